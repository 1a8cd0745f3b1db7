r"""HSA against flat softmax attention on the batches users train on:
many small graphs or documents, not one giant tree.

Run from the repository root::

    python -m benchmarks.batches [--repeats 15] [--threads 1] \
        [--device cpu] [--out benchmarks/results/batches.json] [--calibrate]

On a machine without the offline data (a lent GPU), save the workloads
first (``--save-workloads PATH``) and read them there with
``--saved-workloads PATH``.

Workloads (real offline data, :mod:`benchmarks.batch_workloads`):

* ``molecules`` -- 128 molecules of 15-50 atoms from rdkit's ChEMBL assay
  CHEMBL2321810, each with a Louvain hierarchy built once by
  :class:`~hsa_geo.transforms.AddHierarchy` (as a ``pre_transform``);
* ``documents 32x256``, ``8x1024``, ``2x4096`` -- IMDB reviews cut to that
  many MiniLM word pieces (reviews concatenated for the long ones), each a
  document -> sentence -> word -> word-piece tree of families of at most 32
  (:func:`hsa_geo.text.document_hierarchy`), built once per document.

Every step of training meets a new batch, so every HSA call pays for the
forest: ``hsa`` times :func:`~hsa_geo.data.build_hierarchy` (molecules)
or :meth:`~hsa_geo.Hierarchy.batch_hierarchies` (documents), what the sweeps
read (the CPU kernel's family tables; the slot layout on a GPU) and
:func:`hsa_geo.functional.hsa`, forward and backward; ``hsa (planned)`` the
attention alone on a forest planned beforehand (what a
:class:`~hsa_geo.loader.HierarchyLoader` worker hands over), ``plan`` the
forest and its plan alone, and ``tensor sweeps (planned)`` the attention on
the engine the CPU kernel replaces (:mod:`hsa_geo.functional.sweep`, still
the GPU engine). The flat baselines get the same q, k, v
``[T, 4, 16]`` (float32): ``sdpa`` is
:func:`~torch.nn.functional.scaled_dot_product_attention` on the graphs
padded by :func:`~torch_geometric.utils.to_dense_batch` with a key mask,
and ``mha`` is PyG's :class:`~torch_geometric.nn.conv.GPSConv` attention,
:class:`torch.nn.MultiheadAttention` (its own input and output projections
included, on the ``[T, 64]`` features) over ``to_dense_batch`` with a key
padding mask. All calls are timed in interleaved rounds
(:func:`~benchmarks.timing.time_interleaved`); ratios are medians of
per-round ratios.

With ``--calibrate`` it also times the tensor sweeps (planned,
forward+backward) on layouts built with several bucket costs
(:data:`~hsa_geo.functional.layout.BLOCK_COST`), side by side: the
measurement behind the default.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.utils import to_dense_batch

from benchmarks.batch_workloads import WORKLOADS, Workload, load_workload, save_workloads
from benchmarks.scaling import run_and_report, target_lines
from benchmarks.timing import machine_info, median, paired_ratio, time_interleaved
from hsa_geo.functional import engine, hsa, kernel_runs
from hsa_geo.functional import prepare as prepare_fused
from hsa_geo.functional.sweep import HSAFunction
from hsa_geo.functional.layout import build_slot_layout
from hsa_geo.functional.engines import slot_layout

HEADS, DIM = 4, 16

#: Targets: HSA forward+backward (forest and layout included) over flat SDPA.
TARGETS = {'molecules': 1.0, 'documents 32x256': 1.0, 'documents 8x1024': 0.35}


def padded_sdpa(q: Tensor, k: Tensor, v: Tensor, batch: Tensor) -> Tensor:
    r"""Softmax attention within every graph of a packed batch: ``[T, H, D]``
    in and out, the graphs padded to the longest and padding masked from the
    keys."""
    heads = q.size(1)
    dense, mask = zip(*(to_dense_batch(t.flatten(1), batch) for t in (q, k, v)))
    mask = mask[0]
    size, length = mask.shape
    q, k, v = (t.view(size, length, heads, -1).transpose(1, 2) for t in dense)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    return out.transpose(1, 2)[mask]


def attention_calls(workload: Workload, backward: bool = True,
                    device: torch.device = torch.device('cpu'),
                    errors: Optional[List[str]] = None) -> Dict[str, Callable[[], Any]]:
    r"""The timed calls of one workload on :obj:`device`. On a GPU the
    forest is built and planned on the CPU (as a data loader's collate
    does) and moved to the device in the timed call; the planned HSA call
    is also replayed from a CUDA graph (a failed capture is appended to
    :obj:`errors`)."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    tokens = workload.num_leaves
    q, k, v = (torch.randn(tokens, HEADS, DIM, generator=generator).to(device).requires_grad_()
               for _ in range(3))
    x = torch.randn(tokens, HEADS * DIM, generator=generator).to(device).requires_grad_()
    mha = torch.nn.MultiheadAttention(HEADS * DIM, HEADS, batch_first=True).to(device)
    batch = workload.batch.to(device)

    def new_forest():
        forest = workload.forest()
        prepare_fused(forest, device)
        return forest if device.type == 'cpu' else forest.to(device)

    planned = new_forest()
    slot_layout(planned, device)  # for the tensor sweeps

    def step(out: Tensor) -> None:
        if backward:
            out.sum().backward()

    def run_hsa():
        step(hsa(q, k, v, new_forest()))

    def run_planned():
        step(hsa(q, k, v, planned))

    def run_tensor_sweeps():
        with engine('tensor'):
            step(hsa(q, k, v, planned))

    def run_sdpa():
        step(padded_sdpa(q, k, v, batch))

    def run_mha():
        dense, mask = to_dense_batch(x, batch)
        out = mha(dense, dense, dense, key_padding_mask=~mask, need_weights=False)[0]
        step(out[mask])

    def run_plan():
        prepare_fused(workload.forest(), device)

    calls = {'hsa': run_hsa, 'hsa (planned)': run_planned, 'sdpa': run_sdpa, 'mha': run_mha,
             'plan': run_plan}
    if kernel_runs(q.device):
        calls['tensor sweeps (planned)'] = run_tensor_sweeps
    if device.type == 'cuda':
        try:
            calls['hsa (planned, CUDA graph)'] = cuda_graph_replay(
                run_planned if backward else torch.no_grad()(run_planned))
        except Exception as error:  # recorded: a capture may meet a host sync
            if errors is not None:
                errors.append(f'{workload.name}: CUDA graph capture failed: {error!r}'[:500])
    if not backward:
        calls = {name: torch.no_grad()(call) for name, call in calls.items() if name != 'plan'}
    return calls


def cuda_graph_replay(call: Callable[[], Any]) -> Callable[[], Any]:
    r""":obj:`call` captured once into a CUDA graph (after warm-up runs on a
    side stream); returns the graph's replay. Its inputs and the gradients
    it accumulates stay in place, as a fixed plan allows."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


#: Bucket costs compared by ``--calibrate`` (padded pairs per block).
CALIBRATION_COSTS = (0, 512, 2048, 8192, 32768)


def calibration_calls(workload: Workload) -> Dict[str, Callable[[], Any]]:
    r"""HSA forward+backward on layouts of one forest built with each of
    :data:`CALIBRATION_COSTS`."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(workload.num_leaves, HEADS, DIM, generator=generator,
                           requires_grad=True) for _ in range(3))
    forest = workload.forest()
    calls = {}
    for cost in CALIBRATION_COSTS:
        layout = build_slot_layout(forest.parent, forest.num_leaves, forest.depth,
                                   forest.num_leaves_below, forest.first_leaf, block_cost=cost)

        def call(layout=layout):
            HSAFunction.apply(q, k, v, None, layout, DIM ** -0.5).sum().backward()

        calls[f'{cost}: {len(layout.blocks)} blocks, {layout.num_pairs} pairs'] = call
    return calls


def run(args: argparse.Namespace) -> Dict[str, Any]:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.time()
    device = torch.device(args.device)
    results: Dict[str, Any] = {
        'benchmark': 'batches', 'config': {'heads': HEADS, 'dim': DIM, 'dtype': 'float32',
                                           'repeats': args.repeats, 'threads': args.threads,
                                           'device': str(device)},
        'machine': machine_info(device), 'workloads': [], 'errors': []}
    for name in args.workloads:
        workload = load_workload(name, args.saved_workloads)
        entry: Dict[str, Any] = {'name': name, **workload.describe()}
        print(f'{name}: {entry["num_leaves"]} leaves, {entry["num_graphs"]} graphs', flush=True)
        for mode, backward in (('forward', False), ('forward_backward', True)):
            samples = time_interleaved(attention_calls(workload, backward, device,
                                                       results['errors']),
                                       repeats=args.repeats, warmup=args.warmup, device=device)
            entry[mode] = {
                'seconds': {call: median(times) for call, times in samples.items()},
                'ratio_to_sdpa': {call: paired_ratio(times, samples['sdpa'])
                                  for call, times in samples.items() if call != 'sdpa'},
                'samples': samples}
        if args.calibrate and device.type == 'cpu':
            samples = time_interleaved(calibration_calls(workload), repeats=args.repeats,
                                       warmup=args.warmup)
            entry['calibration'] = {call: median(times) for call, times in samples.items()}
        results['workloads'].append(entry)
    results['machine']['load_average_after'] = list(os.getloadavg())
    results['targets'] = evaluate_targets(results)
    results['wall_s'] = time.time() - started
    return results


def evaluate_targets(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    targets = []
    for entry in results['workloads']:
        limit = TARGETS.get(entry['name'])
        if limit is None:
            continue
        measured = entry['forward_backward']['ratio_to_sdpa']['hsa']
        targets.append({
            'name': f'{entry["name"]}: HSA fwd+bwd (forest + plan included) / flat SDPA',
            'limit': limit, 'measured': measured,
            'status': 'PASS' if measured is not None and measured <= limit else 'FAIL',
            'detail': f'<= {limit:g}x'})
    return targets


def format_report(results: Dict[str, Any]) -> str:
    lines = [f'device={results["config"].get("device", "cpu")}, '
             f'threads={results["config"]["threads"]}, load average before '
             f'{results["machine"]["load_average"]}, after '
             f'{results["machine"]["load_average_after"]}', '']
    calls = ['hsa', 'hsa (planned)', 'tensor sweeps (planned)', 'hsa (planned, CUDA graph)',
             'plan', 'sdpa', 'mha']
    calls = [call for call in calls
             if any(call in entry['forward_backward']['seconds']
                    for entry in results['workloads'])]
    header = ['workload', 'mode'] + calls + ['hsa / sdpa', 'hsa (planned) / sdpa', 'hsa / mha']
    rows = []
    for entry in results['workloads']:
        for mode in ('forward', 'forward_backward'):
            seconds, ratios = entry[mode]['seconds'], entry[mode]['ratio_to_sdpa']
            mha_ratio = paired_ratio(entry[mode]['samples']['hsa'], entry[mode]['samples']['mha'])
            rows.append([entry['name'], mode.replace('_', '+')]
                        + [_ms(seconds.get(call)) for call in calls]
                        + [_x(ratios.get('hsa')), _x(ratios.get('hsa (planned)')), _x(mha_ratio)])
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines.append('  '.join(h.ljust(w) for h, w in zip(header, widths)))
    lines += ['  '.join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    for entry in results['workloads']:
        if 'calibration' in entry:
            lines += ['', f'calibration, {entry["name"]} (block cost: fwd+bwd, planned)']
            lines += [f'  {call}: {_ms(seconds)}' for call, seconds in entry['calibration'].items()]
    lines += [''] + target_lines(results)
    return '\n'.join(lines)


def _ms(value: Optional[float]) -> str:
    return '-' if value is None else f'{value * 1e3:.2f} ms'


def _x(value: Optional[float]) -> str:
    return '-' if value is None else f'{value:.2f}x'


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.batches',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('--workloads', nargs='+', default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads (default: 1, as in the issue\'s measurements)')
    parser.add_argument('--out', default=os.path.join('benchmarks', 'results', 'batches.json'))
    parser.add_argument('--calibrate', action='store_true',
                        help='also time layouts built with several bucket costs (CPU only)')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--saved-workloads', default=None, metavar='PATH',
                        help='read the workloads from a file written by --save-workloads '
                             '(for a machine without the offline data)')
    parser.add_argument('--save-workloads', default=None, metavar='PATH',
                        help='write the workloads to PATH and exit')
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error('--threads must be at least 1')
    return args


def main(argv: Optional[Sequence[str]] = None) -> Optional[Dict[str, Any]]:
    args = parse_args(argv)
    if args.save_workloads is not None:
        save_workloads(args.save_workloads, args.workloads)
        print(f'saved {len(args.workloads)} workloads to {args.save_workloads}')
        return None
    return run_and_report(args, run, format_report)


if __name__ == '__main__':
    from benchmarks.batches import main as _main

    _main()
