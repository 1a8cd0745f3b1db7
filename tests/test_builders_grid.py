import pytest
import torch

from hsa_geo.hierarchy import grid_quadtree

from test_builders_helpers import assert_valid_tree, cluster_sets


def _square(top, left, side, height, width):
    return frozenset(r * width + c for r in range(top, min(top + side, height))
                     for c in range(left, min(left + side, width)))


@pytest.mark.parametrize('height, width, block', [(8, 8, 2), (5, 7, 2), (1, 9, 2), (14, 14, 2),
                                                  (9, 9, 3), (1, 1, 2), (6, 4, 4)])
def test_clusters_are_aligned_squares(height, width, block):
    h = grid_quadtree(height, width, block=block, max_children=None)
    assert_valid_tree(h, height * width, max_children=block * block)
    expected = set()
    side = block
    while True:
        for top in range(0, height, side):
            for left in range(0, width, side):
                square = _square(top, left, side, height, width)
                if len(square) > 1:
                    expected.add(square)
        if side >= max(height, width):
            break
        side *= block
    assert cluster_sets(h) == expected | ({frozenset(range(height * width))}
                                          if height * width > 1 else set())


def test_power_of_two_is_a_complete_quadtree():
    h = grid_quadtree(16, 16)
    assert set(h.num_children[h.num_leaves:].tolist()) == {4}
    assert h.max_depth == 4 and h.num_clusters == 64 + 16 + 4 + 1


def test_max_children_below_block_squared():
    h = grid_quadtree(9, 9, block=3, max_children=4)
    assert_valid_tree(h, 81, max_children=4)
    assert _square(0, 0, 3, 9, 9) in cluster_sets(h)


@pytest.mark.parametrize('kwargs, match', [(dict(height=0, width=3), 'height'),
                                           (dict(height=3, width=2.5), 'width'),
                                           (dict(height=3, width=3, block=1), 'block')])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        grid_quadtree(**kwargs)


def test_large_grid_is_fast():
    h = grid_quadtree(512, 512)
    assert h.num_leaves == 512 * 512 and h.max_depth == 9
    assert torch.equal(h.num_children[h.num_leaves:].unique(), torch.tensor([4]))
