"""The slot layout of the fused sweeps: its invariants, and exactness of the
sweeps on it for forests of mixed depth and branching, with padding buckets
forced on and off."""
import doctest

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hsa_geo.functional.layout as layout_module
from hsa_geo import Hierarchy
from hsa_geo.functional import engine, hsa
from hsa_geo.functional.layout import build_slot_layout, choose_buckets
from hsa_geo.functional.engines import engine_cache, slot_layout
from dense_checks import assert_equals_dense
from random_trees import balanced_parent, random_parent


def forest(seed: int, trees: int, **kwargs) -> Hierarchy:
    return Hierarchy.batch_hierarchies([
        Hierarchy.from_parent(*random_parent(seed * 7 + tree, **kwargs)) for tree in range(trees)])


def with_layout(hierarchy: Hierarchy, block_cost: float, pairs_per_block: int = 1 << 16):
    r"""The same hierarchy with its layout built with other bucket settings."""
    copy = Hierarchy.from_parent(hierarchy.parent, hierarchy.num_leaves, hierarchy.batch)
    engine_cache(copy).slot_layouts[torch.device('cpu')] = build_slot_layout(
        copy.parent, copy.num_leaves, copy.depth, copy.num_leaves_below, copy.first_leaf,
        pairs_per_block=pairs_per_block, block_cost=block_cost)
    return copy


def test_layout_doctests():
    assert doctest.testmod(layout_module, raise_on_error=True).attempted > 0


@pytest.mark.parametrize('block_cost', [0, 2048, 1e9])
@pytest.mark.parametrize('seed', range(6))
def test_every_family_is_a_contiguous_run_in_sibling_order(seed, block_cost):
    hierarchy = with_layout(forest(seed, 3, max_children=9, max_depth=5), block_cost)
    layout = slot_layout(hierarchy)
    parent, num_leaves = hierarchy.parent, hierarchy.num_leaves
    child = (parent >= 0).nonzero().view(-1)
    slots = layout.node_slot[child]
    assert torch.unique(slots).numel() == child.numel()  # one slot per child
    assert int(slots.max()) < layout.num_slots
    for block in layout.blocks:
        grid = torch.full((block.num_families, block.width), -1)
        in_block = (slots >= block.slot_start) & (slots < block.slot_start + block.num_slots)
        local = slots[in_block] - block.slot_start
        grid.view(-1)[local] = child[in_block]
        for row in grid:
            members = row[row >= 0]
            # children first, padding after, all of one family, by first leaf
            assert bool((row[:members.numel()] >= 0).all())
            assert torch.unique(parent[members]).numel() == 1
            assert int(hierarchy.num_children[parent[members[0]]]) == members.numel()
            first = hierarchy.first_leaf[members]
            assert bool((first[1:] > first[:-1]).all())
        padding = grid < 0
        assert bool((block.share[padding] == 0).all())
        assert bool((block.count[padding] == 0).all())
        assert bool((block.share.sum(1) - 1).abs().max() < 1e-12)
        if block.leaf_range is not None:
            start, end = block.leaf_range
            assert torch.equal(grid.view(-1), torch.arange(start, end))
        assert bool(((grid >= num_leaves) == block.cluster).all())


def test_buckets_trade_padding_against_blocks():
    assert choose_buckets([2, 3, 4], [1000, 300, 5], block_cost=0) == [(0, 0), (1, 1), (2, 2)]
    assert choose_buckets([2, 3, 4], [10, 3, 5], block_cost=1e6) == [(0, 2)]
    # never padded beyond twice the width, whatever the block cost saved
    assert choose_buckets([2, 32], [1000, 100], block_cost=4096) == [(0, 0), (1, 1)]


def test_a_batch_of_small_graphs_takes_few_blocks_per_level():
    hierarchy = forest(0, 64, max_children=6, max_depth=4, max_leaves=20)
    layout = slot_layout(hierarchy)
    distinct = len({(b.depth, b.num_children) for b in hierarchy.plan().blocks})
    assert len(layout.blocks) < distinct
    assert len(layout.blocks) <= 3 * len(layout.levels)


def test_leaf_ranges_read_the_inputs_in_place():
    hierarchy = Hierarchy.from_parent(balanced_parent(512, 8), 512)
    layout = slot_layout(hierarchy)
    assert all(block.leaf_range is not None for block in layout.levels[0].blocks)
    assert layout.slotted_leaves.numel() == 0
    # slot buffers hold the clusters and roots only
    assert layout.num_rows == hierarchy.num_clusters


def qkv(num_leaves, seed, heads=2, dim=3):
    generator = torch.Generator().manual_seed(seed)
    return [1.5 * torch.randn(num_leaves, heads, dim, generator=generator, dtype=torch.float64,
                              requires_grad=True) for _ in range(3)]


@settings(max_examples=150, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), trees=st.integers(1, 4), max_depth=st.integers(1, 6),
       max_children=st.integers(1, 9), block_cost=st.sampled_from([0, 2048, 1e9]),
       pairs_per_block=st.sampled_from([16, 1 << 16]),
       energy=st.sampled_from(['dot', 'euclidean']), causal=st.booleans(),
       biased=st.booleans())
def test_sweeps_on_any_layout_equal_the_dense_definition(seed, trees, max_depth, max_children,
                                                         block_cost, pairs_per_block, energy,
                                                         causal, biased):
    kwargs = dict(max_depth=max_depth, max_children=max_children, max_leaves=16,
                  shuffle_leaves=not causal)
    hierarchy = with_layout(forest(seed % 10_000, trees, **kwargs), block_cost, pairs_per_block)
    if causal:
        from random_trees import number_leaves_depth_first
        parent = number_leaves_depth_first(hierarchy.parent, hierarchy.num_leaves)
        hierarchy = with_layout(Hierarchy.from_parent(parent, hierarchy.num_leaves), block_cost,
                                pairs_per_block)
    q, k, v = qkv(hierarchy.num_leaves, seed % 997)
    terms = dict(energy=energy, causal=causal)
    if biased:
        generator = torch.Generator().manual_seed(seed % 991)
        terms['pair_bias'] = torch.randn(hierarchy.num_sibling_pairs, 2, generator=generator,
                                         dtype=torch.float64, requires_grad=True)
    with engine('tensor'):  # the tensor sweeps, which read the layout
        out = hsa(q, k, v, hierarchy, **terms)
    assert_equals_dense(out, q, k, v, hierarchy, **terms)
