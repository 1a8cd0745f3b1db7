r"""How HSA's time and memory grow with the number of leaves, side by side
with dense attention, a memory-bound floor and a linear-attention baseline.

Run from the repository root::

    python -m benchmarks.scaling [--max-log2 20] [--quick] \
        [--device cpu|cuda] [--out benchmarks/results/scaling.json]

Set-up (issue 2, section 5): balanced trees with branching :math:`b = 8`
over :math:`N = 2^{12} \dots 2^{20}` leaves (consecutive leaves share a
parent; when :math:`N` is not a power of 8 the top family is smaller),
width 64 as 4 heads of 16, float32. For every :math:`N` it measures

* ``hsa`` -- :func:`hsa_geo.functional.hsa` on ``[N, 4, 16]`` q, k, v; the
  hierarchy and its sweep plan are built outside the timed region and
  their construction is timed on its own;
* ``dense`` -- :func:`torch.nn.functional.scaled_dot_product_attention` on
  ``[1, 4, N, 16]``, while it fits (see ``--dense-max-log2`` and
  ``--dense-max-gib``; a skipped size is said so in the output);
* ``floor`` -- ``torch.addcmul(q, k, v)``: one elementwise pass reading
  q, k, v and writing the output, the least any attention must do. Its
  forward is also timed writing into a preallocated tensor (``out=``):
  once the output outgrows glibc's largest mmap threshold (32 MiB, so
  :math:`N \ge 2^{17}` here) every fresh allocation is a new mapping whose
  pages fault in on first touch, which can cost more than the arithmetic;
* ``sgformer`` -- PyG's :class:`torch_geometric.nn.attention.SGFormerAttention`
  (linear, approximate) at the same width and heads. It takes node features
  ``x`` ``[1, N, 64]`` and so also pays for its own q/k/v ``Linear(64, 64)``
  projections, which the other three receive ready-made.

Forward time is an inference pass under :func:`torch.no_grad`;
forward+backward computes the forward with autograd and the gradients of
every input (and of SGFormer's weights) for a fixed random output gradient.
Times are medians over rounds that run every method back to back after a
warm-up round (:func:`~benchmarks.timing.time_interleaved`); ratios
are medians of per-round ratios, so load from other processes on a shared
machine cancels as far as possible. Every round also times a fixed
*reference* workload (HSA forward+backward at :math:`N = 2^{12}`), so that
besides the raw log-log slope of time against :math:`N` a load-normalised
slope (of time / reference time) is reported: sizes are measured minutes
apart, and a change of load in between bends the raw slope.

Peak memory of one forward+backward: on CPU each (method, :math:`N`) runs
in its own fresh process (:func:`~benchmarks.timing.run_isolated`),
which reports its absolute peak RSS during the call (``VmHWM`` after a
reset), the baseline RSS before it (interpreter, torch, inputs and, for HSA,
hierarchy and plan) and their difference; on CUDA,
:func:`torch.cuda.max_memory_allocated` around the call.

Results (raw samples, medians, ratios, memory, slopes, targets, machine)
go to a JSON file; the targets of the issue are printed as PASS/FAIL lines,
never asserted.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from benchmarks.timing import (GiB, MiB, IsolatedError, PeakMemory, loglog_slope,
                                       machine_info, median, paired_ratio, run_isolated,
                                       time_interleaved)

BRANCHING = 8
HEADS = 4
HEAD_DIM = 16
WIDTH = HEADS * HEAD_DIM
DTYPE = torch.float32
METHODS = ('hsa', 'floor', 'dense', 'sgformer')
SLOPE_MIN_LOG2 = 14
REFERENCE_LEAVES = 1 << 12  # the fixed workload timed in every round
# Imported once by the fork server; not this module itself, which the
# workers' start-up re-runs as __mp_main__ and would warn about.
PRELOAD = ('torch', 'torch_geometric', 'torch_geometric.nn.attention', 'hsa_geo')

#: The issue's targets on the 2-core CPU machine.
TARGET_DENSE_SPEEDUP = (32768, 100.0)  # (N, dense / HSA forward+backward at least)
TARGET_PEAK_RSS = (1 << 20, 3 * GiB)  # (N, HSA forward+backward peak at most)
TARGET_FLOOR_RATIO = 10.0  # HSA forward / floor forward at most, at the largest N
TARGET_SLOPE = 1.1  # log-log slope of HSA forward+backward time, N >= 2^14


def balanced_parent(num_leaves: int, branching: int = BRANCHING) -> Tensor:
    r"""Parent pointers of the balanced tree with :obj:`branching` children
    per cluster over :obj:`num_leaves` leaves, as
    :meth:`hsa_geo.Hierarchy.from_parent` takes them.

    Leaves come first and in order, so leaves ``8j .. 8j+7`` share a parent;
    each level of clusters follows the one below it and the root comes
    last. When a level's size is not a multiple of :obj:`branching` its last
    family is smaller. One tensor operation per level:
    :math:`O(N)` time for :math:`N` leaves.

    Example::

        >>> balanced_parent(4, branching=2).tolist()
        [4, 4, 5, 5, 6, 6, -1]
        >>> balanced_parent(10).tolist()  # 10 leaves, families of 8 and 2
        [10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 12, 12, -1]
    """
    if num_leaves < 1 or branching < 2:
        raise ValueError(f'need num_leaves >= 1 and branching >= 2 '
                         f'(got {num_leaves}, {branching})')
    levels, offset, size = [], 0, num_leaves
    while size > 1:
        levels.append(offset + size + torch.arange(size) // branching)
        offset += size
        size = -(-size // branching)
    levels.append(torch.tensor([-1]))
    return torch.cat(levels)


# ------------------------------------------------------------------ workers
class Case:
    r"""One method's inputs at one :math:`N`: an inference forward and a
    forward+backward, both closures over preallocated tensors."""

    def __init__(self, forward: Callable[[], Tensor], inputs: Sequence[Tensor],
                 grad_output: Tensor, forward_out: Optional[Callable[[], Tensor]] = None):
        self._forward, self._inputs, self._grad_output = forward, tuple(inputs), grad_output
        self.forward_out = None
        if forward_out is not None:
            def forward_out_no_grad():
                with torch.no_grad():
                    forward_out()
            self.forward_out = forward_out_no_grad

    def forward(self) -> None:
        with torch.no_grad():
            self._forward()

    def forward_backward(self) -> None:
        out = self._forward()
        torch.autograd.grad(out, self._inputs, self._grad_output)


def build_hierarchy(num_leaves: int, device: torch.device, ordered: bool = False):
    r"""The balanced hierarchy over :obj:`num_leaves` leaves with its plan on
    :obj:`device`, and the seconds each step took. With :obj:`ordered` the
    leaf ids are declared a sequence (:attr:`hsa_geo.Hierarchy.ordered`),
    which positional terms need; every subtree is an interval of it."""
    from hsa_geo import Hierarchy

    start = time.perf_counter()
    parent = balanced_parent(num_leaves)
    built = time.perf_counter()
    hierarchy = Hierarchy.from_parent(parent, num_leaves, ordered=ordered)
    validated = time.perf_counter()
    plan = hierarchy.plan(device)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    planned = time.perf_counter()
    return hierarchy, {'parent_s': built - start, 'hierarchy_s': validated - built,
                       'plan_s': planned - validated, 'plan_blocks': len(plan.blocks)}


def _make_case(method: str, num_leaves: int, device: torch.device, hierarchy=None) -> Case:
    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=DTYPE)

    if method == 'hsa':
        from hsa_geo.functional import hsa

        q, k, v = (randn(num_leaves, HEADS, HEAD_DIM).requires_grad_() for _ in range(3))
        return Case(lambda: hsa(q, k, v, hierarchy), (q, k, v),
                     randn(num_leaves, HEADS, HEAD_DIM))
    if method == 'floor':
        q, k, v = (randn(num_leaves, HEADS, HEAD_DIM).requires_grad_() for _ in range(3))
        out = torch.empty_like(q, requires_grad=False)
        return Case(lambda: torch.addcmul(q, k, v), (q, k, v),
                     randn(num_leaves, HEADS, HEAD_DIM),
                     forward_out=lambda: torch.addcmul(q, k, v, out=out))
    if method == 'dense':
        q, k, v = (randn(1, HEADS, num_leaves, HEAD_DIM).requires_grad_() for _ in range(3))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return Case(lambda: sdpa(q, k, v), (q, k, v), randn(1, HEADS, num_leaves, HEAD_DIM))
    if method == 'sgformer':
        from torch_geometric.nn.attention import SGFormerAttention

        module = SGFormerAttention(WIDTH, heads=HEADS, head_channels=HEAD_DIM).to(device, DTYPE)
        x = randn(1, num_leaves, WIDTH).requires_grad_()
        return Case(lambda: module(x), (x, *module.parameters()),
                     randn(1, num_leaves, HEAD_DIM))  # it averages its heads
    raise ValueError(f'unknown method {method!r} (choose from {METHODS})')


def measure_peak_memory(method: str, num_leaves: int, device: str, seed: int = 0,
                        threads: Optional[int] = None) -> Dict[str, Any]:
    r"""Peak memory of one forward+backward of :obj:`method` (run it in a
    fresh process: the first call, allocator growth included)."""
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    hierarchy = build_hierarchy(num_leaves, device)[0] if method == 'hsa' else None
    case = _make_case(method, num_leaves, device, hierarchy)
    gc.collect()
    with PeakMemory(device) as memory:
        case.forward_backward()
    return memory.as_dict()


def measure_times(num_leaves: int, methods: Sequence[str], device: str, repeats: int,
                  warmup: int, budget_s: Optional[float], seed: int = 0,
                  memory_in_process: bool = False,
                  threads: Optional[int] = None) -> Dict[str, Any]:
    r"""Interleaved forward and forward+backward samples of every method at
    one :math:`N`, the construction times of the hierarchy (median of up to
    three fresh builds) and, with :obj:`memory_in_process` (CUDA), each
    method's peak memory."""
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    if device.type == 'cuda':
        torch.cuda.init()  # not inside the timed plan construction
        torch.empty(1, device=device)
    torch.manual_seed(seed)
    result: Dict[str, Any] = {'memory': {}, 'threads': torch.get_num_threads(),
                              'load_average': list(os.getloadavg())}
    if 'hsa' in methods:
        builds = [build_hierarchy(num_leaves, device) for _ in range(min(3, max(1, repeats)))]
        hierarchy = builds[-1][0]
        result['construction'] = {key: median([info[key] for _, info in builds])
                                  for key in builds[0][1]}
        result['construction']['samples'] = [info for _, info in builds]
        result['hierarchy_summary'] = hierarchy.summary()
        del builds[:-1]
    else:
        hierarchy = None
    if memory_in_process:
        # One method's inputs alive at a time, so each baseline is its own.
        for method in methods:
            case = _make_case(method, num_leaves, device, hierarchy)
            gc.collect()
            with PeakMemory(device) as memory:
                case.forward_backward()
            result['memory'][method] = memory.as_dict()
            del case
            gc.collect()
            if device.type == 'cuda':
                torch.cuda.empty_cache()
    cases = {method: _make_case(method, num_leaves, device, hierarchy) for method in methods}
    reference = _make_case('hsa', REFERENCE_LEAVES, device,
                           build_hierarchy(REFERENCE_LEAVES, device)[0])
    calls = {'reference': reference.forward_backward}
    for method, case in cases.items():
        calls[f'{method}/forward'] = case.forward
        calls[f'{method}/forward_backward'] = case.forward_backward
        if case.forward_out is not None:
            calls[f'{method}/forward_out'] = case.forward_out
    result['samples'] = time_interleaved(calls, repeats=repeats, warmup=warmup, device=device,
                                         budget_s=budget_s)
    return result


# ------------------------------------------------------------- orchestration
def run(args: argparse.Namespace) -> Dict[str, Any]:
    device = torch.device(args.device)
    isolate = not args.no_isolate
    memory_in_process = device.type == 'cuda' or not isolate
    # A fork server that imported torch_geometric may have initialised CUDA.
    start_method = 'spawn' if device.type == 'cuda' else 'forkserver'
    sizes = list(range(args.min_log2, args.max_log2 + 1))
    started = time.perf_counter()
    results: Dict[str, Any] = {
        'benchmark': 'benchmarks.scaling',
        'config': {
            'branching': BRANCHING, 'heads': HEADS, 'head_dim': HEAD_DIM, 'width': WIDTH,
            'dtype': str(DTYPE).replace('torch.', ''), 'device': str(device),
            'log2_sizes': sizes, 'repeats': args.repeats, 'warmup': args.warmup,
            'budget_s': args.budget_s, 'dense_max_log2': args.dense_max_log2,
            'dense_max_gib': args.dense_max_gib, 'quick': args.quick, 'seed': args.seed,
            'isolated': isolate, 'methods': list(METHODS), 'threads': args.threads,
        },
        'definitions': {
            'forward_s': 'median seconds of one inference forward under torch.no_grad()',
            'forward_backward_s': 'median seconds of one forward with autograd plus '
                                  'torch.autograd.grad of all inputs (SGFormer: and weights)',
            'samples': 'seconds per call, one per round; rounds run all methods back to back',
            'ratios': 'median over rounds of the per-round ratio',
            'memory': ('CPU: one forward+backward in a fresh process; peak_bytes = absolute '
                       'peak RSS during the call (VmHWM after reset), baseline_bytes = RSS '
                       'before it (interpreter, torch, inputs, hierarchy and plan), '
                       'delta_bytes = their difference, process_peak_bytes = peak RSS over the '
                       'whole process (set-up included). CUDA: the same fields in '
                       'torch.cuda.memory_allocated bytes.' if isolate or device.type == 'cuda'
                       else 'measured in the timing process (--no-isolate): RSS peaks are '
                            'not independent between methods'),
            'sgformer': 'SGFormerAttention(64, heads=4, head_channels=16) on x [1, N, 64]; '
                        'includes its q/k/v Linear(64, 64) projections and the head mean',
            'slope': f'least-squares slope of log time vs log N over N >= 2^{SLOPE_MIN_LOG2}',
            'reference': f'HSA forward+backward at N = {REFERENCE_LEAVES}, timed in every '
                         'round; *_over_reference = median per-round time / reference time; '
                         'value_load_normalised = slope of those',
            'forward_out_s': 'floor only: forward writing into a preallocated output',
        },
        'machine': machine_info(device),
        'sizes': [],
        'errors': [],
    }
    _print_header(results)
    previous_dense: Optional[Tuple[int, int]] = None  # (N, delta bytes)
    for log2 in sizes:
        num_leaves = 1 << log2
        entry: Dict[str, Any] = {'log2': log2, 'num_leaves': num_leaves, 'methods': {},
                                 'skipped': {}}
        methods = list(METHODS)
        # Both rules grow with N: once dense is skipped it stays skipped.
        dense_skip = _dense_skip_reason(log2, previous_dense, args)
        if dense_skip is not None:
            methods.remove('dense')
            entry['skipped']['dense'] = dense_skip
        memory: Dict[str, Any] = {}
        if not memory_in_process:
            for method in list(methods):
                try:
                    memory[method] = run_isolated(measure_peak_memory, method, num_leaves,
                                                  str(device), args.seed, args.threads,
                                                  preload=PRELOAD,
                                                  timeout=args.timeout)
                except IsolatedError as error:
                    _record_error(results, entry, method, 'memory', error)
                    methods.remove(method)
        kwargs = dict(num_leaves=num_leaves, methods=methods, device=str(device),
                      repeats=args.repeats, warmup=args.warmup, budget_s=args.budget_s,
                      seed=args.seed, memory_in_process=memory_in_process,
                      threads=args.threads)
        try:
            timed = (run_isolated(measure_times, preload=PRELOAD, start_method=start_method,
                                  timeout=args.timeout, **kwargs)
                     if isolate else measure_times(**kwargs))
        except IsolatedError as error:
            _record_error(results, entry, 'all', 'timing', error)
            results['sizes'].append(entry)
            continue
        memory.update(timed['memory'])
        entry['threads'] = timed['threads']
        entry['load_average'] = timed['load_average']
        entry['construction'] = timed.get('construction')
        entry['hierarchy_summary'] = timed.get('hierarchy_summary')
        samples = timed['samples']
        entry['reference_s'] = median(samples['reference'])
        entry['reference_samples'] = samples['reference']
        for method in methods:
            data = entry['methods'][method] = {}
            for stage in ('forward', 'forward_backward', 'forward_out'):
                if f'{method}/{stage}' in samples:
                    data[f'{stage}_s'] = median(samples[f'{method}/{stage}'])
                    data[f'{stage}_samples'] = samples[f'{method}/{stage}']
                    # Time in units of the reference workload of the same rounds.
                    data[f'{stage}_over_reference'] = paired_ratio(samples[f'{method}/{stage}'],
                                                                   samples['reference'])
            data['memory'] = memory.get(method)
        entry['ratios'] = _ratios(samples, methods)
        results['sizes'].append(entry)
        if 'dense' in methods and memory.get('dense'):
            previous_dense = (num_leaves, memory['dense']['delta_bytes'])
        _print_progress(entry)
    results['slopes'] = _slopes(results['sizes'])
    results['targets'] = evaluate_targets(results)
    results['wall_s'] = time.perf_counter() - started
    results['machine']['load_average_end'] = list(os.getloadavg())
    return results


def _dense_skip_reason(log2: int, previous: Optional[Tuple[int, int]],
                       args: argparse.Namespace) -> Optional[str]:
    num_leaves = 1 << log2
    if log2 > args.dense_max_log2:
        return (f'N > 2^{args.dense_max_log2} (--dense-max-log2): quadratic time; a '
                f'materialised score matrix would need N^2*H*4 bytes = '
                f'{num_leaves ** 2 * HEADS * 4 / GiB:.0f} GiB')
    if previous is not None:
        # Quadratic extrapolation of the measured extra memory: exact for a
        # materialised N x N matrix, an overestimate for flash kernels.
        predicted = previous[1] * (num_leaves / previous[0]) ** 2
        if predicted > args.dense_max_gib * GiB:
            return (f'predicted extra memory {predicted / GiB:.1f} GiB ((N / {previous[0]})^2 '
                    f'times the {previous[1] / MiB:.0f} MiB measured there) exceeds '
                    f'--dense-max-gib {args.dense_max_gib}')
    elif num_leaves ** 2 * HEADS * 4 > args.dense_max_gib * GiB:
        return (f'a materialised score matrix would need N^2*H*4 bytes = '
                f'{num_leaves ** 2 * HEADS * 4 / GiB:.1f} GiB > --dense-max-gib '
                f'{args.dense_max_gib} and no smaller size was measured')
    return None


def _record_error(results, entry, method, stage, error) -> None:
    message = f'N=2^{entry["log2"]} {method} {stage}: {error}'
    entry['skipped'][method] = f'{stage} failed: {str(error).splitlines()[0]}'
    results['errors'].append(message)
    print(f'  ERROR {message}', file=sys.stderr, flush=True)


def _ratios(samples: Dict[str, List[float]], methods: Sequence[str]) -> Dict[str, Optional[float]]:
    def ratio(top, bottom, stage):
        if top not in methods or bottom not in methods:
            return None
        return paired_ratio(samples[f'{top}/{stage}'], samples[f'{bottom}/{stage}'])

    return {
        'dense_over_hsa_forward_backward': ratio('dense', 'hsa', 'forward_backward'),
        'dense_over_hsa_forward': ratio('dense', 'hsa', 'forward'),
        'hsa_over_floor_forward': ratio('hsa', 'floor', 'forward'),
        'hsa_over_floor_forward_backward': ratio('hsa', 'floor', 'forward_backward'),
        'hsa_forward_over_floor_forward_out': (
            paired_ratio(samples['hsa/forward'], samples['floor/forward_out'])
            if 'hsa' in methods and 'floor' in methods else None),
        'hsa_over_sgformer_forward': ratio('hsa', 'sgformer', 'forward'),
        'hsa_over_sgformer_forward_backward': ratio('hsa', 'sgformer', 'forward_backward'),
    }


def _slopes(sizes: List[Dict[str, Any]]) -> Dict[str, Any]:
    def fit(method, key, min_log2):
        points = [(e['num_leaves'], e['methods'][method][key]) for e in sizes
                  if method in e['methods'] and e['log2'] >= min_log2]
        return (loglog_slope(*zip(*points)) if len(points) >= 2 else None), len(points)

    slopes: Dict[str, Any] = {}
    for method in METHODS:
        for stage in ('forward', 'forward_backward'):
            value, points = fit(method, f'{stage}_s', SLOPE_MIN_LOG2)
            slopes[f'{method}_{stage}'] = {
                'value': value, 'min_log2': SLOPE_MIN_LOG2, 'points': points,
                'value_all_sizes': fit(method, f'{stage}_s', 0)[0],
                'value_load_normalised': fit(method, f'{stage}_over_reference',
                                             SLOPE_MIN_LOG2)[0],
            }
    return slopes


def evaluate_targets(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    r"""The issue's targets as ``{'name', 'measured', 'threshold', 'status',
    'detail'}`` with status PASS, FAIL or N/A (not measured in this run)."""
    by_size = {e['num_leaves']: e for e in results['sizes']}
    largest = max((e for e in results['sizes'] if 'hsa' in e['methods']),
                  key=lambda e: e['num_leaves'], default=None)
    targets = []

    def add(name, measured, threshold, passed, detail):
        status = 'N/A' if measured is None else ('PASS' if passed(measured) else 'FAIL')
        targets.append({'name': name, 'measured': measured, 'threshold': threshold,
                        'status': status, 'detail': detail})

    size, speedup = TARGET_DENSE_SPEEDUP
    entry = by_size.get(size, {})
    add(f'N={size} forward+backward: dense SDPA / HSA >= {speedup:g}x',
        (entry.get('ratios') or {}).get('dense_over_hsa_forward_backward'), speedup,
        lambda x: x >= speedup,
        'not measured' if not entry.get('ratios') else
        entry['skipped'].get('dense', 'median of per-round ratios'))

    size, limit = TARGET_PEAK_RSS
    hsa_at = by_size.get(size, {}).get('methods', {}).get('hsa')
    memory = (hsa_at or {}).get('memory')
    kind = (memory or {}).get('kind', 'rss')
    add(f'N=2^{size.bit_length() - 1} forward+backward completes, peak '
        f'{"RSS" if kind == "rss" else "CUDA memory"} <= {limit / GiB:g} GiB',
        None if memory is None else memory['process_peak_bytes'] / GiB, limit / GiB,
        lambda x: x <= limit / GiB,
        'not measured' if memory is None else
        f'whole-process peak in GiB (set-up included); during the call '
        f'{memory["peak_bytes"] / GiB:.2f} GiB absolute, {memory["delta_bytes"] / GiB:.2f} '
        f'GiB above the {memory["baseline_bytes"] / GiB:.2f} GiB baseline')

    ratios = (largest or {}).get('ratios', {})
    ratio, out_ratio = ratios.get('hsa_over_floor_forward'), ratios.get(
        'hsa_forward_over_floor_forward_out')
    add(f'forward <= {TARGET_FLOOR_RATIO:g}x floor pass (largest N'
        + (f' = 2^{largest["log2"]})' if largest else ')'),
        ratio, TARGET_FLOOR_RATIO, lambda x: x <= TARGET_FLOOR_RATIO,
        'median of per-round HSA/floor forward ratios; against the floor writing into a '
        'preallocated output: ' + ('-' if out_ratio is None else f'{out_ratio:.3g}'))

    slope = results['slopes']['hsa_forward_backward']
    normalised = slope['value_load_normalised']
    add(f'log-log slope of HSA forward+backward time vs N (N >= 2^{SLOPE_MIN_LOG2}) '
        f'<= {TARGET_SLOPE:g}', slope['value'], TARGET_SLOPE, lambda x: x <= TARGET_SLOPE,
        f'{slope["points"]} sizes' + ('; needs at least 2' if slope['value'] is None else
                                      '; load-normalised: ' + ('-' if normalised is None
                                                              else f'{normalised:.3g}')))
    return targets


# ------------------------------------------------------------------ printing
def format_seconds(value: Optional[float]) -> str:
    if value is None:
        return '-'
    if value < 1e-3:
        return f'{value * 1e6:.0f}us'
    if value < 1:
        return f'{value * 1e3:.1f}ms'
    return f'{value:.2f}s'


def format_times(value: Optional[float]) -> str:
    return '-' if value is None else (f'{value:.0f}x' if value >= 100 else f'{value:.2f}x')


def _mib(memory: Optional[Dict[str, Any]]) -> str:
    if not memory:
        return '-'
    return f'{memory["peak_bytes"] / MiB:.0f}/{memory["delta_bytes"] / MiB:+.0f}'


def _print_header(results: Dict[str, Any]) -> None:
    m, c = results['machine'], results['config']
    print(f'HSA scaling benchmark: balanced b={c["branching"]}, {c["heads"]} heads x '
          f'{c["head_dim"]}, {c["dtype"]}, device {c["device"]}; torch {m["torch"]}, '
          f'{c["threads"] or m["torch_threads"]} threads, {m["cpu_count"]} cpus, '
          f'load {" ".join(f"{x:.2f}" for x in m["load_average"] or [])}', flush=True)


def _print_progress(entry: Dict[str, Any]) -> None:
    parts = [f'{method} {format_seconds(data["forward_s"])}/'
             f'{format_seconds(data["forward_backward_s"])}'
             for method, data in entry['methods'].items()]
    print(f'  N=2^{entry["log2"]}: ' + ', '.join(parts) + ' (forward/forward+backward)',
          flush=True)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: '  '.join(str(c).rjust(w) for c, w in zip(cells, widths))
    return '\n'.join([line(header), line(['-' * w for w in widths])] + [line(r) for r in rows])


def format_report(results: Dict[str, Any]) -> str:
    r"""The tables, skips, slopes and PASS/FAIL lines as printed."""
    out = []
    rows = []
    for e in results['sizes']:
        m, r = e['methods'], e.get('ratios') or {}
        get = lambda method, key: (m.get(method) or {}).get(key)
        rows.append([f'2^{e["log2"]}', format_seconds((e.get('construction') or {}).get('plan_s')),
                     format_seconds(get('hsa', 'forward_s')),
                     format_seconds(get('hsa', 'forward_backward_s')),
                     format_seconds(get('floor', 'forward_s')),
                     format_seconds(get('floor', 'forward_backward_s')),
                     format_seconds(get('dense', 'forward_s')),
                     format_seconds(get('dense', 'forward_backward_s')),
                     format_seconds(get('sgformer', 'forward_s')),
                     format_seconds(get('sgformer', 'forward_backward_s')),
                     format_times(r.get('dense_over_hsa_forward_backward')),
                     format_times(r.get('hsa_over_floor_forward')),
                     format_times(r.get('hsa_forward_over_floor_forward_out')),
                     format_times(r.get('hsa_over_sgformer_forward')),
                     format_times(r.get('hsa_over_sgformer_forward_backward'))])
    out.append('Time (median; fwd = no_grad forward, f+b = forward+backward)')
    out.append(format_table(['N', 'plan', 'HSA fwd', 'HSA f+b', 'floor fwd', 'floor f+b',
                             'dense fwd', 'dense f+b', 'SGF fwd', 'SGF f+b', 'dense/HSA f+b',
                             'HSA/floor fwd', 'HSA/floor(out=) fwd',
                             'HSA/SGF fwd', 'HSA/SGF f+b'], rows))
    kind = 'peak RSS' if results['config']['device'] == 'cpu' else 'peak CUDA allocated'
    rows = [[f'2^{e["log2"]}'] + [_mib((e['methods'].get(method) or {}).get('memory'))
                                  for method in METHODS] for e in results['sizes']]
    out.append('')
    out.append(f'Memory of one forward+backward, MiB: {kind} / change from baseline')
    out.append(format_table(['N'] + [method for method in METHODS], rows))
    skipped = [f'  N=2^{e["log2"]} {method}: {why}' for e in results['sizes']
               for method, why in e['skipped'].items()]
    if skipped:
        out.append('')
        out.append('Skipped:')
        out.extend(skipped)
    out.append('')
    shown = lambda value: '-' if value is None else f'{value:.3f}'
    for name in ('hsa_forward_backward', 'hsa_forward'):
        slope = results['slopes'][name]
        out.append(f'Log-log slope {name}: {shown(slope["value"])} over N >= '
                   f'2^{SLOPE_MIN_LOG2} ({slope["points"]} sizes; load-normalised '
                   f'{shown(slope["value_load_normalised"])}); '
                   f'{shown(slope["value_all_sizes"])} over all sizes')
    out.append('')
    out.extend(target_lines(results))
    return '\n'.join(out)


def target_lines(results: Dict[str, Any]) -> List[str]:
    r"""One ``STATUS  name: measured x (detail)`` line per target, and a
    count of the errors if there were any."""
    out = []
    for target in results['targets']:
        measured = target['measured']
        shown = '-' if measured is None else f'{measured:.3g}'
        out.append(f'{target["status"]:4s}  {target["name"]}: measured {shown} '
                   f'({target["detail"]})')
    if results['errors']:
        out.append('')
        out.append(f'{len(results["errors"])} error(s), see "errors" in the JSON')
    return out


# ----------------------------------------------------------------------- CLI
def add_common_arguments(parser: argparse.ArgumentParser, max_log2: int, out: str,
                         repeats: int, budget_s: float) -> None:
    r"""The options that the benchmarks over balanced trees share: sizes,
    device, output file, rounds, threads, seed and process isolation."""
    parser.add_argument('--min-log2', type=int, default=12)
    parser.add_argument('--max-log2', type=int, default=max_log2)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--out', default=os.path.join('benchmarks', 'results', out))
    parser.add_argument('--repeats', type=int, default=repeats,
                        help=f'timed rounds (default: {repeats})')
    parser.add_argument('--warmup', type=int, default=1, help='untimed rounds (default: 1)')
    parser.add_argument('--budget-s', type=float, default=budget_s,
                        help='a call leaves later rounds once its samples add up to this '
                             f'(default: {budget_s:g})')
    parser.add_argument('--threads', type=int, default=None,
                        help="torch threads in the measuring processes (default: torch's "
                             'default). On a machine shared with other jobs, 2 threads on 2 '
                             'cores wait on each other at every parallel region; compare with 1')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--timeout', type=float, default=3600.0,
                        help='seconds allowed to one isolated measurement')
    parser.add_argument('--no-isolate', action='store_true',
                        help='measure in this process instead of a fresh one per size (for '
                             'profiling; memory numbers, where measured, are then not '
                             'independent)')


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    r"""Rejects option values that :func:`add_common_arguments` allows but
    no run can use."""
    if args.threads is not None and args.threads < 1:
        parser.error('--threads must be at least 1')
    if args.min_log2 < 1 or args.max_log2 < args.min_log2:
        parser.error('need 1 <= --min-log2 <= --max-log2')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda but CUDA is not available')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.scaling',
                                     description=__doc__.split('\n\n')[0])
    add_common_arguments(parser, max_log2=20, out='scaling.json', repeats=5, budget_s=20.0)
    parser.add_argument('--quick', action='store_true',
                        help='N up to 2^14 (dense up to 2^13), one repeat: a smoke run of '
                             'under a minute')
    parser.add_argument('--dense-max-log2', type=int, default=None,
                        help='largest log2 N for dense SDPA (default on CPU: 15, 13 with '
                             '--quick; one forward+backward at 2^16 takes about a minute. '
                             'No limit on CUDA)')
    parser.add_argument('--dense-max-gib', type=float, default=4.0,
                        help='skip dense SDPA when its extra memory, extrapolated '
                             'quadratically from the previous size, would exceed this')
    args = parser.parse_args(argv)
    if args.quick:
        args.max_log2 = min(args.max_log2, 14)
        args.repeats = 1
    if args.dense_max_log2 is None:
        # On CPU one dense forward+backward takes ~2.5 s at 2^14 and ~10 s at
        # 2^15 on an idle 2-core machine, 4x more per doubling.
        args.dense_max_log2 = args.max_log2 if args.device == 'cuda' else (13 if args.quick else 15)
    check_common_arguments(parser, args)
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    return run_and_report(parse_args(argv), run, format_report)


def run_and_report(args: argparse.Namespace, run: Callable[[argparse.Namespace], Dict[str, Any]],
                   format_report: Callable[[Dict[str, Any]], str]) -> Dict[str, Any]:
    r"""Runs a benchmark, prints its report and writes its JSON to
    ``args.out``."""
    results = run(args)
    print()
    print(format_report(results))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(results, f, indent=1, allow_nan=False, default=_json_default)
        f.write('\n')
    print(f'\nWrote {args.out} ({results["wall_s"]:.0f} s)')
    return results


def _json_default(value):
    if isinstance(value, (torch.device, torch.dtype)):
        return str(value)
    raise TypeError(f'not JSON serialisable: {type(value).__name__}')


if __name__ == '__main__':
    # Import under the package name so the functions sent to worker
    # processes are pickled as benchmarks.scaling.*, not __main__.*.
    from benchmarks.scaling import main as _main

    _main()
