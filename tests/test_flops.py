import doctest

import pytest
import torch

import hsa_geo.flops
from hsa_geo import Hierarchy
from hsa_geo.flops import (block_local_flops, global_token_flops, hsa_flops,
                            sliding_window_flops, softmax_flops)


def test_softmax_flops_by_hand():
    # QK^T: 4*4 dot products of width 8 = 2*16*8; AV: 2*16*8 -> 512
    assert softmax_flops(4, dim=8) == 512
    # two sequences of 2 and 3 tokens, D = Dv = 1: 2*4*2 + 2*9*2
    assert softmax_flops([2, 3], dim=1) == 52
    assert softmax_flops(3, dim=2, value_dim=1, heads=5) == 5 * 2 * 9 * 3


def test_block_local_flops_by_hand():
    assert block_local_flops(torch.tensor([0, 0, 1, 1, 1]), dim=1) == 52
    # groups need not be contiguous: sizes 3 and 2 again
    assert block_local_flops([7, 3, 7, 3, 7], dim=1) == 52
    # one group is plain softmax
    assert block_local_flops([0] * 6, dim=4, heads=2) == softmax_flops(6, dim=4, heads=2)


def test_hsa_flops_flat_by_hand():
    # one family of 4: 16 sibling pairs * 2 * (8 + 8) = 512, plus 4 edges * 4 * 16 = 256
    assert hsa_flops(Hierarchy.flat(4), dim=8) == 768
    assert hsa_flops(Hierarchy.flat(2), dim=2, value_dim=3) == 2 * 4 * 5 + 4 * 2 * 5


def test_hsa_flops_two_levels_by_hand():
    # leaves 0,1 under 4; 2,3 under 5; root 6: three families of 2 -> 12 pairs, 6 edges
    h = Hierarchy.from_parent(torch.tensor([4, 4, 5, 5, 6, 6, -1]), num_leaves=4)
    assert hsa_flops(h, dim=1) == 2 * 12 * 2 + 4 * 6 * 2
    assert hsa_flops(h, dim=1, heads=3) == 3 * 96
    # a binary tree over 4 leaves has fewer sibling pairs than softmax has scores
    assert 2 * 12 * 2 < softmax_flops(4, dim=1)


def test_hsa_flops_forest_by_hand():
    forest = Hierarchy.batch_hierarchies([Hierarchy.flat(2), Hierarchy.flat(3)])
    # pairs 4 + 9 = 13, edges 2 + 3 = 5 (roots have no parent edge)
    assert hsa_flops(forest, dim=1) == 2 * 13 * 2 + 4 * 5 * 2
    # the pair term is exactly softmax inside every tree
    assert hsa_flops(forest, dim=1) - 4 * 5 * 2 == softmax_flops([2, 3], dim=1)


@pytest.mark.parametrize('num_leaves', [1, 5, 64])
def test_hsa_flops_flat_is_softmax_plus_linear(num_leaves):
    dim = 16
    overhead = 4 * num_leaves * 2 * dim
    assert hsa_flops(Hierarchy.flat(num_leaves), dim) == softmax_flops(num_leaves, dim) + overhead


def test_flops_doctest():
    result = doctest.testmod(hsa_geo.flops)
    assert result.attempted > 0 and result.failed == 0


def _counted(hierarchy, dim, value_dim, heads, block_cost):
    from torch.utils.flop_counter import FlopCounterMode

    from hsa_geo.functional.sweep import HSAFunction
    from hsa_geo.functional.layout import build_slot_layout
    layout = build_slot_layout(hierarchy.parent, hierarchy.num_leaves, hierarchy.depth,
                               hierarchy.num_leaves_below, hierarchy.first_leaf,
                               block_cost=block_cost)
    q, k = (torch.randn(hierarchy.num_leaves, heads, dim) for _ in range(2))
    v = torch.randn(hierarchy.num_leaves, heads, value_dim)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        HSAFunction.apply(q, k, v, None, layout, dim ** -0.5)
    return counter.get_total_flops(), layout


@pytest.mark.parametrize('seed', range(4))
def test_pair_terms_agree_with_torch_flop_counter(seed):
    from random_trees import random_hierarchy
    dim, value_dim, heads = 8, 5, 2
    # a flat tree is one block: the counter sees exactly the pair terms
    flat = Hierarchy.flat(10 + seed)
    counted, _ = _counted(flat, dim, value_dim, heads, block_cost=0)
    assert counted == hsa_flops(flat, dim, value_dim, heads, per_edge=False)
    # any tree, on a layout without padding: the scores are always products
    # (at least the formula's score terms); the value mixes of small
    # families and most means are elementwise (not counted), those of wide
    # families products: never more than all the formula's terms, allowing
    # the columns that fold log|C| (and the key norm) into the keys
    forest = Hierarchy.batch_hierarchies([random_hierarchy(seed * 5 + j) for j in range(4)])
    pairs = hsa_flops(forest, dim, value_dim, heads, per_edge=False)
    scores = pairs * dim // (dim + value_dim)
    total = hsa_flops(forest, dim, value_dim, heads)
    counted, layout = _counted(forest, dim, value_dim, heads, block_cost=0)
    assert layout.num_pairs == forest.num_sibling_pairs  # no padding
    assert scores <= counted <= total * (dim + 2 + value_dim) / (dim + value_dim)
    # the default layout pads families into buckets: the counter counts the
    # padding, the formula only the tree's pairs
    counted, layout = _counted(forest, dim, value_dim, heads, block_cost=2048)
    assert layout.num_pairs >= forest.num_sibling_pairs and counted >= scores


@pytest.mark.parametrize('num_tokens', [1, 2, 7, 30])
@pytest.mark.parametrize('window', [0, 1, 3, 40])
def test_sliding_window_and_global_flops_count_the_pairs_of_their_mask(num_tokens, window):
    position = torch.arange(num_tokens)
    local = (position[:, None] - position[None, :]).abs() <= window
    per_pair = 2 * (8 + 5) * 3  # 2 (D + D_v) H
    assert sliding_window_flops(num_tokens, window, 8, 5, heads=3) == \
        int(local.sum()) * per_pair
    for num_global in range(min(num_tokens, 3) + 1):
        # the global tokens' whole rows and columns: g(2n - g) pairs
        is_global = position < num_global
        both = is_global[:, None] | is_global[None, :]
        assert global_token_flops(num_tokens, num_global, 8, 5, heads=3) == \
            int(both.sum()) * per_pair
    with pytest.raises(ValueError, match='num_global'):
        global_token_flops(3, 4, 8)
