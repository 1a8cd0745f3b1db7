"""Hierarchy.to_networkx() and the shape statistics of Hierarchy.summary()."""
import networkx as nx
import torch

from hsa_geo import Hierarchy
from hsa_geo.hierarchy import chunk_sequence, from_networkx, grid_quadtree


def _parent_from_tree(T, num_nodes):
    return [next(iter(T.predecessors(v)), -1) for v in range(num_nodes)]


def test_to_networkx_round_trip():
    for h in (from_networkx(nx.les_miserables_graph(), max_children=6),
              chunk_sequence(50, 4), grid_quadtree(5, 3), Hierarchy.flat(1)):
        T = h.to_networkx()
        assert isinstance(T, nx.DiGraph) and T.number_of_nodes() == h.num_nodes
        assert nx.is_arborescence(T)
        assert _parent_from_tree(T, h.num_nodes) == h.parent.tolist()
        kinds = nx.get_node_attributes(T, 'kind')
        assert [kinds[v] for v in range(h.num_nodes)] == \
            ['leaf'] * h.num_leaves + ['cluster'] * h.num_clusters
        below = nx.get_node_attributes(T, 'num_leaves')
        root = int(h.roots[0])
        assert below[root] == h.num_leaves
        assert all(T.out_degree(v) == 0 for v in range(h.num_leaves))
        assert nx.get_node_attributes(T, 'depth') == dict(enumerate(h.depth.tolist()))


def test_to_networkx_of_a_batch_is_a_forest_with_graph_ids():
    h = Hierarchy.batch_hierarchies([chunk_sequence(5, 2), Hierarchy.flat(3)])
    T = h.to_networkx()
    assert nx.is_branching(T) and not nx.is_arborescence(T)
    assert nx.number_weakly_connected_components(T) == 2
    graph = nx.get_node_attributes(T, 'graph')
    assert [graph[v] for v in range(8)] == [0] * 5 + [1] * 3


def test_summary_depth_branching_and_cost():
    h = chunk_sequence(64, 4)  # complete 4-ary tree of depth 3
    s = h.summary()
    assert s['max_depth'] == 3 and s['mean_leaf_depth'] == 3.0
    assert s['max_children'] == 4 and s['mean_children'] == 4.0
    assert s['hsa_cost'] == s['sibling_pairs'] == 21 * 16
    assert s['dense_cost'] == 64 * 64
    flat = Hierarchy.flat(64).summary()
    assert flat['hsa_cost'] == flat['dense_cost'] == 64 * 64
    # irregular: leaves 0, 1 under the root, leaf 2 below a single-child cluster 3
    h = Hierarchy.from_parent(torch.tensor([4, 4, 3, 4, -1]), num_leaves=3)
    s = h.summary()
    assert s['mean_leaf_depth'] == (1 + 1 + 2) / 3
    assert s['hsa_cost'] == 3 ** 2 + 1 ** 2 and s['single_child_clusters'] == 1
    forest = Hierarchy.batch_hierarchies([Hierarchy.flat(3), Hierarchy.flat(5)]).summary()
    assert forest['dense_cost'] == 9 + 25
