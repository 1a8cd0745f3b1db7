r"""Nested signals inside :class:`torch_geometric.data.Data`.

A graph's leaves are the rows of :obj:`x` (ids ``0..N-1``); its
:obj:`num_clusters` cluster nodes have ids ``N..N+M-1`` *within the graph*.
The hierarchy travels as :obj:`hierarchy_edge_index` (``[2, N+M-1]``: child
in row 0, parent in row 1), which PyG's collater shifts by ``N + M`` per
graph, so the standard :class:`~torch_geometric.loader.DataLoader` batches
nested signals into a forest. :func:`hierarchy_from_data` turns a
:class:`~torch_geometric.data.Data` or a batch back into a
:class:`~hsa_geo.Hierarchy` (all leaves first, one tree per graph).

Every node also records which leaf of the tree it is, in the node
attribute :obj:`hierarchy_leaf` (``arange(N)`` when the hierarchy is
attached). PyG selects and permutes it with the other node attributes, so
after :meth:`~torch_geometric.data.Data.subgraph`, a
:class:`~torch_geometric.loader.NeighborLoader` batch or a Cluster-GCN
partition (:class:`~torch_geometric.loader.ClusterData`) the nodes still
name their leaves, and :func:`hierarchy_from_data` returns the tree
restricted to them (:func:`~hsa_geo.hierarchy.subhierarchy`), in their
order.
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Batch, Data

from hsa_geo.hierarchy.hierarchy import Hierarchy
from hsa_geo.hierarchy.subgraph import check_leaf_ids, restrict_parent


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
        NestedSignal(x=[3, 8], hierarchy_edge_index=[2, 4], num_clusters=2, hierarchy_ordered=False, hierarchy_leaf=[3])
        >>> hierarchy_from_data(data).parent.tolist()
        [3, 3, 4, 4, -1]
        >>> # nodes 2 and 0 only: the hierarchy follows (leaf 1's cluster is gone)
        >>> hierarchy_from_data(data.subgraph(torch.tensor([2, 0]))).parent.tolist()
        [2, 2, -1]

    A graph whose nodes were permuted, subset or sampled after its
    hierarchy was attached gets the hierarchy restricted to its nodes, in
    their order; a node id repeated or outside the tree is refused, naming
    the node.
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
            # the tree's nodes (one parent edge per node but the root), which
            # differ from num_nodes + num_clusters once nodes were sampled
            return value.size(-1) + 1
        return super().__inc__(key, value, *args, **kwargs)

    def __cat_dim__(self, key: str, value: Any, *args, **kwargs) -> Any:
        if key == 'hierarchy_edge_index':
            return HIERARCHY_CAT_DIM
        return super().__cat_dim__(key, value, *args, **kwargs)


#: The dimension along which batches concatenate ``hierarchy_edge_index``:
#: the last, as for ``edge_index``, but given as a NumPy integer. PyG tells
#: node and edge attributes apart by their size along a *Python int* cat
#: dimension (``is_node_attr``, ``is_edge_attr``), so a hierarchy with as
#: many parent edges as the graph has edges or nodes was permuted, split or
#: subset with them by ``ToUndirected``, ``RandomLinkSplit``, ``subgraph``.
#: With any other index type PyG leaves it alone, while concatenation and
#: slicing (which take any integer index) batch and unbatch it as before.
HIERARCHY_CAT_DIM = np.int64(-1)


#: Node attribute holding, for every node, its leaf in the hierarchy
#: (PyG selects and permutes it with the other node attributes).
LEAF_KEY = 'hierarchy_leaf'


def hierarchy_attributes(hierarchy: Hierarchy) -> Dict[str, Any]:
    r"""The attributes of a :class:`NestedSignal` that store a single-graph
    :obj:`hierarchy`: :obj:`hierarchy_edge_index`, :obj:`num_clusters`,
    :obj:`hierarchy_ordered` (always present, so that graphs of both kinds
    batch together) and :obj:`hierarchy_leaf` (every node's leaf,
    ``arange(N)``). A forest is refused: one graph holds one tree."""
    if hierarchy.num_trees != 1:
        raise ValueError(f"A NestedSignal holds one tree per graph, but the hierarchy is a "
                         f"forest of {hierarchy.num_trees} trees (roots "
                         f"{hierarchy.roots[:5].tolist()}): give it one root cluster, or "
                         f"wrap each tree in a NestedSignal of its own and batch them")
    leaf = torch.arange(hierarchy.num_leaves, device=hierarchy.parent.device)
    return dict(hierarchy_edge_index=hierarchy.edge_index,
                num_clusters=hierarchy.num_clusters, hierarchy_ordered=hierarchy.ordered,
                hierarchy_leaf=leaf)


#: Attributes :func:`hierarchy_attributes` may set (a new hierarchy replaces
#: all of them).
HIERARCHY_KEYS = ('hierarchy_edge_index', 'num_clusters', 'hierarchy_ordered', LEAF_KEY)

#: Attribute under which :class:`~hsa_geo.loader.HierarchyLoader` attaches
#: a batch's planned forest.
PLANNED_KEY = 'hierarchy'


# Processed PyG/OGB datasets of nested signals reload with torch.load's
# weights_only default (torch >= 2.6) only if the class is allow-listed.
torch.serialization.add_safe_globals([NestedSignal])



class BatchForest:
    r"""The forest of the batch last passed to :func:`hierarchy_from_data`,
    kept so that every layer a model passes the same batch to shares one
    :class:`~hsa_geo.Hierarchy` (and what the engines cached for it). The
    batch is recognised by the tensors its forest is read from --
    :obj:`hierarchy_edge_index`, the nodes' :obj:`hierarchy_leaf`,
    :obj:`num_clusters`, :obj:`ptr` and the forest a
    :class:`~hsa_geo.loader.HierarchyLoader` planned -- held weakly (the
    batch is not kept alive; only the last forest is), and by the tensors'
    versions: a new batch, a new sample of the same graph (whose batches
    share the whole graph's :obj:`hierarchy_edge_index`) or an in-place edit
    builds the forest anew."""

    def __init__(self):
        self.sources: Tuple = ()  # (weak reference, version) of everything read
        self.hierarchy: Optional[Hierarchy] = None

    @staticmethod
    def _sources_of(data: Data) -> Tuple:
        sources = []
        for key in ('hierarchy_edge_index', LEAF_KEY, 'num_clusters', 'ptr', PLANNED_KEY):
            value = data[key] if key in data else None
            if isinstance(value, Tensor):
                sources.append((weakref.ref(value), value._version))
            elif isinstance(value, Hierarchy):
                sources.append((weakref.ref(value), None))
            else:  # absent, or a number: compared by value
                sources.append((None, value))
        return tuple(sources)

    def _is_current(self, sources: Tuple, data: Data) -> bool:
        if self.hierarchy is None:
            return False
        for (kept, kept_state), (new, new_state) in zip(self.sources, sources):
            if (kept is None) != (new is None) or kept_state != new_state:
                return False
            if kept is not None and kept() is not new():
                return False
        return (self.hierarchy.num_leaves == data.num_nodes
                and self.hierarchy.parent.device == data.hierarchy_edge_index.device)

    def __call__(self, data: Data) -> Hierarchy:
        if getattr(data, 'hierarchy_edge_index', None) is None:  # no hierarchy: its error
            return build_hierarchy(data)
        sources = self._sources_of(data)
        if not self._is_current(sources, data):
            self.hierarchy, self.sources = build_hierarchy(data), sources
        return self.hierarchy


#: the one per-batch cache of forests (see :class:`BatchForest`)
BATCH_FOREST = BatchForest()


def hierarchy_from_data(data: Data) -> Hierarchy:
    r"""The :class:`~hsa_geo.Hierarchy` of a :class:`NestedSignal` or of a
    batch of them (a forest with one tree per graph and a graph id per node).

    Validates the batch: every graph must have exactly one root, and errors
    name the graph. The forest of the batch last passed is kept
    (:class:`BatchForest`): every layer given the same batch gets the same
    hierarchy, built once. The result is
    :attr:`~hsa_geo.Hierarchy.ordered` when every graph has
    :obj:`hierarchy_ordered` set. A batch from
    :class:`~hsa_geo.loader.HierarchyLoader` carries its forest, planned in
    the loader: it is returned (moved to the batch's device) instead.

    When the nodes were selected or reordered after the hierarchy was
    attached (:meth:`~torch_geometric.data.Data.subgraph`, a
    :class:`~torch_geometric.loader.NeighborLoader` or
    :class:`~torch_geometric.loader.ClusterLoader` batch, any permutation
    by PyG), their :obj:`hierarchy_leaf` names their leaves, and the result
    is the tree restricted to them, in their order
    (:func:`~hsa_geo.hierarchy.subhierarchy`: single-child clusters
    removed, ordered only if the leaves kept their order).

    Raises:
        ValueError: naming the node or graph, for a malformed hierarchy, a
            node whose :obj:`hierarchy_leaf` is repeated or not a leaf, or
            nodes that changed without a :obj:`hierarchy_leaf` to follow
            them.
    """
    return BATCH_FOREST(data)


def build_hierarchy(data: Data) -> Hierarchy:
    r""":func:`hierarchy_from_data` without its cache: the forest of
    :obj:`data`, built (or taken from the loader's plan) on every call."""
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
        if int(ptr[-1]) != data.num_nodes:
            raise ValueError(f"data.ptr describes {int(ptr[-1])} nodes, but data has "
                             f"{data.num_nodes}: nodes were selected from a batch of graphs. "
                             f"Select nodes of each graph (or sample from one large graph) "
                             f"before batching")
        num_leaves = (ptr[1:] - ptr[:-1]).to(device)
    if num_leaves.numel() != num_clusters.numel():
        raise ValueError(f"num_clusters has {num_clusters.numel()} entries for "
                         f"{num_leaves.numel()} graphs")
    whole = edge.size(-1) == int(num_leaves.sum() + num_clusters.sum()) - num_leaves.numel()
    leaf = data[LEAF_KEY] if LEAF_KEY in data else None
    if leaf is not None and (leaf.dim() != 1 or leaf.numel() != data.num_nodes):
        raise ValueError(f"{LEAF_KEY} has shape {tuple(leaf.shape)}, but the data has "
                         f"{data.num_nodes} nodes: nodes were added without a leaf of the "
                         f"hierarchy. Attach the hierarchy after the transform that adds them")
    if leaf is not None and not (whole and leaves_in_place(leaf, num_leaves)):
        return restricted_hierarchy(data)
    planned = getattr(data, PLANNED_KEY, None) if PLANNED_KEY in data else None
    if isinstance(planned, Hierarchy) and planned.num_leaves == data.num_nodes:
        return planned if planned.parent.device == device else planned.to(device)
    total_leaves = int(num_leaves.sum())
    if not whole:
        _raise_on_edge_count(edge, total_leaves, int(num_clusters.sum()), num_leaves.numel())
    graph_size = num_leaves + num_clusters
    node_offset = torch.cumsum(graph_size, 0) - graph_size
    leaf_offset = torch.cumsum(num_leaves, 0) - num_leaves
    cluster_offset = torch.cumsum(num_clusters, 0) - num_clusters + total_leaves
    num_nodes = int(graph_size.sum())
    stored_parent = parent_pointers(edge, num_nodes)

    graph_of = torch.repeat_interleave(torch.arange(graph_size.numel(), device=device),
                                       graph_size)
    local = torch.arange(num_nodes, device=device) - node_offset[graph_of]
    is_leaf = local < num_leaves[graph_of]
    new_id = torch.where(is_leaf, leaf_offset[graph_of] + local,
                         cluster_offset[graph_of] + local - num_leaves[graph_of])
    parent = torch.full((num_nodes, ), -1, dtype=torch.long, device=device)
    has_parent = stored_parent >= 0
    parent[new_id[has_parent]] = new_id[stored_parent[has_parent]]
    batch = torch.empty_like(parent)
    batch[new_id] = graph_of
    return Hierarchy.from_parent(parent.cpu(), total_leaves, batch=batch.cpu(),
                                 ordered=stored_as_ordered(data)).to(device)


def leaves_in_place(leaf: Tensor, num_leaves: Tensor) -> bool:
    r"""Whether the :obj:`hierarchy_leaf` of a graph, or of a batch with
    :obj:`num_leaves` nodes per graph, is ``0, 1, ...`` within every graph
    (the nodes are the hierarchy's leaves, in order)."""
    start = torch.cumsum(num_leaves, 0) - num_leaves
    graph_of = torch.repeat_interleave(torch.arange(num_leaves.numel(), device=leaf.device),
                                       num_leaves.to(leaf.device))
    local = torch.arange(leaf.numel(), device=leaf.device) - start.to(leaf.device)[graph_of]
    return bool(torch.equal(leaf.long(), local))


def restricted_hierarchy(data: Data) -> Hierarchy:
    r"""The hierarchy of a graph (or batch) whose nodes are a selection of
    its tree's leaves, named by :obj:`hierarchy_leaf`: the stored tree
    restricted to them (:func:`~hsa_geo.hierarchy.subhierarchy`)."""
    if getattr(data, 'ptr', None) is not None:
        if not isinstance(data, Batch):
            raise ValueError("The graphs of this batch hold selected nodes, but it is not a "
                             "torch_geometric Batch, so its graphs cannot be told apart: "
                             "batch them with Batch.from_data_list (or a PyG DataLoader)")
        return Hierarchy.batch_hierarchies([build_hierarchy(graph)
                                            for graph in data.to_data_list()])
    if 'batch' in data and data.batch is not None:
        raise ValueError("The nodes carry a 'batch' vector but no 'ptr': a disjoint "
                         "NeighborLoader batch (disjoint=True), in which a node appears once "
                         "per seed. HSA over it is not supported: sample with disjoint=False")
    edge = data.hierarchy_edge_index
    num_tree_nodes = edge.size(-1) + 1  # one tree: every node but the root has a parent
    num_tree_leaves = num_tree_nodes - int(data.num_clusters)
    if num_tree_leaves < 1:
        raise ValueError(f"hierarchy_edge_index has {edge.size(-1)} parent edges, too few "
                         f"for {int(data.num_clusters)} clusters above at least one leaf")
    parent = parent_pointers(edge, num_tree_nodes)
    roots = (parent < 0).nonzero().view(-1)
    if roots.numel() != 1:
        raise ValueError(f"hierarchy_edge_index stores {roots.numel()} roots (nodes "
                         f"{roots[:5].tolist()}), but a graph holds one tree")
    leaf = check_leaf_ids(data[LEAF_KEY], num_tree_leaves, position='node')
    parent, _ = restrict_parent(parent, num_tree_leaves, leaf.to(parent.device))
    # sibling order survives a selection that keeps the leaves' order
    ordered = stored_as_ordered(data) and bool((leaf[1:] > leaf[:-1]).all())
    return Hierarchy.from_parent(parent.cpu(), leaf.numel(), ordered=ordered).to(edge.device)


def stored_as_ordered(data: Data) -> bool:
    r"""Whether every graph of :obj:`data` has :obj:`hierarchy_ordered` set."""
    return 'hierarchy_ordered' in data and bool(torch.as_tensor(data.hierarchy_ordered).all())


def parent_pointers(edge: Tensor, num_nodes: int) -> Tensor:
    r"""``[num_nodes]`` parent pointers (:obj:`-1` for a root) from
    child-to-parent edges, or a :class:`ValueError` naming a node id out of
    range or a node with two parents."""
    if edge.numel() and (int(edge.min()) < 0 or int(edge.max()) >= num_nodes):
        raise ValueError(f"hierarchy_edge_index refers to node ids outside [0, {num_nodes - 1}]")
    parents_per_node = torch.bincount(edge[0], minlength=num_nodes)
    if bool((parents_per_node > 1).any()):
        repeated = (parents_per_node > 1).nonzero()[0, 0]
        raise ValueError(f"Node {int(repeated)} has more than one parent in hierarchy_edge_index")
    parent = torch.full((num_nodes, ), -1, dtype=torch.long, device=edge.device)
    parent[edge[0]] = edge[1].long()
    return parent


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
    cause = (f"the nodes changed after the hierarchy was built (subgraph(), a sampling "
             f"loader, or a transform that adds or drops nodes), and the data has no "
             f"'{LEAF_KEY}' to follow them. Attach the hierarchy with AddHierarchy or "
             f"NestedSignal.from_hierarchy, which record every node's leaf")
    if edge.size(-1) < expected:  # more roots than graphs, or nodes were added
        cause = (f"the hierarchy has {expected - edge.size(-1)} more root(s) than graphs (a "
                 f"forest stored as one graph: give it one root cluster), or {cause}")
    raise ValueError(
        f"hierarchy_edge_index has {edge.size(-1)} parent edges, but {num_leaves} leaves and "
        f"{num_clusters} clusters in {trees} have {expected}: {cause}")
