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

More models evaluate the tree bottom-up instead (:class:`BottomUpModel`):
HSA's bottom-up sweep with *learned* summaries. Level by level from the
deepest lists up, a list's family -- its operator token, its digits, the
states of its sub-lists (computed at earlier levels) and its closing
bracket, each with its sibling index -- passes through
:data:`FAMILY_LAYERS` shared pre-norm layers, and the list's state is what
its operator token's slot holds at the end. Every list is composed once, so
a batch costs :math:`O(N)` instead of :math:`O(N \cdot D)`. Only the
family mixing differs:

==================  =========================================================
``hsa_bottom_up``   multi-head attention within the family: HSA on the
                    family's flat tree, where it is exactly softmax
``tree_bottom_up``  the same recursion with child-sum mixing (every member
                    adds a map of the family's sum to its own: a child-sum
                    tree network, Tai et al., 2015) -- the baseline given the
                    same tree and the same schedule
``hsa_fold``        ``hsa_bottom_up`` over the *left-folded* parse tree
                    (:func:`left_folded`): a list's members are composed two
                    at a time, left to right (operator with the first
                    argument, that with the second, ..., the last with the
                    closing bracket), so every family has two members
``tree_fold``       ``tree_bottom_up`` over the same left-folded tree
``hsa_values``      ``hsa_bottom_up`` passing every list up as the digit it
                    is predicted to be: the readout applied at every list,
                    its softmax over the digits' token embeddings
``tree_values``     ``tree_bottom_up`` passing lists up the same way
==================  =========================================================

The width of each model is chosen so that its parameter count is within
10 % of ``hsa``'s (:func:`matched_width`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Optional

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


@dataclass(frozen=True)
class BottomUpDesign:
    r"""What distinguishes the bottom-up models: how a family is mixed
    (``'attention'`` or ``'sum'``), whether the parse tree is left-folded
    first, and whether a list is passed up as its predicted value."""
    mixing: str
    folded: bool = False
    values: bool = False


BOTTOM_UP_MODELS = {'hsa_bottom_up': BottomUpDesign('attention'),
                    'tree_bottom_up': BottomUpDesign('sum'),
                    'hsa_fold': BottomUpDesign('attention', folded=True),
                    'tree_fold': BottomUpDesign('sum', folded=True),
                    'hsa_values': BottomUpDesign('attention', values=True),
                    'tree_values': BottomUpDesign('sum', values=True)}
MODELS = BASE_MODELS + tuple(ABLATIONS) + tuple(BOTTOM_UP_MODELS)
#: shared layers a family passes through when its list is composed
FAMILY_LAYERS = 2
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

    @functools.cached_property
    def schedule(self) -> 'FamilySchedule':
        r"""The lists by depth, for the bottom-up models (built on first use)."""
        return family_schedule(self.hierarchy)

    @functools.cached_property
    def folded_schedule(self) -> 'FamilySchedule':
        r"""The same for the left-folded parse tree."""
        return family_schedule(left_folded(self.hierarchy))


@dataclass
class FamilyLevel:
    r"""The lists of one depth: their node ids and their children's node
    ids in sibling order, padded with :obj:`-1` to the widest family of the
    level."""
    lists: Tensor     # [L] cluster node ids
    children: Tensor  # [L, W] node ids, -1 past a family's end


@dataclass
class FamilySchedule:
    r"""The families of a tree in an order that composes every list after
    its sub-lists: by depth, deepest first."""
    num_nodes: int
    levels: List[FamilyLevel]


def left_folded(hierarchy: Hierarchy) -> Hierarchy:
    r"""The tree in which every family of :math:`b > 2` children
    :math:`c_0, \dots, c_{b-1}` (in sibling order) becomes a left-leaning
    chain of families of two: :math:`a_1 = (c_0, c_1)`,
    :math:`a_j = (a_{j-1}, c_j)`, the family's own node being
    :math:`a_{b-1}`. The chain nodes :math:`a_1 \dots a_{b-2}` are new
    clusters after the old ones; leaves, old clusters and roots keep their
    ids."""
    num_leaves, num_nodes = hierarchy.num_leaves, hierarchy.num_nodes
    parent = hierarchy.parent
    child = (parent >= 0).nonzero().squeeze(1)
    family, index = parent[child], hierarchy.sibling_index[child]
    size = hierarchy.num_children[family]
    extra = (hierarchy.num_children[num_leaves:] - 2).clamp(min=0)
    offset = num_nodes + torch.cumsum(extra, 0) - extra  # first chain node of every family
    offset = torch.cat([torch.zeros(num_leaves, dtype=torch.long), offset])

    def chain(mask: Tensor, position: Tensor) -> Tensor:  # a_j of the masked children's families
        return torch.where(position >= size[mask] - 1, family[mask],
                           offset[family[mask]] + position - 1)

    new_parent = torch.full((num_nodes + int(extra.sum()), ), -1, dtype=torch.long)
    new_parent[:num_nodes] = parent
    every = torch.ones_like(child, dtype=torch.bool)
    new_parent[child] = chain(every, index.clamp(min=1))
    link = (index >= 1) & (index < size - 1)   # a_j -> a_{j+1} for j < b - 1
    new_parent[chain(link, index[link])] = chain(link, index[link] + 1)
    return Hierarchy.from_parent(new_parent, num_leaves, ordered=True)


def family_schedule(hierarchy: Hierarchy) -> FamilySchedule:
    r"""The families of :obj:`hierarchy` level by level in the order of
    its family tables (:meth:`~hsa_geo.Hierarchy.family_tables`: deepest
    first), so every list comes after all of its sub-lists."""
    tables = hierarchy.family_tables()
    sizes = tables.child_ptr.diff()
    family = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    slot = torch.arange(tables.children.numel()) - tables.child_ptr[:-1][family]
    table = torch.full((sizes.numel(), int(sizes.max())), -1, dtype=torch.long)
    table[family, slot] = tables.children
    bounds = tables.level_ptr.tolist()
    levels = [FamilyLevel(tables.family_node[first:last],
                          table[first:last, :int(sizes[first:last].max())])
              for first, last in zip(bounds[:-1], bounds[1:])]
    return FamilySchedule(hierarchy.num_nodes, levels)


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


class FamilyLayer(nn.Module):
    r"""One pre-norm layer over the members of families ``[L, W, width]``:
    mixing (multi-head attention within the family, or child-sum), then a
    GELU feed-forward."""

    def __init__(self, width: int, heads: int, mixing: str):
        super().__init__()
        self.heads, self.mixing = heads, mixing
        self.norm_mix, self.norm_ffn = nn.LayerNorm(width), nn.LayerNorm(width)
        if mixing == 'attention':
            self.qkv = nn.Linear(width, 3 * width)
        else:
            self.self_map = nn.Linear(width, width)
            self.sum_map = nn.Linear(width, width, bias=False)
        self.out = nn.Linear(width, width)
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                 nn.Linear(2 * width, width))

    def forward(self, x: Tensor, member: Tensor) -> Tensor:
        h = self.norm_mix(x)
        if self.mixing == 'attention':
            q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
            mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=member[:, None, None, :])
            mixed = mixed.transpose(1, 2).flatten(2)
        else:
            total = (self.sum_map(h) * member[..., None]).sum(1, keepdim=True)
            mixed = F.gelu(self.self_map(h) + total)
        x = x + self.out(mixed) * member[..., None]
        return x + self.ffn(self.norm_ffn(x))


class BottomUpModel(nn.Module):
    r"""HSA's bottom-up sweep with learned summaries (see the module's
    docstring): the state of every list is composed from its family once
    its sub-lists' states are known, by :data:`FAMILY_LAYERS` layers shared
    by every level; the root lists' states are read out."""

    def __init__(self, name: str, width: int = 64, heads: int = 4):
        super().__init__()
        self.name, self.width = name, width
        self.design = BOTTOM_UP_MODELS[name]
        self.token = nn.Embedding(VOCAB_SIZE, width)
        self.sibling = nn.Embedding(MAX_CHILDREN, width)
        self.layers = nn.ModuleList(FamilyLayer(width, heads, self.design.mixing)
                                    for _ in range(FAMILY_LAYERS))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, NUM_CLASSES)

    def forward(self, data: ListOpsBatch) -> Tensor:
        return self.list_logits(data)[data.hierarchy.roots]

    def list_logits(self, data: ListOpsBatch) -> Tensor:
        r"""The readout at every list: logits ``[num_nodes, 10]`` over the
        schedule's nodes (zero at the tokens; the folded tree's chain nodes
        have rows too); :meth:`forward` returns the root lists' rows."""
        state = self.token(data.tokens)
        schedule = data.folded_schedule if self.design.folded else data.schedule
        state = torch.cat([state, state.new_zeros(schedule.num_nodes - state.size(0),
                                                  self.width)])
        logits = state.new_zeros(schedule.num_nodes, NUM_CLASSES)
        digits = self.token.weight[:NUM_CLASSES]  # a digit's token id is its value
        for level in schedule.levels:
            member = level.children >= 0
            x = state[level.children.clamp(min=0)] * member[..., None]
            x = x + self.sibling.weight[:x.size(1)]
            for layer in self.layers:
                x = layer(x, member)
            summary = x[:, 0]
            level_logits = self.head(self.norm(summary))
            if self.design.values:  # the list goes up as the digit it is predicted to be
                summary = level_logits.softmax(-1) @ digits
            state = state.index_copy(0, level.lists, summary)
            logits = logits.index_copy(0, level.lists, level_logits)
        return logits

    def __repr__(self) -> str:
        return (f'BottomUpModel({self.name!r}, width={self.width}, '
                f'parameters={count_parameters(self)})')


def build_model(name: str, width: int = 64, heads: int = 4) -> nn.Module:
    r"""The ListOps model :obj:`name` (one of :data:`MODELS`)."""
    if name in BOTTOM_UP_MODELS:
        return BottomUpModel(name, width, heads)
    return ListOpsModel(name, width, heads)


def matched_width(name: str, reference: str = 'hsa', width: int = 64, heads: int = 4) -> int:
    r"""The width (a multiple of :obj:`heads`) at which model :obj:`name`
    has the parameter count closest to :obj:`reference`'s at :obj:`width`."""
    target = count_parameters(build_model(reference, width, heads))
    return closest_width(lambda w: build_model(name, w, heads), target, heads, 4 * width)
