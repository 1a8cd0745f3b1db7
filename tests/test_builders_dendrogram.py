import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import pdist, squareform

from hsa_geo.hierarchy import from_features, from_linkage

from test_builders_helpers import assert_valid_tree, children_of, cluster_sets, leaf_sets


def _blobs(seed=0, sizes=(30, 20, 25), spread=0.3):
    rng = np.random.default_rng(seed)
    # equidistant centres (a triangle of side 10): the three blobs are the
    # one clear level above the points
    centres = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [5.0, 8.66, 0.0]])[:len(sizes)]
    x = np.concatenate([c + spread * rng.normal(size=(n, 3)) for c, n in zip(centres, sizes)])
    label = np.repeat(np.arange(len(sizes)), sizes)
    perm = rng.permutation(len(x))
    return x[perm], label[perm]


def test_clear_clusters_are_subtrees():
    x, label = _blobs()
    for method in ('ward', 'average', 'complete', 'single'):
        h = from_features(x, method=method, max_children=8)
        assert_valid_tree(h, len(x), max_children=8)
        sets = cluster_sets(h)
        for c in range(3):
            assert frozenset(np.flatnonzero(label == c).tolist()) in sets, method


def test_cuts_follow_the_dendrogram():
    x, _ = _blobs(1)
    Z = linkage(x, 'average')
    h = from_linkage(Z, max_depth=3, max_children=None)
    assert_valid_tree(h, len(x))
    # every cluster is a subtree of the dendrogram
    n = len(x)
    members = {i: frozenset([i]) for i in range(n)}
    for i, (a, b) in enumerate(Z[:, :2].astype(int)):
        members[n + i] = members[a] | members[b]
    assert cluster_sets(h) <= set(members.values())
    assert h.max_depth <= 3


def test_depth_and_children_bounds():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 2))
    for method in ('ward', 'single'):  # single linkage chains: unbalanced
        h = from_features(x, method=method, max_children=8)
        assert_valid_tree(h, 500, max_children=8)
        # default depth ceil(log_8 500) = 3, plus at most ceil(log_8 500) for splits
        assert h.max_depth <= 6, method


def test_split_children_are_neighbours_in_dendrogram_order():
    x = np.arange(64, dtype=float)[:, None] ** 1.5  # chaining distances
    h = from_features(x, method='single', max_depth=1, max_children=4)
    assert_valid_tree(h, 64, max_children=4)
    for node, children in children_of(h).items():
        if all(c < 64 for c in children):
            assert max(children) - min(children) == len(children) - 1


def test_distance_matrix_input_and_tensor_input():
    x, _ = _blobs(2)
    D = squareform(pdist(x))
    a = from_linkage(linkage(squareform(D), 'average'))
    b = from_features(torch.from_numpy(x), method='average')
    assert torch.equal(a.parent, b.parent)
    c = from_linkage(torch.from_numpy(linkage(x, 'average')))
    assert torch.equal(a.parent, c.parent)


def test_small_inputs():
    assert from_features(np.zeros((1, 3))).num_clusters == 0
    h = from_features(np.array([[0.0], [1.0]]))
    assert h.parent.tolist() == [2, 2, -1]
    h = from_features(np.zeros((10, 2)))  # all distances equal
    assert_valid_tree(h, 10)


@pytest.mark.parametrize('Z, match', [
    (np.zeros((3, 3)), 'linkage'),
    (np.array([[0, 1, 0.5, 2], [0, 1, 0.7, 2]]), 'linkage'),
    ('abc', 'linkage'),
])
def test_bad_linkage(Z, match):
    with pytest.raises(ValueError, match=match):
        from_linkage(Z)


@pytest.mark.parametrize('kwargs, match', [
    (dict(x=np.zeros((0, 2))), 'n >= 1'),
    (dict(x=np.zeros(5)), r'\[n, d\]'),
    (dict(x=np.array([[0.0], [np.nan]])), 'Row 1 of x is not finite'),
    (dict(x=np.zeros((3, 2)), method='nearest'), 'linkage failed'),
    (dict(x=np.zeros((3, 2)), max_depth=0), 'max_depth'),
])
def test_bad_features(kwargs, match):
    with pytest.raises(ValueError, match=match):
        from_features(**kwargs)


def test_leaves_are_observations():
    x, label = _blobs(3, sizes=(5, 5))
    h = from_features(x, max_children=None, max_depth=2)
    top = [leaf_sets(h)[c] for c in children_of(h)[int(h.roots[0])]]
    assert sorted(sorted(label[list(s)].tolist()) for s in top) == [[0] * 5, [1] * 5]


@pytest.mark.parametrize('height', [float('nan'), float('inf')])
def test_a_linkage_with_a_height_that_is_not_finite_is_refused(height):
    from scipy.cluster.hierarchy import linkage
    Z = linkage(np.array([[0.0], [0.1], [5.0], [5.1], [5.3], [9.0]]), 'average')
    Z[2, 2] = height
    with pytest.raises(ValueError, match='merge 2 has height'):
        from_linkage(Z)
