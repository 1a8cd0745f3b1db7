r"""PyG transforms that attach a hierarchy to a graph."""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import networkx as nx
import torch
from torch_geometric.data import Data, HeteroData
from torch_geometric.transforms import BaseTransform

from hsa_geo.data import HIERARCHY_KEYS, NestedSignal, hierarchy_attributes
from hsa_geo.hierarchy import DEFAULT_MAX_CHILDREN, Hierarchy, from_edge_index_metis, from_networkx
from hsa_geo.hierarchy.builders.graph import METHODS


class AddHierarchy(BaseTransform):
    r"""Builds a hierarchy over the nodes of a graph and returns the graph as a
    :class:`~hsa_geo.data.NestedSignal`, with every attribute kept (for the
    :class:`~hsa_geo.nn.HSAConv` layers, which read the hierarchy with
    :func:`~hsa_geo.data.hierarchy_from_data`).

    Use it as :obj:`pre_transform` of a dataset, so the clustering runs once
    when the dataset is processed, and PyG's
    :class:`~torch_geometric.loader.DataLoader` batches the trees into a
    forest:

    .. code-block:: python

        from torch_geometric.datasets import TUDataset  # or OGB's PygGraphPropPredDataset
        from hsa_geo.transforms import AddHierarchy

        dataset = TUDataset(root, 'MUTAG', pre_transform=AddHierarchy('louvain', max_children=16))

    Args:
        method (str or callable, optional): :obj:`"metis"`
            (:func:`~hsa_geo.hierarchy.from_edge_index_metis`, for large
            graphs), one of the networkx methods of
            :func:`~hsa_geo.hierarchy.from_networkx` (:obj:`"louvain"`,
            :obj:`"greedy_modularity"`, :obj:`"label_propagation"`,
            :obj:`"girvan_newman"`, :obj:`"asyn_fluid"`), or a callable
            ``method(data) -> Hierarchy``. (default: :obj:`"louvain"`)
        max_children (int, optional): Most children of one cluster.
            (default: :obj:`32`)
        seed (int, optional): Random seed of the method. (default: :obj:`0`)
        keep_chains (bool, optional): Keep single-child clusters.
            (default: :obj:`False`)
        use_edge_weight (bool, optional): Pass a one-dimensional
            :obj:`edge_weight` (or :obj:`edge_attr`) of the graph to the
            networkx method, or to METIS, as edge weights.
            (default: :obj:`False`)
        **kwargs: Passed to the builder (e.g. :obj:`resolution`,
            :obj:`max_levels`, :obj:`split`).

    The clustering methods give hierarchies without a sibling order
    (:attr:`Hierarchy.ordered <hsa_geo.Hierarchy.ordered>` is
    :obj:`False`, so :class:`~hsa_geo.nn.SiblingPositionBias` does not apply);
    a callable returning an ordered hierarchy (e.g. from
    :func:`~hsa_geo.hierarchy.chunk_sequence`) keeps the flag, stored as
    :obj:`hierarchy_ordered`.

    Graphs without edges, with isolated nodes, self-loops or repeated edges
    are fine; a graph without nodes raises :class:`ValueError`. Edges are used
    as undirected.

    Example::

        >>> from torch_geometric.datasets import KarateClub
        >>> from hsa_geo.transforms import AddHierarchy
        >>> data = AddHierarchy('louvain', max_children=8)(KarateClub()[0])
        >>> type(data).__name__, data.num_nodes, int(data.num_clusters) > 0
        ('NestedSignal', 34, True)
        >>> sorted(data.keys())
        ['edge_index', 'hierarchy_edge_index', 'hierarchy_leaf', 'hierarchy_ordered', 'num_clusters', 'train_mask', 'x', 'y']
    """

    def __init__(self, method: Union[str, Callable[[Data], Hierarchy]] = 'louvain',
                 max_children: Optional[int] = DEFAULT_MAX_CHILDREN, seed: int = 0,
                 keep_chains: bool = False, use_edge_weight: bool = False, **kwargs: Any):
        if not callable(method) and method != 'metis' and method not in METHODS:
            raise ValueError(f"Unknown method {method!r}; choose 'metis', one of {METHODS} "
                             f"or pass a callable")
        self.method = method
        self.max_children = max_children
        self.seed = seed
        self.keep_chains = keep_chains
        self.use_edge_weight = use_edge_weight
        self.kwargs = kwargs

    def hierarchy(self, data: Data) -> Hierarchy:
        r"""The hierarchy this transform builds for :obj:`data`."""
        num_nodes = data.num_nodes
        if not num_nodes:
            raise ValueError("The graph has no nodes; a hierarchy needs at least one leaf")
        if callable(self.method):
            hierarchy = self.method(data)
            if not isinstance(hierarchy, Hierarchy) or hierarchy.num_leaves != num_nodes:
                raise ValueError(f"The method must return a Hierarchy over the graph's "
                                 f"{num_nodes} nodes (got {hierarchy!r})")
            return hierarchy
        edge_index = data.edge_index if 'edge_index' in data else None
        if edge_index is None:
            edge_index = torch.empty(2, 0, dtype=torch.long)
        weight = self._edge_weight(data)
        if self.method == 'metis':
            return from_edge_index_metis(edge_index, num_nodes, max_children=self.max_children,
                                         seed=self.seed, keep_chains=self.keep_chains,
                                         edge_weight=weight, **self.kwargs)
        graph = nx.Graph()
        graph.add_nodes_from(range(num_nodes))
        if weight is None:
            graph.add_edges_from(edge_index.t().tolist())
        else:
            # Repeated edges (e.g. both directions) would overwrite each other
            # in nx.Graph; a MultiGraph keeps them and from_networkx sums them.
            graph = nx.MultiGraph(graph)
            graph.add_weighted_edges_from(
                (u, v, w) for (u, v), w in zip(edge_index.t().tolist(), weight.tolist()))
        return from_networkx(graph, method=self.method, seed=self.seed,
                             max_children=self.max_children, keep_chains=self.keep_chains,
                             **self.kwargs)

    def _edge_weight(self, data: Data) -> Optional[torch.Tensor]:
        if not self.use_edge_weight:
            return None
        for key in ('edge_weight', 'edge_attr'):
            value = data[key] if key in data else None
            if value is None:
                continue
            if value.dim() == 1 or (value.dim() == 2 and value.size(1) == 1):
                return value.view(-1).to(torch.float64)
        raise ValueError("use_edge_weight=True needs a one-dimensional 'edge_weight' or "
                         "'edge_attr'")

    def forward(self, data: Data) -> NestedSignal:
        if isinstance(data, HeteroData):
            raise ValueError("AddHierarchy works on homogeneous graphs (Data), not HeteroData")
        hierarchy = self.hierarchy(data)
        attrs = data.to_dict()
        for key in HIERARCHY_KEYS:  # replaced, if present
            attrs.pop(key, None)
        x = attrs.pop('x', None)
        if x is not None:
            return NestedSignal.from_hierarchy(x, hierarchy, **attrs)
        attrs.setdefault('num_nodes', hierarchy.num_leaves)
        return NestedSignal(**hierarchy_attributes(hierarchy), **attrs)

    def __repr__(self) -> str:
        method = getattr(self.method, '__name__', repr(self.method)) if callable(self.method) \
            else repr(self.method)
        extra = ''.join(f', {key}={value!r}' for key, value in sorted(self.kwargs.items()))
        return (f'{self.__class__.__name__}(method={method}, max_children={self.max_children}, '
                f'seed={self.seed}{extra})')
