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
padded sibling pair; ``python -m hsa_geo.benchmarks.batches --calibrate``):
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
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

#: Fixed cost of one block relative to one padded sibling pair, per head
#: (see the module docstring); measured by
#: ``python -m hsa_geo.benchmarks.batches --calibrate`` on the 2-core CPU.
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
    log_count: Tensor  #: ``[F, w]`` :math:`\log|B|`, :math:`-\infty` at padding
    inverse_count: Tensor  #: ``[F, w]`` :math:`1 / |B|`, 0 at padding
    cluster: Tensor  #: ``[F, w]`` 1.0 at cluster children, else 0.0

    @property
    def num_slots(self) -> int:
        return self.num_families * self.width

    @property
    def num_pairs(self) -> int:
        return self.num_families * self.width * self.width

    def to(self, device) -> 'LayoutBlock':
        return LayoutBlock(**{f.name: _move(getattr(self, f.name), device) for f in fields(self)})


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
    #: ``[num_slots + num_roots]`` row-space block start and block size of
    #: every slot, to place head ``h`` at ``H * start + h * size + offset``
    slot_block_row: Tensor
    slot_block_size: Tensor
    slot_block: Tensor  #: ``[num_slots]`` block of every slot (index into :attr:`blocks`)
    slotted_leaves: Tensor  #: leaves outside leaf ranges (not isolated)
    padding_slots: Tensor  #: slots of no node in blocks that are not leaf ranges
    isolated_leaves: Tensor  #: leaves that are roots of their own tree
    sibling_index: Tensor  #: ``[N + M]`` position among siblings (0 at roots)
    _rows: Dict[Tuple[str, int], Tensor] = field(default_factory=dict)

    @property
    def blocks(self) -> List[LayoutBlock]:
        return [block for level in self.levels for block in level.blocks]

    def pair_positions(self, slots: Tensor, columns: Tensor) -> Tensor:
        r"""Positions in a per-pair buffer ``[H, P]`` (families innermost:
        block ``[w, w, F]``) of the pairs (child in slot :obj:`slots`,
        sibling in column :obj:`columns`)."""
        if ('blocks', 0) not in self._rows:
            blocks = self.blocks
            self._rows[('blocks', 0)] = torch.tensor(
                [[b.pair_start for b in blocks], [b.num_families for b in blocks],
                 [b.width for b in blocks], [b.slot_start for b in blocks]],
                dtype=torch.long, device=self.node_slot.device).view(4, len(blocks))
        pair_start, num_families, width, slot_start = self._rows[('blocks', 0)][:, self.slot_block[slots]]
        local = slots - slot_start
        family, row = local // width, local % width
        return pair_start + (row * width + columns) * num_families + family

    def leaf_diagonal(self, padded: Tensor) -> Tensor:
        r"""``[N, H]`` entries of the leaves' own pairs :math:`(i, i)` in a
        per-pair buffer ``[H, P]`` (0 for a leaf that is a root of its own)."""
        key = ('leaf_pairs', 0)
        if key not in self._rows:
            leaves = torch.arange(self.num_leaves, device=self.node_slot.device)
            leaves = leaves[self.node_slot[:self.num_leaves] < self.num_slots]
            self._rows[key] = (leaves, self.pair_positions(self.node_slot[leaves],
                                                           self.sibling_index[leaves]))
        leaves, positions = self._rows[key]
        if leaves.numel() == self.num_leaves:
            return padded[:, positions].t()
        out = padded.new_zeros(self.num_leaves, padded.size(0))
        out[leaves] = padded[:, positions].t()
        return out

    def rows(self, slots: Tensor, heads: int) -> Tensor:
        r"""``[len(slots), H]`` rows of :obj:`slots` for every head."""
        head = torch.arange(heads, device=slots.device)
        start = self.slot_block_row[slots, None]
        return (heads * start + head * self.slot_block_size[slots, None]
                + self.slot_row[slots, None] - start)

    def cached_rows(self, name: str, heads: int) -> Tensor:
        r"""Row indices used on every call, per number of heads:
        ``'leaves'`` (``[L, H]`` of :attr:`slotted_leaves`), ``'padding'``
        (of :attr:`padding_slots`) and
        ``'parents<i>'`` (``[H * F]`` of level ``i``'s parents, in the
        block-major, head-major order of the family buffers)."""
        key = (name, heads)
        if key not in self._rows:
            if name == 'leaves':
                rows = self.rows(self.node_slot[self.slotted_leaves], heads)
            elif name == 'padding':
                rows = self.rows(self.padding_slots, heads).view(-1)
            else:
                level = self.levels[int(name[len('parents'):])]
                parts, start = [], 0
                for block in level.blocks:
                    slots = level.parent_slot[start:start + block.num_families]
                    parts.append(self.rows(slots, heads).t().reshape(-1))
                    start += block.num_families
                rows = torch.cat(parts)
            self._rows[key] = rows
        return self._rows[key]

    def to(self, device) -> 'SlotLayout':
        return SlotLayout(**{f.name: ({} if f.name == '_rows' else _move(getattr(self, f.name), device))
                             for f in fields(self)})


def _move(value, device):
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [item.to(device) for item in value]
    return value


def choose_buckets(widths: List[int], counts: List[int],
                   block_cost: float = BLOCK_COST) -> List[Tuple[int, int]]:
    r"""Groups sorted distinct family widths into buckets, each padded to its
    widest member, minimising :math:`\sum (c + F w^2)` over buckets
    (:math:`c` = :obj:`block_cost`, :math:`F` families of padded width
    :math:`w`). Returns ``(first, last)`` index ranges into :obj:`widths`.

    Example::

        >>> choose_buckets([2, 3, 4], [1000, 300, 5])   # few families: one block
        [(0, 2)]
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
        for start in range(end):
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

    Cost: a few sorts over the :math:`N + M` nodes and one Python step per
    block.
    """
    num_nodes = parent.numel()
    child = (parent >= 0).nonzero().view(-1)
    family_of_child = parent[child]
    num_children = torch.bincount(family_of_child, minlength=num_nodes)
    count = num_leaves_below.to(torch.float64)

    # children in (family, first leaf) order: sibling index = rank in family
    order = torch.argsort(first_leaf[child])
    order = order[torch.argsort(family_of_child[order], stable=True)]
    child, family_of_child = child[order], family_of_child[order]
    family_first_child = torch.cumsum(num_children, 0) - num_children
    sibling_index = torch.zeros(num_nodes, dtype=torch.long)
    sibling_index[child] = torch.arange(child.numel()) - family_first_child[family_of_child]

    families = torch.arange(num_leaves, num_nodes)
    family_width = num_children[families]
    family_level = depth[families]
    # families by (level descending, width, first leaf)
    order = torch.argsort(first_leaf[families])
    for key in (family_width, -family_level):
        order = order[torch.argsort(key[order], stable=True)]
    families, family_width, family_level = families[order], family_width[order], family_level[order]

    # blocks: per level, buckets of widths, cut into chunks of bounded size
    plans = []  # (level, family ids, padded width)
    level_keys, level_counts = torch.unique_consecutive(family_level, return_counts=True)
    start = 0
    for level, level_size in zip(level_keys.tolist(), level_counts.tolist()):
        widths = family_width[start:start + level_size]
        distinct, per_width = torch.unique_consecutive(widths, return_counts=True)
        distinct, per_width = distinct.tolist(), per_width.tolist()
        offset = start
        width_start = [0]
        for n in per_width:
            width_start.append(width_start[-1] + n)
        for first, last in choose_buckets(distinct, per_width, block_cost):
            members = families[offset + width_start[first]:offset + width_start[last + 1]]
            # keep leaf order across the bucket's widths
            members = members[torch.argsort(first_leaf[members], stable=True)]
            width = distinct[last]
            step = max(1, pairs_per_block // (width * width))
            for chunk in range(0, members.numel(), step):
                plans.append((level, members[chunk:chunk + step], width))
        start += level_size

    # slots of every child: block, family row, sibling column
    is_root = parent < 0
    roots = is_root.nonzero().view(-1)
    node_slot = torch.full((num_nodes, ), -1, dtype=torch.long)
    blocks_by_level: Dict[int, List[LayoutBlock]] = {}
    parent_slots: Dict[int, List[Tensor]] = {}
    slot_start = pair_start = family_start = row_start = 0
    slot_row_parts, block_row_parts, block_size_parts, slot_block_parts = [], [], [], []
    padding_parts = []
    pending = []
    for level, members, width in plans:
        num_families = members.numel()
        # children of these families, in family then sibling order
        first = family_first_child[members]
        size = num_children[members]
        grid_child = torch.full((num_families, width), -1, dtype=torch.long)
        column = torch.arange(width)
        real = column[None, :] < size[:, None]
        positions = (first[:, None] + column[None, :])[real]
        grid_child[real] = child[positions]
        flat = grid_child.view(-1)
        slots = torch.arange(slot_start, slot_start + flat.numel())
        node_slot[flat[flat >= 0]] = slots[flat >= 0]
        leaf_range = None
        if bool(real.all()) and bool((flat < num_leaves).all()):
            begin = int(flat[0])
            if torch.equal(flat, torch.arange(begin, begin + flat.numel())):
                leaf_range = (begin, begin + flat.numel())
        counts = torch.where(real, count[grid_child.clamp(min=0)], 0.0)
        block = LayoutBlock(
            level=level, num_families=num_families, width=width, slot_start=slot_start,
            pair_start=pair_start, family_start=family_start,
            row_start=-1 if leaf_range is not None else row_start, leaf_range=leaf_range,
            share=counts / count[members][:, None],
            log_count=torch.where(real, counts.log(), float('-inf')),
            inverse_count=torch.where(real, 1.0 / counts.clamp(min=1.0), 0.0),
            cluster=(real & (grid_child >= num_leaves)).to(torch.float64))
        if leaf_range is None:
            padding_parts.append(slots[flat < 0])
            slot_row_parts.append(torch.arange(row_start, row_start + flat.numel()))
            block_row_parts.append(torch.full((flat.numel(), ), row_start, dtype=torch.long))
            block_size_parts.append(torch.full((flat.numel(), ), flat.numel(), dtype=torch.long))
            row_start += flat.numel()
        else:
            for parts in (slot_row_parts, block_row_parts, block_size_parts):
                parts.append(torch.full((flat.numel(), ), -1, dtype=torch.long))
        slot_block_parts.append(torch.full((flat.numel(), ), len(pending), dtype=torch.long))
        blocks_by_level.setdefault(level, []).append(block)
        pending.append((level, members))
        slot_start += flat.numel()
        pair_start += flat.numel() * width
        family_start += num_families
    num_slots = slot_start
    node_slot[roots] = torch.arange(num_slots, num_slots + roots.numel())
    slot_row_parts.append(torch.arange(row_start, row_start + roots.numel()))
    block_row_parts.append(torch.full((roots.numel(), ), row_start, dtype=torch.long))
    block_size_parts.append(torch.full((roots.numel(), ), roots.numel(), dtype=torch.long))
    for level, members in pending:
        parent_slots.setdefault(level, []).append(node_slot[members])
    levels = [LayoutLevel(level, blocks_by_level[level], torch.cat(parent_slots[level]))
              for level in sorted(blocks_by_level, reverse=True)]
    slot_row = torch.cat(slot_row_parts)
    leaves = torch.arange(num_leaves)
    isolated = leaves[is_root[:num_leaves]]
    in_range = torch.zeros(num_leaves, dtype=torch.bool)
    for level in levels:
        for block in level.blocks:
            if block.leaf_range is not None:
                in_range[block.leaf_range[0]:block.leaf_range[1]] = True
    slotted = leaves[~in_range & ~is_root[:num_leaves]]
    return SlotLayout(num_leaves=num_leaves, num_nodes=num_nodes, levels=levels,
                      num_slots=num_slots, num_pairs=pair_start, num_families=family_start,
                      num_rows=row_start + roots.numel(), root_row=row_start,
                      node_slot=node_slot,
                      slot_row=slot_row, slot_block_row=torch.cat(block_row_parts),
                      slot_block_size=torch.cat(block_size_parts),
                      slot_block=torch.cat(slot_block_parts) if slot_block_parts
                      else torch.zeros(0, dtype=torch.long),
                      slotted_leaves=slotted,
                      padding_slots=torch.cat(padding_parts) if padding_parts
                      else torch.zeros(0, dtype=torch.long), isolated_leaves=isolated,
                      sibling_index=sibling_index)
