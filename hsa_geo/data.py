r"""Nested signals inside :class:`torch_geometric.data.Data`.

A graph's leaves are the rows of :obj:`x` (ids ``0..N-1``); its
:obj:`num_clusters` cluster nodes have ids ``N..N+M-1`` *within the graph*.
The hierarchy travels as :obj:`hierarchy_edge_index` (``[2, N+M-1]``: child
in row 0, parent in row 1), which PyG's collater shifts by ``N + M`` per
graph, so the standard :class:`~torch_geometric.loader.DataLoader` batches
nested signals into a forest. :func:`hierarchy_from_data` turns a
:class:`~torch_geometric.data.Data` or a batch back into a
:class:`~hsa_geo.Hierarchy` (all leaves first, one tree per graph).
"""
from __future__ import annotations

from typing import Any, Dict

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Data

from hsa_geo.hierarchy.hierarchy import Hierarchy


class NestedSignal(Data):
    r"""A :class:`~torch_geometric.data.Data` carrying a hierarchy over its
    nodes (the leaves) in :obj:`hierarchy_edge_index` and
    :obj:`num_clusters`, and whether it is
    :attr:`~hsa_geo.Hierarchy.ordered` (a sequence or grid builder's) in
    :obj:`hierarchy_ordered`. Every graph carries the flag, so PyG batches
    any mix of ordered and unordered graphs; the batch's forest is ordered
    only when all its graphs are.

    Example::

        >>> import torch
        >>> from hsa_geo import Hierarchy
        >>> from hsa_geo.data import NestedSignal, hierarchy_from_data
        >>> h = Hierarchy.from_parent(torch.tensor([3, 3, 4, 4, -1]), num_leaves=3)
        >>> data = NestedSignal.from_hierarchy(torch.randn(3, 8), h)
        >>> data
        NestedSignal(x=[3, 8], hierarchy_edge_index=[2, 4], num_clusters=2, hierarchy_ordered=False)
        >>> hierarchy_from_data(data).parent.tolist()
        [3, 3, 4, 4, -1]
    """

    @classmethod
    def from_hierarchy(cls, x: Tensor, hierarchy: Hierarchy, **kwargs: Any) -> 'NestedSignal':
        r"""Wraps leaf features :obj:`x` and a single-graph hierarchy;
        further attributes (:obj:`edge_index`, :obj:`y`, ...) pass through."""
        if x.size(0) != hierarchy.num_leaves:
            raise ValueError(f"x has {x.size(0)} rows but the hierarchy has "
                             f"{hierarchy.num_leaves} leaves")
        return cls(x=x, **{**hierarchy_attributes(hierarchy), **kwargs})

    def __inc__(self, key: str, value: Any, *args, **kwargs) -> Any:
        if key == 'hierarchy_edge_index':
            return self.num_nodes + int(self.num_clusters)
        return super().__inc__(key, value, *args, **kwargs)

    def __cat_dim__(self, key: str, value: Any, *args, **kwargs) -> Any:
        if key == 'hierarchy_edge_index':
            return HIERARCHY_CAT_DIM
        return super().__cat_dim__(key, value, *args, **kwargs)


def _raise_on_edge_count(edge: Tensor, num_leaves: int, num_clusters: int,
                         num_graphs: int) -> None:
    r"""Raises the error that explains a number of parent edges other than
    one per node but the roots."""
    child, counts = torch.unique(edge[0], return_counts=True)
    if bool((counts > 1).any()):
        raise ValueError(f"Node {int(child[counts > 1][0])} has more than one parent in "
                         f"hierarchy_edge_index")
    trees = 'one tree' if num_graphs == 1 else f'{num_graphs} trees'
    expected = num_leaves + num_clusters - num_graphs
    cause = ("the nodes changed after the hierarchy was built (subgraph(), or a transform "
             "that adds or drops nodes). Build the hierarchy after such transforms "
             "(AddHierarchy last)")
    if edge.size(-1) < expected:  # more roots than graphs, or nodes were added
        cause = (f"the hierarchy has {expected - edge.size(-1)} more root(s) than graphs (a "
                 f"forest stored as one graph: give it one root cluster), or {cause}")
    raise ValueError(
        f"hierarchy_edge_index has {edge.size(-1)} parent edges, but {num_leaves} leaves and "
        f"{num_clusters} clusters in {trees} have {expected}: {cause}")


#: The dimension along which batches concatenate ``hierarchy_edge_index``:
#: the last, as for ``edge_index``, but given as a NumPy integer. PyG tells
#: node and edge attributes apart by their size along a *Python int* cat
#: dimension (``is_node_attr``, ``is_edge_attr``), so a hierarchy with as
#: many parent edges as the graph has edges or nodes was permuted, split or
#: subset with them by ``ToUndirected``, ``RandomLinkSplit``, ``subgraph``.
#: With any other index type PyG leaves it alone, while concatenation and
#: slicing (which take any integer index) batch and unbatch it as before.
HIERARCHY_CAT_DIM = np.int64(-1)


def hierarchy_attributes(hierarchy: Hierarchy) -> Dict[str, Any]:
    r"""The attributes of a :class:`NestedSignal` that store a single-graph
    :obj:`hierarchy`: :obj:`hierarchy_edge_index`, :obj:`num_clusters` and
    :obj:`hierarchy_ordered` (always present, so that graphs of both kinds
    batch together). A forest is refused: one graph holds one tree."""
    if hierarchy.num_trees != 1:
        raise ValueError(f"A NestedSignal holds one tree per graph, but the hierarchy is a "
                         f"forest of {hierarchy.num_trees} trees (roots "
                         f"{hierarchy.roots[:5].tolist()}): give it one root cluster, or "
                         f"wrap each tree in a NestedSignal of its own and batch them")
    return dict(hierarchy_edge_index=hierarchy.edge_index,
                num_clusters=hierarchy.num_clusters, hierarchy_ordered=hierarchy.ordered)


#: Attributes :func:`hierarchy_attributes` may set (a new hierarchy replaces
#: all of them).
HIERARCHY_KEYS = ('hierarchy_edge_index', 'num_clusters', 'hierarchy_ordered')

#: Attribute under which :class:`~hsa_geo.loader.HierarchyLoader` attaches
#: a batch's planned forest.
PLANNED_KEY = 'hierarchy'


# Processed PyG/OGB datasets of nested signals reload with torch.load's
# weights_only default (torch >= 2.6) only if the class is allow-listed.
torch.serialization.add_safe_globals([NestedSignal])


def hierarchy_from_data(data: Data) -> Hierarchy:
    r"""The :class:`~hsa_geo.Hierarchy` of a :class:`NestedSignal` or of a
    batch of them (a forest with one tree per graph and a graph id per node).

    Validates the batch: every graph must have exactly one root, and errors
    name the graph. Build it once per batch and pass it to every layer. The
    result is :attr:`~hsa_geo.Hierarchy.ordered` when every graph has
    :obj:`hierarchy_ordered` set. A batch from
    :class:`~hsa_geo.loader.HierarchyLoader` carries its forest, planned in
    the loader: it is returned (moved to the batch's device) instead.
    """
    planned = getattr(data, PLANNED_KEY, None) if PLANNED_KEY in data else None
    if isinstance(planned, Hierarchy):
        device = data.hierarchy_edge_index.device
        return planned if planned.parent.device == device else planned.to(device)
    if 'hierarchy_edge_index' not in data or 'num_clusters' not in data:
        raise ValueError("data has no hierarchy: expected 'hierarchy_edge_index' and "
                         "'num_clusters' (see NestedSignal.from_hierarchy)")
    edge = data.hierarchy_edge_index
    device = edge.device
    num_clusters = torch.as_tensor(data.num_clusters, device=device).view(-1).long()
    ptr = getattr(data, 'ptr', None)
    if ptr is None:
        num_leaves = torch.tensor([data.num_nodes], device=device)
    else:
        num_leaves = (ptr[1:] - ptr[:-1]).to(device)
    if num_leaves.numel() != num_clusters.numel():
        raise ValueError(f"num_clusters has {num_clusters.numel()} entries for "
                         f"{num_leaves.numel()} graphs")
    total_leaves = int(num_leaves.sum())
    graph_size = num_leaves + num_clusters
    node_offset = torch.cumsum(graph_size, 0) - graph_size
    leaf_offset = torch.cumsum(num_leaves, 0) - num_leaves
    cluster_offset = torch.cumsum(num_clusters, 0) - num_clusters + total_leaves
    num_nodes = int(graph_size.sum())
    if edge.size(-1) != num_nodes - num_leaves.numel():
        _raise_on_edge_count(edge, total_leaves, num_nodes - total_leaves, num_leaves.numel())
    if edge.numel() and (int(edge.min()) < 0 or int(edge.max()) >= num_nodes):
        raise ValueError(f"hierarchy_edge_index refers to node ids outside [0, {num_nodes - 1}]")

    graph_of = torch.repeat_interleave(torch.arange(graph_size.numel(), device=device),
                                       graph_size)
    local = torch.arange(num_nodes, device=device) - node_offset[graph_of]
    is_leaf = local < num_leaves[graph_of]
    new_id = torch.where(is_leaf, leaf_offset[graph_of] + local,
                         cluster_offset[graph_of] + local - num_leaves[graph_of])
    parent = torch.full((num_nodes, ), -1, dtype=torch.long, device=device)
    child, up = new_id[edge[0]], new_id[edge[1]]
    parents_per_node = torch.bincount(child, minlength=num_nodes)
    if bool((parents_per_node > 1).any()):
        repeated = (parents_per_node > 1).nonzero()[0, 0]
        raise ValueError(f"Node {int(repeated)} has more than one parent in hierarchy_edge_index")
    parent[child] = up
    batch = torch.empty_like(parent)
    batch[new_id] = graph_of
    ordered = 'hierarchy_ordered' in data and bool(torch.as_tensor(data.hierarchy_ordered).all())
    return Hierarchy.from_parent(parent.cpu(), total_leaves, batch=batch.cpu(),
                                 ordered=ordered).to(device)
