r"""Distributed exact HSA: per-rank memory, time per layer and bytes
communicated, for 1, 2 and 4 ranks (gloo, processes on this machine).

Set-up: balanced trees with branching 8 (as :mod:`benchmarks.scaling`),
4 heads x 16 features, float32; one layer is
:func:`hsa_geo.distributed.distributed_hsa` forward and backward on random
q, k, v. The parent process builds the hierarchy and the partition
(:func:`~hsa_geo.distributed.partition_hierarchy`) and saves each rank's
shard; a rank loads only its own, so its memory is that of its share of the
graph:

* **weak scaling**: :math:`2^{k}` leaves per rank on 1, 2 and 4 ranks;
* **strong scaling**: :math:`2^{k}` leaves in all on 1, 2 and 4 ranks;
* **communication**: bytes of the collectives of one layer (forward and
  backward) on the largest world, at every size.

Per rank it records the peak resident set size during the layer above the
process's RSS before it loaded its shard (the memory of holding and
processing its share: shard, inputs, gradients, sweeps), the process's
absolute peak, and the median seconds per layer (slowest rank). Ranks share
this machine's cores: with more ranks than cores, time per layer measures
contention, not scaling; the JSON records the cores and the load.

Targets (issue 12): 4 ranks hold a graph 4x larger than 1 rank at <= 1.2x
the per-rank peak memory; bytes per layer within 10 % from the smallest to
the largest :math:`N` and <= 1 MB at the largest.
"""
from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.scaling import balanced_parent, run_and_report, target_lines
from benchmarks.timing import (MiB, PeakMemory, current_rss_bytes, machine_info,
                                       median)

HEADS, DIM = 4, 16


def build_shards(num_leaves: int, world_size: int, directory: str) -> Dict[str, Any]:
    r"""Partitions the balanced tree over :obj:`num_leaves` leaves and saves
    each rank's shard to ``directory/shard<rank>.pt``."""
    from hsa_geo import Hierarchy
    from hsa_geo.distributed import partition_hierarchy
    hierarchy = Hierarchy.from_parent(balanced_parent(num_leaves), num_leaves)
    partition = partition_hierarchy(hierarchy, world_size)
    for rank in range(world_size):
        torch.save(partition.shard(rank), os.path.join(directory, f'shard{rank}.pt'))
    return {'parts': partition.top.num_parts, 'top_nodes': int(partition.top.node.numel()),
            'leaves_per_rank': partition.rank_num_leaves().tolist()}


def _rank_main(rank: int, world_size: int, directory: str, repeats: int, threads: int) -> None:
    from hsa_geo.distributed import count_communication, distributed_hsa
    torch.set_num_threads(threads)
    dist.init_process_group('gloo', init_method=f'file://{directory}/init', rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(minutes=30))
    before_shard = current_rss_bytes()
    shard = torch.load(os.path.join(directory, f'shard{rank}.pt'), weights_only=False)
    generator = torch.Generator().manual_seed(rank)
    inputs = [torch.randn(shard.num_leaves, HEADS, DIM, generator=generator,
                          requires_grad=True) for _ in range(3)]

    def layer():
        out = distributed_hsa(*inputs, shard)
        out.backward(torch.ones_like(out))
        for tensor in inputs:
            tensor.grad = None

    with PeakMemory() as memory:
        layer()  # the first call also checks that the ranks agree on the top tree
    with count_communication() as meter:
        layer()
    seconds = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        layer()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank
        seconds.append(float(elapsed))
    row = torch.tensor([shard.num_leaves, memory.peak_bytes - before_shard,
                        memory.process_peak_bytes, meter.bytes, meter.calls],
                       dtype=torch.float64)
    rows = [torch.empty_like(row) for _ in range(world_size)]
    dist.all_gather(rows, row)
    if rank == 0:
        torch.save({'seconds': seconds, 'ranks': [r.tolist() for r in rows]},
                   os.path.join(directory, 'result.pt'))
    dist.destroy_process_group()


def measure(num_leaves: int, world_size: int, repeats: int, threads: int) -> Dict[str, Any]:
    r"""One configuration: shards built here, the layer measured on
    :obj:`world_size` spawned ranks."""
    with tempfile.TemporaryDirectory() as directory:
        partition = build_shards(num_leaves, world_size, directory)
        mp.spawn(_rank_main, args=(world_size, directory, repeats, threads), nprocs=world_size)
        result = torch.load(os.path.join(directory, 'result.pt'))
    ranks = [dict(zip(('leaves', 'layer_peak_bytes', 'process_peak_bytes',
                       'communication_bytes', 'collectives'), map(int, row)))
             for row in result['ranks']]
    return {'num_leaves': num_leaves, 'world_size': world_size, **partition,
            'seconds_per_layer': median(result['seconds']), 'seconds': result['seconds'],
            'max_layer_peak_bytes': max(r['layer_peak_bytes'] for r in ranks),
            'max_process_peak_bytes': max(r['process_peak_bytes'] for r in ranks),
            'communication_bytes': max(r['communication_bytes'] for r in ranks),
            'ranks': ranks}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    started = time.perf_counter()
    results: Dict[str, Any] = {'benchmark': 'distributed', 'machine': machine_info(),
                               'config': {'heads': HEADS, 'dim': DIM, 'dtype': 'float32',
                                          'branching': 8, 'backend': 'gloo',
                                          'threads_per_rank': args.threads,
                                          'repeats': args.repeats},
                               'weak': [], 'strong': [], 'communication': []}
    worlds = [w for w in (1, 2, 4) if w <= args.max_world]
    per_rank = 2**args.log2
    for world_size in worlds:
        entry = measure(per_rank * world_size, world_size, args.repeats, args.threads)
        results['weak'].append(entry)
        _print_entry('weak', entry)
    for world_size in worlds:
        if world_size == 1:  # the same configuration as weak scaling's first
            entry = results['weak'][0]
        else:
            entry = measure(per_rank, world_size, args.repeats, args.threads)
            _print_entry('strong', entry)
        results['strong'].append(entry)
    largest = worlds[-1]
    sizes = {entry['num_leaves']: entry for entry in results['weak'] + results['strong']
             if entry['world_size'] == largest}
    for log2 in args.communication_log2:
        if 2**log2 not in sizes:
            sizes[2**log2] = measure(2**log2, largest, 1, args.threads)
            _print_entry('communication', sizes[2**log2])
    results['communication'] = [
        {'num_leaves': n, 'world_size': largest, 'bytes': sizes[n]['communication_bytes'],
         'parts': sizes[n]['parts'], 'top_nodes': sizes[n]['top_nodes']}
        for n in sorted(sizes)]
    results['targets'] = evaluate_targets(results)
    results['machine']['load_average_after'] = list(os.getloadavg())
    results['errors'] = []
    results['wall_s'] = time.perf_counter() - started
    return results


def evaluate_targets(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    targets = []

    def add(name, measured, threshold, passed, detail):
        targets.append({'name': name, 'measured': measured, 'threshold': threshold,
                        'status': 'PASS' if passed else 'FAIL', 'detail': detail})

    weak = results['weak']
    if len(weak) > 1:
        first, last = weak[0], weak[-1]
        ratio = last['max_layer_peak_bytes'] / first['max_layer_peak_bytes']
        add('weak scaling memory', ratio, 1.2, ratio <= 1.2,
            f"limit 1.2; per-rank layer peak, {last['world_size']} ranks x {last['num_leaves']} leaves vs "
            f"1 rank x {first['num_leaves']}: {last['max_layer_peak_bytes'] / MiB:.0f} vs "
            f"{first['max_layer_peak_bytes'] / MiB:.0f} MiB")
    communication = results['communication']
    if len(communication) > 1:
        small, large = communication[0], communication[-1]
        change = abs(large['bytes'] / small['bytes'] - 1)
        add('bytes independent of N', change, 0.1, change <= 0.1,
            f"limit 0.1; {small['bytes']} B at N={small['num_leaves']}, {large['bytes']} B at "
            f"N={large['num_leaves']} ({large['world_size']} ranks)")
        add('bytes per layer', large['bytes'] / 1e6, 1.0, large['bytes'] <= 1e6,
            f"limit 1 MB per layer at N={large['num_leaves']}, forward and backward")
    return targets


def _print_entry(kind: str, entry: Dict[str, Any]) -> None:
    print(f"{kind:13s} ranks={entry['world_size']} N={entry['num_leaves']:>8d} "
          f"parts={entry['parts']:>4d}  {entry['seconds_per_layer']:.3f} s/layer  "
          f"layer peak {entry['max_layer_peak_bytes'] / MiB:7.1f} MiB/rank  "
          f"process peak {entry['max_process_peak_bytes'] / MiB:7.1f} MiB  "
          f"{entry['communication_bytes']} B/layer", flush=True)


def format_report(results: Dict[str, Any]) -> str:
    lines = ['ranks  N          s/layer  layer peak MiB/rank  bytes/layer  (weak, then strong)']
    for entry in results['weak'] + results['strong'][1:]:
        lines.append(f"{entry['world_size']:5d}  {entry['num_leaves']:<9d}  "
                     f"{entry['seconds_per_layer']:7.3f}  {entry['max_layer_peak_bytes'] / MiB:19.1f}"
                     f"  {entry['communication_bytes']:11d}")
    lines.append('')
    lines.extend(target_lines(results))
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.distributed',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('--log2', type=int, default=20,
                        help='leaves per rank (weak) and in all (strong): 2^LOG2 (default: 20)')
    parser.add_argument('--communication-log2', type=int, nargs='*', default=[20, 22],
                        help='sizes of the bytes-per-layer measurement on the largest world '
                             '(default: 20 22)')
    parser.add_argument('--max-world', type=int, default=4, choices=[1, 2, 4])
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=1, help='torch threads per rank')
    parser.add_argument('--out', default=os.path.join('benchmarks', 'results',
                                                      'distributed.json'))
    parser.add_argument('--quick', action='store_true',
                        help='2^12 leaves per rank, bytes at 2^12 and 2^14: a smoke run')
    args = parser.parse_args(argv)
    if args.quick:
        args.log2, args.communication_log2, args.repeats = 12, [12, 14], 1
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    return run_and_report(parse_args(argv), run, format_report)


if __name__ == '__main__':
    # under the package name, so that spawned ranks find _rank_main
    from benchmarks.distributed import main as _main

    _main()
