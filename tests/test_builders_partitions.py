import numpy as np
import pytest
import torch

from hsa_geo import Hierarchy
from hsa_geo.hierarchy import DEFAULT_MAX_CHILDREN, from_partitions, limit_children

from test_builders_helpers import assert_valid_tree, children_of, cluster_sets, leaf_sets


def test_sets_become_clusters():
    levels = [[{0, 1}, {2, 3, 4}, {5, 6}, {7}], [{0, 1, 2, 3, 4}, {5, 6, 7}]]
    h = from_partitions(levels, num_leaves=8, max_children=None)
    assert_valid_tree(h, 8)
    # {7} and the root's absence of a duplicate are chains: they disappear
    expected = {frozenset(s) for level in levels for s in level if len(s) > 1}
    assert cluster_sets(h) == expected | {frozenset(range(8))}


def test_keep_chains_keeps_every_set_and_adds_a_root():
    levels = [[{0, 1}, {2}], [{0, 1}, {2}]]
    h = from_partitions(levels, num_leaves=3, max_children=None, keep_chains=True)
    assert h.num_clusters == 5  # 2 + 2 sets + root
    assert_valid_tree(h, 3, chains_allowed=True)
    collapsed = from_partitions(levels, num_leaves=3, max_children=None)
    assert collapsed.parent.tolist() == [3, 3, 4, 4, -1]


def test_no_root_added_when_coarsest_level_is_one_set():
    h = from_partitions([[{0, 1}, {2, 3}], [{0, 1, 2, 3}]], num_leaves=4)
    assert h.num_clusters == 3 and h.num_trees == 1


def test_no_levels_is_flat_and_any_iterables_work():
    h = from_partitions([], num_leaves=3)
    assert h.parent.tolist() == [3, 3, 3, -1]
    h = from_partitions(iter([[[0, 1], (2, )], ({0, 1, 2}, )]), num_leaves=3)
    assert_valid_tree(h, 3)
    h = from_partitions([[np.array([0, 1]), torch.tensor([2, 3])]], num_leaves=4)
    assert cluster_sets(h) == {frozenset({0, 1}), frozenset({2, 3}), frozenset(range(4))}


def test_partition_order_does_not_change_the_tree():
    a = from_partitions([[{0, 3}, {1, 2}, {4, 5}]], num_leaves=6)
    b = from_partitions([[{5, 4}, {2, 1}, {3, 0}]], num_leaves=6)
    assert torch.equal(a.parent, b.parent)  # canonical cluster numbering


def test_max_children_splits_into_balanced_contiguous_chunks():
    h = from_partitions([[set(range(100))]], num_leaves=100, max_children=10)
    assert_valid_tree(h, 100, max_children=10)
    for node, children in children_of(h).items():
        if all(c < 100 for c in children):
            assert children == list(range(children[0], children[0] + len(children)))
            assert len(children) == 10
    assert h.max_depth == 2


def test_default_max_children_is_applied():
    n = DEFAULT_MAX_CHILDREN * 3 + 1
    h = from_partitions([], num_leaves=n)
    assert_valid_tree(h, n, max_children=DEFAULT_MAX_CHILDREN)
    assert from_partitions([], num_leaves=n, max_children=None).summary()['max_children'] == n


def test_max_children_two_on_odd_sizes_never_creates_chains():
    for n in range(2, 40):
        h = from_partitions([], num_leaves=n, max_children=2)
        assert_valid_tree(h, n, max_children=2)


@pytest.mark.parametrize('levels, match', [
    ([[{0, 1}]], r'Level 0 misses 1 leaves \(e\.g\. \[2\]\)'),
    ([[{0, 1}, {1, 2}]], r'Leaf 1 appears twice in level 0 \(in set 0 and set 1\)'),
    ([[[0, 0, 1, 2]]], r'Leaf 0 appears twice in level 0'),
    ([[{0, 1}, {2}], [{0}, {1, 2}]], r'Set 0 of level 0 \(leaves \{0, 1\}\) is split across '
                                    r'sets \[0, 1\] of level 1'),
    ([[{0, 1}, set(), {2}]], r'Set 1 of level 0 is empty'),
    ([[{0, 1, 5}, {2}]], r'Set 0 of level 0 holds leaf 5, outside \[0, 2\]'),
    ([[{0, 1, -1}, {2}]], r'holds leaf -1'),
    ([[{0, 1.0}, {2}]], r'holds 1\.0, which is not an integer'),
    ([[{0, 1}, {'2'}]], r"holds '2'"),
    ([[[0, True], [2]]], r'holds True'),
    ([[]], r'Level 0 has no sets'),
    ([[{0, 1, 2}], 'ab'], r'Level 1 must be an iterable of sets'),
    ([[0, 1, 2]], r'Set 0 of level 0 must be an iterable'),
])
def test_bad_partitions_name_the_problem(levels, match):
    with pytest.raises(ValueError, match=match):
        from_partitions(levels, num_leaves=3)


@pytest.mark.parametrize('kwargs, match', [
    (dict(num_leaves=0), 'num_leaves'),
    (dict(num_leaves=3, max_children=1), 'at least 2'),
    (dict(num_leaves=3, max_children=2.5), 'integer'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        from_partitions([[{0, 1, 2}]], **kwargs)


def test_limit_children_on_an_existing_hierarchy():
    h = Hierarchy.from_parent(torch.tensor([5, 5, 5, 5, 6, 6, -1]), num_leaves=5)
    limited = limit_children(h, max_children=2)
    assert_valid_tree(limited, 5, max_children=2)
    assert frozenset({0, 1, 2, 3}) in cluster_sets(limited)
    assert limit_children(Hierarchy.flat(1)).num_clusters == 0  # a lone leaf is its own root


def test_a_large_child_is_not_buried_with_its_small_siblings():
    # one community of 100 leaves beside 40 single leaves, max_children=8: the
    # singles are chunked, the community stays a child of the root
    levels = [[set(range(100))] + [{leaf} for leaf in range(100, 140)]]
    h = from_partitions(levels, num_leaves=140, max_children=8)
    assert_valid_tree(h, 140, max_children=8)
    root = int(h.roots[0])
    assert frozenset(range(100)) in {leaf_sets(h)[c] for c in children_of(h)[root]}
    # without a large child, plain balanced chunks (sizes differ by at most one)
    flat = from_partitions([], num_leaves=45, max_children=8)
    sizes = sorted(len(c) for c in children_of(flat).values() if all(x < 45 for x in c))
    assert sizes[-1] - sizes[0] <= 1
