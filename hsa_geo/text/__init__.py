r"""Text as a nested signal: offline WordPiece tokenisation, the IMDB reviews
with a seeded split, document → sentence → word → word-piece hierarchies, and
the small from-scratch text encoders of the paper's §4.1 experiment."""
from hsa_geo.text.tokenize import (TokenizedDocument, clean_review, load_wordpiece_tokenizer,
                                   strip_special_tokens, tokenize_documents)
from hsa_geo.text.imdb import load_imdb, make_split, load_split
from hsa_geo.text.hierarchy import document_hierarchy, sentence_groups
from hsa_geo.text.models import (HSA_VARIANTS, MeanPoolClassifier, TextClassifier,
                                 packed_softmax_attention)
from hsa_geo.text.corpus import TextCorpus

__all__ = [
    'TokenizedDocument', 'clean_review', 'load_wordpiece_tokenizer', 'strip_special_tokens',
    'tokenize_documents',
    'load_imdb', 'make_split', 'load_split', 'document_hierarchy', 'sentence_groups',
    'HSA_VARIANTS', 'MeanPoolClassifier', 'TextClassifier', 'packed_softmax_attention',
    'TextCorpus'
]
