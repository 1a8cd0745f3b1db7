"""Partitions of a hierarchy across ranks (hsa_geo.distributed.partition):
any cut, any assignment, deep and wide trees, forests; and exactness of
distributed HSA over any cut against single-process hsa, on a one-rank gloo
group in this process."""
import datetime
import random
import warnings

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from hsa_geo import Hierarchy
from hsa_geo.distributed import HierarchyPartition, distributed_hsa, partition_hierarchy
from hsa_geo.functional import hsa
from random_trees import random_parent

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def caterpillar(depth: int) -> Hierarchy:
    r"""A chain of :obj:`depth` clusters, each with one leaf child and the
    next cluster; the deepest has two leaves: ``depth + 1`` leaves."""
    num_leaves = depth + 1
    chain = torch.arange(depth)
    parent = torch.empty(num_leaves + depth, dtype=torch.long)
    parent[num_leaves + chain] = num_leaves + chain - 1
    parent[num_leaves] = -1
    parent[:depth] = num_leaves + chain
    parent[depth] = num_leaves + depth - 1
    return Hierarchy.from_parent(parent, num_leaves)


def wide(num_leaves: int) -> Hierarchy:
    return Hierarchy.flat(num_leaves)


def forest(trees) -> Hierarchy:
    return Hierarchy.batch_hierarchies(trees)


@st.composite
def hierarchies(draw) -> Hierarchy:
    r"""Random trees of mixed depth, caterpillars, wide flat trees, and
    forests of them (single leaves included)."""
    def one_tree(kind, seed):
        if kind == 'random':
            return Hierarchy.from_parent(*random_parent(seed, max_leaves=30))
        if kind == 'caterpillar':
            return caterpillar(1 + seed % 60)
        if kind == 'wide':
            return wide(1 + seed % 70)
        return Hierarchy.from_parent(torch.tensor([-1]), 1)  # a lone leaf

    kinds = st.sampled_from(['random', 'caterpillar', 'wide', 'leaf'])
    trees = draw(st.lists(st.tuples(kinds, st.integers(0, 10**6)), min_size=1, max_size=6))
    built = [one_tree(kind, seed) for kind, seed in trees]
    if len(built) == 1:
        return built[0]
    return forest([Hierarchy.from_parent(h.parent, h.num_leaves) for h in built])


def random_cut(hierarchy: Hierarchy, seed: int):
    r"""A random cut: from the roots, every node is split into its children
    with probability 1/2."""
    rng = random.Random(seed)
    parent = hierarchy.parent.tolist()
    children = {}
    for node, up in enumerate(parent):
        children.setdefault(up, []).append(node)
    cut, frontier = [], list(children[-1])
    while frontier:
        node = frontier.pop()
        if node in children and rng.random() < 0.5:
            frontier.extend(children[node])
        else:
            cut.append(node)
    return cut


def check_partition(partition: HierarchyPartition) -> None:
    r"""Every leaf on exactly one rank; the shards' and the top tree's
    sibling pairs are the global ones at their pair_index, and all of them."""
    hierarchy = partition.hierarchy
    shards = partition.shards()
    leaves = torch.cat([shard.leaves for shard in shards])
    assert torch.equal(leaves.sort().values, torch.arange(hierarchy.num_leaves))
    assert partition.rank_num_leaves().tolist() == [shard.num_leaves for shard in shards]
    rows, cols = hierarchy.sibling_pairs()
    used = [partition.top.pair_index]
    top = partition.top
    top_rows, top_cols = top.hierarchy.sibling_pairs()
    assert torch.equal(top.node[top_rows], rows[top.pair_index])
    assert torch.equal(top.node[top_cols], cols[top.pair_index])
    for shard in shards:
        assert int(top.part_num_leaves[shard.parts].sum()) == shard.num_leaves
        if shard.local is None:
            continue
        local_rows, local_cols = shard.local.sibling_pairs()
        assert torch.equal(shard.node[local_rows], rows[shard.pair_index])
        assert torch.equal(shard.node[local_cols], cols[shard.pair_index])
        used.append(shard.pair_index)
    assert torch.equal(torch.cat(used).sort().values, torch.arange(hierarchy.num_sibling_pairs))


# ------------------------------------------------------------ any cut
@SETTINGS
@given(hierarchies(), st.integers(0, 10**6), st.integers(1, 4))
def test_any_cut_and_assignment_makes_a_partition(hierarchy, seed, world_size):
    cut = random_cut(hierarchy, seed)
    ranks = [random.Random(seed + part).randrange(world_size) for part in cut]
    check_partition(HierarchyPartition.from_parts(hierarchy, cut, ranks, world_size))


@SETTINGS
@given(hierarchies(), st.integers(0, 10**6))
def test_a_repeated_part_is_refused(hierarchy, seed):
    cut = random_cut(hierarchy, seed)
    repeated = cut + [cut[seed % len(cut)]]
    with pytest.raises(ValueError, match=f"part {repeated[-1]} is listed twice"):
        HierarchyPartition.from_parts(hierarchy, repeated, [0] * len(repeated), 1)


def test_the_repeated_part_of_the_issue_is_refused():
    hierarchy = Hierarchy.from_parent(torch.tensor([4, 4, 5, 5, 6, 6, -1]), 4)
    with pytest.raises(ValueError, match="part 4 is listed twice"):
        HierarchyPartition.from_parts(hierarchy, [4, 4, 5], [0, 0, 0], 1)


@SETTINGS
@given(hierarchies(), st.integers(0, 10**6))
def test_a_cut_with_a_hole_or_an_overlap_is_refused(hierarchy, seed):
    cut = random_cut(hierarchy, seed)
    parent = hierarchy.parent
    hole = cut[:-1]
    with pytest.raises(ValueError, match="lies below no part" if hole else "at least one part"):
        HierarchyPartition.from_parts(hierarchy, hole, [0] * len(hole), 1)
    above = [node for node in cut if int(parent[node]) >= 0]
    if above:
        overlap = cut + [int(parent[above[0]])]
        with pytest.raises(ValueError, match="lies below two parts"):
            HierarchyPartition.from_parts(hierarchy, overlap, [0] * len(overlap), 1)


# ---------------------------------------------------------- arguments
def test_bad_arguments_give_clear_errors():
    hierarchy = Hierarchy.from_parent(torch.tensor([4, 4, 5, 5, 6, 6, -1]), 4)
    with pytest.raises(TypeError, match="'world_size' must be an integer"):
        partition_hierarchy(hierarchy, 2.5)
    with pytest.raises(TypeError, match="'world_size' must be an integer"):
        HierarchyPartition.from_parts(hierarchy, [6], [0], 1.5)
    with pytest.raises(TypeError, match="must be a hsa_geo.Hierarchy"):
        partition_hierarchy(hierarchy.parent, 2)
    with pytest.raises(TypeError, match="'parts_per_rank' must be an integer"):
        partition_hierarchy(hierarchy, 2, parts_per_rank='4')
    with pytest.raises(ValueError, match="'max_parts_per_rank' must be at least 1"):
        partition_hierarchy(hierarchy, 2, max_parts_per_rank=0)
    with pytest.raises(ValueError, match="'max_part_share' must be a positive"):
        partition_hierarchy(hierarchy, 2, max_part_share=float('nan'))
    with pytest.raises(TypeError, match="'parts' must hold integer node ids"):
        HierarchyPartition.from_parts(hierarchy, [4.0, 5.0], [0, 1], 2)
    with pytest.raises(TypeError, match="'rank' must be an integer"):
        partition_hierarchy(hierarchy, 2).shard(0.0)


# ------------------------------------------------------------ balance
def leaves_per_rank_bound(num_leaves: int, world_size: int, max_part_share: float) -> float:
    r"""The documented bound of :func:`partition_hierarchy`."""
    share = num_leaves / world_size
    return share + (1 - 1 / world_size) * max(max_part_share * share, 1)


def test_a_deep_caterpillar_warns_when_it_cannot_be_balanced():
    hierarchy = caterpillar(5000)
    with pytest.warns(UserWarning, match="max_parts_per_rank"):
        partition = partition_hierarchy(hierarchy, 2)
    assert partition.top.num_parts <= 2 * 256
    # with room for enough parts, it balances within the bound, silently
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        partition = partition_hierarchy(hierarchy, 2, max_parts_per_rank=2048)
    counts = partition.rank_num_leaves()
    assert float(counts.max()) <= leaves_per_rank_bound(5001, 2, 0.25), counts


@SETTINGS
@given(hierarchies(), st.integers(1, 4), st.integers(1, 6), st.integers(1, 8))
def test_partitions_balance_within_the_bound_or_warn(hierarchy, world_size, parts_per_rank,
                                                     max_parts_per_rank):
    max_parts_per_rank = max(max_parts_per_rank, parts_per_rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        partition = partition_hierarchy(hierarchy, world_size, parts_per_rank=parts_per_rank,
                                        max_parts_per_rank=max_parts_per_rank)
    check_partition(partition)
    counts = partition.rank_num_leaves()
    warned = any('max_parts_per_rank' in str(w.message) for w in caught)
    within = float(counts.max()) <= leaves_per_rank_bound(hierarchy.num_leaves, world_size, 0.25)
    assert within != warned, (counts.tolist(), [str(w.message) for w in caught])
    # the exchange: parts below a top cluster, bounded, and one bundle per
    # rank for the whole trees
    assert partition.top.num_parts <= (max_parts_per_rank + 1) * world_size


# ------------------------------------------------------------ forests
def test_whole_trees_of_a_forest_are_bundled_per_rank():
    hierarchy = Hierarchy.from_parent(torch.full((20000, ), -1), 20000)
    partition = partition_hierarchy(hierarchy, 4)
    assert partition.top.num_parts == 4
    assert partition.rank_num_leaves().tolist() == [5000] * 4
    check_partition(partition)
    # a forest of many small trees and one large one: the large one is split
    trees = [Hierarchy.flat(3) for _ in range(500)] + [Hierarchy.flat(2000)]
    partition = partition_hierarchy(forest(trees), 2, parts_per_rank=4, max_parts_per_rank=3000)
    check_partition(partition)
    assert partition.top.num_parts <= 2000 + 2
    assert float(partition.rank_num_leaves().max()) <= leaves_per_rank_bound(3500, 2, 0.25)


# ------------------------------------------- exactness on one rank, any cut
@pytest.fixture(scope='module')
def one_rank_group(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip('a process group is already initialised')
    init = tmp_path_factory.mktemp('gloo') / 'init'
    dist.init_process_group('gloo', init_method=f'file://{init}', rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()


@settings(max_examples=15, deadline=None, derandomize=True)
@given(hierarchies(), st.integers(0, 10**6), st.sampled_from(['dot', 'euclidean']))
def test_distributed_hsa_over_any_cut_equals_hsa(one_rank_group, hierarchy, seed, energy):
    generator = torch.Generator().manual_seed(seed)
    n = hierarchy.num_leaves
    q, k, v = (torch.randn(n, 2, 3, generator=generator, dtype=torch.float64,
                           requires_grad=True) for _ in range(3))
    bias = torch.randn(hierarchy.num_sibling_pairs, 2, generator=generator, dtype=torch.float64,
                       requires_grad=True)
    expected = hsa(q, k, v, hierarchy, pair_bias=bias, energy=energy)
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v, bias))
    cut = random_cut(hierarchy, seed)
    shard = HierarchyPartition.from_parts(hierarchy, cut, [0] * len(cut), 1).shard(0)
    local = [t.detach()[shard.leaves].requires_grad_() for t in (q, k, v)]
    local_bias = bias.detach()[shard.pair_index].requires_grad_()
    top_bias = bias.detach()[shard.top.pair_index].requires_grad_()
    out = distributed_hsa(*local, shard, pair_bias=local_bias, top_pair_bias=top_bias,
                          energy=energy)
    grads = torch.autograd.grad(out.sum(), local + [local_bias, top_bias], allow_unused=True,
                                materialize_grads=True)
    assert torch.allclose(out, expected[shard.leaves], atol=1e-10)
    for grad, full in zip(grads[:3], expected_grads[:3]):
        assert torch.allclose(grad, full[shard.leaves], atol=1e-10)
    assert torch.allclose(grads[3], expected_grads[3][shard.pair_index], atol=1e-10)
    assert torch.allclose(grads[4], expected_grads[3][shard.top.pair_index], atol=1e-10)


def test_scatter_shards_needs_a_partition(one_rank_group):
    from hsa_geo.distributed import scatter_shards
    hierarchy = Hierarchy.flat(4)
    with pytest.raises(TypeError, match="must pass a HierarchyPartition"):
        scatter_shards(hierarchy, src=0)
    shard = scatter_shards(partition_hierarchy(hierarchy, 1), src=0)
    assert torch.equal(shard.leaves, torch.arange(4))
