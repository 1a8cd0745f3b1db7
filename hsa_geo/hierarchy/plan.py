"""The family plan: a hierarchy's families grouped by parent depth and
number of children.

A *family* is a cluster with its children. All families whose parents share
a depth and that have the same number of children :math:`b` form one
:class:`FamilyBlock`, whose children are an :math:`F \times b` index matrix.
The plan fixes the order of the ordered sibling pairs
(:meth:`SweepPlan.sibling_pairs`, which per-pair tensors such as a pair bias
follow) and drives the scatter backend, strictly causal HSA and the
positional terms. The fused sweeps read the same order as flat
:class:`FamilyTables` (the CPU kernel) or the padded slot layout of
:mod:`hsa_geo.functional.layout` (the tensor sweeps).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import List, Optional, Tuple

import torch
from torch import Tensor

#: Upper bound on sibling pairs (F * b * b) handled by one block, so the
#: temporaries of a step stay cache- and memory-friendly for any N.
PAIRS_PER_BLOCK = 1 << 16


@dataclass
class FamilyBlock:
    r"""Families with equal parent depth and equal number of children."""
    depth: int  #: depth of the parent clusters
    parents: Tensor  #: ``[F]`` parent ids, counted from the first cluster
    children: Tensor  #: ``[F, b]`` node ids of the children
    child_count: Tensor  #: ``[F, b]`` leaves below each child (float64)
    parent_count: Tensor  #: ``[F]`` leaves below each parent (float64)
    leaf_slot: Tensor  #: positions in ``children.view(-1)`` holding leaves
    leaf_id: Tensor  #: the leaves at those positions
    cluster_slot: Tensor  #: positions holding clusters
    cluster_id: Tensor  #: those clusters, counted from the first cluster
    #: ``(start, end)`` when the children are exactly leaves ``start..end-1``
    #: in row-major order, so gathers become views.
    leaf_range: Optional[Tuple[int, int]] = None
    #: every child of every family has the same number of leaves below it,
    #: so a parent's mean is the plain mean over its children
    equal_children: bool = False
    #: every child is a single leaf: :math:`\log|C| = 0`
    unit_children: bool = False
    #: position of this block's first pair in the plan's sibling-pair order
    #: (:meth:`SweepPlan.sibling_pairs`), which per-pair tensors follow
    pair_start: int = 0

    @property
    def pair_slice(self) -> slice:
        r"""This block's ``F * b * b`` entries of a per-pair tensor."""
        return slice(self.pair_start, self.pair_start + self.children.numel() * self.num_children)

    @property
    def share(self) -> Tensor:
        r"""``[F, b]`` fraction :math:`|B| / |A|` of the parent's leaves
        below each child."""
        return self.child_count / self.parent_count[:, None]

    @property
    def num_families(self) -> int:
        return self.children.size(0)

    @property
    def num_children(self) -> int:
        return self.children.size(1)

    def sibling_pairs(self) -> Tensor:
        r"""``[2, F * b * b]`` ordered sibling pairs :math:`(B, C)` of every
        family, the diagonal included, family by family in row-major order."""
        family, size = self.children.shape
        rows = self.children[:, :, None].expand(family, size, size)
        cols = self.children[:, None, :].expand(family, size, size)
        return torch.stack([rows.reshape(-1), cols.reshape(-1)])

    def to(self, device) -> 'FamilyBlock':
        return FamilyBlock(**{
            f.name: getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), Tensor)
            else getattr(self, f.name)
            for f in fields(self)
        })


@dataclass
class SweepPlan:
    r"""Everything HSA's sweeps need, computed once per hierarchy."""
    num_leaves: int
    num_clusters: int
    blocks: List[FamilyBlock]  #: bottom-up order (deepest parents first)
    isolated_leaves: Tensor  #: leaves that are roots of their own tree
    parent: Tensor  #: ``[N + M]`` parent of every node, ``-1`` at roots
    num_leaves_below: Tensor  #: ``[N + M]``
    #: ``[N + M]`` position of every node among its siblings, ordered by
    #: their first leaf (0 at roots): the column it occupies in its block
    sibling_index: Tensor

    @property
    def num_nodes(self) -> int:
        return self.num_leaves + self.num_clusters

    @property
    def num_pairs(self) -> int:
        r"""Number :math:`E = \sum_A b_A^2` of ordered sibling pairs."""
        return sum(block.children.numel() * block.num_children for block in self.blocks)

    def to(self, device) -> 'SweepPlan':
        return SweepPlan(self.num_leaves, self.num_clusters,
                         [block.to(device) for block in self.blocks],
                         self.isolated_leaves.to(device), self.parent.to(device),
                         self.num_leaves_below.to(device), self.sibling_index.to(device))

    def sibling_pairs(self) -> Tensor:
        r"""``[2, E]`` all ordered sibling pairs :math:`(B, C)`, the
        :math:`B = C` diagonal included, in block order."""
        pairs = [block.sibling_pairs() for block in self.blocks]
        if not pairs:
            return self.isolated_leaves.new_empty(2, 0)
        return torch.cat(pairs, dim=1)


def ordered_children(parent: Tensor, depth: Tensor, first_leaf: Tensor):
    r"""Every non-root node and its parent, ordered by (parent depth
    descending, family size, family's first leaf, child's first leaf):
    families become contiguous runs of siblings in sibling order, deepest
    first, and families of consecutive leaves consecutive runs. Returns
    ``(child, family_of_child, num_children)`` (``num_children`` per node).
    This order defines :meth:`SweepPlan.sibling_pairs`."""
    child = (parent >= 0).nonzero().view(-1)
    family_of_child = parent[child]
    num_children = torch.bincount(family_of_child, minlength=parent.numel())
    if child.numel() == 0:
        return child, family_of_child, num_children
    keys = [first_leaf[child], first_leaf[family_of_child], num_children[family_of_child],
            int(depth.max()) - depth[family_of_child]]  # least significant first
    # one sort of a combined key when it fits in 63 bits, else one stable
    # sort per key
    extents = [int(key.max()) + 1 for key in keys]
    bits = sum(max(extent - 1, 1).bit_length() for extent in extents)
    if bits <= 62:
        combined, factor = torch.zeros_like(child), 1
        for key, extent in zip(keys, extents):
            combined += key * factor
            factor *= extent
        order = torch.argsort(combined)
    else:
        order = torch.argsort(keys[0])
        for key in keys[1:]:
            order = order[torch.argsort(key[order], stable=True)]
    return child[order], family_of_child[order], num_children


@dataclass
class FamilyTables:
    r"""The families of a hierarchy as flat tables (CPU ``int64``), for
    sweeps that visit one family at a time (the CPU kernel of
    :mod:`hsa_geo.functional.kernel`): families in bottom-up level order
    (parent depth descending), children in sibling order, and the
    :math:`b^2` ordered pairs of every family row-major, in the order of
    :meth:`SweepPlan.sibling_pairs` (so a per-pair tensor needs no
    reordering)."""
    family_node: Tensor  #: ``[F]`` the cluster of every family
    #: ``[F + 1]`` the children of family f are ``children[child_ptr[f]:child_ptr[f + 1]]``
    child_ptr: Tensor
    children: Tensor  #: node ids
    pair_ptr: Tensor  #: ``[F + 1]`` first pair of every family; ``pair_ptr[-1]`` = E
    level_ptr: Tensor  #: ``[L + 1]`` families of every level, deepest level first
    num_nodes: int

    @property
    def num_pairs(self) -> int:
        return int(self.pair_ptr[-1])


def build_family_tables(parent: Tensor, depth: Tensor, first_leaf: Tensor) -> FamilyTables:
    r""":class:`FamilyTables` of a validated hierarchy (CPU tensors): one
    ordering of the children and a few cumulative sums, :math:`O((N + M)
    \log(N + M))`."""
    child, family_of_child, _ = ordered_children(parent, depth, first_leaf)
    family_node, sizes = torch.unique_consecutive(family_of_child, return_counts=True)
    level_sizes = torch.unique_consecutive(depth[family_node], return_counts=True)[1]
    zero = torch.zeros(1, dtype=torch.long)
    return FamilyTables(family_node=family_node, child_ptr=torch.cat([zero, sizes.cumsum(0)]),
                        children=child, pair_ptr=torch.cat([zero, (sizes * sizes).cumsum(0)]),
                        level_ptr=torch.cat([zero, level_sizes.cumsum(0)]),
                        num_nodes=parent.numel())


def build_sweep_plan(parent: Tensor, num_leaves: int, depth: Tensor,
                     num_leaves_below: Tensor, first_leaf: Tensor,
                     pairs_per_block: int = PAIRS_PER_BLOCK) -> SweepPlan:
    r"""Groups the families of a validated hierarchy into blocks.

    Within a family, children are ordered by their first (smallest) leaf,
    so on a hierarchy over a sequence, columns follow the sequence.

    Cost: a few sorts over the :math:`N + M` nodes, :math:`O((N+M)\log(N+M))`.
    """
    num_nodes = parent.numel()
    child, family_of_child, num_children = ordered_children(parent, depth, first_leaf)
    family_depth = depth[family_of_child]
    family_size = num_children[family_of_child]

    largest = int(family_size.max()) if child.numel() else 0
    group_key = family_depth * (largest + 1) + family_size
    group_lengths = torch.unique_consecutive(group_key, return_counts=True)[1].tolist()
    count = num_leaves_below.to(torch.float64)
    blocks: List[FamilyBlock] = []
    sibling_index = torch.zeros(num_nodes, dtype=torch.long)
    start = pair_start = 0
    for length in group_lengths:
        size = int(family_size[start])
        children = child[start:start + length].view(-1, size)
        sibling_index[children] = torch.arange(size)
        parents = family_of_child[start:start + length:size]
        step = max(1, pairs_per_block // (size * size))
        for first in range(0, children.size(0), step):
            block = _make_block(int(family_depth[start]), parents[first:first + step],
                                children[first:first + step], num_leaves, count)
            block.pair_start = pair_start
            pair_start += block.children.numel() * size
            blocks.append(block)
        start += length
    isolated = ((parent < 0) & (torch.arange(num_nodes) < num_leaves)).nonzero().view(-1)
    return SweepPlan(num_leaves, num_nodes - num_leaves, blocks, isolated, parent,
                     num_leaves_below, sibling_index)


def _make_block(depth: int, parents: Tensor, children: Tensor, num_leaves: int,
                count: Tensor) -> FamilyBlock:
    flat = children.reshape(-1)
    is_leaf = flat < num_leaves
    leaf_slot = is_leaf.nonzero().view(-1)
    cluster_slot = (~is_leaf).nonzero().view(-1)
    leaf_range = None
    if bool(is_leaf.all()):
        start = int(flat[0])
        if torch.equal(flat, torch.arange(start, start + flat.numel())):
            leaf_range = (start, start + flat.numel())
    child_count = count[children]
    return FamilyBlock(depth=depth, parents=parents - num_leaves, children=children,
                       child_count=child_count, parent_count=count[parents],
                       leaf_slot=leaf_slot, leaf_id=flat[leaf_slot],
                       cluster_slot=cluster_slot, cluster_id=flat[cluster_slot] - num_leaves,
                       leaf_range=leaf_range,
                       equal_children=bool((child_count == child_count[:, :1]).all()),
                       unit_children=bool((child_count == 1).all()))
