r"""Wall-clock of one training step (forward, backward, optimiser) of the
demo's model (``examples/ogbg_molhiv.py``: GINE + global HSA blocks,
hierarchy readout) in eager mode and under
``torch.compile(model, dynamic=True, fullgraph=True)`` with inductor's
default options and with the options that make it pay on the CPU
(:data:`VARIANTS`), on the same batches of synthetic molecules, timed
interleaved (eager, then every compiled variant, batch after batch, round
after round) so that the machine's load falls on all alike. Medians, the
median of the per-step ratios compiled / eager and the load average go to
``benchmarks/results/compile_step.json``.

    python benchmarks/compile_step.py --rounds 5
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import os.path as osp
import platform
import statistics
import time

import torch
from torch_geometric.data import Data

from hsa_geo.compiler import cpu_training_options
from hsa_geo.loader import HierarchyLoader
from hsa_geo.nn.models import HSAGraphModel
from hsa_geo.transforms import AddHierarchy

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

#: torch.compile options per variant. ``fallback_random``: dropout masks
#: from aten's bernoulli, not from inductor's per-element CPU random
#: generator (which, profiled, costs several times the eager dropout);
#: ``guard_filter_fn``: no guards on the modules' parameters and buffers
#: (checked on every call otherwise; safe while the model's modules are not
#: replaced between calls); ``cpu_training_options``: what
#: :func:`hsa_geo.compiler.cpu_training_options` returns, ``fallback_random``
#: and boolean masks recomputed in the backward graph instead of saved.
VARIANTS = {
    'default': {},
    'fallback_random': {'fallback_random': True},
    'fallback_random, no module guards': {
        'fallback_random': True,
        'guard_filter_fn': torch.compiler.skip_guard_on_all_nn_modules_unsafe},
    'cpu_training_options': cpu_training_options(),
}


def synthetic_molecules(count: int, seed: int):
    r"""Molecule-sized graphs (15-35 atoms, a chain with ring closures) with
    OGB-style integer atom and bond features."""
    generator = torch.Generator().manual_seed(seed)
    graphs = []
    for _ in range(count):
        n = int(torch.randint(15, 36, (1, ), generator=generator))
        chain = torch.stack([torch.arange(n - 1), torch.arange(1, n)])
        rings = torch.randint(0, n, (2, n // 6), generator=generator)
        rings = rings[:, rings[0] != rings[1]]
        edges = torch.cat([chain, rings], dim=1)
        edge_index = torch.cat([edges, edges.flip(0)], dim=1)
        graphs.append(Data(x=torch.randint(0, 2, (n, 9), generator=generator),
                           edge_index=edge_index,
                           edge_attr=torch.randint(0, 2, (edge_index.size(1), 3),
                                                   generator=generator),
                           y=torch.randint(0, 2, (1, 1), generator=generator).float()))
    transform = AddHierarchy('louvain', max_children=8)
    return [transform(graph) for graph in graphs]


def build_model(hidden: int, layers: int, heads: int) -> torch.nn.Module:
    from ogb.graphproppred.mol_encoder import AtomEncoder, BondEncoder
    return HSAGraphModel(AtomEncoder(hidden), hidden, 1, num_layers=layers, conv='gine',
                         heads=heads, dropout=0.1, norm='batch_norm', readout='hierarchy',
                         edge_encoder=BondEncoder(hidden))


WHAT = {'demo': "the demo model", 'hsa-layers': "the demo model's HSA layers alone"}


class HSALayers(torch.nn.Module):
    r"""The demo model's global attention alone: :obj:`layers` HSA layers
    (no local convolution, normalisation or dropout)."""

    def __init__(self, hidden: int, layers: int, heads: int):
        super().__init__()
        from ogb.graphproppred.mol_encoder import AtomEncoder
        from hsa_geo.nn import HSAConv
        self.atom = AtomEncoder(hidden)
        self.convs = torch.nn.ModuleList([HSAConv(hidden, hidden // heads, heads=heads)
                                          for _ in range(layers)])

    def forward(self, x, edge_index, hierarchy, edge_attr=None, num_graphs=None):
        h = self.atom(x)
        for conv in self.convs:
            h = h + conv(h, hierarchy)
        return h.mean(0, keepdim=True).sum(1, keepdim=True).expand(num_graphs, 1)


def make_step(model, optimizer):
    from hsa_geo.data import hierarchy_from_data
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step(batch) -> float:
        start = time.perf_counter()
        hierarchy = hierarchy_from_data(batch)
        out = model(batch.x, batch.edge_index, hierarchy, batch.edge_attr,
                    num_graphs=batch.num_graphs)
        loss = loss_fn(out, batch.y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--graphs', type=int, default=256)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--hidden', type=int, default=64)
    parser.add_argument('--layers', type=int, default=3)
    parser.add_argument('--heads', type=int, default=4)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--backend', default='inductor')
    parser.add_argument('--model', default='demo', choices=['demo', 'hsa-layers'],
                        help="the demo's model, or its HSA layers alone")
    parser.add_argument('--variants', default='',
                        help=f"comma-separated, of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument('--out', default=osp.join(ROOT, 'benchmarks', 'results',
                                                  'compile_step.json'))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = list(HierarchyLoader(synthetic_molecules(args.graphs, seed=0),
                                   batch_size=args.batch_size))
    eager = (build_model(args.hidden, args.layers, args.heads) if args.model == 'demo'
             else HSALayers(args.hidden, args.layers, args.heads))
    steps = {'eager': make_step(eager, torch.optim.Adam(eager.parameters(), lr=1e-3))}
    variants = args.variants.split(',') if args.variants else list(VARIANTS)
    load_before = os.getloadavg()
    compile_seconds = {}
    for variant in variants:
        model = copy.deepcopy(eager)
        compiled = torch.compile(model, backend=args.backend, dynamic=True, fullgraph=True,
                                 options=dict(VARIANTS[variant]) or None)
        steps[variant] = make_step(compiled, torch.optim.Adam(model.parameters(), lr=1e-3))
        start = time.perf_counter()
        for batch in batches[:3]:  # compiles (dynamic shapes from the first batch on)
            steps[variant](batch)
        compile_seconds[variant] = round(time.perf_counter() - start, 2)
    for batch in batches[:3]:
        steps['eager'](batch)
    times = {name: [] for name in steps}
    ratios = {variant: [] for variant in variants}
    for _ in range(args.rounds):
        for batch in batches:
            seconds = {name: step(batch) for name, step in steps.items()}
            for name, value in seconds.items():
                times[name].append(value)
            for variant in variants:
                ratios[variant].append(seconds[variant] / seconds['eager'])
    result = {
        'what': f"one training step of {WHAT[args.model]}, eager vs "
                f"torch.compile(dynamic=True, fullgraph=True), timed interleaved",
        'torch': torch.__version__, 'python': platform.python_version(),
        'model': args.model, 'backend': args.backend, 'threads': args.threads, 'graphs': args.graphs,
        'batch_size': args.batch_size, 'hidden': args.hidden, 'layers': args.layers,
        'heads': args.heads, 'rounds': args.rounds, 'steps_per_mode': len(times['eager']),
        'variants': {variant: sorted(VARIANTS[variant]) for variant in variants},
        'compile_seconds_first_three_batches': compile_seconds,
        'median_ms': {name: round(1e3 * statistics.median(t), 3) for name, t in times.items()},
        'median_ratio_compiled_over_eager': {
            variant: round(statistics.median(r), 4) for variant, r in ratios.items()},
        'ratio_quartiles': {variant: [round(q, 4) for q in statistics.quantiles(r, n=4)]
                            for variant, r in ratios.items()},
        'loadavg_before': load_before, 'loadavg_after': os.getloadavg(),
    }
    os.makedirs(osp.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=2)
        f.write('\n')
    print(json.dumps(result, indent=2))
    return result


if __name__ == '__main__':
    main()
