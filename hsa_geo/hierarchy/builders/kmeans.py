r"""A two-level hierarchy from k-means: leaves grouped by their features.

What :func:`from_features` does with a dendrogram, this does in
:math:`O(nkf)` instead of :math:`O(n^2)` memory and time of a linkage, and
for the one shape that served zero-shot attention best
(``examples/zero_shot_minilm.py``): a root over many small clusters of
similar leaves. HSA is exact inside a cluster and block-constant between
two, so clusters of leaves with similar keys make the blocks it assumes
close to the softmax it approximates.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from hsa_geo.hierarchy.builders.limits import check_positive_int
from hsa_geo.hierarchy.hierarchy import Hierarchy

#: power-iteration steps for the top principal direction (initialisation)
POWER_STEPS = 4


def kmeans_labels(x: Tensor, num_clusters: int, iterations: int = 3) -> Tensor:
    r"""``[n]`` cluster labels of the rows of :obj:`x` ``[n, f]`` after
    :obj:`iterations` Lloyd steps from a deterministic start: the
    :obj:`num_clusters` rows at evenly spaced ranks along the top principal
    direction (a few power-iteration steps). Labels are
    ``0 .. num_clusters - 1``; a cluster may end empty."""
    x = x.float()
    centred = x - x.mean(0)
    direction = centred.new_ones(x.size(1))
    for _ in range(POWER_STEPS):
        direction = centred.t() @ (centred @ direction)
        direction = direction / direction.norm().clamp(min=1e-12)
    order = torch.argsort(centred @ direction, stable=True)
    ranks = torch.linspace(0, x.size(0) - 1, num_clusters, device=x.device).round().long()
    centres = x[order[ranks]]
    for _ in range(iterations):
        labels = torch.cdist(x, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=num_clusters)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
    return torch.cdist(x, centres).argmin(1)


def from_kmeans(features: Tensor, cluster_size: int = 4, iterations: int = 3) -> Hierarchy:
    r"""A root over the k-means clusters of the rows of :obj:`features`,
    :math:`k = \lceil n / \text{cluster\_size} \rceil`
    (:func:`kmeans_labels`). Empty clusters vanish and a cluster of one
    leaf is that leaf, under the root; :math:`n \le` :obj:`cluster_size`
    gives the flat tree (exact softmax attention). Unlike the other
    builders it does not bound the root's children by a
    :obj:`max_children`: the root holds up to :math:`k` of them, and HSA
    costs about :math:`k^2 + n \cdot \text{cluster\_size}` pairs (deeper
    trees over the clusters were cheaper and much less accurate where we
    measured).

    Args:
        features (torch.Tensor): ``[n, f]`` finite features, one row per leaf
            (e.g. a layer's keys, heads concatenated).
        cluster_size (int, optional): Mean number of leaves per cluster.
            (default: :obj:`4`)
        iterations (int, optional): Lloyd iterations. (default: :obj:`3`)

    Returns:
        Hierarchy: One tree over the :math:`n` rows, depth at most 2,
        clusters numbered in order of their first leaf.

    Raises:
        ValueError: for no rows, a non-2-D input, or a non-finite row (named).

    Complexity: :math:`O(nkf \cdot (\text{iterations} + 1))`, counted by
    :func:`hsa_geo.flops.kmeans_flops`.

    Example::

        >>> import torch
        >>> from hsa_geo.hierarchy import from_kmeans
        >>> x = torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.1, 0.0], [5.0, 5.1], [9.0, 0.0]])
        >>> from_kmeans(x, cluster_size=2).parent.tolist()
        [5, 6, 5, 6, 7, 7, 7, -1]
    """
    if not isinstance(features, Tensor) or features.dim() != 2 or features.size(0) == 0:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a [n, f] tensor with n >= 1 (got {shape})")
    finite = torch.isfinite(features).all(1)
    if not bool(finite.all()):
        raise ValueError(f"Row {int((~finite).nonzero()[0, 0])} of features is not finite")
    cluster_size = check_positive_int(cluster_size, 'cluster_size')
    iterations = check_positive_int(iterations, 'iterations', minimum=0)
    num_leaves = features.size(0)
    num_clusters = math.ceil(num_leaves / cluster_size)
    if num_clusters <= 1:
        return Hierarchy.flat(num_leaves)
    return from_cluster_labels(kmeans_labels(features.detach().cpu(), num_clusters, iterations))


def from_cluster_labels(labels: Tensor) -> Hierarchy:
    r"""A root over the clusters named by :obj:`labels` ``[n]`` (any
    integers; one cluster per distinct value): a cluster of two or more
    leaves is a child of the root (clusters numbered by their first leaf),
    a cluster of one leaf is that leaf, under the root.

    Example::

        >>> import torch
        >>> from hsa_geo.hierarchy.builders.kmeans import from_cluster_labels
        >>> from_cluster_labels(torch.tensor([7, 3, 7, 3, 1])).parent.tolist()
        [5, 6, 5, 6, 7, 7, 7, -1]
    """
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.numel() == 0:
        raise ValueError("labels must be a non-empty 1-D tensor of cluster ids")
    num_leaves = labels.numel()
    _, labels, counts = torch.unique(labels.cpu().long(), return_inverse=True, return_counts=True)
    num_clusters = counts.numel()
    if num_clusters == 1:  # one cluster of everything: the root itself
        return Hierarchy.flat(num_leaves)
    # clusters of two or more leaves, numbered by their first leaf
    first = torch.full((num_clusters, ), num_leaves, dtype=torch.long).scatter_reduce_(
        0, labels, torch.arange(num_leaves), 'amin')
    kept = (counts >= 2).nonzero().view(-1)
    kept = kept[torch.argsort(first[kept])]
    cluster_id = torch.full((num_clusters, ), -1, dtype=torch.long)
    cluster_id[kept] = num_leaves + torch.arange(kept.numel())
    root = num_leaves + kept.numel()
    parent = torch.full((root + 1, ), root, dtype=torch.long)
    in_cluster = cluster_id[labels] >= 0
    parent[:num_leaves] = torch.where(in_cluster, cluster_id[labels], root)
    parent[root] = -1
    return Hierarchy.from_parent(parent, num_leaves)
