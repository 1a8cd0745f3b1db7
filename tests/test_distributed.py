"""Exact HSA across ranks (hsa_geo.distributed): partitions, then outputs and
gradients against single-process hsa, on processes spawned with gloo."""
import datetime
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hsa_geo import Hierarchy, HSAConv
from hsa_geo.distributed import (HierarchyPartition, all_reduce_gradients, count_communication,
                                 distributed_hsa, partition_hierarchy)
from hsa_geo.functional import hsa
from hsa_geo.functional import engine
from random_trees import balanced_parent, random_forest

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


# ------------------------------------------------------------- partitions
def test_partition_covers_every_leaf_once_and_balances():
    hierarchy = Hierarchy.from_parent(balanced_parent(4096, 4), 4096)
    partition = partition_hierarchy(hierarchy, 4)
    counts = partition.rank_num_leaves()
    assert int(counts.sum()) == 4096
    assert float(counts.max()) <= 1.1 * 4096 / 4
    leaves = torch.cat([shard.leaves for shard in partition.shards()])
    assert torch.equal(leaves.sort().values, torch.arange(4096))
    for shard in partition.shards():
        assert shard.local.num_leaves == shard.num_leaves
        # the shard's sibling pairs are the global ones at pair_index
        rows, cols = shard.local.sibling_pairs()
        global_rows, global_cols = hierarchy.sibling_pairs()
        assert torch.equal(shard.node[rows], global_rows[shard.pair_index])
        assert torch.equal(shard.node[cols], global_cols[shard.pair_index])
    top = partition.top
    rows, cols = top.hierarchy.sibling_pairs()
    global_rows, global_cols = hierarchy.sibling_pairs()
    assert torch.equal(top.node[rows], global_rows[top.pair_index])
    assert torch.equal(top.node[cols], global_cols[top.pair_index])


def test_parts_do_not_grow_with_the_leaves():
    for log2 in (9, 10, 13, 14):
        hierarchy = Hierarchy.from_parent(balanced_parent(2**log2, 4), 2**log2)
        partition = partition_hierarchy(hierarchy, 4, parts_per_rank=8)
        # splitting stops at the first family that reaches 32 parts
        assert 32 <= partition.top.num_parts <= 32 + 3, log2
        counts = partition.rank_num_leaves()
        assert float(counts.max()) <= 1.1 * 2**log2 / 4, (log2, counts)


def test_sibling_pairs_of_the_shards_and_top_are_all_the_pairs():
    hierarchy = random_forest(3, trees=3)
    partition = partition_hierarchy(hierarchy, 3, parts_per_rank=4)
    used = torch.cat([shard.pair_index for shard in partition.shards()]
                     + [partition.top.pair_index])
    # a part's own pair (B, B) is in its parent's family: the top tree's
    assert torch.equal(used.sort().values, torch.arange(hierarchy.num_sibling_pairs))


def test_a_cut_must_cover_every_leaf_once():
    hierarchy = Hierarchy.from_parent(torch.tensor([4, 4, 5, 5, 6, 6, -1]), 4)
    with pytest.raises(ValueError, match="leaf 2 lies below no part"):
        HierarchyPartition.from_parts(hierarchy, [4], [0], 2)
    with pytest.raises(ValueError, match="leaf 0 lies below two parts"):
        HierarchyPartition.from_parts(hierarchy, [4, 0, 5], [0, 0, 1], 2)
    with pytest.raises(ValueError, match="outside 0..1"):
        HierarchyPartition.from_parts(hierarchy, [4, 5], [0, 2], 2)
    with pytest.raises(ValueError, match="not a node"):
        HierarchyPartition.from_parts(hierarchy, [4, 9], [0, 1], 2)


def test_distributed_hsa_needs_an_initialised_process_group():
    hierarchy = Hierarchy.flat(4)
    shard = partition_hierarchy(hierarchy, 1).shard(0)
    q = torch.randn(4, 2, 3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed_hsa(q, q, q, shard)


# ------------------------------------------------------------- on ranks
def run_ranks(world_size: int, worker, tmp_path, *args) -> None:
    r"""Runs :obj:`worker(rank, world_size, *args)` on :obj:`world_size`
    processes joined by gloo; an exception in any fails the test."""
    mp.spawn(_on_rank, args=(world_size, str(tmp_path / 'init'), worker, args),
             nprocs=world_size)


def _on_rank(rank, world_size, init_file, worker, args):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        worker(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def _partition(hierarchy: Hierarchy, world_size: int, kind: str) -> HierarchyPartition:
    r"""'balanced'; 'uneven' (every part on rank 0 but the last); 'empty'
    (the last rank holds nothing)."""
    balanced = partition_hierarchy(hierarchy, world_size, parts_per_rank=4)
    if kind == 'balanced':
        return balanced
    parts = balanced.parts
    if kind == 'uneven':
        ranks = torch.zeros_like(parts)
        ranks[-1] = world_size - 1
    else:
        ranks = torch.arange(parts.numel()) % (world_size - 1)
    return HierarchyPartition(hierarchy, parts, ranks, world_size)


def _max_error(pairs) -> float:
    return max((float((a - b).detach().abs().max()) for a, b in pairs if a.numel() > 0), default=0.0)


def _exactness_worker(rank, world_size, kinds, dtypes, seeds, kernels):
    for kernel in kernels:  # the CPU kernel, or the tensor sweeps of the GPU
        with engine('auto' if kernel else 'tensor'):
            _check_exactness(rank, world_size, kinds, dtypes, seeds)


def _check_exactness(rank, world_size, kinds, dtypes, seeds):
    heads, dim = 2, 3
    for seed in seeds:
        for causal in (False, True):
            hierarchy = random_forest(seed, trees=2, causal=causal)
            generator = torch.Generator().manual_seed(seed)
            n = hierarchy.num_leaves
            inputs = [torch.randn(n, heads, dim, generator=generator, dtype=torch.float64)
                      for _ in range(3)]
            bias = torch.randn(hierarchy.num_sibling_pairs, heads, generator=generator,
                               dtype=torch.float64)
            upstream = torch.randn(n, heads, dim, generator=generator, dtype=torch.float64)
            for kind in kinds:
                shard = _partition(hierarchy, world_size, kind).shard(rank)
                mine = shard.leaves
                for dtype in dtypes:
                    for energy in ('dot', 'euclidean'):
                        q, k, v, b = (t.to(dtype).requires_grad_() for t in inputs + [bias])
                        expected = hsa(q, k, v, hierarchy, pair_bias=b, energy=energy,
                                       causal=causal)
                        expected_grads = torch.autograd.grad(
                            (expected * upstream.to(dtype)).sum(), (q, k, v, b))
                        local = [t.detach()[mine].requires_grad_() for t in (q, k, v)]
                        local_bias = b.detach()[shard.pair_index].requires_grad_()
                        top_bias = b.detach()[shard.top.pair_index].requires_grad_()
                        out = distributed_hsa(*local, shard, pair_bias=local_bias,
                                              top_pair_bias=top_bias, energy=energy,
                                              causal=causal)
                        grads = torch.autograd.grad(
                            (out * upstream.to(dtype)[mine]).sum(),
                            local + [local_bias, top_bias], allow_unused=True,
                            materialize_grads=True)  # a rank without leaves uses no q
                        top_grad = grads[4].clone()  # this rank's share; summed below
                        dist.all_reduce(top_grad)
                        pairs = [(out, expected[mine])]
                        pairs += [(g, e[mine]) for g, e in zip(grads[:3], expected_grads[:3])]
                        pairs += [(grads[3], expected_grads[3][shard.pair_index]),
                                  (top_grad, expected_grads[3][shard.top.pair_index])]
                        error = _max_error(pairs)
                        assert error < TOLERANCE[dtype], (
                            f"rank {rank}/{world_size}, seed {seed}, partition {kind}, "
                            f"{dtype}, {energy}, causal={causal}: error {error:.2e}")


@pytest.mark.parametrize('world_size,kinds,kernels', [(2, ('balanced', 'uneven'), (True, False)),
                                                      (4, ('balanced', 'empty'), (True, ))])
def test_outputs_and_gradients_equal_single_process_hsa(tmp_path, world_size, kinds, kernels):
    run_ranks(world_size, _exactness_worker, tmp_path, kinds,
              (torch.float64, torch.float32), range(4), kernels)


def _disagreement_worker(rank, world_size):
    hierarchy = Hierarchy.from_parent(balanced_parent(64, 4), 64)
    # rank 1 cuts the tree one level deeper than rank 0
    partition = partition_hierarchy(hierarchy, world_size, parts_per_rank=4 if rank == 0 else 16)
    shard = partition.shard(rank)
    q = torch.randn(shard.num_leaves, 2, 3)
    with pytest.raises(ValueError, match="disagree on the top tree"):
        distributed_hsa(q, q, q, shard)


def test_ranks_that_disagree_on_the_top_tree_get_a_clear_error(tmp_path):
    run_ranks(2, _disagreement_worker, tmp_path)


def _options_worker(rank, world_size):
    hierarchy = random_forest(1, trees=2, causal=True)
    shard = partition_hierarchy(hierarchy, world_size, parts_per_rank=4).shard(rank)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(hierarchy.num_leaves, 2, 3, generator=generator)[shard.leaves]
    top_bias = torch.randn(shard.top.pair_index.numel(), 2, generator=generator)
    other = 1 - rank
    # (what differs, rank 1's call); rank 0 makes the default call
    cases = [('causal', lambda: distributed_hsa(q, q, q, shard, causal=True)),
             ('scale', lambda: distributed_hsa(q, q, q, shard, scale=0.3)),
             ('top_pair_bias', lambda: distributed_hsa(q, q, q, shard, top_pair_bias=top_bias)),
             ('energy', lambda: distributed_hsa(q, q, q, shard, energy='euclidean')),
             ('dtype', lambda: distributed_hsa(*(q.double(), ) * 3, shard)),
             ('heads', lambda: distributed_hsa(*(q[:, :1], ) * 3, shard)),
             ('dim', lambda: distributed_hsa(q[..., :2], q[..., :2], q, shard)),
             ('value_dim', lambda: distributed_hsa(q, q, q[..., :2], shard))]
    for name, call in cases:
        with pytest.raises(ValueError, match=rf"rank {rank}: the ranks disagree on the options "
                                             rf"of distributed_hsa.* {name}: .* ranks \[{other}\]"):
            call() if rank == 1 else distributed_hsa(q, q, q, shard)
    # the same options but another top bias (values), and a rank under no_grad
    with pytest.raises(ValueError, match=rf"top_pair_bias: .* ranks \[{other}\]"):
        distributed_hsa(q, q, q, shard, top_pair_bias=top_bias * (1 + rank))
    with pytest.raises(ValueError, match=rf"grad enabled: .* ranks \[{other}\]"):
        with torch.set_grad_enabled(rank == 0):
            distributed_hsa(q, q, q, shard)
    # after the errors, the ranks are still in step
    distributed_hsa(q, q, q, shard, top_pair_bias=top_bias, causal=True)


def test_ranks_that_disagree_on_the_options_get_a_clear_error(tmp_path):
    run_ranks(2, _options_worker, tmp_path)


def _out_of_step_worker(rank, world_size):
    hierarchy = random_forest(2, trees=2)
    shard = partition_hierarchy(hierarchy, world_size, parts_per_rank=4).shard(rank)
    q = torch.randn(shard.num_leaves, 2, 3, requires_grad=True)
    # rank 1 skips the backward: its next call meets rank 0's backward
    group = dist.new_group([0, 1])
    out = distributed_hsa(q, q, q, shard, group=group)
    with pytest.raises(ValueError, match=rf"rank {rank}: distributed_hsa is out of step"):
        if rank == 0:
            out.sum().backward()
        else:
            distributed_hsa(q, q, q, shard, group=group)
    # two layers; rank 1 skips the second: its backward meets rank 0's call
    group = dist.new_group([0, 1])
    with pytest.raises(ValueError, match=r"this rank is at the (forward of call 2|backward of "
                                         r"call 1), ranks \[\d\] at the (backward of call 1|"
                                         r"forward of call 2)"):
        out = distributed_hsa(q, q, q, shard, group=group)
        if rank == 0:
            out = distributed_hsa(out, out, out, shard, group=group)
        out.sum().backward()
    # rank 1 skips the backward and goes elsewhere: rank 0 times out, with
    # a message that names the call and the rank
    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=3))
    out = distributed_hsa(q, q, q, shard, group=group)
    if rank == 0:
        with pytest.raises(RuntimeError, match=r"rank 0: the backward of call 1 of "
                                               r"distributed_hsa failed .*Timed out"):
            out.sum().backward()
    dist.barrier()


def test_a_rank_that_skips_a_call_or_its_backward_is_named(tmp_path):
    run_ranks(2, _out_of_step_worker, tmp_path)


def _layer_worker(rank, world_size):
    torch.manual_seed(0)
    hierarchy = random_forest(5, trees=2, causal=True)
    hierarchy = Hierarchy.from_parent(hierarchy.parent, hierarchy.num_leaves, ordered=True)
    conv = HSAConv(8, 4, heads=2, positional='learned', causal=True).double()
    x = torch.randn(hierarchy.num_leaves, 8, dtype=torch.float64)
    expected = conv(x, hierarchy)
    expected.pow(2).sum().backward()
    expected_grads = [p.grad.clone() for p in conv.parameters()]
    balanced = partition_hierarchy(hierarchy, world_size, parts_per_rank=4)
    # one part, on rank 0: rank 1 holds no leaves, and its positional
    # parameters get no gradient at all (None)
    single = HierarchyPartition.from_parts(hierarchy, hierarchy.roots, [0, 0], world_size)
    for partition in (balanced, single):
        conv.zero_grad()
        shard = partition.shard(rank)
        out = conv(x[shard.leaves], shard)
        out.pow(2).sum().backward()
        assert _max_error([(out, expected[shard.leaves])]) < 1e-10
        all_reduce_gradients(conv)  # sums the ranks' shares, None as zeros
        for parameter, grad in zip(conv.parameters(), expected_grads):
            assert _max_error([(parameter.grad, grad)]) < 1e-10
    weight = torch.ones(2, requires_grad=True)
    weight.grad = torch.full((2, ), float(rank))
    all_reduce_gradients([weight], average=True)  # as DDP does
    assert weight.grad.tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match=rf"rank {rank}: .* other counts on ranks \[{1 - rank}\]"):
        all_reduce_gradients(list(conv.parameters())[:1 + rank])


def test_hsa_conv_over_a_shard_equals_the_whole_hierarchy(tmp_path):
    run_ranks(2, _layer_worker, tmp_path)


def _communication_worker(rank, world_size):
    measured = []
    for log2 in (10, 13):
        hierarchy = Hierarchy.from_parent(balanced_parent(2**log2, 4), 2**log2)
        partition = partition_hierarchy(hierarchy, world_size)
        shard = partition.shard(rank)
        q = torch.randn(shard.num_leaves, 4, 16, requires_grad=True)
        with count_communication() as meter:
            distributed_hsa(q, q, q, shard).sum().backward()
        # parts x heads x (2D + D_v + 1) float32 numbers, reduced forward and
        # backward, each after the ranks' check: 16 float64 numbers per rank
        assert meter.bytes == 2 * partition.top.num_parts * 4 * (3 * 16 + 1) * 4 + \
            2 * world_size * 16 * 8
        assert meter.calls == 4
        measured.append(meter.bytes)
    assert abs(measured[1] / measured[0] - 1) <= 0.1, measured


def test_communication_does_not_grow_with_the_leaves(tmp_path):
    run_ranks(2, _communication_worker, tmp_path)


def _forest_worker(rank, world_size):
    # 1,500 lone leaves, small random trees and one tree large enough to split
    lone = Hierarchy.from_parent(torch.tensor([-1]), 1)
    trees = [lone] * 1500 + [random_forest(seed, trees=1) for seed in range(3)]
    trees.append(Hierarchy.from_parent(balanced_parent(512, 4), 512))
    hierarchy = Hierarchy.batch_hierarchies(trees)
    partition = partition_hierarchy(hierarchy, world_size)
    shard = partition.shard(rank)
    # the large tree's two halves, and one bundle of whole trees per rank
    assert partition.top.num_parts == 2 + world_size
    generator = torch.Generator().manual_seed(0)
    n, heads, dim = hierarchy.num_leaves, 2, 4
    q, k, v = (torch.randn(n, heads, dim, generator=generator, dtype=torch.float64,
                           requires_grad=True) for _ in range(3))
    expected = hsa(q, k, v, hierarchy, energy='euclidean')
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), (q, k, v))
    local = [t.detach()[shard.leaves].requires_grad_() for t in (q, k, v)]
    with count_communication() as meter:
        out = distributed_hsa(*local, shard, energy='euclidean')
        grads = torch.autograd.grad(out.pow(2).sum(), local)
    assert _max_error([(out, expected[shard.leaves])]) < 1e-10
    assert _max_error([(g, e[shard.leaves]) for g, e in zip(grads, expected_grads)]) < 1e-10
    # rows of parts x heads x (3D + 2) float64 numbers forward and backward,
    # the keys' centre (HD + 1), the ranks' checks (16 per rank); not 1,500 rows
    assert meter.bytes == (2 * partition.top.num_parts * heads * (3 * dim + 2)
                           + heads * dim + 1 + 2 * world_size * 16) * 8


def test_a_forest_exchanges_one_bundle_per_rank_and_stays_exact(tmp_path):
    run_ranks(2, _forest_worker, tmp_path)


# ------------------------------------------------------------- the example
EXAMPLE = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'examples',
                   'distributed_planted_partition.py')


def _run_example(tmp_path, world_size: int) -> dict:
    out = tmp_path / f'run{world_size}.json'
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
               f'--nproc_per_node={world_size}', EXAMPLE, '--num-nodes', '8192',
               '--epochs', '3', '--eval-every', '1', '--out', str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_example_trains_the_same_on_two_ranks_as_on_one(tmp_path):
    # the graph does not depend on the number of ranks, and the summed
    # gradients are those of the global loss: the runs agree step by step
    one, two = _run_example(tmp_path, 1), _run_example(tmp_path, 2)
    assert two['world_size'] == 2 and len(two['history']) == 3
    for single, split in zip(one['history'], two['history']):
        assert split['loss'] == pytest.approx(single['loss'], rel=1e-4)
        assert split['test_acc'] == pytest.approx(single['test_acc'], abs=2e-3)


def _errors_and_scatter_worker(rank, world_size):
    from hsa_geo.distributed import scatter_shards
    hierarchy = Hierarchy.from_parent(balanced_parent(64, 4), 64)
    partition = partition_hierarchy(hierarchy, world_size) if rank == 0 else None
    shard = scatter_shards(partition, src=0)
    expected = partition_hierarchy(hierarchy, world_size).shard(rank)
    assert shard.rank == rank and torch.equal(shard.leaves, expected.leaves)
    q = torch.randn(shard.num_leaves + 1, 2, 3)
    with pytest.raises(ValueError, match=f"rank {rank}: q has {shard.num_leaves + 1} rows"):
        distributed_hsa(q, q, q, shard)
    other = expected if world_size == 1 else partition_hierarchy(hierarchy, world_size).shard(
        1 - rank)
    q = torch.randn(other.num_leaves, 2, 3)
    with pytest.raises(ValueError, match=f"was given the shard of rank {1 - rank}"):
        distributed_hsa(q, q, q, other)
    with pytest.raises(ValueError, match="not block-constant"):
        distributed_hsa(q[:shard.num_leaves], q[:shard.num_leaves], q[:shard.num_leaves], shard,
                        causal='strict')
    # one head as [n, D], half precision in and out
    x = torch.randn(shard.num_leaves, 4, dtype=torch.bfloat16)
    out = distributed_hsa(x, x, x, shard)
    assert out.shape == x.shape and out.dtype == torch.bfloat16


def test_bad_input_and_shards_sent_from_rank_zero(tmp_path):
    run_ranks(2, _errors_and_scatter_worker, tmp_path)


def _cuda_worker(rank, world_size):
    # tensors on the GPU, exchanged by gloo (one GPU: nccl would need one per rank)
    torch.cuda.set_device(0)
    hierarchy = random_forest(2, trees=2)
    shard = partition_hierarchy(hierarchy, world_size, parts_per_rank=4).shard(rank)
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(hierarchy.num_leaves, 2, 3, generator=generator, dtype=torch.float64)
              for _ in range(3)]
    expected = hsa(*[t.cuda() for t in inputs], hierarchy.to('cuda'), energy='euclidean')
    local = [t[shard.leaves].cuda().requires_grad_() for t in inputs]
    out = distributed_hsa(*local, shard, energy='euclidean')
    out.sum().backward()
    assert out.device.type == 'cuda' and local[0].grad.device.type == 'cuda'
    assert _max_error([(out, expected[shard.leaves.cuda()])]) < 1e-10


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_distributed_hsa_on_cuda_tensors(tmp_path):
    run_ranks(2, _cuda_worker, tmp_path)
