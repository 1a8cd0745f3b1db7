import pytest
import torch

from hsa_geo import Hierarchy
from hsa_geo.functional.engines import engine_cache, prepare_slot_layout, slot_layout
from random_trees import balanced_parent, random_parent


def test_from_parent_derives_depth_counts_and_summary():
    hierarchy = Hierarchy.from_parent(torch.tensor([4, 4, 5, 6, 6, 6, -1]), num_leaves=4)
    assert hierarchy.depth.tolist() == [2, 2, 2, 1, 1, 1, 0]
    assert hierarchy.num_leaves_below.tolist() == [1, 1, 1, 1, 2, 1, 4]
    assert hierarchy.num_children.tolist() == [0, 0, 0, 0, 2, 1, 3]
    summary = hierarchy.summary()
    assert summary['max_children'] == 3 and summary['sibling_pairs'] == 4 + 1 + 9
    assert summary['single_child_clusters'] == 1
    assert repr(hierarchy) == 'Hierarchy(num_leaves=4, num_clusters=3, num_trees=1, max_depth=2)'


def test_plan_groups_families_by_depth_and_size_deepest_first():
    hierarchy = Hierarchy.from_parent(torch.tensor([4, 4, 5, 6, 6, 6, -1]), num_leaves=4)
    plan = hierarchy.plan()
    depths = [block.depth for block in plan.blocks]
    assert depths == sorted(depths, reverse=True)
    families = sorted((block.parents + 4).tolist()[f] for block in plan.blocks
                      for f in range(block.num_families))
    assert families == [4, 5, 6]
    assert hierarchy.plan() is plan  # cached


def test_forest_and_isolated_leaf():
    hierarchy = Hierarchy.from_parent(torch.tensor([3, 3, -1, -1]), num_leaves=3)
    assert hierarchy.num_trees == 2
    assert hierarchy.plan().isolated_leaves.tolist() == [2]


@pytest.mark.parametrize('parent,num_leaves,message', [
    (torch.tensor([2.0, 2.0, -1.0]), 2, 'integer node ids'),
    (torch.tensor([True, False]), 2, 'integer node ids'),
    (torch.tensor([[2, 2, -1]]), 2, 'one-dimensional'),
    (torch.tensor([], dtype=torch.long), 0, 'at least one leaf'),
    (torch.tensor([2]), 2, 'has length 1'),
    (torch.tensor([2, 7, -1]), 2, 'Node 1 has parent 7, out of range'),
    (torch.tensor([2, -2, -1]), 2, 'Node 1 has parent -2, out of range'),
    (torch.tensor([2, 2, 2]), 2, 'Node 2 is its own parent'),
    (torch.tensor([1, 2, -1]), 2, 'Node 0 has parent 1, which is a leaf'),
    (torch.tensor([2, 2, -1, -1]), 2, 'Cluster node 3 has no children'),
    (torch.tensor([2, 2, 3, 4, 2]), 2, r'cycle through nodes \[2, 3, 4\]'),
])
def test_validation_errors_name_the_node(parent, num_leaves, message):
    with pytest.raises(ValueError, match=message):
        Hierarchy.from_parent(parent, num_leaves)


def test_graph_ids_one_root_per_graph_and_no_crossing_edges():
    parent = torch.tensor([4, 4, 5, 5, -1, -1])
    with pytest.raises(ValueError, match='Graph 0 has 2 roots'):
        Hierarchy.from_parent(parent, 4, batch=torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match=r'Node 1 \(graph 1\) has parent 4 in another graph'):
        Hierarchy.from_parent(parent, 4, batch=torch.tensor([0, 1, 1, 1, 0, 1]))
    with pytest.raises(ValueError, match="'batch' has 3 entries"):
        Hierarchy.from_parent(parent, 4, batch=torch.tensor([0, 0, 1]))
    ok = Hierarchy.from_parent(parent, 4, batch=torch.tensor([0, 0, 1, 1, 0, 1]))
    assert ok.leaf_batch.tolist() == [0, 0, 1, 1]


def test_long_chain_depth_by_pointer_jumping():
    # leaf 0 under a chain of 300 single-child clusters
    parent = torch.arange(1, 302)
    parent[-1] = -1
    hierarchy = Hierarchy.from_parent(parent, 1)
    assert hierarchy.max_depth == 300
    assert hierarchy.num_leaves_below.tolist() == [1] * 301


@pytest.mark.parametrize('seed', range(30))
def test_batching_keeps_every_tree(seed):
    parts = [random_parent(seed + i) for i in range(3)]
    hierarchies = [Hierarchy.from_parent(p, n) for p, n in parts]
    forest = Hierarchy.batch_hierarchies(hierarchies)
    assert forest.num_trees == 3
    assert forest.num_leaves == sum(h.num_leaves for h in hierarchies)
    # every graph's leaves keep their counts under each root
    roots = forest.roots
    sizes = forest.num_leaves_below[roots].tolist()
    assert sizes == [h.num_leaves for h in hierarchies]
    # validation of the batched forest accepts it again
    again = Hierarchy.from_parent(forest.parent, forest.num_leaves, batch=forest.batch)
    assert torch.equal(again.depth, forest.depth)


def test_plan_moves_to_device_and_edge_index():
    hierarchy = Hierarchy.from_parent(balanced_parent(20, 3), 20)
    edges = hierarchy.edge_index
    assert edges.shape == (2, hierarchy.num_nodes - 1)
    assert torch.equal(hierarchy.parent[edges[0]], edges[1])
    plan = hierarchy.plan()
    moved = hierarchy.to('cpu')
    assert moved.plan() is plan


def test_batching_refuses_a_forest_as_one_graph():
    # a forest would become one graph with two roots, and a readout would
    # give that graph a total weight of 2
    forest = Hierarchy.from_parent(torch.tensor([3, 3, -1, -1]), 3)
    assert forest.num_trees == 2
    with pytest.raises(ValueError, match='input 1 is a forest of 2 trees'):
        Hierarchy.batch_hierarchies([Hierarchy.flat(2), forest])
    with pytest.raises(TypeError, match='input 0 is a Tensor'):
        Hierarchy.batch_hierarchies([torch.tensor([1, -1])])


def test_an_in_place_edit_of_the_parent_pointers_is_caught():
    import pickle

    from hsa_geo.functional import hsa
    hierarchy = Hierarchy.from_parent(torch.tensor([4, 4, 5, 5, 6, 6, -1]), 4)
    q = torch.randn(4, 2, 3)
    hsa(q, q, q, hierarchy)  # plans cached
    copy = pickle.loads(pickle.dumps(hierarchy))  # a copy starts clean
    hsa(q, q, q, copy)
    hierarchy.parent[1] = 5  # the cached plans would describe the old tree
    with pytest.raises(ValueError, match='modified in place'):
        hsa(q, q, q, hierarchy)


def test_the_tree_facts_cannot_be_reassigned():
    # a new parent tensor would leave the depths, counts and cached plans
    # of the old tree in place: refused, like an in-place edit
    from hsa_geo.functional import hsa
    hierarchy = Hierarchy.from_parent(torch.tensor([4, 4, 5, 5, 6, 6, -1]), 4)
    q = torch.randn(4, 2, 3)
    expected = hsa(q, q, q, hierarchy)  # plans cached
    for name, value in (('parent', torch.tensor([4, 4, 4, 5, 5, 6, -1])), ('num_leaves', 3),
                        ('depth', hierarchy.depth.clone()),
                        ('num_leaves_below', hierarchy.num_leaves_below.clone())):
        with pytest.raises(AttributeError, match=f'Hierarchy.{name} cannot be reassigned'):
            setattr(hierarchy, name, value)
    torch.testing.assert_close(hsa(q, q, q, hierarchy), expected)
    hierarchy.ordered = True  # not a fact the caches derive from


def test_a_scale_that_needs_its_gradient_is_refused():
    from hsa_geo.functional import hsa
    hierarchy = Hierarchy.flat(3)
    q = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match='requires grad'):
        hsa(q, q, q, hierarchy, scale=torch.tensor(0.5, requires_grad=True))
    torch.testing.assert_close(hsa(q, q, q, hierarchy, scale=torch.tensor(0.5)),
                               hsa(q, q, q, hierarchy, scale=0.5))


@pytest.mark.parametrize('num_leaves, message', [
    (-1, 'at least one leaf'), (0, 'at least one leaf'), (torch.tensor(2.9), 'must be an integer'),
    (2.0, 'must be an integer'), (True, 'must be an integer')])
def test_leaf_counts_are_checked_at_every_entry(num_leaves, message):
    with pytest.raises(ValueError, match=message):
        Hierarchy.flat(num_leaves)
    with pytest.raises(ValueError, match=message):
        Hierarchy.from_parent(torch.tensor([3, 3, 3, -1]), num_leaves)


def test_integer_leaf_counts_of_any_kind_are_accepted():
    import numpy as np
    for count in (np.int64(3), torch.tensor(3), 3):
        assert Hierarchy.flat(count).num_leaves == 3
        assert Hierarchy.from_parent(torch.tensor([3, 3, 3, -1]), count).num_leaves == 3


def test_degenerate_feature_sizes_get_clear_errors():
    from hsa_geo import HSAConv
    from hsa_geo.functional import hsa
    hierarchy = Hierarchy.flat(3)
    with pytest.raises(ValueError, match='at least one feature'):
        hsa(torch.randn(3, 2, 0), torch.randn(3, 2, 0), torch.randn(3, 2, 4), hierarchy)
    with pytest.raises(ValueError, match='no heads'):
        hsa(torch.randn(3, 0, 4), torch.randn(3, 0, 4), torch.randn(3, 0, 4), hierarchy)
    # values without features are fine: an empty output
    assert hsa(torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 0),
               hierarchy).shape == (3, 2, 0)
    with pytest.raises(ValueError, match="'out_channels' must be a positive int"):
        HSAConv(8, 0)


def test_a_hierarchy_saved_after_every_engine_loads_with_weights_only(tmp_path):
    # what the engines derive (scatter plans, strict-causal groups, layouts
    # and their constants, position codes) is not saved with the tree: it
    # would need its classes allow-listed, and is rebuilt on demand
    from hsa_geo.functional import (hsa, hsa_block_weights, hsa_log_partition)
    from hsa_geo.functional import engine
    from hsa_geo.nn import SiblingPositionBias
    from random_trees import random_sequence_hierarchy
    hierarchy = random_sequence_hierarchy(3)
    q = torch.randn(hierarchy.num_leaves, 2, 4, dtype=torch.float64)
    bias = SiblingPositionBias(heads=2, max_children=64, dim=4).double()(hierarchy)
    expected = hsa(q, q, q, hierarchy, backend='scatter', pair_bias=bias)
    for kernel in (True, False):
        with engine('auto' if kernel else 'tensor'):
            hsa(q, q, q, hierarchy, pair_bias=bias)
            hsa(q, q, q, hierarchy, causal='strict')
    hsa_block_weights(q, q, hierarchy)
    hsa_log_partition(q, q, hierarchy)
    path = tmp_path / 'hierarchy.pt'
    torch.save(hierarchy, path)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded.parent, hierarchy.parent) and loaded.ordered
    assert not loaded._plans and not engine_cache(loaded).slot_layouts
    assert loaded._family_tables is None
    torch.testing.assert_close(hsa(q, q, q, loaded, pair_bias=bias), expected)


def test_a_loader_worker_hands_the_plans_over_with_the_tree():
    # between processes (multiprocessing's pickler, as DataLoader workers
    # use) the prepared tables and layouts travel with the tree; a plain
    # pickle (torch.save) holds the tree only
    import pickle
    from multiprocessing.reduction import ForkingPickler
    hierarchy = Hierarchy.from_parent(torch.tensor([4, 4, 5, 5, 6, 6, -1]), 4)
    hierarchy.family_tables()
    prepare_slot_layout(hierarchy, 'cpu')
    shipped = pickle.loads(ForkingPickler.dumps(hierarchy))
    assert shipped._family_tables is not None
    assert torch.device('cpu') in engine_cache(shipped).slot_layouts
    shipped.check_unchanged()
    saved = pickle.loads(pickle.dumps(hierarchy))
    assert saved._family_tables is None and not engine_cache(saved).slot_layouts
    # a copy made by .to() starts with what was built for the original
    assert torch.device('cpu') in engine_cache(hierarchy.to('cpu')).slot_layouts


def test_a_saved_hierarchy_loads_under_the_weights_only_default(tmp_path):
    from hsa_geo.functional import hsa
    from hsa_geo.functional import engine
    hierarchy = Hierarchy.batch_hierarchies([Hierarchy.from_parent(
        torch.tensor([4, 4, 5, 5, 6, 6, -1]), 4), Hierarchy.flat(3)])
    q = torch.randn(7, 2, 3)
    expected = hsa(q, q, q, hierarchy)  # with its plans cached
    with engine('tensor'):  # the GPU engine: the layout's blocks cache constants
        hsa(q, q, q, hierarchy)
    slot_layout(hierarchy)
    hierarchy.plan()
    path = tmp_path / 'hierarchy.pt'
    torch.save(hierarchy, path)
    loaded = torch.load(path)  # weights_only=True by default
    assert torch.equal(loaded.parent, hierarchy.parent)
    assert torch.equal(loaded.batch, hierarchy.batch)
    torch.testing.assert_close(hsa(q, q, q, loaded), expected)
