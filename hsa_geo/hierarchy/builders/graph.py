r"""Hierarchies from networkx community detection."""
from __future__ import annotations

import math
from itertools import islice
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Union

import networkx as nx
import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components, reverse_cuthill_mckee

from hsa_geo.hierarchy.builders.limits import (DEFAULT_MAX_CHILDREN, check_positive_int,
                                               finalize, size_aware_chunks)
from hsa_geo.hierarchy.builders.partitions import (check_refinement, first_occurrence,
                                                   partition_labels)
from hsa_geo.hierarchy.hierarchy import Hierarchy

METHODS = ('louvain', 'greedy_modularity', 'label_propagation', 'girvan_newman',
           'asyn_fluid')

#: A community method: ``method(G, seed) -> list of partitions`` (fine to
#: coarse) of the connected graph ``G`` with nodes ``0..n-1``.
CommunityMethod = Callable[[nx.Graph, int], List[List[set]]]


def from_networkx(G: nx.Graph, method: Union[str, Callable] = 'louvain',
                  nodes: Optional[Sequence[Hashable]] = None, seed: int = 0,
                  max_levels: Optional[int] = None,
                  max_children: Optional[int] = DEFAULT_MAX_CHILDREN,
                  keep_chains: bool = False, weight: Optional[str] = 'weight',
                  split: str = 'louvain', **method_kwargs) -> Hierarchy:
    r"""Builds a hierarchy over the nodes of a networkx graph by community
    detection.

    The graph is first made simple and undirected: edge directions are
    dropped (the weights of :math:`u \to v` and :math:`v \to u` add up),
    parallel edges of a multigraph are merged (weights add up), self-loops
    and zero-weight edges are dropped. Each connected component gets its own
    subtree (an isolated node is a leaf under the root); the community
    method runs on each component of two or more nodes:

    * :obj:`"louvain"`: every level of the Louvain dendrogram
      (:func:`networkx.community.louvain_partitions`), the first
      :obj:`max_levels` of them when given. Extra keywords
      (:obj:`resolution`, :obj:`threshold`) are passed on.
    * :obj:`"greedy_modularity"`: one partition by Clauset-Newman-Moore
      (keywords :obj:`resolution`, :obj:`cutoff`, :obj:`best_n`).
    * :obj:`"label_propagation"`: one partition by asynchronous label
      propagation (:func:`networkx.community.asyn_lpa_communities`, seeded).
    * :obj:`"girvan_newman"`: the Girvan-Newman dendrogram cut where it has
      :math:`2, 4, \ldots, 2^{L}` communities (:math:`L` = :obj:`max_levels`,
      default 3), or at the counts given as :obj:`num_communities`. Removes
      edges by betweenness: :math:`O(m^2 n)`, for small graphs only.
    * :obj:`"asyn_fluid"`: one partition into :obj:`k` fluid communities
      per component (default :math:`\lceil\sqrt{n}\rceil`, capped at the
      component size; keyword :obj:`max_iter`).
    * a callable ``method(G, seed)`` returning a list of partitions (fine to
      coarse) of the connected graph :obj:`G` on nodes ``0..n-1``.

    A family with more than :obj:`max_children` children is then split by
    sub-clustering: Louvain on the graph between its children (their
    quotient graph) groups them, recursively; where Louvain finds no split
    (e.g. a clique, or unconnected children) the children are cut into
    balanced chunks along a reverse Cuthill-McKee order of that graph, so
    chunks stay local. Single-child clusters are removed unless
    :obj:`keep_chains`.

    Args:
        G (networkx.Graph): Any networkx graph (directed, multi, weighted or
            not), with at least one node. Node labels can be any hashables.
        method (str or callable, optional): The community method, see above.
            (default: :obj:`"louvain"`)
        nodes (list, optional): The graph's nodes in leaf order: leaf
            :obj:`i` is :obj:`nodes[i]`. Must list every node exactly once.
            (default: :obj:`list(G.nodes)`, the order of
            :func:`torch_geometric.utils.from_networkx`)
        seed (int, optional): Random seed of the method and of the
            sub-clustering; equal seeds give equal hierarchies.
            (default: :obj:`0`)
        max_levels (int, optional): Louvain: use only the first (finest)
            levels; Girvan-Newman: number of cuts. (default: :obj:`None`)
        max_children (int, optional): Most children of one cluster, or
            :obj:`None` for no bound. (default: :obj:`32`)
        keep_chains (bool, optional): Keep single-child clusters.
            (default: :obj:`False`)
        weight (str, optional): Edge attribute holding the weight (missing
            means 1), or :obj:`None` to ignore weights. Weights must be
            non-negative and finite. (default: :obj:`"weight"`)
        split (str, optional): How oversized families are split:
            :obj:`"louvain"` (sub-clustering, above) or :obj:`"chunk"`
            (balanced chunks in leaf order, faster). (default:
            :obj:`"louvain"`)
        **method_kwargs: Passed to the networkx method.

    Returns:
        Hierarchy: One tree whose leaves are the graph's nodes in the order
        of :obj:`nodes`.

    Raises:
        ValueError: for an empty graph, a :obj:`nodes` list that misses,
            repeats or adds a node, an unknown method, or a negative or
            non-finite weight.

    Complexity: that of the method (Louvain: about :math:`O(m \log n)`),
    plus :math:`O(n + m)` to simplify the graph and, per oversized family of
    :math:`b` children over :math:`n_A` leaves, a Louvain run on a
    :math:`b`-node graph and :math:`O(n_A + m_A)` to build it.

    Example::

        >>> import networkx as nx
        >>> from hsa_geo.hierarchy import from_networkx
        >>> G = nx.karate_club_graph()
        >>> h = from_networkx(G, method='louvain', seed=0, max_children=8)
        >>> h.num_leaves, h.num_trees, h.summary()['max_children'] <= 8
        (34, 1, True)
    """
    if not isinstance(G, nx.Graph):
        raise ValueError(f"G must be a networkx graph (got {type(G).__name__})")
    seed = int(seed)
    if max_levels is not None:
        max_levels = check_positive_int(max_levels, 'max_levels')
    if split not in ('louvain', 'chunk'):
        raise ValueError(f"split must be 'louvain' or 'chunk' (got {split!r})")
    community = _community_method(method, max_levels, method_kwargs)
    adjacency = graph_adjacency(G, nodes, weight)
    num_leaves = adjacency.shape[0]

    parent: List[int] = [-1] * num_leaves
    num_components, component = connected_components(adjacency, directed=False)
    order = np.argsort(component, kind='stable')
    members_of = np.split(order, np.cumsum(np.bincount(component))[:-1])
    tops = []
    for members in members_of:  # components in order of their first node
        if members.size == 1:
            tops.append(int(members[0]))
            continue
        sub = adjacency[members][:, members]
        graph = nx.from_scipy_sparse_array(sub, edge_attribute='weight')
        levels = community(graph, seed)
        tops.append(_add_levels(parent, members, levels))
    if len(tops) > 1:
        _add_cluster(parent, tops)
    splitter = LouvainSplitter(adjacency, seed) if split == 'louvain' else None
    return finalize(np.asarray(parent, dtype=np.int64), num_leaves, max_children,
                    keep_chains, splitter)


# ------------------------------------------------------------ the input graph
def graph_adjacency(G: nx.Graph, nodes: Optional[Sequence[Hashable]],
                    weight: Optional[str]) -> sp.csr_matrix:
    r"""Symmetric ``[N, N]`` weight matrix of :obj:`G` in the order of
    :obj:`nodes`: directions dropped, parallel edges summed, self-loops and
    zero weights removed."""
    if nodes is None:
        nodes = list(G.nodes)
    else:
        nodes = list(nodes)
        index: Dict[Hashable, int] = {}
        for position, node in enumerate(nodes):
            if node in index:
                raise ValueError(f"'nodes' lists node {node!r} twice (positions "
                                 f"{index[node]} and {position})")
            if node not in G:
                raise ValueError(f"'nodes' lists {node!r} (position {position}), which is "
                                 f"not a node of G")
            index[node] = position
        if len(nodes) != G.number_of_nodes():
            missing = [node for node in G.nodes if node not in index]
            raise ValueError(f"'nodes' misses {len(missing)} node(s) of G, e.g. "
                             f"{missing[:5]!r}; every node must be a leaf")
    if len(nodes) == 0:
        raise ValueError("The graph has no nodes; a hierarchy needs at least one leaf")
    index = {node: position for position, node in enumerate(nodes)}
    num_nodes = len(nodes)
    rows, cols, weights = [], [], []
    for u, v, w in G.edges(data=weight, default=1):
        rows.append(index[u])
        cols.append(index[v])
        try:
            weights.append(1.0 if weight is None else float(w))
        except (TypeError, ValueError):
            raise ValueError(f"Edge ({u!r}, {v!r}) has {weight}={w!r}, which is not a "
                             f"number; pass weight=None to ignore weights") from None
    weights = np.asarray(weights, dtype=np.float64)
    if weights.size and not (np.isfinite(weights).all() and (weights >= 0).all()):
        bad = int(np.flatnonzero(~(np.isfinite(weights) & (weights >= 0)))[0])
        raise ValueError(f"Edge ({nodes[rows[bad]]!r}, {nodes[cols[bad]]!r}) has weight "
                         f"{weights[bad]}; weights must be finite and non-negative")
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    keep = (rows != cols) & (weights > 0)
    rows, cols, weights = rows[keep], cols[keep], weights[keep]
    matrix = sp.coo_matrix((np.concatenate([weights, weights]),
                            (np.concatenate([rows, cols]), np.concatenate([cols, rows]))),
                           shape=(num_nodes, num_nodes))
    return matrix.tocsr()  # sums duplicates


# ------------------------------------------------------------------- methods
def _community_method(method, max_levels: Optional[int], kwargs) -> CommunityMethod:
    if callable(method):
        if kwargs:
            raise ValueError(f"Keyword arguments {sorted(kwargs)} are only for the built-in "
                             f"methods; bind them into the callable instead")
        return lambda graph, seed: _levels_of(method, graph, seed)
    if method == 'louvain':
        return lambda graph, seed: list(islice(
            nx.community.louvain_partitions(graph, weight='weight', seed=seed, **kwargs),
            max_levels))
    if method == 'greedy_modularity':
        return lambda graph, seed: [nx.community.greedy_modularity_communities(
            graph, weight='weight', **kwargs)]
    if method == 'label_propagation':
        return lambda graph, seed: [list(nx.community.asyn_lpa_communities(
            graph, weight='weight', seed=seed, **kwargs))]
    if method == 'girvan_newman':
        counts = kwargs.pop('num_communities', None)
        if counts is None:
            counts = [2 ** level for level in range(1, (max_levels or 3) + 1)]
        counts = sorted({check_positive_int(c, 'num_communities', 2) for c in counts})
        return lambda graph, seed: _girvan_newman_levels(graph, counts, kwargs)
    if method == 'asyn_fluid':
        k = kwargs.pop('k', None)
        if k is not None:
            k = check_positive_int(k, 'k')
        return lambda graph, seed: [list(nx.community.asyn_fluidc(
            graph, min(k or math.ceil(math.sqrt(graph.number_of_nodes())),
                       graph.number_of_nodes()),
            seed=seed, **kwargs))]
    raise ValueError(f"Unknown community method {method!r}; choose one of {METHODS} "
                     f"or pass a callable")


def _levels_of(method: Callable, graph: nx.Graph, seed: int) -> List:
    r"""The partitions a community callable returns for one component, as a
    list; anything else but an iterable of them (None, a number, a string)
    is refused naming the method."""
    levels = method(graph, seed)
    if levels is None or isinstance(levels, (str, bytes)) or not hasattr(levels, '__iter__'):
        name = getattr(method, '__name__', repr(method))
        raise ValueError(f"The community method {name} returned {type(levels).__name__} for "
                         f"a component of {graph.number_of_nodes()} nodes; it must return a "
                         f"list of partitions of the nodes 0..n-1 (each a list of sets), "
                         f"finest first")
    return list(levels)


#: Largest :math:`n m^2` (nodes times squared edges of a component) that
#: Girvan-Newman is run on: it recomputes all edge betweennesses after every
#: edge it removes. Measured here (networkx, 2 cores): 2.3e8 took 4.4 s, so
#: the limit is about 40 s; K_200 (8e10) would take about half an hour.
GIRVAN_NEWMAN_MAX_COST = 2e9


def _girvan_newman_levels(graph: nx.Graph, counts: List[int], kwargs) -> List[List[set]]:
    # Each step of the generator splits one community (the graph is connected),
    # so it passes through every count; stop at the largest one needed.
    nodes, edges = graph.number_of_nodes(), graph.number_of_edges()
    if nodes * edges ** 2 > GIRVAN_NEWMAN_MAX_COST:
        raise ValueError(
            f"girvan_newman would take very long on a component of {nodes} nodes and {edges} "
            f"edges: it recomputes every edge betweenness after each edge it removes, "
            f"O(n m^2) = {nodes * edges ** 2:.1e} here (the limit, "
            f"GIRVAN_NEWMAN_MAX_COST, is {GIRVAN_NEWMAN_MAX_COST:.0e}, about 40 s). Use "
            f"'louvain', 'greedy_modularity' or 'metis', or pass a callable to run it anyway")
    wanted = [c for c in counts if c < nodes]
    levels = []
    if wanted:
        for partition in nx.community.girvan_newman(graph, **kwargs):
            if len(partition) in wanted:
                levels.append(list(partition))
            if len(partition) >= wanted[-1]:
                break
    return levels[::-1] if levels else [[set(graph.nodes)]]


def _add_levels(parent: List[int], members: np.ndarray, levels) -> int:
    r"""Adds the clusters of nested partitions of a component (local node ids
    ``0..n-1`` standing for :obj:`members`) and returns its top node."""
    levels = list(levels)
    labels = [partition_labels(level, members.size, index) for index, level in enumerate(levels)]
    check_refinement(labels)
    below = members.tolist()  # node id of every current item
    label_below = np.arange(members.size)  # item of each local node
    for label in labels:
        size = int(label.max()) + 1
        # Items of this level: the sets; children: the items of the level below.
        item_set = label[first_occurrence(label_below, len(below))]
        groups = np.split(np.argsort(item_set, kind='stable'),
                          np.cumsum(np.bincount(item_set, minlength=size))[:-1])
        below = [_add_cluster(parent, [below[i] for i in group.tolist()]) for group in groups]
        label_below = label
    if len(below) == 1:
        return below[0]
    return _add_cluster(parent, below)


def _add_cluster(parent: List[int], children: List[int]) -> int:
    node = len(parent)
    parent.append(-1)
    for child in children:
        parent[child] = node
    return node


# -------------------------------------------------------- sub-clustering
class LouvainSplitter:
    r"""Groups a family's children by Louvain on their quotient graph (edge
    weight between two children = total weight of the graph edges between
    their leaves); falls back to balanced chunks along a reverse
    Cuthill-McKee order when Louvain finds no useful split."""
    needs_leaves = True

    def __init__(self, adjacency: sp.csr_matrix, seed: int = 0):
        self.adjacency = adjacency
        self.seed = seed

    def quotient(self, items, leaves_of) -> sp.csr_matrix:
        leaves = [leaves_of(item) for item in items]
        sizes = np.fromiter((len(x) for x in leaves), dtype=np.int64, count=len(leaves))
        leaves = np.concatenate(leaves)
        owner = np.repeat(np.arange(len(items)), sizes)
        sub = self.adjacency[leaves][:, leaves].tocoo()
        return sp.coo_matrix((sub.data, (owner[sub.row], owner[sub.col])),
                             shape=(len(items), len(items))).tocsr()

    def __call__(self, items, max_children: int, leaves_of,
                 sizes: Optional[np.ndarray] = None) -> List[np.ndarray]:
        quotient = self.quotient(items, leaves_of)
        between = quotient - sp.diags(quotient.diagonal())
        between.eliminate_zeros()
        if between.nnz:
            graph = nx.Graph()
            graph.add_nodes_from(range(len(items)))
            coo = sp.triu(quotient).tocoo()
            # A child's internal edges appear twice on the diagonal; a
            # self-loop of half that weight gives it the right degree.
            halves = np.where(coo.row == coo.col, 0.5, 1.0) * coo.data
            graph.add_weighted_edges_from(zip(coo.row.tolist(), coo.col.tolist(),
                                              halves.tolist()))
            groups = nx.community.louvain_communities(graph, weight='weight', seed=self.seed)
            if 2 <= len(groups) < len(items):
                groups = [np.sort(np.fromiter(g, dtype=np.int64)) for g in groups]
                return sorted(groups, key=lambda g: int(g[0]))
        order = reverse_cuthill_mckee(between.tocsr(), symmetric_mode=True).astype(np.int64)
        return size_aware_chunks(order, max_children, None if sizes is None else sizes[order])
