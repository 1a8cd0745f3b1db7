r"""The models of the ListOps comparison (``examples/listops.py``).

Every model is the same recurrent pre-norm encoder: token embeddings, one
block (token mixing, then a GELU feed-forward) applied with shared weights
as many times as the batch's deepest expression is deep plus
:data:`EXTRA_ITERATIONS` (a depth-:math:`D` expression needs :math:`D`
rounds of composition), and a linear readout of the root list's opening
token. Only the token mixing differs:

==================  =========================================================
``hsa``             HSA over the parse tree (:func:`hsa_geo.hierarchy.from_brackets`)
``hsa_pos``         the same, with a learned term per sibling-position pair
``softmax``         flat softmax attention, sinusoidal absolute positions
``softmax_tree``    flat softmax attention given the same tree: tree
                    positional encodings (depth and the path of sibling
                    indices from the root, learned)
``tree_gnn``        message passing along the parse tree's edges (each token
                    to its list's opening token and back)
``gps``             GPS-style: the tree message passing plus flat softmax
                    attention, summed (Rampášek et al., 2022)
``gps_hsa``         the same with HSA over the parse tree in place of flat
                    softmax (no absolute positions: the tree orders the tokens)
``hsa_x2``          ablation: ``hsa`` with two rounds of the block per level
``hsa_gated``       ablation: ``hsa`` whose tokens take each round's update
                    through a learned sigmoid gate, so resolved lists can keep
                    their value
==================  =========================================================

The width of each model is chosen so that its parameter count is within
10 % of ``hsa``'s (:func:`matched_width`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hsa_geo.datasets.listops import CLOSE, OPERATORS, VOCAB_SIZE
from hsa_geo.functional import hsa
from hsa_geo.hierarchy import Hierarchy, from_brackets
from hsa_geo.nn.positional import SiblingPositionBias
from hsa_geo.text.models import packed_softmax_attention

from common import count_parameters  # noqa: E402 (examples/, on the path of its users)
from common import matched_width as closest_width  # noqa: E402

BASE_MODELS = ('hsa', 'hsa_pos', 'softmax', 'softmax_tree', 'tree_gnn', 'gps', 'gps_hsa')
#: ablations of the HSA model: (its token mixing, options of ListOpsModel)
ABLATIONS = {'hsa_x2': ('hsa', dict(rounds_per_level=2)),  # two rounds per level of depth
             'hsa_gated': ('hsa', dict(gated=True))}     # gated updates of the tokens
MODELS = BASE_MODELS + tuple(ABLATIONS)
NUM_CLASSES = 10
#: rounds of the shared block beyond the batch's depth
EXTRA_ITERATIONS = 2
#: widest ListOps family: the operator, 10 arguments and the closing bracket
MAX_CHILDREN = 12
#: deepest level the tree positional encodings distinguish (deeper ones share)
MAX_LEVELS = 20


@dataclass
class ListOpsBatch:
    r"""A packed batch: the token ids of :math:`B` expressions concatenated,
    and what every model may read of their structure (all parsed from the
    brackets)."""
    tokens: Tensor          # [T] token ids
    batch: Tensor           # [T] expression of every token
    root: Tensor            # [B] position of every expression's first token
    hierarchy: Hierarchy    # the parse trees (leaves = tokens)
    parent_token: Tensor    # [T] the opening token of the enclosing list (-1 at roots)
    position: Tensor        # [T] position in the expression
    label: Tensor           # [B]

    @property
    def iterations(self) -> int:
        return self.hierarchy.max_depth + EXTRA_ITERATIONS

    @classmethod
    def collate(cls, tokens: Tensor, ptr: Tensor, label: Tensor) -> 'ListOpsBatch':
        hierarchy = from_brackets(tokens, OPERATORS, [CLOSE], ptr=ptr)
        num_tokens = tokens.numel()
        lengths = ptr.diff()
        batch = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        position = torch.arange(num_tokens) - ptr[:-1][batch]
        return cls(tokens.long(), batch, ptr[:-1].clone(), hierarchy,
                   parent_tokens(hierarchy), position, label)


def parent_tokens(hierarchy: Hierarchy) -> Tensor:
    r"""The parse tree over the tokens alone: the parent of a token is the
    opening token of its list, and that of an opening token the opening
    token of the list around it (:obj:`-1` for a root list's)."""
    num_tokens = hierarchy.num_leaves
    opener = hierarchy.first_leaf            # [N + M]: a list's first token opens it
    own_list = hierarchy.parent[:num_tokens]
    is_opener = opener[own_list] == torch.arange(num_tokens)
    outer_list = hierarchy.parent[own_list]
    outer_opener = torch.where(outer_list >= 0, opener[outer_list.clamp(min=0)],
                               torch.full_like(outer_list, -1))
    return torch.where(is_opener, outer_opener, opener[own_list])


def sinusoidal(position: Tensor, width: int) -> Tensor:
    half = width // 2
    frequency = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angle = position.float()[:, None] * frequency[None, :]
    out = torch.cat([angle.sin(), angle.cos()], dim=1)
    return F.pad(out, (0, width - out.size(1)))


class TreePositions(nn.Module):
    r"""Tree positional encodings: a learned vector per (level, sibling
    index), summed along the path from the root to every token."""

    def __init__(self, width: int):
        super().__init__()
        self.table = nn.Embedding(MAX_LEVELS * (MAX_CHILDREN + 1), width)
        nn.init.normal_(self.table.weight, std=0.1)

    def forward(self, hierarchy: Hierarchy) -> Tensor:
        sibling = hierarchy.sibling_index.clamp(max=MAX_CHILDREN)
        code = hierarchy.depth.clamp(max=MAX_LEVELS - 1) * (MAX_CHILDREN + 1) + sibling
        node = torch.arange(hierarchy.num_leaves)
        out = self.table(code[node])
        below_root = torch.ones_like(node, dtype=torch.bool)
        for _ in range(hierarchy.max_depth - 1):
            up = hierarchy.parent[node]
            node = torch.where(up >= 0, up, node)  # a root stays where it is
            # the root list has no position: nothing is added at or past it
            below_root = below_root & (hierarchy.parent[node] >= 0)
            out = out + self.table(code[node]) * below_root[:, None]
        return out


class TreeMessages(nn.Module):
    r"""One round of message passing along the token tree: every token
    adds a map of the sum of its children and one of its parent to its
    own."""

    def __init__(self, width: int):
        super().__init__()
        self.self_map = nn.Linear(width, width)
        self.child_map = nn.Linear(width, width, bias=False)
        self.parent_map = nn.Linear(width, width, bias=False)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, parent_token: Tensor) -> Tensor:
        has_parent = parent_token >= 0
        child, parent = has_parent.nonzero().squeeze(1), parent_token[has_parent]
        from_children = torch.zeros_like(x).index_add_(0, parent, self.child_map(x[child]))
        from_parent = torch.zeros_like(x)
        from_parent[child] = self.parent_map(x[parent])
        return self.out(F.gelu(self.self_map(x) + from_children + from_parent))


class Attention(nn.Module):
    r"""Multi-head self-attention: HSA over the parse trees or flat softmax
    within every expression."""

    def __init__(self, width: int, heads: int, kind: str, positional: bool = False):
        super().__init__()
        self.heads, self.kind = heads, kind
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.positional = (SiblingPositionBias(heads, MAX_CHILDREN) if positional else None)

    def forward(self, x: Tensor, data: ListOpsBatch, pair_bias: Optional[Tensor]) -> Tensor:
        q, k, v = self.qkv(x).view(x.size(0), 3, self.heads, -1).unbind(1)
        if self.kind == 'hsa':
            y = hsa(q, k, v, data.hierarchy, pair_bias=pair_bias)
        else:
            y = packed_softmax_attention(q, k, v, data.batch)
        return self.out(y.flatten(1))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, name: str):
        super().__init__()
        self.norm_mix, self.norm_ffn = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = None
        if name in ('hsa', 'hsa_pos', 'gps_hsa'):
            self.attention = Attention(width, heads, 'hsa', positional=name == 'hsa_pos')
        elif name in ('softmax', 'softmax_tree', 'gps'):
            self.attention = Attention(width, heads, 'softmax')
        self.messages = TreeMessages(width) if name in ('tree_gnn', 'gps', 'gps_hsa') else None
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                 nn.Linear(2 * width, width))

    def forward(self, x: Tensor, data: ListOpsBatch, pair_bias: Optional[Tensor]) -> Tensor:
        h = self.norm_mix(x)
        mixed = 0
        if self.attention is not None:
            mixed = mixed + self.attention(h, data, pair_bias)
        if self.messages is not None:
            mixed = mixed + self.messages(h, data.parent_token)
        x = x + mixed
        return x + self.ffn(self.norm_ffn(x))


class ListOpsModel(nn.Module):
    r"""The recurrent encoder with the token mixing :obj:`name` (one of
    :data:`MODELS`)."""

    def __init__(self, name: str, width: int = 64, heads: int = 4):
        super().__init__()
        if name not in MODELS:
            raise ValueError(f"unknown ListOps model {name!r}; choose one of {MODELS}")
        mixing, options = ABLATIONS.get(name, (name, {}))
        self.name, self.width = name, width
        self.rounds_per_level = options.get('rounds_per_level', 1)
        self.token = nn.Embedding(VOCAB_SIZE, width)
        self.tree_positions = TreePositions(width) if mixing == 'softmax_tree' else None
        self.absolute_positions = mixing in ('softmax', 'gps')
        self.block = Block(width, heads, mixing)
        self.gate = nn.Linear(width, width) if options.get('gated') else None
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, NUM_CLASSES)

    def forward(self, data: ListOpsBatch, iterations: Optional[int] = None) -> Tensor:
        x = self.token(data.tokens)
        if self.absolute_positions:
            x = x + sinusoidal(data.position, self.width)
        if self.tree_positions is not None:
            x = x + self.tree_positions(data.hierarchy)
        positional = (None if self.block.attention is None else self.block.attention.positional)
        pair_bias = None if positional is None else positional(data.hierarchy)
        if iterations is None:
            iterations = self.rounds_per_level * data.hierarchy.max_depth + EXTRA_ITERATIONS
        for _ in range(iterations):
            update = self.block(x, data, pair_bias)
            if self.gate is not None:
                update = x + torch.sigmoid(self.gate(x)) * (update - x)
            x = update
        return self.head(self.norm(x[data.root]))

    def __repr__(self) -> str:
        return (f'ListOpsModel({self.name!r}, width={self.width}, '
                f'parameters={count_parameters(self)})')


def matched_width(name: str, reference: str = 'hsa', width: int = 64, heads: int = 4) -> int:
    r"""The width (a multiple of :obj:`heads`) at which model :obj:`name`
    has the parameter count closest to :obj:`reference`'s at :obj:`width`."""
    target = count_parameters(ListOpsModel(reference, width, heads))
    return closest_width(lambda w: ListOpsModel(name, w, heads), target, heads, 4 * width)
