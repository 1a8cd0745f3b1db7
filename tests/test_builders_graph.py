import random

import networkx as nx
import pytest
import torch

from hsa_geo.hierarchy import from_networkx

from test_builders_helpers import assert_valid_tree, children_of, cluster_sets, leaf_sets

METHODS = ['louvain', 'greedy_modularity', 'label_propagation', 'girvan_newman', 'asyn_fluid']


def _named(h, nodes):
    """Cluster leaf sets as sets of graph nodes."""
    return {frozenset(nodes[i] for i in s) for s in cluster_sets(h)}


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('graph', ['karate', 'les_miserables'])
def test_real_graphs_every_method(method, graph):
    G = nx.karate_club_graph() if graph == 'karate' else nx.les_miserables_graph()
    h = from_networkx(G, method=method, seed=1, max_children=8)
    assert_valid_tree(h, G.number_of_nodes(), max_children=8)
    again = from_networkx(G, method=method, seed=1, max_children=8)
    assert torch.equal(h.parent, again.parent)


def test_louvain_uses_every_level_of_the_dendrogram():
    G = nx.les_miserables_graph()
    nodes = list(G.nodes)
    h = from_networkx(G, seed=3, max_children=None, keep_chains=True)
    index = {node: i for i, node in enumerate(nodes)}
    levels = list(nx.community.louvain_partitions(
        nx.relabel_nodes(G, index), weight='weight', seed=3))
    assert len(levels) >= 2
    expected = {frozenset(s) for level in levels for s in level}
    assert expected <= cluster_sets(h)
    assert cluster_sets(h) - expected <= {frozenset(range(len(nodes)))}
    first = from_networkx(G, seed=3, max_children=None, keep_chains=True, max_levels=1)
    assert {frozenset(s) for s in levels[0]} <= cluster_sets(first)
    assert first.max_depth == 2


def test_leaf_order_follows_nodes():
    # Two 5-cliques joined by one edge: the root's two subtrees are the cliques.
    G = nx.barbell_graph(5, 0)
    nodes = list(G.nodes)
    random.Random(0).shuffle(nodes)
    h = from_networkx(G, nodes=nodes, max_children=None)
    top = [leaf_sets(h)[c] for c in children_of(h)[int(h.roots[0])]]
    assert {frozenset(nodes[i] for i in s) for s in top} == {frozenset(range(5)),
                                                             frozenset(range(5, 10))}


def test_disconnected_graph_has_one_subtree_per_component():
    G = nx.disjoint_union_all([nx.karate_club_graph(), nx.cycle_graph(6), nx.path_graph(2)])
    G.add_nodes_from(['lonely', 'alone'])
    h = from_networkx(G, max_children=None)
    nodes = list(G.nodes)
    assert_valid_tree(h, len(nodes))
    root = int(h.roots[0])
    tops = {frozenset(nodes[i] for i in leaf_sets(h)[c]) for c in children_of(h)[root]}
    assert tops == {frozenset(c) for c in nx.connected_components(G)}


def test_many_isolated_nodes_respect_max_children():
    G = nx.empty_graph(50)
    h = from_networkx(G, max_children=4)
    assert_valid_tree(h, 50, max_children=4)


def test_single_node_and_empty_graph():
    h = from_networkx(nx.empty_graph(1))
    assert h.num_leaves == 1 and h.num_clusters == 0
    with pytest.raises(ValueError, match='no nodes'):
        from_networkx(nx.Graph())


def test_arbitrary_node_labels():
    G = nx.relabel_nodes(nx.karate_club_graph(), {i: f'member {i}' for i in range(34)})
    G = nx.relabel_nodes(G, {'member 3': (3, 'x'), 'member 7': 700})
    h = from_networkx(G, seed=0)
    plain = from_networkx(nx.karate_club_graph(), seed=0)
    assert torch.equal(h.parent, plain.parent)


def test_self_loops_are_ignored():
    G = nx.karate_club_graph()
    looped = G.copy()
    looped.add_edges_from((v, v) for v in list(G.nodes)[::3])
    assert torch.equal(from_networkx(G).parent, from_networkx(looped).parent)


def test_multigraph_is_the_weighted_simple_graph():
    G = nx.MultiGraph(nx.karate_club_graph())
    for u, v in list(G.edges())[::4]:
        G.add_edge(u, v, weight=2.0)
    simple = nx.Graph()
    simple.add_nodes_from(G)
    for u, v, w in G.edges(data='weight', default=1):
        old = simple.get_edge_data(u, v, {'weight': 0})['weight']
        simple.add_edge(u, v, weight=old + w)
    assert torch.equal(from_networkx(G).parent, from_networkx(simple).parent)


def test_directed_graph_is_symmetrised():
    D = nx.DiGraph()
    D.add_nodes_from(nx.karate_club_graph())
    for u, v in nx.karate_club_graph().edges():
        D.add_edge(v, u) if (u + v) % 2 else D.add_edge(u, v)
    undirected = from_networkx(nx.Graph(D), weight=None)
    assert torch.equal(from_networkx(D, weight=None).parent, undirected.parent)


def test_weights_matter_and_can_be_ignored():
    G = nx.karate_club_graph()  # has a 'weight' attribute
    weighted = from_networkx(G, seed=0)
    unweighted = from_networkx(G, seed=0, weight=None)
    plain = nx.Graph(G.edges())
    plain.add_nodes_from(G)
    assert torch.equal(unweighted.parent, from_networkx(plain, seed=0, nodes=list(G)).parent)
    assert weighted.num_leaves == unweighted.num_leaves


def test_seed_is_honoured():
    G = nx.les_miserables_graph()
    parents = {tuple(from_networkx(G, method='label_propagation', seed=s).parent.tolist())
               for s in range(6)}
    assert len(parents) > 1  # the seed changes the result ...
    h = from_networkx(G, method='label_propagation', seed=4)
    assert torch.equal(h.parent, from_networkx(G, method='label_propagation', seed=4).parent)


def test_girvan_newman_cuts():
    G = nx.karate_club_graph()
    h = from_networkx(G, method='girvan_newman', num_communities=[2], max_children=None)
    first_split = next(nx.community.girvan_newman(G))
    root = int(h.roots[0])
    top = {leaf_sets(h)[c] for c in children_of(h)[root]}
    assert top == {frozenset(s) for s in first_split}
    deep = from_networkx(G, method='girvan_newman', max_levels=3, max_children=None,
                         keep_chains=True)
    counts = [2, 4, 8]
    partitions = [p for p in nx.community.girvan_newman(G) if len(p) in counts][:3]
    assert {frozenset(s) for p in partitions for s in p} <= cluster_sets(deep)


def test_asyn_fluid_k():
    G = nx.karate_club_graph()
    h = from_networkx(G, method='asyn_fluid', k=2, max_children=None, seed=0)
    root = int(h.roots[0])
    assert len(children_of(h)[root]) == 2
    tiny = nx.disjoint_union(nx.path_graph(3), nx.path_graph(40))
    assert_valid_tree(from_networkx(tiny, method='asyn_fluid', k=5), 43)


def test_callable_method():
    G = nx.karate_club_graph()
    club = [{v for v in G if G.nodes[v]['club'] == name} for name in ('Mr. Hi', 'Officer')]
    h = from_networkx(G, method=lambda graph, seed: [club], max_children=None)
    assert {leaf_sets(h)[c] for c in children_of(h)[int(h.roots[0])]} == \
        {frozenset(s) for s in club}
    with pytest.raises(ValueError, match='Leaf 0 appears twice'):
        from_networkx(G, method=lambda graph, seed: [[{0, 1}, set(graph) - {1}]])


def test_oversized_community_is_sub_clustered_by_the_graph():
    # Six 6-cliques in a ring, reported as one community: with max_children=6
    # Louvain on the induced graph recovers the cliques, whatever the leaf order.
    G = nx.ring_of_cliques(6, 6)
    nodes = list(G.nodes)
    random.Random(1).shuffle(nodes)
    one = lambda graph, seed: [[set(graph)]]  # noqa: E731
    h = from_networkx(G, method=one, nodes=nodes, max_children=6)
    assert_valid_tree(h, 36, max_children=6)
    cliques = {frozenset(range(6 * i, 6 * i + 6)) for i in range(6)}
    assert cliques <= _named(h, nodes)
    chunked = from_networkx(G, method=one, nodes=nodes, max_children=6, split='chunk')
    assert_valid_tree(chunked, 36, max_children=6)
    assert not cliques <= _named(chunked, nodes)


def test_clique_falls_back_to_balanced_chunks():
    h = from_networkx(nx.complete_graph(100), max_children=8)
    assert_valid_tree(h, 100, max_children=8)
    sizes = sorted(len(s) for s in cluster_sets(h))
    assert sizes[-1] == 100 and h.max_depth <= 4


@pytest.mark.parametrize('kwargs, match', [
    (dict(method='spectral'), 'Unknown community method'),
    (dict(nodes=[0, 1, 2]), 'misses 31 node'),
    (dict(nodes=list(range(34)) + [99]), 'not a node of G'),
    (dict(nodes=[0] + list(range(34))), 'node 0 twice'),
    (dict(split='random'), 'split must be'),
    (dict(max_levels=0), 'max_levels'),
    (dict(max_children=1), 'at least 2'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        from_networkx(nx.karate_club_graph(), **kwargs)


def test_bad_weights_and_inputs():
    G = nx.path_graph(3)
    G[0][1]['weight'] = -1.0
    with pytest.raises(ValueError, match=r'Edge \(0, 1\) has weight -1\.0'):
        from_networkx(G)
    G[0][1]['weight'] = float('nan')
    with pytest.raises(ValueError, match='finite'):
        from_networkx(G)
    G[0][1]['weight'] = 0.0  # a zero weight is no edge: 0 is alone
    h = from_networkx(G, max_children=None)
    assert {leaf_sets(h)[c] for c in children_of(h)[int(h.roots[0])]} == \
        {frozenset({0}), frozenset({1, 2})}
    G[0][1]['weight'] = 'heavy'
    with pytest.raises(ValueError, match=r"Edge \(0, 1\) has weight='heavy'"):
        from_networkx(G)
    assert from_networkx(G, weight=None).num_leaves == 3
    with pytest.raises(ValueError, match='networkx graph'):
        from_networkx(torch.zeros(2, 3))


def test_girvan_newman_refuses_a_hopeless_graph_at_once():
    import time
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"girvan_newman would take very long on a component "
                                         r"of 120 nodes and 7140 edges.*'louvain'"):
        from_networkx(nx.complete_graph(120), method='girvan_newman')
    assert time.perf_counter() - start < 5  # refused before any betweenness pass
