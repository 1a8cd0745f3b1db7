r"""Hierarchies for large graphs by recursive METIS partitioning."""
from __future__ import annotations

import math
from typing import List, Optional

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

from hsa_geo.hierarchy.builders.limits import (DEFAULT_MAX_CHILDREN, balanced_chunks,
                                               check_max_children, check_positive_int,
                                               finalize)
from hsa_geo.hierarchy.hierarchy import Hierarchy


def from_edge_index_metis(edge_index, num_nodes: Optional[int] = None,
                          max_children: int = DEFAULT_MAX_CHILDREN, seed: int = 0,
                          keep_chains: bool = False, edge_weight=None) -> Hierarchy:
    r"""Builds a balanced hierarchy over a (large) graph by recursive METIS
    partitioning (`pymetis <https://pypi.org/project/PyMetis/>`_).

    Each connected component gets its own subtree. A subtree over
    :math:`n > m^2` nodes (:math:`m` = :obj:`max_children`) is cut by METIS
    into :math:`m` parts of equal size with few edges between them; one over
    :math:`m < n \leq m^2` nodes into the fewest parts of at most :math:`m`
    nodes, which become leaf families. The tree is thus as shallow as
    :obj:`max_children` allows, :math:`\lceil \log_m n \rceil` levels (one
    more in the rare part where METIS' size tolerance overshoots), with
    full families at the bottom. All subgraphs of one level are extracted together
    with array operations, so the Python work is one METIS call per cluster
    with more than :math:`m` nodes. The graph is used as undirected;
    self-loops are ignored, and repeated edges (both directions included)
    count once, or add their weights.

    Args:
        edge_index (torch.Tensor): ``[2, E]`` edges (either or both
            directions).
        num_nodes (int, optional): Number of nodes :math:`N`; isolated nodes
            beyond the largest id count. (default: largest id + 1)
        max_children (int, optional): Most children of one cluster.
            (default: :obj:`32`)
        seed (int, optional): METIS' random seed. (default: :obj:`0`)
        keep_chains (bool, optional): Keep single-child clusters.
            (default: :obj:`False`)
        edge_weight (torch.Tensor, optional): ``[E]`` positive weights:
            METIS then minimises the weight of the cut edges. They are
            scaled to METIS' integers (the largest to 1000, none below 1).
            (default: :obj:`None`: every edge weighs 1)

    Returns:
        Hierarchy: One tree over the :math:`N` nodes (leaf :obj:`i` = node
        :obj:`i`).

    Raises:
        ValueError: for a malformed :obj:`edge_index`, ids outside
            :math:`[0, N)`, or :math:`N = 0`.
        ImportError: without :obj:`pymetis` (``pip install pymetis``).

    Complexity: :math:`O((N + E) \log_m N)` for the subgraph extraction
    plus METIS' near-linear :math:`O(N + E)` per level: 5.5 s of processor
    time (8.6 s wall-clock on a shared 2-core machine) for a 169k-node,
    1.2M-edge graph (``python -m benchmarks.builders``).

    Example::

        >>> import torch
        >>> from torch_geometric.datasets import KarateClub
        >>> from hsa_geo.hierarchy import from_edge_index_metis
        >>> data = KarateClub()[0]
        >>> h = from_edge_index_metis(data.edge_index, data.num_nodes, max_children=6)
        >>> h.num_leaves, h.summary()['max_children'] <= 6, h.max_depth
        (34, True, 2)
    """
    try:
        import pymetis
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("from_edge_index_metis() needs pymetis: pip install pymetis "
                          "(or the 'metis' extra of hsa_geo)") from error
    max_children = check_max_children(max_children)
    if max_children is None:
        raise ValueError("METIS needs a target family size: give max_children")
    src, dst, num_nodes, weight = undirected_edges(edge_index, num_nodes, edge_weight)
    partition = _MetisPartitioner(pymetis, src, dst, num_nodes, max_children, int(seed),
                                  _metis_weights(weight))
    parent = partition.build()
    return finalize(parent, num_nodes, max_children, keep_chains)


def undirected_edges(edge_index, num_nodes: Optional[int], edge_weight=None):
    r"""Both directions of every edge once, without self-loops, sorted by
    (source, target), the number of nodes and, with :obj:`edge_weight`, the
    summed weight of every such edge (else None)."""
    if not isinstance(edge_index, torch.Tensor):
        edge_index = torch.as_tensor(np.asarray(edge_index))
    if edge_index.dtype == torch.bool or edge_index.is_floating_point() \
            or edge_index.is_complex():
        raise ValueError(f"edge_index must hold integer node ids (got {edge_index.dtype})")
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"edge_index must have shape [2, E] (got {tuple(edge_index.shape)})")
    edges = edge_index.detach().cpu().to(torch.int64).numpy()
    if num_nodes is None:
        if edges.size == 0:
            raise ValueError("edge_index is empty: give num_nodes")
        num_nodes = int(edges.max()) + 1
    num_nodes = check_positive_int(num_nodes, 'num_nodes')
    if edges.size:
        low, high = int(edges.min()), int(edges.max())
        if low < 0 or high >= num_nodes:
            bad = low if low < 0 else high
            column = int(np.flatnonzero((edges == bad).any(0))[0])
            raise ValueError(f"Edge {column} refers to node {bad}, outside [0, {num_nodes - 1}]")
    src = np.concatenate([edges[0], edges[1]])
    dst = np.concatenate([edges[1], edges[0]])
    if edge_weight is not None:
        weight = _check_edge_weight(edge_weight, edges.shape[1])
        keep = src != dst
        key, inverse = np.unique(src[keep] * num_nodes + dst[keep], return_inverse=True)
        summed = np.bincount(inverse, weights=np.concatenate([weight, weight])[keep])
        return key // num_nodes, key % num_nodes, num_nodes, summed
    key = np.sort(src[src != dst] * num_nodes + dst[src != dst])
    key = key[np.concatenate([key[:1] == key[:1], key[1:] != key[:-1]])]  # faster than unique
    return key // num_nodes, key % num_nodes, num_nodes, None


def _check_edge_weight(edge_weight, num_edges: int) -> np.ndarray:
    weight = torch.as_tensor(edge_weight).detach().cpu()
    if weight.dim() == 2 and weight.size(1) == 1:
        weight = weight.view(-1)
    if weight.dim() != 1 or weight.numel() != num_edges:
        raise ValueError(f"edge_weight must have shape [{num_edges}] (one weight per edge), "
                         f"got {tuple(weight.shape)}")
    weight = weight.to(torch.float64).numpy()
    bad = np.flatnonzero(~np.isfinite(weight) | (weight <= 0))
    if bad.size:
        raise ValueError(f"edge_weight must be positive and finite: edge {int(bad[0])} has "
                         f"weight {weight[bad[0]]}")
    return weight


#: METIS takes integer edge weights: the largest becomes this.
METIS_WEIGHT_SCALE = 1000


def _metis_weights(weight: Optional[np.ndarray]) -> Optional[np.ndarray]:
    if weight is None or weight.size == 0:
        return weight
    return np.maximum(1, np.rint(weight * (METIS_WEIGHT_SCALE / weight.max()))).astype(np.int64)


#: METIS lets parts exceed their target size by up to 3 % (its default
#: ``ufactor``); asking for parts this much smaller keeps leaf families
#: within ``max_children`` without an extra level.
METIS_SLACK = 1.03


def num_parts(size: int, max_children: int) -> int:
    r"""Parts to cut :math:`n` nodes into: :math:`m` while :math:`n > m^2`
    (the widest split, so coarse levels are as fine as allowed and the
    depth stays :math:`\lceil \log_m n \rceil`), else
    :math:`\lceil 1.03\, n / m \rceil`: the fewest parts that fit
    :math:`m` leaves each, given METIS' size tolerance."""
    if size > max_children * max_children:
        return max_children
    return min(max_children, max(2, math.ceil(size * METIS_SLACK / max_children)))


class _MetisPartitioner:
    def __init__(self, pymetis, src, dst, num_nodes, max_children, seed, weight=None):
        self.pymetis = pymetis
        self.src, self.dst, self.weight = src, dst, weight
        self.num_nodes = num_nodes
        self.max_children = max_children
        self.options = pymetis.Options(seed=seed)
        self.index_dtype = pymetis.zero_copy_dtype() if hasattr(pymetis, 'zero_copy_dtype') \
            else np.dtype(np.int64)
        self.leaf_parent = np.full(num_nodes, -1, dtype=np.int64)
        self.cluster_parent: List[int] = []

    def new_cluster(self, parent: int) -> int:
        self.cluster_parent.append(parent)
        return self.num_nodes + len(self.cluster_parent) - 1

    def build(self) -> np.ndarray:
        adjacency = sp.csr_matrix((np.ones(self.src.size, dtype=np.int8), (self.src, self.dst)),
                                  shape=(self.num_nodes, self.num_nodes))
        num_components, component = connected_components(adjacency, directed=False)
        order = np.argsort(component, kind='stable')
        members = np.split(order, np.cumsum(np.bincount(component))[:-1])
        root = self.new_cluster(-1) if num_components > 1 else -1
        groups = []
        for nodes in members:
            if nodes.size == 1:
                self.leaf_parent[nodes] = root
            else:
                groups.append((self.new_cluster(root), nodes))
        while groups:
            groups = self._split_level(groups)
        return np.concatenate([self.leaf_parent,
                               np.asarray(self.cluster_parent, dtype=np.int64)])

    def _split_level(self, groups):
        r"""Gives small groups their leaves and cuts every large one, all
        subgraphs of this level extracted at once."""
        large = []
        for cluster, nodes in groups:
            if nodes.size <= self.max_children:
                self.leaf_parent[nodes] = cluster
            else:
                large.append((cluster, nodes))
        if not large:
            return []
        sizes = np.array([nodes.size for _, nodes in large])
        nodes_all = np.concatenate([nodes for _, nodes in large])
        group_of = np.full(self.num_nodes, -1, dtype=np.int64)
        group_of[nodes_all] = np.repeat(np.arange(len(large)), sizes)
        # Local ids follow node ids within each group, so the globally sorted
        # edge list stays sorted by local source after a stable group sort.
        sorted_nodes = nodes_all[np.lexsort((nodes_all, group_of[nodes_all]))]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        local = np.full(self.num_nodes, -1, dtype=np.int64)
        local[sorted_nodes] = np.arange(sorted_nodes.size) - np.repeat(starts[:-1], sizes)
        group_src = group_of[self.src]
        inside = (group_src >= 0) & (group_src == group_of[self.dst])
        edge_src, edge_dst = self.src[inside], self.dst[inside]
        edge_group = group_src[inside]
        order = np.argsort(edge_group, kind='stable')
        edge_src, edge_dst = local[edge_src[order]], local[edge_dst[order]]
        edge_weight = None if self.weight is None else self.weight[inside][order]
        edge_counts = np.bincount(edge_group, minlength=len(large))
        edge_starts = np.concatenate([[0], np.cumsum(edge_counts)])

        next_groups = []
        for index, (cluster, _) in enumerate(large):
            nodes = sorted_nodes[starts[index]:starts[index + 1]]
            span = slice(edge_starts[index], edge_starts[index + 1])
            degree = np.bincount(edge_src[span], minlength=nodes.size)
            xadj = np.concatenate([[0], np.cumsum(degree)]).astype(self.index_dtype)
            adjncy = edge_dst[span].astype(self.index_dtype)
            weights = None if edge_weight is None else edge_weight[span].astype(self.index_dtype)
            for part in self._cut(nodes.size, xadj, adjncy, weights):
                part_nodes = nodes[part]
                if part_nodes.size == 1:
                    self.leaf_parent[part_nodes] = cluster
                else:
                    next_groups.append((self.new_cluster(cluster), part_nodes))
        return next_groups

    def _cut(self, size: int, xadj, adjncy, weights=None) -> List[np.ndarray]:
        count = num_parts(size, self.max_children)
        if weights is not None:  # edge weights go with the raw CSR arrays
            graph = dict(xadj=xadj, adjncy=adjncy, eweights=weights)
        elif hasattr(self.pymetis, 'CSRAdjacency'):  # pymetis >= 2025.2
            graph = dict(adjacency=self.pymetis.CSRAdjacency(xadj, adjncy))
        else:  # pragma: no cover - older pymetis
            graph = dict(xadj=xadj, adjncy=adjncy)
        result = self.pymetis.part_graph(count, options=self.options, **graph)
        label = np.asarray(result[1], dtype=np.int64)
        order = np.argsort(label, kind='stable')
        parts = [p for p in np.split(order, np.cumsum(np.bincount(label))[:-1]) if p.size]
        if len(parts) < 2:  # METIS left everything together: cut by position
            parts = balanced_chunks(np.arange(size), math.ceil(size / count))
        return parts
