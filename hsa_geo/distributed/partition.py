r"""Splitting a :class:`~hsa_geo.Hierarchy` across ranks.

A *cut* of the tree is a set of nodes, the *parts*, such that every leaf
lies below exactly one of them. Every part's subtree goes to one rank,
whole; the nodes above the parts form the *top tree*, whose leaves are the
parts. Every rank holds the top tree (a few hundred nodes) and the subtrees
of its own parts; nothing else.

:func:`partition_hierarchy` chooses a cut that balances the leaves over the
ranks; :meth:`HierarchyPartition.from_parts` takes any cut and assignment
(uneven, or with ranks that hold nothing). :meth:`HierarchyPartition.shard`
gives what one rank needs (:class:`HierarchyShard`): the nodes of its
parts, renumbered (leaves first, in global order), and the top tree.
"""
from __future__ import annotations

import hashlib
import heapq
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from hsa_geo.hierarchy.hierarchy import Hierarchy


@dataclass
class TopTree:
    r"""The nodes above the parts, held by every rank.

    Its leaves ``0 .. P - 1`` are what the ranks exchange one summary of:
    first the parts below a node of the top tree, in the order of their
    first leaf, then one *bundle* per rank that holds whole trees of a
    forest (parts that are roots), in rank order. Trees of a forest never
    attend to each other, so a bundle needs nothing from the other ranks:
    bundling keeps the exchange from growing with the number of trees. Ids
    from :math:`P` on are the top clusters. Siblings keep the global
    hierarchy's order, so positional terms and :obj:`causal` attention mean
    the same on it."""
    #: the top tree, the parts and bundles as its leaves
    hierarchy: Hierarchy
    #: ``[P + T]`` id of every top-tree node in the global hierarchy (-1
    #: for a bundle)
    node: Tensor
    #: ``[P]`` rank that owns every part
    part_rank: Tensor
    #: ``[P + T]`` leaves of the global hierarchy below every top-tree node
    num_leaves_below: Tensor
    #: ``[P]`` whether the part is one leaf of the global hierarchy
    part_is_leaf: Tensor
    #: ``[E_top]`` position of every sibling pair of the top tree among the
    #: global hierarchy's :meth:`~hsa_geo.Hierarchy.sibling_pairs`
    pair_index: Tensor
    world_size: int

    @property
    def num_parts(self) -> int:
        return int(self.part_rank.numel())

    @property
    def part_num_leaves(self) -> Tensor:
        r"""``[P]`` leaves of the global hierarchy below every part."""
        return self.num_leaves_below[:self.num_parts]

    @property
    def is_bundle(self) -> Tensor:
        r"""``[P]`` whether the part is a bundle of whole trees."""
        return self.node[:self.num_parts] < 0

    def parts_of(self, rank: int) -> Tensor:
        r"""``[p_r]`` the parts of :obj:`rank`, in order."""
        return (self.part_rank == rank).nonzero().view(-1)

    def fingerprint(self) -> int:
        r"""A 63-bit digest of everything the ranks must agree on: the top
        tree, the owners and leaf counts of the parts, the world size."""
        digest = hashlib.sha256()
        for tensor in (self.hierarchy.parent, self.node, self.part_rank,
                       self.num_leaves_below, self.part_is_leaf):
            digest.update(tensor.detach().cpu().to(torch.long).numpy().tobytes())
            digest.update(b'|')
        digest.update(str(self.world_size).encode())
        return int.from_bytes(digest.digest()[:8], 'little') >> 1


@dataclass
class HierarchyShard:
    r"""What one rank holds of a partitioned hierarchy: the subtrees of its
    parts as a forest over its own leaves (:attr:`local`, :obj:`None` when
    it owns none), and the top tree.

    A rank's leaves are the global leaves :attr:`leaves`, in increasing
    order: select a node-level dataset's rows with ``x[shard.leaves]``."""
    rank: int
    top: TopTree
    #: forest over the rank's leaves (one tree per part), or None
    local: Optional[Hierarchy]
    #: ``[n_r]`` global id of every local leaf
    leaves: Tensor
    #: ``[n_r + m_r]`` global id of every local node
    node: Tensor
    #: ``[p_r]`` the rank's parts and its bundle of whole trees, if any
    #: (top-tree leaf ids)
    parts: Tensor
    #: ``[n_r]`` which of :attr:`parts` every local leaf lies below (0 .. p_r - 1)
    leaf_part: Tensor
    #: ``[p_r]`` local node id of every part's root, in :attr:`parts` order
    #: (-1 for the bundle, which has several)
    part_root: Tensor
    #: ``[E_r]`` position of every sibling pair of :attr:`local` among the
    #: global hierarchy's :meth:`~hsa_geo.Hierarchy.sibling_pairs`
    pair_index: Tensor

    @property
    def num_leaves(self) -> int:
        return int(self.leaves.numel())

    @property
    def world_size(self) -> int:
        return self.top.world_size

    def __repr__(self) -> str:
        return (f"HierarchyShard(rank={self.rank}, world_size={self.world_size}, "
                f"num_leaves={self.num_leaves}, num_parts={self.parts.numel()}, "
                f"top_nodes={self.top.node.numel()})")


class HierarchyPartition:
    r"""A hierarchy cut into parts, and the parts assigned to ranks.

    A part that is a whole tree of a forest (a root) joins its rank's
    *bundle*: the top tree has one leaf per rank for all of that rank's
    whole trees (:class:`TopTree`), so a forest of many small trees costs
    as little to exchange as one tree.

    Args:
        hierarchy (Hierarchy): The global tree or forest.
        parts (torch.Tensor): Node ids of the cut, each once: every leaf
            below exactly one of them.
        part_rank (torch.Tensor): The rank of every part (same length).
        world_size (int): Number of ranks; ranks without a part hold no
            leaves (allowed).
    """

    def __init__(self, hierarchy: Hierarchy, parts: Tensor, part_rank: Tensor,
                 world_size: int):
        check_hierarchy(hierarchy)
        self.world_size = _integer(world_size, 'world_size')
        parts, part_rank = _node_ids(parts, 'parts'), _node_ids(part_rank, 'part_rank')
        if part_rank.numel() != parts.numel():
            raise ValueError(f"{parts.numel()} parts but {part_rank.numel()} ranks for them")
        bad = ((part_rank < 0) | (part_rank >= world_size)).nonzero().view(-1)
        if bad.numel() > 0:
            raise ValueError(f"part {int(parts[bad[0]])} is assigned to rank "
                             f"{int(part_rank[bad[0]])}, outside 0..{world_size - 1}")
        self.hierarchy = hierarchy
        self.node_part = _node_parts(hierarchy, parts)  # [N + M], -1 above the cut
        # parts in the order of their first leaf
        order = torch.argsort(hierarchy.first_leaf.cpu()[parts], stable=True)
        self.parts, self.part_rank = parts[order], part_rank[order]
        self.node_part = torch.where(self.node_part >= 0,
                                     torch.argsort(order)[self.node_part.clamp(min=0)], -1)
        self._global_pairs = None
        self.top = self._top_tree()

    @classmethod
    def from_parts(cls, hierarchy: Hierarchy, parts: Sequence[int],
                   part_rank: Sequence[int], world_size: int) -> 'HierarchyPartition':
        r"""The partition with the given cut and owners."""
        return cls(hierarchy, parts, part_rank, world_size)

    # ------------------------------------------------------------------ top
    def _top_tree(self) -> TopTree:
        hierarchy, parts = self.hierarchy, self.parts
        parent = hierarchy.parent.cpu()
        count = hierarchy.num_leaves_below.cpu()
        whole = parent[parts] < 0
        linked = parts[~whole]
        bundle_rank = torch.unique(self.part_rank[whole])  # sorted
        # the top-tree leaf of every part: its own, or its rank's bundle
        self.part_top = torch.empty_like(parts)
        self.part_top[~whole] = torch.arange(linked.numel())
        self.part_top[whole] = linked.numel() + torch.searchsorted(bundle_rank,
                                                                   self.part_rank[whole])
        above = (self.node_part < 0).nonzero().view(-1)  # the top clusters, global ids
        num_top_leaves = linked.numel() + bundle_rank.numel()
        node = torch.cat([linked, torch.full_like(bundle_rank, -1), above])
        top_id = torch.full((hierarchy.num_nodes, ), -1, dtype=torch.long)
        top_id[linked] = torch.arange(linked.numel())
        top_id[above] = torch.arange(num_top_leaves, node.numel())
        global_parent = torch.where(node >= 0, parent[node.clamp(min=0)], -1)
        top_parent = torch.where(global_parent >= 0, top_id[global_parent.clamp(min=0)], -1)
        top = Hierarchy.from_parent(top_parent, num_leaves=num_top_leaves,
                                    ordered=hierarchy.ordered)
        bundle_count = torch.zeros(bundle_rank.numel(), dtype=torch.long).index_add_(
            0, self.part_top[whole] - linked.numel(), count[parts[whole]])
        node_count = torch.cat([count[linked], bundle_count, count[above]])
        owner = torch.cat([self.part_rank[~whole], bundle_rank])
        is_leaf = torch.cat([linked < hierarchy.num_leaves,
                             torch.zeros(bundle_rank.numel(), dtype=torch.bool)])
        return TopTree(top, node, owner, node_count, is_leaf, self._pair_positions(top, node),
                       self.world_size)

    def _pair_positions(self, local: Hierarchy, node: Tensor) -> Tensor:
        r"""Positions in the global sibling-pair order of the sibling pairs
        of a sub-hierarchy whose nodes have global ids :obj:`node`."""
        if self._global_pairs is None:
            rows, cols = self.hierarchy.sibling_pairs().cpu()
            keys = rows * self.hierarchy.num_nodes + cols
            sorted_keys, position = torch.sort(keys)
            self._global_pairs = (sorted_keys, position)
        sorted_keys, position = self._global_pairs
        rows, cols = local.sibling_pairs().cpu()
        keys = node[rows] * self.hierarchy.num_nodes + node[cols]
        found = torch.searchsorted(sorted_keys, keys)
        return position[found]

    # ---------------------------------------------------------------- shards
    def shard(self, rank: int) -> HierarchyShard:
        r"""What :obj:`rank` holds: its forest, its leaves, the top tree."""
        rank = _integer(rank, 'rank', minimum=0)
        if rank >= self.world_size:
            raise ValueError(f"rank {rank} is outside 0..{self.world_size - 1}")
        hierarchy, top = self.hierarchy, self.top
        owned = torch.cat([self.part_rank == rank, torch.zeros(1, dtype=torch.bool)])
        node_is_mine = owned[self.node_part]  # -1 indexes the extra False
        leaves = node_is_mine[:hierarchy.num_leaves].nonzero().view(-1)
        clusters = node_is_mine[hierarchy.num_leaves:].nonzero().view(-1) + hierarchy.num_leaves
        node = torch.cat([leaves, clusters])
        mine = top.parts_of(rank)
        position = torch.full((top.num_parts, ), -1, dtype=torch.long)
        position[mine] = torch.arange(mine.numel())
        leaf_part = position[self.part_top[self.node_part[leaves]]]
        if leaves.numel() == 0:
            none = torch.zeros(0, dtype=torch.long)
            return HierarchyShard(rank, top, None, leaves, node, mine, leaf_part, none, none)
        local_id = torch.full((hierarchy.num_nodes, ), -1, dtype=torch.long)
        local_id[node] = torch.arange(node.numel())
        parent = hierarchy.parent.cpu()[node]
        is_part = torch.zeros(hierarchy.num_nodes, dtype=torch.bool)
        is_part[self.parts] = True
        local_parent = torch.where(is_part[node] | (parent < 0), -1,
                                   local_id[parent.clamp(min=0)])
        local = Hierarchy.from_parent(local_parent, num_leaves=leaves.numel(),
                                      ordered=hierarchy.ordered)
        pair_index = self._pair_positions(local, node)
        # the sweep plan behind sibling_pairs() is large (a shard is pickled
        # to its rank): the rank rebuilds it if its engine needs it
        local._plans.clear()
        part_node = top.node[mine]
        part_root = torch.where(part_node >= 0, local_id[part_node.clamp(min=0)], -1)
        return HierarchyShard(rank, top, local, leaves, node, mine, leaf_part, part_root,
                              pair_index)

    def shards(self) -> List[HierarchyShard]:
        return [self.shard(rank) for rank in range(self.world_size)]

    def rank_num_leaves(self) -> Tensor:
        r"""``[world_size]`` leaves held by every rank."""
        return torch.zeros(self.world_size, dtype=torch.long).index_add_(
            0, self.part_rank, self.hierarchy.num_leaves_below.cpu()[self.parts])

    def __repr__(self) -> str:
        counts = self.rank_num_leaves().tolist()
        return (f"HierarchyPartition(world_size={self.world_size}, parts={self.parts.numel()}, "
                f"exchanged={self.top.num_parts}, top_nodes={self.top.node.numel()}, "
                f"leaves_per_rank={counts})")


def check_hierarchy(hierarchy) -> None:
    r"""Raises a :class:`TypeError` unless :obj:`hierarchy` is a
    :class:`~hsa_geo.Hierarchy`."""
    if not isinstance(hierarchy, Hierarchy):
        raise TypeError(f"'hierarchy' must be a hsa_geo.Hierarchy (got "
                        f"{type(hierarchy).__name__}); build one from parent pointers with "
                        f"Hierarchy.from_parent or with a builder of hsa_geo.hierarchy")


def _integer(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"'{name}' must be an integer (got {value!r})")
    if value < minimum:
        raise ValueError(f"'{name}' must be at least {minimum} (got {value})")
    return int(value)


def _node_ids(values, name: str) -> Tensor:
    ids = torch.as_tensor(values)
    if ids.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"'{name}' must hold integer node ids (got {ids.dtype})")
    return ids.to(torch.long).view(-1).cpu()


def _node_parts(hierarchy: Hierarchy, parts: Tensor) -> Tensor:
    r"""``[N + M]`` the index in :obj:`parts` of the part every node lies
    in (-1 above the cut); raises unless the parts are distinct nodes and
    every leaf lies below exactly one of them.

    The part of a node is its nearest marked ancestor (itself included),
    found by pointer jumping: :math:`O((N + M) \log \text{depth})`, so deep
    trees cost no more than wide ones."""
    num_nodes = hierarchy.num_nodes
    if parts.numel() == 0:
        raise ValueError("a partition needs at least one part")
    bad = ((parts < 0) | (parts >= num_nodes)).nonzero().view(-1)
    if bad.numel() > 0:
        raise ValueError(f"part {int(parts[bad[0]])} is not a node of the hierarchy "
                         f"(ids 0..{num_nodes - 1})")
    distinct, times = torch.unique(parts, return_counts=True)
    repeated = (times > 1).nonzero().view(-1)
    if repeated.numel() > 0:
        first = int(repeated[0])
        listed = 'twice' if int(times[first]) == 2 else f'{int(times[first])} times'
        raise ValueError(f"part {int(distinct[first])} is listed {listed}: the parts of a cut "
                         f"are distinct nodes")
    part_index = torch.full((num_nodes + 1, ), -1, dtype=torch.long)
    part_index[parts] = torch.arange(parts.numel())
    parent = hierarchy.parent.cpu()
    # one step up, the roots to an extra node that stands for 'none'
    up = torch.cat([torch.where(parent >= 0, parent, num_nodes), torch.tensor([num_nodes])])
    nearest = torch.where(part_index >= 0, torch.arange(num_nodes + 1), up)
    nearest[num_nodes] = num_nodes
    while True:  # parts and 'none' point to themselves; everyone else jumps
        jumped = nearest[nearest]
        if torch.equal(jumped, nearest):
            break
        nearest = jumped
    node_part = part_index[nearest[:num_nodes]]
    first_leaf = hierarchy.first_leaf.cpu()
    uncovered = (node_part[:hierarchy.num_leaves] < 0).nonzero().view(-1)
    nested = part_index[nearest[up[parts]]] >= 0  # a part below another part
    first_uncovered = int(uncovered[0]) if uncovered.numel() > 0 else num_nodes
    first_nested = int(first_leaf[parts[nested]].min()) if nested.any() else num_nodes
    if min(first_uncovered, first_nested) < num_nodes:
        leaf = min(first_uncovered, first_nested)
        state = 'below no part' if leaf == first_uncovered else 'below two parts'
        raise ValueError(f"leaf {leaf} lies {state}: the parts must cut the hierarchy so "
                         f"that every leaf lies below exactly one of them (a part's ancestors "
                         f"are not parts)")
    return node_part


def partition_hierarchy(hierarchy: Hierarchy, world_size: int, parts_per_rank: int = 16,
                        max_part_share: float = 0.25,
                        max_parts_per_rank: int = 256) -> HierarchyPartition:
    r"""A partition of :obj:`hierarchy` over :obj:`world_size` ranks with
    balanced leaf counts and a top tree whose size does not depend on
    :math:`N`.

    Starting from the roots, the part with the most leaves is replaced by
    its children until there are :obj:`parts_per_rank` parts per rank and
    none holds more than :obj:`max_part_share` of a rank's share of the
    leaves, or until splitting it would make more than
    :obj:`max_parts_per_rank` parts per rank below a top-tree node (whole
    trees of a forest do not count: each rank's go into one bundle). The
    parts then go, largest first, to the rank with the fewest leaves so
    far. The number of parts exchanged, and with it the communication per
    layer, is set by :obj:`parts_per_rank` and the tree's branching, not by
    :math:`N` nor by the number of trees.

    **Balance.** Every rank then holds at most
    :math:`N / W + (1 - 1/W) \max(s N / W, 1)` leaves (:math:`W` ranks,
    :math:`s` = :obj:`max_part_share`; list scheduling's bound). A tree
    that cannot be cut that finely within :obj:`max_parts_per_rank` (a deep
    chain, whose subtrees shrink by one leaf per level, or one very wide
    family) breaks it: the function then warns, naming the largest part;
    raise :obj:`max_parts_per_rank` or use a more balanced hierarchy.

    Args:
        hierarchy (Hierarchy): The tree or forest.
        world_size (int): Number of ranks.
        parts_per_rank (int, optional): Parts to aim for per rank: more
            balance the leaves better, and cost
            :math:`H (2D + D_v + 1)` numbers each per exchange.
            (default: :obj:`16`)
        max_part_share (float, optional): Largest part, as a fraction of
            :math:`N / \text{world\_size}`. (default: :obj:`0.25`)
        max_parts_per_rank (int, optional): Bound on the exchanged parts per
            rank (a wide family splits into many at once); at least 1.
            (default: :obj:`256`)

    Complexity: :math:`O(N + M + K \log K)` for :math:`K` parts, plus the
    sibling pairs of the whole hierarchy (to index a global pair bias).

    Example::

        >>> import torch
        >>> from hsa_geo import Hierarchy
        >>> tree = Hierarchy.from_parent(torch.tensor([4, 4, 5, 5, 6, 6, -1]), 4)
        >>> partition_hierarchy(tree, 2, parts_per_rank=1).rank_num_leaves().tolist()
        [2, 2]
    """
    check_hierarchy(hierarchy)
    world_size = _integer(world_size, 'world_size')
    parts_per_rank = _integer(parts_per_rank, 'parts_per_rank')
    max_parts_per_rank = _integer(max_parts_per_rank, 'max_parts_per_rank')
    if isinstance(max_part_share, bool) or not isinstance(max_part_share, numbers.Real) or \
            not 0 < max_part_share < math.inf:
        raise ValueError(f"'max_part_share' must be a positive number (got {max_part_share!r})")
    count = hierarchy.num_leaves_below.cpu()
    parent = hierarchy.parent.cpu()
    # children of every node, grouped (CSR): children_of[start[v]:start[v + 1]]
    has_parent = (parent >= 0).nonzero().view(-1)
    children_of = has_parent[torch.argsort(parent[has_parent], stable=True)]
    start = torch.zeros(hierarchy.num_nodes + 1, dtype=torch.long)
    start[1:] = torch.cumsum(torch.bincount(parent[has_parent], minlength=hierarchy.num_nodes), 0)
    share = hierarchy.num_leaves / world_size
    target, limit = parts_per_rank * world_size, max_parts_per_rank * world_size
    # a max-heap of the parts by leaf count (ties: the lower node id)
    heap = [(-int(count[root]), root) for root in hierarchy.roots.tolist()]
    heapq.heapify(heap)
    linked = 0  # parts below a top-tree node: the whole trees are bundled
    while heap:
        size, largest = -heap[0][0], heap[0][1]
        below = children_of[int(start[largest]):int(start[largest + 1])].tolist()
        if not below or (len(heap) >= target and size <= max_part_share * share):
            break
        grown = linked + len(below) - int(parent[largest] >= 0)
        if grown > limit:
            break
        heapq.heappop(heap)
        for child in below:
            heapq.heappush(heap, (-int(count[child]), child))
        linked = grown
    parts = torch.tensor(sorted(node for _, node in heap), dtype=torch.long)
    # largest first to the least loaded rank (ties: the lower rank)
    load = [(0, rank) for rank in range(world_size)]
    part_rank = torch.empty_like(parts)
    for index in torch.argsort(-count[parts], stable=True).tolist():
        leaves, rank = heapq.heappop(load)
        part_rank[index] = rank
        heapq.heappush(load, (leaves + int(count[parts[index]]), rank))
    heaviest, rank = max(load)
    bound = share + (1 - 1 / world_size) * max(max_part_share * share, 1)
    if heaviest > bound:
        size, largest = -heap[0][0], heap[0][1]
        warnings.warn(f"partition_hierarchy: rank {rank} holds {heaviest} of "
                      f"{hierarchy.num_leaves} leaves, above the bound of {bound:.0f} for "
                      f"{world_size} ranks: its largest part (node {largest}, {size} leaves) "
                      f"cannot be split without more than max_parts_per_rank="
                      f"{max_parts_per_rank} parts per rank (a deep chain or a very wide "
                      f"family needs many parts to cut evenly). Raise max_parts_per_rank "
                      f"(each part costs H(2D + D_v + 1) numbers per exchange) or use a more "
                      f"balanced hierarchy.", UserWarning, stacklevel=2)
    return HierarchyPartition(hierarchy, parts, part_rank, world_size)
