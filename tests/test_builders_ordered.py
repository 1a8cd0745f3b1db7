"""Which builders record a sibling order (Hierarchy.ordered), that the order
they record is the meaningful one, and that the flag survives limit_children,
compose, NestedSignal batching and AddHierarchy."""
import networkx as nx
import pytest
import torch
from torch_geometric.data import Batch, Data

from hsa_geo import Hierarchy
from hsa_geo.data import NestedSignal, hierarchy_from_data
from hsa_geo.hierarchy import (chunk_sequence, compose, from_features, from_nested_lengths,
                               from_networkx, from_partitions, from_segments, grid_quadtree,
                               limit_children)
from hsa_geo.transforms import AddHierarchy
from random_trees import random_hierarchy, random_sequence_hierarchy


def children_by_position(hierarchy, cluster):
    r"""The children of :obj:`cluster`, sorted by their sibling index."""
    children = (hierarchy.parent == cluster).nonzero().view(-1)
    return children[hierarchy.sibling_index[children].argsort()].tolist()


def assert_siblings_in_leaf_order(hierarchy):
    first_leaf = hierarchy.first_leaf
    for cluster in range(hierarchy.num_leaves, hierarchy.num_nodes):
        children = children_by_position(hierarchy, cluster)
        assert first_leaf[children].tolist() == sorted(first_leaf[children].tolist())


# --------------------------------------------------------- ordered builders
def test_sequence_builders_are_ordered_in_sequence_order():
    h = chunk_sequence(10, chunk_size=4)
    assert h.ordered
    assert h.sibling_index[:10].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    word = torch.tensor([0, 1, 1, 2, 3, 4, 4])
    sentence = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    h = from_segments([word, sentence])
    assert h.ordered
    # sentence 0 = words (the) (cat) (sat .): tokens 0 | 1 2 | 3
    assert children_by_position(h, int(h.parent[3])) == [0, int(h.parent[1]), 3]
    assert from_nested_lengths([[1, 2, 1, 2, 1], [3, 2]]).ordered
    assert_siblings_in_leaf_order(chunk_sequence(300, chunk_size=7, max_children=5))


def test_grid_quadtree_is_ordered_in_raster_order_of_quadrants():
    h = grid_quadtree(4, 4)
    assert h.ordered
    # top-left square holds cells 0, 1 (top row) and 4, 5: positions in raster order
    assert h.sibling_index[torch.tensor([0, 1, 4, 5])].tolist() == [0, 1, 2, 3]
    root = int(h.roots[0])
    quadrants = children_by_position(h, root)
    assert h.first_leaf[quadrants].tolist() == [0, 2, 8, 10]  # TL, TR, BL, BR
    # a square cut by the right border: bottom-left is sibling 1
    cut = grid_quadtree(2, 3)
    assert cut.sibling_index[torch.tensor([2, 5])].tolist() == [0, 1]
    assert_siblings_in_leaf_order(grid_quadtree(9, 7, block=3, max_children=4))


@pytest.mark.parametrize('seed', range(4))
def test_limit_children_keeps_the_flag_and_the_order(seed):
    h = random_sequence_hierarchy(seed, max_children=12, max_leaves=60)
    bounded = limit_children(h, max_children=3)
    assert bounded.ordered
    assert int(bounded.num_children.max()) <= 3
    assert_siblings_in_leaf_order(bounded)
    # a flat family of 100 becomes runs of 10, in order
    flat = limit_children(Hierarchy.flat(100), max_children=10)
    assert flat.ordered
    assert flat.sibling_index[:100].tolist() == [i % 10 for i in range(100)]
    assert not limit_children(random_hierarchy(seed), max_children=3).ordered


def test_compose_is_ordered_iff_every_part_is():
    text, image = chunk_sequence(6, chunk_size=3), grid_quadtree(2, 2)
    graph = from_partitions([[{0, 1, 2}, {3, 4}]], num_leaves=5)
    assert compose({'text': text, 'image': image}).hierarchy.ordered
    assert not compose({'text': text, 'graph': graph}).hierarchy.ordered
    h, _ = compose({'text': text, 'image': image})
    # the parts sit under the root in the mapping's order
    assert h.first_leaf[children_by_position(h, int(h.roots[0]))].tolist() == [0, 6]


# ------------------------------------------------------- clustering builders
def test_clustering_builders_are_unordered():
    assert not from_partitions([[{0, 1, 2}, {3, 4}]], num_leaves=5).ordered
    assert not from_networkx(nx.karate_club_graph(), method='louvain', seed=0).ordered
    assert not from_features(torch.randn(20, 3), max_children=4).ordered
    assert not Hierarchy.from_parent(torch.tensor([2, 2, -1]), 2).ordered


def test_metis_is_unordered():
    pytest.importorskip('pymetis')
    from hsa_geo.hierarchy import from_edge_index_metis
    edge_index = torch.tensor([[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 0]])
    assert not from_edge_index_metis(edge_index, 6, max_children=2).ordered


# ------------------------------------------------------------- PyG data
def test_nested_signal_carries_the_flag_through_batching():
    ordered = NestedSignal.from_hierarchy(torch.randn(7, 2), chunk_sequence(7, 3))
    assert ordered.hierarchy_ordered is True
    assert hierarchy_from_data(ordered).ordered
    unordered_tree = Hierarchy.from_parent(torch.tensor([3, 3, 4, 4, -1]), 3)
    unordered = NestedSignal.from_hierarchy(torch.randn(3, 2), unordered_tree)
    assert unordered.hierarchy_ordered is False
    assert not hierarchy_from_data(unordered).ordered

    batch = Batch.from_data_list([ordered, ordered])
    h = hierarchy_from_data(batch)
    assert h.ordered and h.num_trees == 2
    # a dataset mixing both marks the unordered ones explicitly
    marked = NestedSignal.from_hierarchy(torch.randn(3, 2), unordered_tree,
                                         hierarchy_ordered=False)
    assert not hierarchy_from_data(Batch.from_data_list([ordered, marked])).ordered


def test_add_hierarchy_keeps_the_flag_of_a_callable():
    data = Data(x=torch.randn(9, 2), edge_index=torch.tensor([[0, 1], [1, 2]]))
    ordered = AddHierarchy(lambda d: chunk_sequence(d.num_nodes, 3))(data)
    assert hierarchy_from_data(ordered).ordered
    assert not hierarchy_from_data(AddHierarchy('louvain')(data)).ordered
    # a graph without x goes through the same attributes
    no_x = AddHierarchy(lambda d: chunk_sequence(d.num_nodes, 3))(
        Data(num_nodes=9, edge_index=torch.tensor([[0, 1], [1, 2]])))
    assert no_x.hierarchy_ordered is True and hierarchy_from_data(no_x).ordered
    # re-applying a clustering transform replaces a stale flag
    assert AddHierarchy('louvain')(ordered).hierarchy_ordered is False


@pytest.mark.parametrize('order', [(True, False), (False, True)])
def test_batches_mixing_ordered_and_unordered_graphs_are_unordered(order):
    # the flag is stored on every graph: PyG's collate sees the same keys
    # whatever comes first, and the answer does not depend on the order
    unordered_tree = Hierarchy.from_parent(torch.tensor([3, 3, 4, 4, -1]), 3)
    graphs = {True: NestedSignal.from_hierarchy(torch.randn(7, 2), chunk_sequence(7, 3)),
              False: NestedSignal.from_hierarchy(torch.randn(3, 2), unordered_tree)}
    hierarchy = hierarchy_from_data(Batch.from_data_list([graphs[o] for o in order]))
    assert not hierarchy.ordered and hierarchy.num_trees == 2
