r"""Small text classifiers for the from-scratch IMDB experiment (paper
§4.1): one pre-norm transformer encoder whose attention is either HSA over
the document hierarchy or flat softmax attention, and a mean-pooled
embedding baseline. Documents are packed (no padding): tokens of all
documents of a batch are concatenated and :obj:`batch` names their document."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.utils import to_dense_batch

from hsa_geo.functional import hsa
from hsa_geo.hierarchy.builders.limits import DEFAULT_MAX_CHILDREN
from hsa_geo.hierarchy.hierarchy import Hierarchy
from hsa_geo.nn.positional import SiblingPositionBias

ATTENTIONS = ('hsa', 'softmax')
#: how a token's position enters :class:`TextClassifier`
POSITIONS = ('absolute', 'none')
#: HSA with the paper's full energy (issue 6): keyword arguments of
#: :class:`TextClassifier` per variant name -- plain HSA, with a learned
#: positional term per sibling pair, and with the Euclidean energy as well
HSA_VARIANTS = {'hsa': {}, 'hsa_pos': dict(positional='learned'),
                'hsa_euclid_pos': dict(positional='learned', energy='euclidean')}


def packed_softmax_attention(q: Tensor, k: Tensor, v: Tensor, batch: Tensor) -> Tensor:
    r"""Softmax attention inside every document of a packed batch:
    ``[T, H, D]`` in and out, padding masked out of the keys."""
    q_dense, mask = to_dense_batch(q.flatten(1), batch)  # [B, L, H*D]
    k_dense, _ = to_dense_batch(k.flatten(1), batch)
    v_dense, _ = to_dense_batch(v.flatten(1), batch)
    size, length = mask.shape
    heads = q.size(1)

    def split(x: Tensor) -> Tensor:
        return x.view(size, length, heads, -1).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q_dense), split(k_dense), split(v_dense),
                                         attn_mask=mask[:, None, None, :])
    return out.transpose(1, 2)[mask]


class TextAttention(nn.Module):
    r"""Multi-head self-attention over packed documents: HSA over a forest
    (one tree per document) or flat softmax per document. HSA may use the
    paper's full energy: a learned positional term per sibling pair
    (:class:`~hsa_geo.nn.SiblingPositionBias`, the position of a sentence in
    its document, of a word in its sentence, ...; :obj:`positional`) and the
    Euclidean energy (:obj:`energy`)."""

    def __init__(self, width: int, heads: int, attention: str = 'hsa', dropout: float = 0.0,
                 positional: Optional[str] = None, energy: str = 'dot',
                 max_children: int = DEFAULT_MAX_CHILDREN):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"'attention' must be one of {ATTENTIONS} (got {attention!r})")
        if width % heads != 0:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        if attention != 'hsa' and (positional is not None or energy != 'dot'):
            raise ValueError("'positional' and 'energy' are options of HSA attention")
        self.heads, self.attention, self.energy = heads, attention, energy
        self.positional = (None if positional is None
                           else SiblingPositionBias(heads, max_children, kind=positional))
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, batch: Tensor, hierarchy: Optional[Hierarchy]) -> Tensor:
        q, k, v = self.qkv(x).view(x.size(0), 3, self.heads, -1).unbind(1)
        if self.attention == 'hsa':
            if hierarchy is None:
                raise ValueError("HSA attention needs the hierarchy forest of the batch")
            pair_bias = None if self.positional is None else self.positional(hierarchy)
            y = hsa(q, k, v, hierarchy, pair_bias=pair_bias, energy=self.energy)
        else:
            y = packed_softmax_attention(q, k, v, batch)
        return self.dropout(self.out(y.flatten(1)))


class TextEncoderLayer(nn.Module):
    r"""Pre-norm transformer layer: attention then a GELU feed-forward."""

    def __init__(self, width: int, heads: int, attention: str, dropout: float,
                 **attention_kwargs):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = TextAttention(width, heads, attention, dropout, **attention_kwargs)
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(2 * width, width), nn.Dropout(dropout))

    def forward(self, x: Tensor, batch: Tensor, hierarchy: Optional[Hierarchy]) -> Tensor:
        x = x + self.attn(self.norm1(x), batch, hierarchy)
        return x + self.ffn(self.norm2(x))


class TextClassifier(nn.Module):
    r"""Token (+ position) embeddings, :obj:`depth` encoder layers with
    :obj:`attention` (``'hsa'`` or ``'softmax'``), mean pooling per document
    and a linear head.

    Args:
        vocab_size (int): Number of token ids.
        num_classes (int): Output classes.
        width (int, optional): Model width. (default: :obj:`64`)
        depth (int, optional): Encoder layers. (default: :obj:`2`)
        heads (int, optional): Attention heads. (default: :obj:`4`)
        max_tokens (int, optional): Longest document (positions).
            (default: :obj:`512`)
        attention (str, optional): ``'hsa'`` or ``'softmax'``.
            (default: :obj:`'hsa'`)
        dropout (float, optional): Dropout. (default: :obj:`0.1`)
        positions (str, optional): ``'absolute'`` (a learned embedding of
            the position in the document is added to every token) or
            ``'none'`` (the model sees positions only through the
            hierarchy, if at all). (default: :obj:`'absolute'`)
        pretrained_embeddings (torch.Tensor, optional): A frozen
            ``[vocab_size, E]`` token embedding table (e.g. a pretrained
            model's word-piece embeddings) read through a learned linear
            map to :obj:`width`, instead of embeddings learned from
            scratch. Not saved in :meth:`state_dict`. (default: :obj:`None`)
        **attention_kwargs (optional): :obj:`positional`, :obj:`energy`
            and :obj:`max_children` of :class:`TextAttention` (HSA only).

    Shapes:
        input: token ids ``[T]``, position in document ``[T]``, document id
        ``[T]`` (sorted), and for HSA a :class:`Hierarchy` forest over the
        :math:`T` tokens; output: logits ``[B, num_classes]``.
    """

    def __init__(self, vocab_size: int, num_classes: int, width: int = 64, depth: int = 2,
                 heads: int = 4, max_tokens: int = 512, attention: str = 'hsa',
                 dropout: float = 0.1, positions: str = 'absolute',
                 pretrained_embeddings: Optional[Tensor] = None, **attention_kwargs):
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"'positions' must be one of {POSITIONS} (got {positions!r})")
        self.attention = attention
        if pretrained_embeddings is None:
            self.token = nn.Embedding(vocab_size, width)
        else:
            if pretrained_embeddings.dim() != 2 or pretrained_embeddings.size(0) != vocab_size:
                raise ValueError(f"'pretrained_embeddings' must be [vocab_size={vocab_size}, E] "
                                 f"(got {tuple(pretrained_embeddings.shape)})")
            self.token = FrozenEmbedding(pretrained_embeddings, width)
        self.position = nn.Embedding(max_tokens, width) if positions == 'absolute' else None
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TextEncoderLayer(width, heads, attention, dropout, **attention_kwargs)
            for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, input_ids: Tensor, position: Tensor, batch: Tensor,
                hierarchy: Optional[Hierarchy] = None) -> Tensor:
        x = self.token(input_ids)
        if self.position is not None:
            x = x + self.position(position)
        x = self.dropout(x)
        for layer in self.layers:
            x = layer(x, batch, hierarchy)
        return self.head(_mean_pool(self.norm(x), batch))

    @classmethod
    def from_variant(cls, name: str, vocab_size: int, num_classes: int,
                     **kwargs) -> 'TextClassifier':
        r"""The classifier with :obj:`"softmax"` attention or one of the HSA
        variants of :data:`HSA_VARIANTS`; :obj:`kwargs` as in the
        constructor (:obj:`max_children` only matters with positions)."""
        if name == 'softmax':
            return cls(vocab_size, num_classes, attention='softmax', **kwargs)
        if name not in HSA_VARIANTS:
            raise ValueError(f"Unknown variant {name!r}; choose 'softmax' or one of "
                             f"{list(HSA_VARIANTS)}")
        return cls(vocab_size, num_classes, attention='hsa', **HSA_VARIANTS[name], **kwargs)

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(attention={self.attention!r}, '
                f'width={self.head.in_features}, depth={len(self.layers)}, '
                f"positions={'absolute' if self.position is not None else 'none'!r}, "
                f"embeddings={'frozen' if isinstance(self.token, FrozenEmbedding) else 'learned'!r})")


class FrozenEmbedding(nn.Module):
    r"""A frozen embedding table (a buffer, left out of the state dict)
    followed by a learned linear map to :obj:`width`."""

    def __init__(self, table: Tensor, width: int):
        super().__init__()
        self.register_buffer('table', table.detach().clone(), persistent=False)
        self.project = nn.Linear(table.size(1), width)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.project(F.embedding(input_ids, self.table))


class MeanPoolClassifier(nn.Module):
    r"""The cheap baseline: mean of the token embeddings per document, then
    a two-layer MLP of the same width. Same call signature as
    :class:`TextClassifier` (positions and hierarchy are ignored)."""

    def __init__(self, vocab_size: int, num_classes: int, width: int = 64,
                 dropout: float = 0.1, **kwargs):
        super().__init__()
        self.attention = 'none'
        self.token = nn.Embedding(vocab_size, width)
        self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, width), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(width, num_classes))

    def forward(self, input_ids: Tensor, position: Tensor, batch: Tensor,
                hierarchy: Optional[Hierarchy] = None) -> Tensor:
        return self.mlp(_mean_pool(self.token(input_ids), batch))


def _mean_pool(x: Tensor, batch: Tensor) -> Tensor:
    size = int(batch.max()) + 1 if batch.numel() else 0
    total = x.new_zeros(size, x.size(1)).index_add_(0, batch, x)
    count = torch.bincount(batch, minlength=size).clamp(min=1).to(x.dtype)
    return total / count[:, None]
