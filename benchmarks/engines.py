r"""The two engines of ``hsa(backend='fused')`` side by side: the CPU kernel
(:mod:`hsa_geo.functional.kernel`) against the tensor sweeps it replaces on
the CPU (:mod:`hsa_geo.functional.sweep`), forward+backward on balanced
trees of several branchings, interleaved in one process.

Run from the repository root::

    python -m benchmarks.engines [--log2 15] [--branching 4 8 16] \
        [--threads 1 2] [--repeats 7] [--out benchmarks/results/engines.json]
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any, Dict, Optional, Sequence

import torch

from benchmarks.scaling import balanced_parent, run_and_report
from benchmarks.timing import machine_info, median, paired_ratio, time_interleaved
from hsa_geo.functional import engine, hsa, kernel_runs
from hsa_geo.hierarchy.hierarchy import Hierarchy
from hsa_geo.functional.engines import slot_layout

HEADS, DIM = 4, 16


def engine_calls(hierarchy: Hierarchy):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(hierarchy.num_leaves, HEADS, DIM, generator=generator,
                           requires_grad=True) for _ in range(3))
    hierarchy.family_tables()
    slot_layout(hierarchy)

    def call(kernel: bool):
        def run():
            with engine('kernel' if kernel else 'tensor'):
                out = hsa(q, k, v, hierarchy)
            out.sum().backward()
        return run

    return {'kernel': call(True), 'tensor sweeps': call(False)}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    if not kernel_runs('cpu'):
        raise SystemExit("the CPU kernel is not available: nothing to compare")
    started = time.time()
    results: Dict[str, Any] = {'benchmark': 'engines', 'machine': machine_info(),
                               'config': {'heads': HEADS, 'dim': DIM, 'log2': args.log2,
                                          'repeats': args.repeats}, 'rows': []}
    threads = torch.get_num_threads()
    try:
        for branching in args.branching:
            num_leaves = 1 << args.log2
            hierarchy = Hierarchy.from_parent(balanced_parent(num_leaves, branching), num_leaves)
            for count in args.threads:
                torch.set_num_threads(count)
                samples = time_interleaved(engine_calls(hierarchy), repeats=args.repeats,
                                           warmup=1)
                row = {'branching': branching, 'threads': count,
                       'seconds': {name: median(times) for name, times in samples.items()},
                       'kernel / tensor sweeps': paired_ratio(samples['kernel'],
                                                              samples['tensor sweeps'])}
                print(f"b={branching:2d} threads={count}: kernel "
                      f"{row['seconds']['kernel'] * 1e3:.1f} ms, tensor sweeps "
                      f"{row['seconds']['tensor sweeps'] * 1e3:.1f} ms, ratio "
                      f"{row['kernel / tensor sweeps']:.2f}", flush=True)
                results['rows'].append(row)
    finally:
        torch.set_num_threads(threads)
    results['machine']['load_average_after'] = list(os.getloadavg())
    results['wall_s'] = time.time() - started
    return results


def format_report(results: Dict[str, Any]) -> str:
    lines = [f"N = 2^{results['config']['log2']}, fwd+bwd, kernel / tensor sweeps "
             f"(median of per-round ratios); load {results['machine']['load_average']} -> "
             f"{results['machine']['load_average_after']}"]
    for row in results['rows']:
        lines.append(f"  b={row['branching']:2d} threads={row['threads']}: "
                     f"{row['kernel / tensor sweeps']:.2f}x")
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.engines',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('--log2', type=int, default=15)
    parser.add_argument('--branching', type=int, nargs='+', default=[4, 8, 16])
    parser.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--out', default=os.path.join('benchmarks', 'results', 'engines.json'))
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    return run_and_report(parse_args(argv), run, format_report)


if __name__ == '__main__':
    from benchmarks.engines import main as _main

    _main()
