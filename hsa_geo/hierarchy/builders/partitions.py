r"""Hierarchies from nested partitions of the leaves (fine to coarse)."""
from __future__ import annotations

import operator
from typing import Iterable, List, Optional, Sequence

import numpy as np

from hsa_geo.hierarchy.builders.limits import DEFAULT_MAX_CHILDREN, finalize
from hsa_geo.hierarchy.hierarchy import Hierarchy


def from_partitions(levels: Sequence[Iterable[Iterable[int]]], num_leaves: int,
                    max_children: Optional[int] = DEFAULT_MAX_CHILDREN,
                    keep_chains: bool = False) -> Hierarchy:
    r"""Builds the tree of nested partitions of the leaves :obj:`0..N-1`.

    Every set of every level becomes a cluster whose children are the sets of
    the level below it contains (the leaves, for the finest level). A root is
    put on top when the coarsest level has more than one set. Families larger
    than :obj:`max_children` are split into balanced chunks in leaf order,
    and single-child clusters (a set equal to the one below it) are removed
    unless :obj:`keep_chains`.

    Args:
        levels (list): Partitions from fine to coarse, each an iterable of
            sets (or lists) of leaf ids, as
            :func:`networkx.community.louvain_partitions` yields them. Each
            partition must cover every leaf exactly once and refine the next.
            An empty list gives one root over all leaves.
        num_leaves (int): Number of leaves :math:`N`.
        max_children (int, optional): Most children of one cluster, or
            :obj:`None` for no bound. (default: :obj:`32`)
        keep_chains (bool, optional): Keep single-child clusters.
            (default: :obj:`False`)

    Returns:
        Hierarchy: One tree over the :math:`N` leaves.

    Raises:
        ValueError: naming the level, the set and the leaf, for a leaf id
            that is not an integer in :math:`[0, N)`, an empty set, a leaf
            missing from or repeated in a partition, or a set that is split
            across two sets of the next (coarser) level.

    Complexity: :math:`O(L \cdot N)` for :math:`L` levels (a Python pass
    over the set members, then array work).

    Example::

        >>> from hsa_geo.hierarchy import from_partitions
        >>> h = from_partitions([[{0, 1}, {2, 3}, {4}], [{0, 1, 2, 3}, {4}]], num_leaves=5)
        >>> h.parent.tolist()
        [5, 5, 6, 6, 8, 7, 7, 8, -1]
    """
    from hsa_geo.hierarchy.builders.limits import check_positive_int
    num_leaves = check_positive_int(num_leaves, 'num_leaves')
    if isinstance(levels, (set, frozenset)) or not isinstance(levels, Sequence):
        levels = list(levels)
    labels = [partition_labels(partition, num_leaves, level)
              for level, partition in enumerate(levels)]
    check_refinement(labels)
    return finalize(tree_from_levels(labels, num_leaves), num_leaves, max_children,
                    keep_chains)


def partition_labels(partition: Iterable[Iterable[int]], num_leaves: int,
                     level: int = 0) -> np.ndarray:
    r"""The set index of every leaf, ``[N]``, validating that the sets
    partition :obj:`0..N-1`."""
    if isinstance(partition, (str, bytes)) or not isinstance(partition, Iterable):
        raise ValueError(f"Level {level} must be an iterable of sets of leaf ids "
                         f"(got {type(partition).__name__})")
    label = np.full(num_leaves, -1, dtype=np.int64)
    count = 0
    for index, members in enumerate(partition):
        count += 1
        if isinstance(members, (str, bytes)) or not isinstance(members, Iterable):
            raise ValueError(f"Set {index} of level {level} must be an iterable of leaf ids "
                             f"(got {members!r})")
        ids = [_leaf_id(member, num_leaves, index, level) for member in members]
        if not ids:
            raise ValueError(f"Set {index} of level {level} is empty; every set must "
                             f"hold at least one leaf")
        ids = np.asarray(ids, dtype=np.int64)
        seen = label[ids] >= 0
        if seen.any() or np.unique(ids).size != ids.size:
            leaf = int(ids[seen][0]) if seen.any() else int(_first_repeat(ids))
            other = int(label[leaf]) if seen.any() else index
            raise ValueError(f"Leaf {leaf} appears twice in level {level} (in set {other} "
                             f"and set {index}); a partition holds every leaf exactly once")
        label[ids] = index
    if count == 0:
        raise ValueError(f"Level {level} has no sets")
    missing = np.flatnonzero(label < 0)
    if missing.size:
        raise ValueError(f"Level {level} misses {missing.size} leaves (e.g. "
                         f"{missing[:10].tolist()}); every partition must cover all "
                         f"{num_leaves} leaves")
    return label


def _leaf_id(member, num_leaves: int, index: int, level: int) -> int:
    try:
        if isinstance(member, bool):
            raise TypeError
        leaf = operator.index(member)
    except TypeError:
        raise ValueError(f"Set {index} of level {level} holds {member!r}, which is not an "
                         f"integer leaf id") from None
    if not 0 <= leaf < num_leaves:
        raise ValueError(f"Set {index} of level {level} holds leaf {leaf}, outside "
                         f"[0, {num_leaves - 1}]")
    return leaf


def _first_repeat(ids: np.ndarray) -> int:
    values, counts = np.unique(ids, return_counts=True)
    return int(values[counts > 1][0])


def first_occurrence(label: np.ndarray, num_labels: int) -> np.ndarray:
    r"""For every label :obj:`0..K-1`, the first position holding it."""
    first = np.full(num_labels, label.size, dtype=np.int64)
    np.minimum.at(first, label, np.arange(label.size))
    return first


def check_refinement(labels: List[np.ndarray], names: Optional[List[np.ndarray]] = None,
                     what: str = 'Set') -> None:
    r"""Raises when a set of level :math:`l` meets two sets of level
    :math:`l+1`. :obj:`names[l][s]`, when given, is how set :obj:`s` of
    level :math:`l` is called in the message (e.g. its original id)."""
    for level in range(len(labels) - 1):
        fine, coarse = labels[level], labels[level + 1]
        first = first_occurrence(fine, int(fine.max()) + 1)
        expected = coarse[first[fine]]
        bad = np.flatnonzero(coarse != expected)
        if bad.size:
            leaf = int(bad[0])
            fine_set = int(fine[leaf])
            members = np.flatnonzero(fine == fine_set)
            coarse_sets = np.unique(coarse[members])

            def name(level_, index):
                return int(names[level_][index]) if names is not None else int(index)
            raise ValueError(
                f"{what} {name(level, fine_set)} of level {level} (leaves "
                f"{_preview(members)}) is split across {what.lower()}s "
                f"{[name(level + 1, c) for c in coarse_sets[:5]]} of level {level + 1}; "
                f"each level must refine the next, coarser one")


def _preview(values: np.ndarray, limit: int = 8) -> str:
    shown = ', '.join(str(v) for v in values[:limit].tolist())
    return '{' + shown + (', ...}' if values.size > limit else '}')


def tree_from_levels(labels: List[np.ndarray], num_leaves: int) -> np.ndarray:
    r"""Parent array of nested partitions given as contiguous labels per
    leaf (fine to coarse, refinement already checked): level :math:`l` sets
    get ids after those of level :math:`l-1`, and a root is added when the
    coarsest level has more than one set (or when there are no levels)."""
    if not labels:
        parent = np.full(num_leaves + 1, num_leaves, dtype=np.int64)
        parent[-1] = -1
        return parent
    chunks = [labels[0] + num_leaves]
    offset = num_leaves
    for level, label in enumerate(labels):
        size = int(label.max()) + 1
        next_offset = offset + size
        if level + 1 < len(labels):
            chunks.append(labels[level + 1][first_occurrence(label, size)] + next_offset)
        elif size > 1:
            chunks.append(np.full(size, next_offset, dtype=np.int64))
            chunks.append(np.array([-1], dtype=np.int64))
        else:
            chunks.append(np.array([-1], dtype=np.int64))
        offset = next_offset
    return np.concatenate(chunks).astype(np.int64)
