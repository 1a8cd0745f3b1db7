"""The compiled tree analysis (hsa_geo/csrc/tree_tables.cpp) against the
PyTorch build it replaces: depths, leaf counts, first and last leaves and
the family tables, on forests of any shape; invalid pointers fall through to
the PyTorch checks and their messages."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hsa_geo import Hierarchy, native
from hsa_geo.hierarchy import hierarchy as hierarchy_module
from hsa_geo.hierarchy.native_tables import analyse_tree
from hsa_geo.hierarchy.plan import build_family_tables
from random_trees import random_parent

pytestmark = pytest.mark.skipif(not (native.ENABLED_BY_ENVIRONMENT and native.load()),
                                reason="the compiled code is off or could not be built")


def shuffled_forest_parent(seed: int, trees: int, isolated: int, **kwargs):
    r"""Parent pointers of :obj:`trees` random trees and :obj:`isolated`
    single leaves, leaves first, clusters after them in a shuffled order."""
    generator = torch.Generator().manual_seed(seed)
    leaf_parents, cluster_parents, num_leaves = [], [], 0
    parts = [random_parent(seed * 13 + tree, **kwargs) for tree in range(trees)]
    total_leaves = sum(n for _, n in parts) + isolated
    cluster_start = total_leaves
    for parent, n in parts:
        num_clusters = parent.numel() - n
        new_id = torch.cat([torch.arange(n) + num_leaves,
                            torch.arange(num_clusters) + cluster_start])
        mapped = torch.where(parent < 0, parent, new_id[parent.clamp(min=0)])
        leaf_parents.append(mapped[:n])
        cluster_parents.append(mapped[n:])
        num_leaves += n
        cluster_start += num_clusters
    leaf_parents.append(torch.full((isolated, ), -1, dtype=torch.long))
    parent = torch.cat(leaf_parents + cluster_parents)
    # shuffle the cluster ids
    num_clusters = parent.numel() - total_leaves
    permutation = torch.randperm(num_clusters, generator=generator)
    new_id = torch.cat([torch.arange(total_leaves), permutation + total_leaves])
    shuffled = torch.empty_like(parent)
    shuffled[new_id] = torch.where(parent < 0, parent, new_id[parent.clamp(min=0)])
    return shuffled, total_leaves


def python_analysis(parent, num_leaves):
    depth = hierarchy_module._depth_or_raise_on_cycle(parent)
    count = hierarchy_module._count_leaves_below(parent, num_leaves, depth)
    first, last = hierarchy_module._first_and_last_leaf(parent, num_leaves, depth)
    return depth, count, first, last, build_family_tables(parent, depth, first)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), trees=st.integers(0, 4), isolated=st.integers(0, 3),
       max_depth=st.integers(1, 7), max_children=st.integers(1, 12))
def test_the_analysis_equals_the_pytorch_build(seed, trees, isolated, max_depth, max_children):
    if trees == 0 and isolated == 0:
        isolated = 1
    parent, num_leaves = shuffled_forest_parent(seed % 100_000, trees, isolated,
                                                max_depth=max_depth, max_children=max_children,
                                                max_leaves=30)
    analysis = analyse_tree(parent, num_leaves)
    depth, count, first, last, tables = python_analysis(parent, num_leaves)
    for got, want in zip(analysis[:4], (depth, count, first, last)):
        assert torch.equal(got, want)
    for name in ('family_node', 'child_ptr', 'children', 'pair_ptr', 'level_ptr'):
        assert torch.equal(getattr(analysis.tables, name), getattr(tables, name)), name
    assert analysis.tables.num_nodes == tables.num_nodes


def test_a_flat_tree_and_a_deep_chain():
    for parent, num_leaves in ((Hierarchy.flat(5000).parent, 5000),
                               (torch.cat([torch.tensor([1]), torch.arange(2, 3001),
                                           torch.tensor([-1])]), 1)):
        analysis = analyse_tree(parent, num_leaves)
        depth, count, first, last, tables = python_analysis(parent, num_leaves)
        assert torch.equal(analysis.depth, depth) and torch.equal(analysis.first_leaf, first)
        assert torch.equal(analysis.tables.children, tables.children)
        assert torch.equal(analysis.tables.level_ptr, tables.level_ptr)


INVALID = [
    ([3, 3, 7, -1], 3, "out of range"),
    ([3, 3, 1, -1], 3, "which is a leaf"),
    ([3, 3, 3, 3], 3, "is its own parent"),
    ([3, 3, 3, -1, 3], 3, "has no children"),
    ([3, 3, 4, 4, 3], 3, "cycle"),
    ([2, 3, 3, 2], 2, "cycle"),
]


@pytest.mark.parametrize('pointers,num_leaves,message', INVALID)
def test_invalid_pointers_fall_through_to_the_named_errors(pointers, num_leaves, message):
    parent = torch.tensor(pointers)
    assert analyse_tree(parent, num_leaves) is None
    with pytest.raises(ValueError, match=message):
        Hierarchy.from_parent(parent, num_leaves)


def test_hierarchies_built_either_way_are_the_same(monkeypatch):
    parent, num_leaves = shuffled_forest_parent(7, 3, 2, max_depth=5, max_children=6)
    compiled = Hierarchy.from_parent(parent, num_leaves)
    assert compiled._family_tables is not None  # adopted from the analysis
    monkeypatch.setattr(native, 'ENABLED_BY_ENVIRONMENT', False)
    plain = Hierarchy.from_parent(parent, num_leaves)
    assert plain._family_tables is None
    for name in ('depth', 'num_leaves_below', 'first_leaf', 'last_leaf'):
        assert torch.equal(getattr(compiled, name), getattr(plain, name)), name
    for got, want in zip(compiled.sibling_pairs(), plain.sibling_pairs()):
        assert torch.equal(got, want)
    for name in ('family_node', 'children', 'pair_ptr', 'level_ptr'):
        assert torch.equal(getattr(compiled.family_tables(), name),
                           getattr(plain.family_tables(), name))


def test_batched_hierarchies_built_either_way_are_the_same(monkeypatch):
    from random_trees import random_hierarchy
    compiled = Hierarchy.batch_hierarchies([random_hierarchy(seed) for seed in range(6)])
    monkeypatch.setattr(native, 'ENABLED_BY_ENVIRONMENT', False)
    # the inputs' own depths, counts and leaf ranges, shifted into place
    plain = Hierarchy.batch_hierarchies([random_hierarchy(seed) for seed in range(6)])
    for name in ('parent', 'batch', 'depth', 'num_leaves_below', 'first_leaf', 'last_leaf'):
        assert torch.equal(getattr(compiled, name), getattr(plain, name)), name
