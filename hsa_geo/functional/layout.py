r"""The slot layout: where the fused HSA sweeps keep every node's rows.

HSA's sweeps visit families level by level (the depth of the parent),
deepest first on the way up. Every node except a root is the child of
exactly one family, so one arrangement of the nodes can make the children
of every family a contiguous run: family :math:`A` with :math:`b_A`
children takes :math:`w \ge b_A` consecutive *slots* (the children in
sibling order, then :math:`w - b_A` padding slots), and the families of one
level whose widths fall in one *bucket* share a :class:`LayoutBlock`, an
``[F, w]`` grid of slots. A block's sibling interactions are then one
batched matrix product, and reading or writing its children is a view of a
slot buffer instead of a gather or a scatter. Padding slots are masked:
:math:`\log|C| = -\infty` keeps them out of every softmax and a zero share
keeps them out of every mean.

Only three index operations per level remain (the parents' means written to
their slots on the way up, the parents' state read on the way down, both in
the forward and in the backward pass), plus one gather of the leaves on
entry and one on exit.

Buckets are chosen per level by a small dynamic program over the family
widths present, minimising :math:`\sum_\text{blocks} (c_0 + c_1 F w^2)`
with :data:`BLOCK_COST` :math:`= c_0 / c_1` measured on this engine (a
block's fixed cost of some forty tensor operations against the cost of one
padded sibling pair; ``python -m benchmarks.batches --calibrate``):
batches of small graphs get one or two blocks per level, while a level of
families whose widths differ a lot keeps them apart rather than pad the
narrow ones to the widest.

A block whose children are all leaves, in leaf order and without padding
(the leaf level of a tree over a sequence), is a *leaf range*: it reads the
inputs and writes the outputs in place and takes no slots, so the inputs
are never copied when every leaf lives in such a block.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch
from torch import Tensor

if TYPE_CHECKING:  # sweep imports this module, not the reverse
    from hsa_geo.functional.sweep import Constants

#: Fixed cost of one block relative to one padded sibling pair, per head
#: (see the module docstring); measured by
#: ``python -m benchmarks.batches --calibrate`` on the 2-core CPU.
BLOCK_COST = 4096

#: Upper bound on padded sibling pairs (F * w * w) of one block on CPU, so a
#: block's temporaries stay cache- and memory-friendly at any N; a GPU plan
#: uses a much larger bound (few, large launches).
PAIRS_PER_BLOCK = 1 << 16


@dataclass
class LayoutBlock:
    r"""Families of one level padded to a common width: an ``[F, w]``
    grid of slots."""
    level: int  #: depth of the parent clusters
    index: int  #: position in :attr:`SlotLayout.blocks`
    num_families: int  #: F
    width: int  #: w, the padded number of children
    slot_start: int  #: first slot in the slot space of all blocks
    pair_start: int  #: first padded pair (F * w * w per block)
    family_start: int  #: first family in the family space of all blocks
    #: first row of the block in the row space of the slot buffers, or
    #: ``-1`` for a leaf range
    row_start: int
    #: ``(start, end)`` leaf ids when the block is a leaf range
    leaf_range: Optional[Tuple[int, int]]
    share: Tensor  #: ``[F, w]`` :math:`|B| / |A|`, 0 at padding
    count: Tensor  #: ``[F, w]`` :math:`|B|`, the leaves below each child, 0 at padding
    cluster: Tensor  #: ``[F, w]`` (bool) the cluster children
    #: the tensor sweeps' per-slot constants per (dtype, causal), built on
    #: first use (:func:`hsa_geo.functional.sweep.constants`)
    constants: Dict[Tuple[torch.dtype, bool], Constants] = field(
        default_factory=dict, repr=False, compare=False)

    @property
    def num_slots(self) -> int:
        return self.num_families * self.width

    @property
    def num_pairs(self) -> int:
        return self.num_families * self.width * self.width

    def to(self, device) -> 'LayoutBlock':
        return LayoutBlock(**{f.name: _move(getattr(self, f.name), device) for f in fields(self)
                              if f.name != 'constants'})

    def __setstate__(self, state):
        # a block pickled by an earlier version may hold its constants
        # outside the dataclass's fields: start with none (built on first use)
        state = {name: value for name, value in state.items() if name != '_constants'}
        state.setdefault('constants', {})
        self.__dict__.update(state)


@dataclass
class LayoutLevel:
    r"""The blocks of one level and the slots of their parents."""
    level: int
    blocks: List[LayoutBlock]
    #: ``[F_level]`` slot of every family's parent, families in block order
    parent_slot: Tensor

    @property
    def num_families(self) -> int:
        return self.parent_slot.numel()

    def to(self, device) -> 'LayoutLevel':
        return LayoutLevel(self.level, [b.to(device) for b in self.blocks],
                           self.parent_slot.to(device))


@dataclass
class SlotRows:
    r"""Row indices of the slot buffers that the sweeps use on every call,
    built on first use (see :class:`SlotLayout`)."""
    #: number of heads -> ``[L, H]`` rows of the slotted leaves
    leaves: Dict[int, Tensor] = field(default_factory=dict)
    #: number of heads -> ``[H * rows]`` source leaf row of every buffer row
    sources: Dict[int, Tensor] = field(default_factory=dict)
    #: (level, number of heads) -> ``[H * F]`` rows of the level's parents
    parents: Dict[Tuple[int, int], Tensor] = field(default_factory=dict)


@dataclass(eq=False)  # compared (and hashed) by identity
class SlotLayout:
    r"""Everything the fused sweeps need, computed once per hierarchy.

    Slot buffers hold one row per head and slot for the slots of the blocks
    that are not leaf ranges, and for the roots (after all blocks); within
    the row space, a block is head-major (``[H, F * w]`` rows), so its
    children are the contiguous view ``[H, F, w, C]``. Slots are numbered
    over all blocks, leaf ranges included (pair and weight buffers use
    them), with the roots after the last block."""
    num_leaves: int
    num_nodes: int
    levels: List[LayoutLevel]  #: bottom-up order (deepest level first)
    num_slots: int  #: slots of all blocks
    num_pairs: int  #: padded pairs of all blocks
    num_families: int  #: families (= clusters) of all blocks
    num_rows: int  #: rows per head of the slot buffers (roots included)
    root_row: int  #: first root row (per head): the roots' rows are the buffers' last
    node_slot: Tensor  #: ``[N + M]`` slot of every node (roots: after the blocks)
    #: ``[num_slots + num_roots]`` row (per head) of every slot in the slot
    #: buffers, ``-1`` in leaf ranges
    slot_row: Tensor
    #: ``[num_slots + num_roots]`` block of every slot (index into
    #: :attr:`blocks`; the roots count as one more block)
    slot_block: Tensor
    slotted_leaves: Tensor  #: leaves outside leaf ranges (not isolated)
    isolated_leaves: Tensor  #: leaves that are roots of their own tree
    sibling_index: Tensor  #: ``[N + M]`` position among siblings (0 at roots)
    #: ``[4, K]`` pair start, families, width and slot start of every block
    block_table: Tensor
    #: ``[2, K + 1]`` first row and rows (per head) of every block, the
    #: roots last
    row_table: Tensor
    #: leaves that have a pair of their own (not isolated), and its position
    #: in a per-pair buffer
    paired_leaves: Optional[Tensor] = None
    leaf_pair_positions: Optional[Tensor] = None
    #: row indices built on first use, see :meth:`leaf_rows`,
    #: :meth:`source_rows` and :meth:`parent_rows`
    _rows: SlotRows = field(default_factory=SlotRows, repr=False, compare=False)

    @property
    def blocks(self) -> List[LayoutBlock]:
        return [block for level in self.levels for block in level.blocks]

    def pair_positions(self, slots: Tensor, columns: Tensor) -> Tensor:
        r"""Positions in a per-pair buffer ``[H, P]`` (families innermost:
        block ``[w, w, F]``) of the pairs (child in slot :obj:`slots`,
        sibling in column :obj:`columns`)."""
        pair_start, num_families, width, slot_start = self.block_table[:, self.slot_block[slots]]
        local = slots - slot_start
        family, row = local // width, local % width
        return pair_start + (row * width + columns) * num_families + family

    def leaf_diagonal(self, padded: Tensor) -> Tensor:
        r"""``[N, H]`` entries of the leaves' own pairs :math:`(i, i)` in a
        per-pair buffer ``[H, P]`` (0 for a leaf that is a root of its own)."""
        values = padded[:, self.leaf_pair_positions].t()
        if self.paired_leaves.numel() == self.num_leaves:
            return values
        out = padded.new_zeros(self.num_leaves, padded.size(0))
        out[self.paired_leaves] = values
        return out

    def rows(self, slots: Tensor, heads: int) -> Tensor:
        r"""``[len(slots), H]`` rows of :obj:`slots` for every head."""
        start, size = self.row_table[:, self.slot_block[slots], None]
        head = torch.arange(heads, device=slots.device)
        return heads * start + head * size + self.slot_row[slots, None] - start

    def leaf_rows(self, heads: int) -> Tensor:
        r"""``[L, H]`` rows of :attr:`slotted_leaves` (built once per
        number of heads)."""
        cache = self._rows.leaves
        if heads not in cache:
            cache[heads] = self.rows(self.node_slot[self.slotted_leaves], heads)
        return cache[heads]

    def source_rows(self, heads: int) -> Tensor:
        r"""``[H * rows]`` the leaf row that fills every buffer row, in
        leaf rows ``[(N + 1) * H]`` (leaf :math:`i`, head :math:`h` at
        ``i * H + h``; the extra leaf :math:`N` is zeros); built once per
        number of heads."""
        cache = self._rows.sources
        if heads not in cache:
            rows = torch.arange(heads, device=self.node_slot.device).repeat(self.num_rows)
            rows += heads * self.num_leaves
            leaves = self.slotted_leaves
            targets = self.rows(self.node_slot[leaves], heads)
            rows[targets.view(-1)] = (heads * leaves[:, None]
                                      + torch.arange(heads, device=leaves.device)).view(-1)
            cache[heads] = rows
        return cache[heads]

    def parent_rows(self, index: int, heads: int) -> Tensor:
        r"""``[H * F]`` rows of the parents of level :obj:`index` (of
        :attr:`levels`), in the block-major, head-major order of the family
        buffers; built once per level and number of heads."""
        cache = self._rows.parents
        key = (index, heads)
        if key not in cache:
            level = self.levels[index]
            parts, start = [], 0
            for block in level.blocks:
                slots = level.parent_slot[start:start + block.num_families]
                parts.append(self.rows(slots, heads).t().reshape(-1))
                start += block.num_families
            cache[key] = torch.cat(parts)
        return cache[key]

    def __setstate__(self, state):
        # a layout pickled by an earlier version holds its rows in a dict
        # keyed by strings: start with empty rows (built on first use)
        if not isinstance(state.get('_rows'), SlotRows):
            state = dict(state, _rows=SlotRows())
        self.__dict__.update(state)

    def to(self, device) -> 'SlotLayout':
        if torch.device(device) == self.node_slot.device:
            return self
        return SlotLayout(**{f.name: (SlotRows() if f.name == '_rows'
                                      else _move(getattr(self, f.name), device))
                             for f in fields(self)})


def _move(value, device):
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [item.to(device) for item in value]
    return value


def choose_buckets(widths: List[int], counts: List[int],
                   block_cost: float = BLOCK_COST) -> List[Tuple[int, int]]:
    r"""Groups sorted distinct family widths (with :obj:`counts` families
    each) into buckets, each padded to its widest member, minimising
    :math:`\sum (c + F w^2)` over buckets (:math:`c` = :obj:`block_cost`,
    :math:`F` families of padded width :math:`w`) among the groupings that
    pad no family beyond twice its width (all groupings when one bucket for
    everything costs less than :math:`c`). Returns ``(first, last)`` index
    ranges into :obj:`widths`. :math:`O(W^2)` for :math:`W` widths at most,
    linear in practice.

    Example::

        >>> choose_buckets([2, 3, 4], [10, 30, 5])      # few families: one block
        [(0, 2)]
        >>> choose_buckets([2, 3, 4], [1000, 300, 5])   # many narrow ones stay apart
        [(0, 0), (1, 2)]
        >>> choose_buckets([2, 32], [1000, 100])        # far apart: two blocks
        [(0, 0), (1, 1)]
    """
    size = len(widths)
    best = [0.0] + [float('inf')] * size
    choice = [0] * (size + 1)
    prefix = [0]
    for count in counts:
        prefix.append(prefix[-1] + count)
    for end in range(1, size + 1):
        width = widths[end - 1]
        # padding a family to more than twice its width never pays off
        # against one more block unless the block cost is huge; the bound
        # keeps the programme linear in the number of widths
        first = 0 if block_cost >= width * width * prefix[end] else end - 1
        while first > 0 and 2 * widths[first - 1] >= width:
            first -= 1
        for start in range(first, end):
            cost = best[start] + block_cost + (prefix[end] - prefix[start]) * width * width
            if cost < best[end]:
                best[end], choice[end] = cost, start
    groups, end = [], size
    while end > 0:
        groups.append((choice[end], end - 1))
        end = choice[end]
    return groups[::-1]


def build_slot_layout(parent: Tensor, num_leaves: int, depth: Tensor, num_leaves_below: Tensor,
                      first_leaf: Tensor, pairs_per_block: int = PAIRS_PER_BLOCK,
                      block_cost: float = BLOCK_COST) -> SlotLayout:
    r"""Lays out the families of a validated hierarchy (CPU tensors) in
    padded blocks. Siblings are ordered by their first leaf, families within
    a block by theirs.

    Cost: a few sorts over the :math:`N + M` nodes; the per-block work is a
    Python step over a handful of integers, everything per node or per slot
    is vectorised.
    """
    num_nodes = parent.numel()
    is_root = parent < 0
    child = (~is_root).nonzero().view(-1)
    family_of_child = parent[child]
    num_children = torch.bincount(family_of_child, minlength=num_nodes)

    # siblings ordered by first leaf: the rank of a child in its family
    order = torch.argsort(family_of_child * (num_leaves + 1) + first_leaf[child])
    child, family_of_child = child[order], family_of_child[order]
    family_first_child = torch.cumsum(num_children, 0) - num_children
    sibling_index = torch.zeros(num_nodes, dtype=torch.long)
    sibling_index[child] = torch.arange(child.numel()) - family_first_child[family_of_child]

    # families by (level descending, width): the widths present per level
    families = torch.arange(num_leaves, num_nodes)
    width_of = num_children[families]
    level_of = depth[families]
    largest = int(width_of.max()) if families.numel() else 0
    level_width = (int(level_of.max()) - level_of if families.numel() else level_of) * (largest + 1) + width_of
    keys, per_key = torch.unique(level_width, return_counts=True)
    levels_of_key = (int(level_of.max()) - keys // (largest + 1)).tolist() if families.numel() else []
    widths_of_key, per_key = (keys % (largest + 1)).tolist(), per_key.tolist()
    # buckets per level (dynamic programme), then chunks of bounded size
    bucket_of_key = torch.zeros(keys.numel(), dtype=torch.long)
    bucket_width, bucket_level = [], []
    start = 0
    while start < len(keys):
        end = start
        while end < len(keys) and levels_of_key[end] == levels_of_key[start]:
            end += 1
        for first, last in choose_buckets(widths_of_key[start:end], per_key[start:end], block_cost):
            bucket_of_key[start + first:start + last + 1] = len(bucket_width)
            bucket_width.append(widths_of_key[start + last])
            bucket_level.append(levels_of_key[start])
        start = end
    bucket = bucket_of_key[torch.searchsorted(keys, level_width)]
    order = torch.argsort(first_leaf[families])
    order = order[torch.argsort(bucket[order], stable=True)]
    families, bucket = families[order], bucket[order]
    per_bucket = torch.bincount(bucket, minlength=len(bucket_width)).tolist()

    # blocks: (level, width, first family, number of families)
    blocks_meta = []
    first_family = 0
    for index, count in enumerate(per_bucket):
        width = bucket_width[index]
        step = max(1, pairs_per_block // (width * width))
        for chunk in range(0, count, step):
            blocks_meta.append((bucket_level[index], width, first_family + chunk,
                                min(step, count - chunk)))
        first_family += count
    num_blocks = len(blocks_meta)
    block_width = torch.tensor([m[1] for m in blocks_meta], dtype=torch.long)
    block_families = torch.tensor([m[3] for m in blocks_meta], dtype=torch.long)
    block_slots = block_width * block_families
    block_slot_start = torch.cumsum(block_slots, 0) - block_slots
    num_slots = int(block_slots.sum())

    # slots: family f of block k owns slots start_k + f * w_k .. + w_k - 1
    family_block = torch.repeat_interleave(torch.arange(num_blocks), block_families)
    family_rank = torch.arange(families.numel()) - (torch.cumsum(block_families, 0)
                                                    - block_families)[family_block]
    family_slot = block_slot_start[family_block] + family_rank * block_width[family_block]
    family_slot_of_node = torch.zeros(num_nodes, dtype=torch.long)
    family_slot_of_node[families] = family_slot
    node_slot = torch.full((num_nodes, ), -1, dtype=torch.long)
    node_slot[child] = family_slot_of_node[family_of_child] + sibling_index[child]
    slot_node = torch.full((num_slots, ), -1, dtype=torch.long)
    slot_node[node_slot[child]] = child
    slot_block = torch.repeat_interleave(torch.arange(num_blocks), block_slots)
    slot_parent = torch.repeat_interleave(families, block_width[family_block])

    # leaf ranges: no padding, all leaves, consecutive ids in slot order
    present = slot_node >= 0
    offset = slot_node - torch.arange(num_slots)
    good = present & (slot_node < num_leaves) & (offset == offset[block_slot_start][slot_block])
    is_range = torch.ones(num_blocks, dtype=torch.bool).scatter_reduce_(
        0, slot_block, good, 'amin') if num_slots else torch.zeros(0, dtype=torch.bool)
    range_slot = is_range[slot_block]

    # rows of the slot buffers: the slots of the other blocks, then the roots
    roots = is_root.nonzero().view(-1)
    block_rows = torch.where(is_range, 0, block_slots)
    block_row_start = torch.cumsum(block_rows, 0) - block_rows
    num_block_rows = int(block_rows.sum())
    slot_row = torch.where(range_slot, -1, block_row_start[slot_block] + torch.arange(num_slots)
                           - block_slot_start[slot_block])
    node_slot[roots] = torch.arange(num_slots, num_slots + roots.numel())
    slot_row = torch.cat([slot_row, torch.arange(num_block_rows, num_block_rows + roots.numel())])
    # per-slot constants, viewed per block
    count = num_leaves_below.to(torch.float64)
    slot_count = torch.where(present, count[slot_node.clamp(min=0)], 0.0)
    share = slot_count / count[slot_parent]
    cluster = slot_node >= num_leaves

    levels: List[LayoutLevel] = []
    pair_start = 0
    leaf_start = slot_node[block_slot_start.clamp(max=max(num_slots - 1, 0))].tolist() if num_slots else []
    range_list, row_start_list = is_range.tolist(), block_row_start.tolist()
    slot_start_list, family_start_list = block_slot_start.tolist(), (
        torch.cumsum(block_families, 0) - block_families).tolist()
    for index, (level, width, first, size) in enumerate(blocks_meta):
        begin, end = slot_start_list[index], slot_start_list[index] + width * size
        block = LayoutBlock(
            level=level, index=index, num_families=size, width=width, slot_start=begin,
            pair_start=pair_start, family_start=family_start_list[index],
            row_start=-1 if range_list[index] else row_start_list[index],
            leaf_range=(leaf_start[index], leaf_start[index] + end - begin) if range_list[index]
            else None,
            share=share[begin:end].view(size, width),
            count=slot_count[begin:end].view(size, width),
            cluster=cluster[begin:end].view(size, width))
        pair_start += width * width * size
        if not levels or levels[-1].level != level:
            levels.append(LayoutLevel(level, [], families[first:first]))
        levels[-1].blocks.append(block)
    family_node_slot = node_slot[families]
    for level in levels:
        first = level.blocks[0].family_start
        last = level.blocks[-1].family_start + level.blocks[-1].num_families
        level.parent_slot = family_node_slot[first:last]

    leaves = torch.arange(num_leaves)
    leaf_row = slot_row[node_slot[:num_leaves].clamp(min=0)]
    slotted = leaves[(leaf_row >= 0) & ~is_root[:num_leaves]]
    blocks = [block for level in levels for block in level.blocks]
    layout = SlotLayout(
        num_leaves=num_leaves, num_nodes=num_nodes, levels=levels, num_slots=num_slots,
        num_pairs=pair_start, num_families=families.numel(),
        num_rows=num_block_rows + roots.numel(), root_row=num_block_rows,
        node_slot=node_slot, slot_row=slot_row,
        slot_block=torch.cat([slot_block, torch.full((roots.numel(), ), num_blocks)]),
        slotted_leaves=slotted, isolated_leaves=leaves[is_root[:num_leaves]],
        sibling_index=sibling_index,
        block_table=torch.tensor([[b.pair_start for b in blocks], [b.num_families for b in blocks],
                                  [b.width for b in blocks], [b.slot_start for b in blocks]],
                                 dtype=torch.long).view(4, num_blocks),
        row_table=torch.tensor([[b.row_start for b in blocks] + [num_block_rows],
                                [b.num_slots for b in blocks] + [roots.numel()]],
                               dtype=torch.long).view(2, num_blocks + 1))
    layout.paired_leaves = leaves[~is_root[:num_leaves]]
    layout.leaf_pair_positions = layout.pair_positions(node_slot[layout.paired_leaves],
                                                       sibling_index[layout.paired_leaves])
    return layout

