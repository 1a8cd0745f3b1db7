r"""Keeping HSA fast: bounded families, no single-child chains.

HSA's cost is :math:`\sum_A b_A^2` over the families (a cluster :math:`A`
with its :math:`b_A` children), so one family of 20,000 children costs as
much as 400 million sibling pairs. Every builder therefore ends with
:func:`finalize`, which

1. splits every family with more than :obj:`max_children` children by
   grouping the children (sub-clustering when a graph is available, balanced
   contiguous chunks otherwise) and putting one new cluster over each group,
   repeatedly, until no family is too large;
2. removes clusters with exactly one child (their child moves up to the
   grandparent): such a cluster has the same leaves as its child, so HSA's
   result is unchanged and only a sweep step is saved;
3. numbers the clusters canonically (deepest first, then by first leaf; the
   root comes last) and validates the result with
   :meth:`~hsa_geo.Hierarchy.from_parent`.

Parent arrays here are :class:`numpy.ndarray` of ``int64`` with leaves
``0..N-1`` first, as in :class:`~hsa_geo.Hierarchy`.
"""
from __future__ import annotations

import math
import operator
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from hsa_geo.hierarchy.hierarchy import Hierarchy

#: Default bound on the children of one cluster. HSA's cost per family grows
#: as b^2 while the number of sequential sweep steps grows as log_b(N). The
#: ``max_children`` benchmark (``python -m benchmarks.builders
#: --only max_children``, results in ``benchmarks/results/builders.json``)
#: times forward+backward HSA on balanced trees: flat within 15 % from b=8
#: to b=32 at N=4096 and N=16384, 1.5x slower at 64, 2-4x at 128-256 and
#: at b=2. 32 is the shallowest tree in the fast range (fewest sequential
#: sweep steps, which matter most where each step is a kernel launch).
DEFAULT_MAX_CHILDREN = 32

#: ``leaves_of(node) -> array of leaf ids``, the leaves below any node.
LeavesOf = Callable[[int], np.ndarray]


def check_max_children(max_children) -> Optional[int]:
    r"""Validates :obj:`max_children` (an int :math:`\geq 2`, or
    :obj:`None` for no bound)."""
    if max_children is None:
        return None
    try:
        if isinstance(max_children, bool):
            raise TypeError
        value = operator.index(max_children)
    except TypeError:
        raise ValueError(f"'max_children' must be an integer >= 2 or None "
                         f"(got {max_children!r})") from None
    if value < 2:
        raise ValueError(f"'max_children' must be at least 2, since a family of one "
                         f"child cannot be split (got {value})")
    return value


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    r"""``int(value)`` for an integer :math:`\geq` :obj:`minimum`, else a
    :class:`ValueError` naming :obj:`name`."""
    try:
        if isinstance(value, bool):
            raise TypeError
        result = operator.index(value)
    except TypeError:
        raise ValueError(f"'{name}' must be an integer (got {value!r})") from None
    if result < minimum:
        raise ValueError(f"'{name}' must be at least {minimum} (got {result})")
    return result


# ----------------------------------------------------------------- splitting
class ChunkSplitter:
    r"""Groups a family's children, in the given order (which builders make
    leaf order), into contiguous chunks of near-equal length, leaving large
    children alone (see :func:`size_aware_chunks`)."""
    needs_leaves = False

    def __call__(self, items: Sequence[int], max_children: int,
                 leaves_of: Optional[LeavesOf] = None,
                 sizes: Optional[np.ndarray] = None) -> List[np.ndarray]:
        return size_aware_chunks(np.arange(len(items)), max_children, sizes)


def balanced_chunks(positions: np.ndarray, max_children: int) -> List[np.ndarray]:
    r"""Splits :obj:`positions` into :math:`\lceil n / m \rceil` contiguous
    runs of near-equal size (each at most :obj:`max_children`)."""
    count = math.ceil(len(positions) / max_children)
    return np.array_split(positions, count)


def size_aware_chunks(positions: np.ndarray, max_children: int,
                      sizes: Optional[np.ndarray] = None) -> List[np.ndarray]:
    r"""Balanced contiguous chunks of :obj:`positions`, except that a child
    holding more than a :math:`1/m` share of the family's leaves stays a
    group of its own (so it is not wrapped, and its subtree does not sink a
    level for the sake of its small siblings); the runs between such
    children are chunked separately. Falls back to plain balanced chunks when
    that would not reduce the number of children.

    :obj:`sizes[i]` is the leaf count of the child at :obj:`positions[i]`.
    """
    if sizes is None:
        return balanced_chunks(positions, max_children)
    sizes = np.asarray(sizes)
    large = sizes * max_children > sizes.sum()
    if not large.any():
        return balanced_chunks(positions, max_children)
    groups: List[np.ndarray] = []
    run_start = 0
    for index in np.flatnonzero(large).tolist() + [len(positions)]:
        if index > run_start:
            groups.extend(balanced_chunks(positions[run_start:index], max_children))
        if index < len(positions):
            groups.append(positions[index:index + 1])
        run_start = index + 1
    if len(groups) >= len(positions):
        return balanced_chunks(positions, max_children)
    return groups


def split_oversized(parent: np.ndarray, num_leaves: int, max_children: int,
                    splitter=None) -> np.ndarray:
    r"""Returns a parent array where no node has more than
    :obj:`max_children` children.

    A family of :math:`b > m` children is partitioned into groups by
    :obj:`splitter` (``splitter(items, m, leaves_of, sizes) -> list of
    position arrays``, :obj:`sizes` the leaf counts of the items; it must
    give at least two groups and fewer than :math:`b`, otherwise
    :func:`size_aware_chunks` is used); each group of two or more becomes a
    new cluster (its own family reduced the same way) and the family is
    regrouped until at most :math:`m` children remain. Groups of one are not wrapped, so no
    single-child cluster is created. Children are visited in order of their
    first leaf, so chunks are contiguous in leaf order.

    Cost: :math:`O(N + M)` array work plus :math:`O(b)` per oversized family
    (and the splitter's own cost).
    """
    num_children = np.bincount(parent[parent >= 0], minlength=parent.size)
    oversized = np.flatnonzero(num_children > max_children)
    if oversized.size == 0:
        return parent
    splitter = ChunkSplitter() if splitter is None else splitter
    depth = node_depth(parent)
    first_leaf = first_leaf_below(parent, num_leaves, depth)
    size = count_leaves_below(parent, num_leaves, depth).tolist()
    children = ChildIndex(parent)
    new_parent: List[int] = parent.tolist()
    extra_leaves = {}

    def leaves_of(node: int) -> np.ndarray:
        if node in extra_leaves:
            return extra_leaves[node]
        return leaves_below(node, num_leaves, children)

    def new_cluster(members: List[int]) -> int:
        node = len(new_parent)
        new_parent.append(-1)
        size.append(sum(size[member] for member in members))
        for member in members:
            new_parent[member] = node
        if splitter.needs_leaves:
            extra_leaves[node] = np.concatenate([leaves_of(m) for m in members])
        return node

    def reduce(items: List[int]) -> List[int]:
        while len(items) > max_children:
            sizes = np.array([size[item] for item in items])
            groups = _valid_groups(splitter(items, max_children, leaves_of, sizes), len(items))
            if groups is None:
                groups = size_aware_chunks(np.arange(len(items)), max_children, sizes)
            regrouped = []
            for group in groups:
                members = [items[position] for position in group]
                if len(members) == 1:
                    regrouped.append(members[0])
                else:
                    regrouped.append(new_cluster(reduce(members)))
            items = regrouped
        return items

    for family in oversized.tolist():
        items = children[family]
        items = items[np.argsort(first_leaf[items], kind='stable')].tolist()
        for child in reduce(items):
            new_parent[child] = family
    return np.asarray(new_parent, dtype=np.int64)


def _valid_groups(groups, size: int) -> Optional[List[np.ndarray]]:
    # A grouping makes progress only with 2..size-1 non-empty groups that
    # cover every position exactly once; anything else falls back to chunks.
    if groups is None:
        return None
    groups = [np.asarray(group, dtype=np.int64) for group in groups if len(group) > 0]
    if not 2 <= len(groups) < size:
        return None
    covered = np.concatenate(groups)
    if covered.size != size or not np.array_equal(np.sort(covered), np.arange(size)):
        raise RuntimeError("internal error: a splitter returned groups that do not "
                           "partition the family's children")
    return groups


# ------------------------------------------------------------------ chains
def collapse_chains(parent: np.ndarray, num_leaves: int) -> np.ndarray:
    r"""Removes every cluster with exactly one child: the child takes the
    removed cluster's place. A root cluster with one child hands the root to
    that child. Remaining clusters keep their relative order.

    Cost: :math:`O((N + M) \log d)` for depth :math:`d` (pointer jumping).
    """
    num_nodes = parent.size
    num_children = np.bincount(parent[parent >= 0], minlength=num_nodes)
    single = np.zeros(num_nodes + 1, dtype=bool)
    single[num_leaves:num_nodes] = num_children[num_leaves:] == 1
    if not single.any():
        return parent
    # Index num_nodes is a sentinel standing for "no parent".
    up = np.append(np.where(parent >= 0, parent, num_nodes), num_nodes)
    # nearest[v]: v itself unless v is a single-child cluster, then its
    # nearest such ancestor; pointer jumping resolves whole chains at once.
    nearest = np.where(single, up, np.arange(num_nodes + 1))
    while True:
        jumped = nearest[nearest]
        if np.array_equal(jumped, nearest):
            break
        nearest = jumped
    keep = ~single[:num_nodes]
    new_id = np.full(num_nodes + 1, -1, dtype=np.int64)
    new_id[:num_nodes][keep] = np.arange(int(keep.sum()))
    return new_id[nearest[up[:num_nodes]]][keep]


# ------------------------------------------------------------------- order
def node_depth(parent: np.ndarray) -> np.ndarray:
    r"""Depth of every node (roots 0) of an acyclic parent array."""
    num_nodes = parent.size
    is_root = parent < 0
    jump = np.where(is_root, np.arange(num_nodes), parent)
    depth = (~is_root).astype(np.int64)
    while not is_root[jump].all():
        depth = depth + depth[jump]
        jump = jump[jump]
    return depth


def first_leaf_below(parent: np.ndarray, num_leaves: int,
                     depth: Optional[np.ndarray] = None) -> np.ndarray:
    r"""Smallest leaf id below every node (the leaf itself for leaves)."""
    depth = node_depth(parent) if depth is None else depth
    first = np.full(parent.size, np.iinfo(np.int64).max, dtype=np.int64)
    first[:num_leaves] = np.arange(num_leaves)
    order = np.argsort(-depth, kind='stable')
    bounds = np.flatnonzero(np.diff(depth[order])) + 1
    for nodes in np.split(order, bounds):  # deepest level first
        nodes = nodes[parent[nodes] >= 0]
        np.minimum.at(first, parent[nodes], first[nodes])
    return first


def count_leaves_below(parent: np.ndarray, num_leaves: int,
                       depth: Optional[np.ndarray] = None) -> np.ndarray:
    r"""Number of leaves below every node (1 for leaves)."""
    depth = node_depth(parent) if depth is None else depth
    count = np.zeros(parent.size, dtype=np.int64)
    count[:num_leaves] = 1
    order = np.argsort(-depth, kind='stable')
    bounds = np.flatnonzero(np.diff(depth[order])) + 1
    for nodes in np.split(order, bounds):  # deepest level first
        nodes = nodes[parent[nodes] >= 0]
        np.add.at(count, parent[nodes], count[nodes])
    return count


class ChildIndex:
    r"""``children[v]``: the children of node :obj:`v` in increasing id
    order (one sort up front, a slice per lookup)."""

    def __init__(self, parent: np.ndarray):
        child = np.flatnonzero(parent >= 0)
        self.child = child[np.argsort(parent[child], kind='stable')]
        counts = np.bincount(parent[child], minlength=parent.size)
        self.start = np.concatenate([[0], np.cumsum(counts)])

    def __getitem__(self, node: int) -> np.ndarray:
        return self.child[self.start[node]:self.start[node + 1]]


def leaves_below(node: int, num_leaves: int, children: ChildIndex) -> np.ndarray:
    r"""The leaves below :obj:`node` (iterative DFS, any depth)."""
    if node < num_leaves:
        return np.array([node], dtype=np.int64)
    leaves, stack = [], [node]
    while stack:
        below = children[stack.pop()]
        leaves.append(below[below < num_leaves])
        stack.extend(below[below >= num_leaves].tolist())
    return np.concatenate(leaves)


def canonical_order(parent: np.ndarray, num_leaves: int) -> np.ndarray:
    r"""Renumbers clusters deepest first, ties broken by their first leaf,
    so equal trees get equal parent arrays and a single root comes last."""
    depth = node_depth(parent)
    first = first_leaf_below(parent, num_leaves, depth)
    clusters = np.arange(num_leaves, parent.size)
    order = clusters[np.lexsort((first[clusters], -depth[clusters]))]
    new_id = np.empty(parent.size + 1, dtype=np.int64)
    new_id[:num_leaves] = np.arange(num_leaves)
    new_id[order] = np.arange(num_leaves, parent.size)
    new_id[-1] = -1  # parent -1 indexes the last slot
    permuted = np.concatenate([np.arange(num_leaves), order])
    return new_id[parent[permuted]]


def finalize(parent, num_leaves: int, max_children: Optional[int],
             keep_chains: bool = False, splitter=None, ordered: bool = False) -> Hierarchy:
    r"""Bounds family sizes, collapses chains, numbers clusters canonically
    and returns the validated :class:`~hsa_geo.Hierarchy`.

    With :obj:`ordered`, the result is marked
    :attr:`~hsa_geo.Hierarchy.ordered` (the leaf order is meaningful and
    siblings keep their order by first leaf). None of the steps reorders
    siblings: the default splitter groups runs of consecutive siblings, each
    new cluster taking its run's place, and a removed chain cluster is
    replaced by its child, which has the same first leaf. A custom
    :obj:`splitter` may group siblings out of order, so it drops the flag.
    """
    parent = np.asarray(parent, dtype=np.int64)
    max_children = check_max_children(max_children)
    if max_children is not None:
        parent = split_oversized(parent, num_leaves, max_children, splitter)
    if not keep_chains:
        parent = collapse_chains(parent, num_leaves)
    parent = canonical_order(parent, num_leaves)
    ordered = ordered and (splitter is None or isinstance(splitter, ChunkSplitter))
    return Hierarchy.from_parent(torch.from_numpy(parent), num_leaves, ordered=ordered)


def limit_children(hierarchy: Hierarchy, max_children: Optional[int] = DEFAULT_MAX_CHILDREN,
                   keep_chains: bool = False) -> Hierarchy:
    r"""Applies the builders' limits to an existing hierarchy.

    Families with more than :obj:`max_children` children are split into
    balanced contiguous chunks (children ordered by their first leaf) and,
    unless :obj:`keep_chains`, single-child clusters are removed. Leaves keep
    their ids; clusters are renumbered (deepest first, the root last).

    Args:
        hierarchy (Hierarchy): Any tree or forest.
        max_children (int, optional): Bound on the children of a cluster, or
            :obj:`None` for none. (default: :obj:`32`)
        keep_chains (bool, optional): Keep single-child clusters.
            (default: :obj:`False`)

    Returns:
        Hierarchy: The same leaves, with at most :obj:`max_children`
        children per cluster. The batch vector is not carried over; the
        :attr:`~hsa_geo.Hierarchy.ordered` flag is: the chunks are runs of
        consecutive siblings, so sibling order is kept (a family of 100
        children becomes runs of 25, in order).

    Complexity: :math:`O((N + M) \log (N + M))`.

    Example::

        >>> from hsa_geo import Hierarchy
        >>> from hsa_geo.hierarchy import limit_children
        >>> h = limit_children(Hierarchy.flat(100), max_children=10)
        >>> h.summary()['max_children'], h.max_depth
        (10, 2)
    """
    return finalize(hierarchy.parent.cpu().numpy(), hierarchy.num_leaves, max_children,
                    keep_chains, ordered=hierarchy.ordered)
