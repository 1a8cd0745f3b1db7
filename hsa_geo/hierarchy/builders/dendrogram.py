r"""Hierarchies from dendrograms (scipy linkage matrices) and from features
by agglomerative clustering."""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch

from hsa_geo.hierarchy.builders.limits import (DEFAULT_MAX_CHILDREN, check_max_children,
                                               check_positive_int, finalize,
                                               size_aware_chunks)
from hsa_geo.hierarchy.builders.partitions import tree_from_levels
from hsa_geo.hierarchy.hierarchy import Hierarchy


def from_linkage(Z, max_depth: Optional[int] = None,
                 max_children: Optional[int] = DEFAULT_MAX_CHILDREN,
                 keep_chains: bool = False) -> Hierarchy:
    r"""Collapses a binary dendrogram into a tree of bounded depth.

    :obj:`Z` is a scipy linkage matrix over :math:`n` observations (row
    :math:`i` merges clusters :obj:`Z[i, 0]` and :obj:`Z[i, 1]` into cluster
    :math:`n + i`). The dendrogram is cut :math:`D - 1` times, where
    :math:`D` = :obj:`max_depth`: the cut into :math:`k` clusters undoes the
    last :math:`k - 1` merges, so cuts are nested. The counts shrink about
    geometrically: cut :math:`l` has :math:`k_l` clusters within a factor
    :math:`n^{1/(2D)}` of :math:`n^{1 - l/D}`, chosen there where the merge
    height grows by the largest factor, so well-separated clusters are kept
    whole. Each cut is
    one level of the tree, under one root. Families that still have more than
    :obj:`max_children` children (an unbalanced dendrogram, e.g. single
    linkage's chaining) are split into balanced chunks along the
    dendrogram's leaf order, so chunks hold neighbouring observations; the
    depth is then at most :math:`D` plus :math:`\lceil \log_m n \rceil`.

    Args:
        Z (numpy.ndarray or torch.Tensor): ``[n - 1, 4]`` linkage matrix, as
            returned by :func:`scipy.cluster.hierarchy.linkage` (on features
            or on a condensed distance matrix).
        max_depth (int, optional): Levels :math:`D` of the tree before
            splitting. (default: :math:`\lceil \log_m n \rceil`, the
            shallowest a tree with :math:`m` = :obj:`max_children` can be)
        max_children (int, optional): Most children of one cluster, or
            :obj:`None` for no bound. (default: :obj:`32`)
        keep_chains (bool, optional): Keep single-child clusters.
            (default: :obj:`False`)

    Returns:
        Hierarchy: One tree over the :math:`n` observations (leaf :obj:`i`
        = observation :obj:`i`).

    Raises:
        ValueError: for a matrix that is not a valid linkage (scipy's
            message, or a height that is not finite), or a bad
            :obj:`max_depth`.

    Complexity: :math:`O(D\, n \log n)`, vectorised.

    Example::

        >>> import numpy as np
        >>> from scipy.cluster.hierarchy import linkage
        >>> from hsa_geo.hierarchy import from_linkage
        >>> x = np.array([[0.0], [0.1], [5.0], [5.1], [5.3], [9.0]])
        >>> h = from_linkage(linkage(x, 'average'), max_depth=3)
        >>> h.parent.tolist()  # root -> {0, 1}, {2, 3, 4, 5}; {2, 3, 4, 5} -> {2, 3, 4}, 5
        [7, 7, 6, 6, 6, 8, 8, 9, 9, -1]
    """
    from scipy.cluster.hierarchy import is_valid_linkage, leaves_list

    Z = Z.detach().cpu().numpy() if isinstance(Z, torch.Tensor) else np.asarray(Z)
    try:
        Z = Z.astype(np.float64)
        is_valid_linkage(Z, throw=True, name='Z')
    except (TypeError, ValueError) as error:
        raise ValueError(f"Not a valid linkage matrix: {error}") from None
    bad = np.flatnonzero(~np.isfinite(Z[:, 2]))
    if bad.size:  # scipy accepts NaN heights; the cuts would follow them silently
        raise ValueError(f"Not a valid linkage matrix: merge {int(bad[0])} has height "
                         f"{Z[bad[0], 2]} (heights must be finite)")
    num_leaves = Z.shape[0] + 1
    max_children = check_max_children(max_children)
    if max_depth is None:
        max_depth = _shallowest_depth(num_leaves, max_children or DEFAULT_MAX_CHILDREN)
    max_depth = check_positive_int(max_depth, 'max_depth')
    merges = Z[:, :2].astype(np.int64)
    counts = _cut_counts(Z[:, 2], num_leaves, max_depth)
    labels = [_cut(merges, num_leaves, count) for count in counts]
    order = np.empty(num_leaves, dtype=np.int64)
    order[leaves_list(Z)] = np.arange(num_leaves)
    return finalize(tree_from_levels(labels, num_leaves), num_leaves, max_children,
                    keep_chains, _OrderSplitter(order))


def _shallowest_depth(num_leaves: int, max_children: int) -> int:
    depth, capacity = 1, max_children
    while capacity < num_leaves:
        capacity *= max_children
        depth += 1
    return depth


def _cut_counts(heights: np.ndarray, num_leaves: int, max_depth: int) -> List[int]:
    r"""Cluster counts of the :math:`D - 1` cuts, fine to coarse: near the
    geometric targets :math:`n^{1 - l/D}`, each snapped, within a factor
    :math:`n^{1/(2D)}` of its target, to the count whose cut undoes the
    merge with the largest height ratio, so clear clusters stay whole."""
    counts: List[int] = []
    # Jumps are compared as ratios (log differences): scale-free, and merge
    # heights grow towards the root.
    log_height = np.log(np.maximum(heights, 0) + 1e-12 * max(float(heights.max()), 1e-300))
    spread = num_leaves ** (0.5 / max_depth)
    upper = num_leaves - 1
    for level in range(1, max_depth):
        target = num_leaves ** (1 - level / max_depth)
        low, high = max(2, int(target / spread)), min(upper, int(np.ceil(target * spread)))
        if low > high:
            continue
        ks = np.arange(low, high + 1)
        # cut into k clusters: merges 0..n-k-1 kept, n-k..n-2 undone
        jump = log_height[num_leaves - ks] - log_height[num_leaves - ks - 1]
        best = int(ks[np.argmax(jump)])
        counts.append(best)
        upper = best - 1
    return counts


def _cut(merges: np.ndarray, num_leaves: int, num_clusters: int) -> np.ndarray:
    r"""Cluster label (contiguous) of every observation after the first
    :math:`n - k` merges, by pointer jumping up the merged part of the
    dendrogram."""
    kept = num_leaves - num_clusters
    num_nodes = num_leaves + kept
    up = np.arange(num_nodes)
    up[merges[:kept].reshape(-1)] = np.repeat(np.arange(num_leaves, num_nodes), 2)
    while True:
        jumped = up[up]
        if np.array_equal(jumped, up):
            break
        up = jumped
    _, label = np.unique(up[:num_leaves], return_inverse=True)
    return label.reshape(-1).astype(np.int64)


class _OrderSplitter:
    r"""Chunks a family's children along a given leaf order (the dendrogram's):
    children sorted by the first position of their leaves."""
    needs_leaves = True

    def __init__(self, position: np.ndarray):
        self.position = position

    def __call__(self, items, max_children: int, leaves_of,
                 sizes: Optional[np.ndarray] = None) -> List[np.ndarray]:
        first = np.array([int(self.position[leaves_of(item)].min()) for item in items])
        order = np.argsort(first, kind='stable')
        return size_aware_chunks(order, max_children, None if sizes is None else sizes[order])


def from_features(x, method: str = 'ward', metric: str = 'euclidean',
                  max_depth: Optional[int] = None,
                  max_children: Optional[int] = DEFAULT_MAX_CHILDREN,
                  keep_chains: bool = False) -> Hierarchy:
    r"""Agglomerative clustering of feature vectors
    (:func:`scipy.cluster.hierarchy.linkage`), collapsed by
    :func:`from_linkage`. For a precomputed distance matrix :obj:`D`, call
    ``from_linkage(linkage(squareform(D), method))`` instead.

    Args:
        x (torch.Tensor or numpy.ndarray): ``[n, d]`` features, finite.
        method (str, optional): Linkage method (:obj:`"ward"`,
            :obj:`"average"`, :obj:`"complete"`, :obj:`"single"`, ...).
            (default: :obj:`"ward"`)
        metric (str, optional): Distance between observations (ward,
            centroid and median need :obj:`"euclidean"`).
            (default: :obj:`"euclidean"`)
        max_depth (int, optional): See :func:`from_linkage`.
        max_children (int, optional): Most children of one cluster, or
            :obj:`None` for no bound. (default: :obj:`32`)
        keep_chains (bool, optional): Keep single-child clusters.
            (default: :obj:`False`)

    Returns:
        Hierarchy: One tree over the :math:`n` rows of :obj:`x`.

    Raises:
        ValueError: for no rows, a non-2-D input, non-finite values, or an
            unknown method or metric.

    Complexity: scipy's linkage, :math:`O(n^2)` time and memory (keep
    :math:`n` to a few ten thousands), then :func:`from_linkage`.

    Example::

        >>> import torch
        >>> from hsa_geo.hierarchy import from_features
        >>> x = torch.tensor([[0.0, 0.0], [0.0, 0.2], [4.0, 4.0], [4.2, 4.0], [4.0, 4.3]])
        >>> from_features(x, max_depth=2).parent.tolist()
        [5, 5, 6, 6, 6, 7, 7, -1]
    """
    from scipy.cluster.hierarchy import linkage

    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be [n, d] with n >= 1 (got shape {tuple(x.shape)})")
    try:
        x = x.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"x must hold numbers (got dtype {x.dtype})") from None
    if not np.isfinite(x).all():
        row = int(np.flatnonzero(~np.isfinite(x).all(1))[0])
        raise ValueError(f"Row {row} of x is not finite")
    if x.shape[0] == 1:
        return Hierarchy.from_parent(torch.tensor([-1]), 1)
    try:
        Z = linkage(x, method=method, metric=metric)
    except (TypeError, ValueError) as error:
        raise ValueError(f"scipy linkage failed: {error}") from None
    return from_linkage(Z, max_depth=max_depth, max_children=max_children,
                        keep_chains=keep_chains)
