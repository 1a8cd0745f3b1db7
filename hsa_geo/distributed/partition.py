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
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from hsa_geo.hierarchy.hierarchy import Hierarchy


@dataclass
class TopTree:
    r"""The nodes above the parts, held by every rank.

    Top-tree node ids ``0 .. P - 1`` are the parts (its leaves), in the
    order of their first leaf; ids from :math:`P` on are the top clusters.
    Siblings keep the global hierarchy's order, so positional terms and
    :obj:`causal` attention mean the same on it."""
    #: the top tree, the parts as its leaves
    hierarchy: Hierarchy
    #: ``[P + T]`` id of every top-tree node in the global hierarchy
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
    #: ``[p_r]`` the rank's parts (top-tree leaf ids)
    parts: Tensor
    #: ``[n_r]`` which of :attr:`parts` every local leaf lies below (0 .. p_r - 1)
    leaf_part: Tensor
    #: ``[p_r]`` local node id of every part's root, in :attr:`parts` order
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

    Args:
        hierarchy (Hierarchy): The global tree or forest.
        parts (torch.Tensor): Node ids of the cut: every leaf below exactly
            one of them.
        part_rank (torch.Tensor): The rank of every part (same length).
        world_size (int): Number of ranks; ranks without a part hold no
            leaves (allowed).
    """

    def __init__(self, hierarchy: Hierarchy, parts: Tensor, part_rank: Tensor,
                 world_size: int):
        if not isinstance(hierarchy, Hierarchy):
            raise TypeError(f"'hierarchy' must be a hsa_geo.Hierarchy "
                            f"(got {type(hierarchy).__name__})")
        parts = torch.as_tensor(parts, dtype=torch.long).view(-1).cpu()
        part_rank = torch.as_tensor(part_rank, dtype=torch.long).view(-1).cpu()
        if int(world_size) < 1:
            raise ValueError(f"'world_size' must be at least 1 (got {world_size})")
        self.world_size = int(world_size)
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
        return cls(hierarchy, torch.as_tensor(parts), torch.as_tensor(part_rank), world_size)

    # ------------------------------------------------------------------ top
    def _top_tree(self) -> TopTree:
        hierarchy, parts = self.hierarchy, self.parts
        parent = hierarchy.parent.cpu()
        above = (self.node_part < 0).nonzero().view(-1)  # the top clusters, global ids
        node = torch.cat([parts, above])
        top_id = torch.full((hierarchy.num_nodes, ), -1, dtype=torch.long)
        top_id[node] = torch.arange(node.numel())
        global_parent = parent[node]
        top_parent = torch.where(global_parent >= 0, top_id[global_parent.clamp(min=0)], -1)
        top = Hierarchy.from_parent(top_parent, num_leaves=parts.numel(),
                                    ordered=hierarchy.ordered)
        count = hierarchy.num_leaves_below.cpu()[node]
        return TopTree(top, node, self.part_rank, count, parts < hierarchy.num_leaves,
                       self._pair_positions(top, node), self.world_size)

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
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside 0..{self.world_size - 1}")
        hierarchy = self.hierarchy
        mine = self.top.parts_of(rank)
        owned = torch.zeros(self.parts.numel() + 1, dtype=torch.bool)
        owned[mine] = True
        node_is_mine = owned[self.node_part]  # -1 indexes the extra False
        leaves = node_is_mine[:hierarchy.num_leaves].nonzero().view(-1)
        clusters = node_is_mine[hierarchy.num_leaves:].nonzero().view(-1) + hierarchy.num_leaves
        node = torch.cat([leaves, clusters])
        local_part = torch.full((self.parts.numel(), ), -1, dtype=torch.long)
        local_part[mine] = torch.arange(mine.numel())
        leaf_part = local_part[self.node_part[leaves]]
        if leaves.numel() == 0:
            return HierarchyShard(rank, self.top, None, leaves, node, mine, leaf_part,
                                  torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
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
        return HierarchyShard(rank, self.top, local, leaves, node, mine, leaf_part,
                              local_id[self.parts[mine]], pair_index)

    def shards(self) -> List[HierarchyShard]:
        return [self.shard(rank) for rank in range(self.world_size)]

    def rank_num_leaves(self) -> Tensor:
        r"""``[world_size]`` leaves held by every rank."""
        return torch.zeros(self.world_size, dtype=torch.long).index_add_(
            0, self.part_rank, self.top.part_num_leaves)

    def __repr__(self) -> str:
        counts = self.rank_num_leaves().tolist()
        return (f"HierarchyPartition(world_size={self.world_size}, parts={self.parts.numel()}, "
                f"top_nodes={self.top.node.numel()}, leaves_per_rank={counts})")


def _node_parts(hierarchy: Hierarchy, parts: Tensor) -> Tensor:
    r"""``[N + M]`` the index in :obj:`parts` of the part every node lies
    in (-1 above the cut); raises unless every leaf lies below exactly one
    part."""
    num_nodes = hierarchy.num_nodes
    if parts.numel() == 0:
        raise ValueError("a partition needs at least one part")
    bad = ((parts < 0) | (parts >= num_nodes)).nonzero().view(-1)
    if bad.numel() > 0:
        raise ValueError(f"part {int(parts[bad[0]])} is not a node of the hierarchy "
                         f"(ids 0..{num_nodes - 1})")
    leaf, node = (index.cpu() for index in hierarchy.leaf_ancestor_pairs())
    part_index = torch.full((num_nodes, ), -1, dtype=torch.long)
    part_index[parts] = torch.arange(parts.numel())
    hits = part_index[node] >= 0
    covered = torch.zeros(hierarchy.num_leaves, dtype=torch.long).index_add_(
        0, leaf[hits], torch.ones_like(leaf[hits]))
    wrong = (covered != 1).nonzero().view(-1)
    if wrong.numel() > 0:
        first = int(wrong[0])
        state = 'below no part' if int(covered[first]) == 0 else 'below two parts'
        raise ValueError(f"leaf {first} lies {state}: the parts must cut the hierarchy so "
                         f"that every leaf lies below exactly one of them (a part's ancestors "
                         f"are not parts)")
    # every node in a part's subtree: the part of any leaf below it
    node_part = torch.full((num_nodes, ), -1, dtype=torch.long)
    leaf_part = torch.empty(hierarchy.num_leaves, dtype=torch.long)
    leaf_part[leaf[hits]] = part_index[node[hits]]
    depth = hierarchy.depth.cpu()
    part_depth = depth[parts][leaf_part[leaf]]
    inside = depth[node] >= part_depth
    node_part[node[inside]] = leaf_part[leaf[inside]]
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
    leaves (or :obj:`max_parts_per_rank` per rank are reached). The parts
    then go, largest first, to the rank with the fewest leaves so far. The
    number of parts, and with it the communication per layer, is set by
    :obj:`parts_per_rank` and the tree's branching, not by :math:`N`.

    Args:
        hierarchy (Hierarchy): The tree or forest.
        world_size (int): Number of ranks.
        parts_per_rank (int, optional): Parts to aim for per rank: more
            balance the leaves better, and cost
            :math:`H (2D + D_v + 1)` numbers each per exchange.
            (default: :obj:`16`)
        max_part_share (float, optional): Largest part, as a fraction of
            :math:`N / \text{world\_size}`. (default: :obj:`0.25`)
        max_parts_per_rank (int, optional): Bound on the parts (a wide
            family splits into many at once). (default: :obj:`256`)
    """
    if int(world_size) < 1:
        raise ValueError(f"'world_size' must be at least 1 (got {world_size})")
    if int(parts_per_rank) < 1:
        raise ValueError(f"'parts_per_rank' must be at least 1 (got {parts_per_rank})")
    if not 0 < max_part_share:
        raise ValueError(f"'max_part_share' must be positive (got {max_part_share})")
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
    while heap:
        size, largest = -heap[0][0], heap[0][1]
        below = children_of[int(start[largest]):int(start[largest + 1])].tolist()
        if not below or (len(heap) >= target and size <= max_part_share * share):
            break
        if len(heap) - 1 + len(below) > limit:
            break
        heapq.heappop(heap)
        for child in below:
            heapq.heappush(heap, (-int(count[child]), child))
    parts = torch.tensor(sorted(node for _, node in heap), dtype=torch.long)
    # largest first to the least loaded rank (ties: the lower rank)
    load = [(0, rank) for rank in range(world_size)]
    part_rank = torch.empty_like(parts)
    for index in torch.argsort(-count[parts], stable=True).tolist():
        leaves, rank = heapq.heappop(load)
        part_rank[index] = rank
        heapq.heappush(load, (leaves + int(count[parts[index]]), rank))
    return HierarchyPartition(hierarchy, parts, part_rank, world_size)
