r"""Zero-shot HSA in pretrained transformers: swap the softmax attention of
chosen layers for HSA (or block-local attention) computed from each layer's
own projections, without training; undo at will. Needs ``transformers``
(extra ``[hf]``) only to load a model."""
from hsa_geo.pretrained.inject import (HSAInjection, KeyClustering, KeyClusters,
                                       find_self_attention_modules, inject_hsa)
from hsa_geo.pretrained.minilm import encode_documents, load_minilm

__all__ = ['HSAInjection', 'KeyClustering', 'KeyClusters', 'inject_hsa', 'find_self_attention_modules', 'load_minilm',
           'encode_documents']
