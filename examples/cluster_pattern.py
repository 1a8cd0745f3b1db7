r"""CLUSTER and PATTERN (the GNN benchmarking suite's SBM node tasks), HSA
against the attention layers PyG users reach for, in one GPS-style layer
(issue 21).

Every model is a stack of the same layer, GPSConv's order (Rampášek et al.,
2022): a local GIN branch and a global attention branch, each with a
residual and batch norm, summed, then a feed-forward network. Models differ
in the branches only:

==============  ==============================================================
``hsa``         global HSA over a METIS (or Louvain) hierarchy of the graph
``softmax``     global softmax attention (the same model without the tree)
``gin``         the local GIN branch only
``gps_hsa``     GIN + HSA
``gps_softmax`` GIN + softmax attention (GPS-style)
``sgformer``    GIN + PyG's ``SGFormerAttention``
``polynormer``  GIN + PyG's ``PolynormerAttention``
``gpsconv``     PyG's own ``GPSConv`` (multi-head attention, GIN inside)
==============  ==============================================================

Widths are matched so that every model's parameter count is within 10 % of
``gps_hsa``'s. Inputs are the node feature ids and a 16-step random-walk
structural encoding (RWSE, as GraphGPS); the loss is the suite's
class-weighted cross entropy and the metric its weighted accuracy. The
hierarchy is found by the builder from the graph's edges, never the planted
communities.

A short run::

    python examples/cluster_pattern.py --dataset CLUSTER --models gps_hsa,gpsconv --epochs 2

Runs checkpoint every epoch under ``--checkpoint-dir`` and resume there; a
finished run leaves ``run_<model>_<seed>.json``, and ``--report-only`` gathers
them into ``--out`` with paired differences of the HSA models to every other
model (95 % bootstrap over seeds and test graphs).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import os.path as osp
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.loader import DataLoader
from torch_geometric.nn import GPSConv
from torch_geometric.nn.attention import PolynormerAttention, SGFormerAttention
from torch_geometric.transforms import AddRandomWalkPE
from torch_geometric.utils import to_dense_batch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from common import (ExampleError, compare_runs, config_of, count_parameters,  # noqa: E402
                    gather_runs, grid_of, load_checkpoint, matched_width, mean_std,
                    report_header, run_experiment, run_main, save_checkpoint, set_seed,
                    write_json)

from hsa_geo import Hierarchy  # noqa: E402
from hsa_geo.data import hierarchy_from_data  # noqa: E402
from hsa_geo.datasets.sbm import RECIPES, generate_sbm_splits, weighted_accuracy  # noqa: E402
from hsa_geo.nn import HSAConv  # noqa: E402
from hsa_geo.nn.models.encoder import resolve_local_conv  # noqa: E402
from hsa_geo.transforms import AddHierarchy  # noqa: E402

#: model name -> (local branch, global branch)
MODELS = {'hsa': (None, 'hsa'), 'softmax': (None, 'softmax'), 'gin': ('gin', None),
          'gps_hsa': ('gin', 'hsa'), 'gps_softmax': ('gin', 'softmax'),
          'sgformer': ('gin', 'sgformer'), 'polynormer': ('gin', 'polynormer'),
          'gpsconv': ('gin', 'gpsconv')}
HSA_MODELS = ('hsa', 'gps_hsa')
REFERENCE = 'gps_hsa'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--dataset', choices=sorted(RECIPES), default='CLUSTER')
    parser.add_argument('--models', default=','.join(MODELS))
    parser.add_argument('--seeds', default='0')
    parser.add_argument('--epochs', type=int, default=5)
    parser.add_argument('--hidden', type=int, default=48)
    parser.add_argument('--layers', type=int, default=4)
    parser.add_argument('--heads', type=int, default=4)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--schedule', choices=('constant', 'cosine'), default='constant',
                        help="learning rate over the run: 'constant' (default) or 'cosine' "
                             'from --lr to 0 over --epochs, per step (stateless, so resume-safe)')
    parser.add_argument('--dropout', type=float, default=0.0)
    parser.add_argument('--rwse', type=int, default=16, help='random-walk steps of the RWSE')
    parser.add_argument('--hierarchy', default='metis',
                        help="builder of AddHierarchy: 'metis' (default), 'louvain', ...; "
                             "or 'metis_shuffled', the control: METIS' tree with its leaves "
                             'moved to random places (same shape, no graph structure)')
    parser.add_argument('--max-children', type=int, default=16)
    parser.add_argument('--train-size', type=int, default=0, help='0 = the suite\'s size')
    parser.add_argument('--valid-size', type=int, default=0)
    parser.add_argument('--test-size', type=int, default=0)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--data-dir', default=osp.join(osp.expanduser('~'), '.cache', 'hsa_geo',
                                                       'sbm'))
    parser.add_argument('--checkpoint-dir', default=None,
                        help='default: ~/.cache/hsa_geo/checkpoints/<dataset>')
    parser.add_argument('--out', default=None,
                        help='default: benchmarks/results/<dataset>.json (lower case)')
    parser.add_argument('--report-only', action='store_true')
    parser.add_argument('--control-runs', action='append', default=[], metavar='LABEL=DIR',
                        help='also report the finished runs under DIR (e.g. of the same models '
                             "on --hierarchy metis_shuffled), each model named '<model> "
                             "[LABEL]', compared with the HSA models on the same test graphs "
                             '(repeatable)')
    parser.add_argument('--resamples', type=int, default=2000)
    args = parser.parse_args(argv)
    grid_of(args, MODELS, args.dataset.lower())
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    args.out = args.out or osp.join(root, 'benchmarks', 'results',
                                    f'{args.dataset.lower()}.json')
    return args


# ---------------------------------------------------------------- data
def load_data(args) -> Dict[str, list]:
    r"""The splits with their hierarchies and RWSE, built once and cached
    under :obj:`args.data_dir`."""
    recipe = RECIPES[args.dataset]
    sizes = {name: (getattr(args, f'{name}_size') or size) for name, size in recipe.splits}
    key = json.dumps([args.dataset, sizes, args.hierarchy, args.max_children, args.rwse])
    path = osp.join(args.data_dir, hashlib.sha1(key.encode()).hexdigest()[:16] + '.pt')
    if osp.isfile(path):
        return torch.load(path, weights_only=False)
    start = time.perf_counter()
    print(f'drawing {args.dataset} {sizes} and building {args.hierarchy} hierarchies ...',
          flush=True)
    splits = generate_sbm_splits(recipe, seed=0, sizes=sizes)
    method = (ShuffledLeaves('metis', args.max_children, seed=0)
              if args.hierarchy == 'metis_shuffled' else args.hierarchy)
    hierarchy = AddHierarchy(method, max_children=args.max_children, seed=0)
    rwse = AddRandomWalkPE(args.rwse, attr_name='rwse')
    data = {name: [hierarchy(rwse(graph)) for graph in graphs]
            for name, graphs in splits.items()}
    print(f'  {time.perf_counter() - start:.0f} s', flush=True)
    os.makedirs(args.data_dir, exist_ok=True)
    torch.save(data, path + '.tmp')
    os.replace(path + '.tmp', path)
    return data


class ShuffledLeaves:
    r"""A control hierarchy: :obj:`method`'s tree over a graph, with its
    leaves moved to random leaf places (leaf :math:`i` takes the parent of
    leaf :math:`\pi(i)`, :math:`\pi` a random permutation). Same shape and
    family sizes as the built tree; which nodes share a cluster no longer
    follows the edges. Deterministic: one generator seeded once, the graphs
    drawn in order."""

    def __init__(self, method: str, max_children: int, seed: int = 0):
        self.build = AddHierarchy(method, max_children=max_children, seed=seed)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, data) -> Hierarchy:
        built = self.build.hierarchy(data)
        parent = built.parent.clone()
        order = torch.randperm(built.num_leaves, generator=self.generator)
        parent[:built.num_leaves] = built.parent[order]
        return Hierarchy.from_parent(parent, built.num_leaves)


# ---------------------------------------------------------------- models
class GlobalAttention(nn.Module):
    r"""The global branch: HSA over the hierarchy forest, or an attention
    over each graph's nodes as a dense padded batch."""

    def __init__(self, kind: str, channels: int, heads: int, dropout: float):
        super().__init__()
        self.kind = kind
        head_channels = channels // heads
        if kind == 'hsa':
            self.attention = HSAConv(channels, head_channels, heads=heads, root_weight=False,
                                     dropout=dropout)
            self.out = nn.Linear(channels, channels)
        elif kind == 'softmax':
            self.attention = nn.MultiheadAttention(channels, heads, dropout=dropout,
                                                   batch_first=True)
        elif kind == 'sgformer':
            # SGFormer averages its heads; its paper's default is one head of full width
            self.attention = SGFormerAttention(channels, 1, channels, qkv_bias=True)
        elif kind == 'polynormer':
            self.attention = PolynormerAttention(channels, heads, head_channels, qkv_bias=True,
                                                 dropout=dropout)
        else:
            raise ValueError(f"unknown global attention {kind!r}")

    def forward(self, x: Tensor, batch: Tensor, hierarchy) -> Tensor:
        if self.kind == 'hsa':
            return self.out(self.attention(x, hierarchy))
        dense, mask = to_dense_batch(x, batch)
        if self.kind == 'softmax':
            out = self.attention(dense, dense, dense, key_padding_mask=~mask,
                                 need_weights=False)[0]
        else:
            out = self.attention(dense, mask)
        return out[mask]


class Layer(nn.Module):
    r"""GPSConv's layer with swappable branches."""

    def __init__(self, channels: int, heads: int, local: Optional[str],
                 global_kind: Optional[str], dropout: float):
        super().__init__()
        self.dropout = dropout
        self.local = resolve_local_conv(local, channels) if local else None
        self.norm_local = nn.BatchNorm1d(channels) if local else None
        self.glob = (GlobalAttention(global_kind, channels, heads, dropout)
                     if global_kind else None)
        self.norm_global = nn.BatchNorm1d(channels) if global_kind else None
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.ReLU(),
                                 nn.Dropout(dropout), nn.Linear(2 * channels, channels),
                                 nn.Dropout(dropout))
        self.norm_out = nn.BatchNorm1d(channels)

    def forward(self, x: Tensor, edge_index: Tensor, batch: Tensor, hierarchy) -> Tensor:
        branches = []
        if self.local is not None:
            h = F.dropout(self.local(x, edge_index), self.dropout, self.training)
            branches.append(self.norm_local(h + x))
        if self.glob is not None:
            h = F.dropout(self.glob(x, batch, hierarchy), self.dropout, self.training)
            branches.append(self.norm_global(h + x))
        out = sum(branches)
        return self.norm_out(out + self.mlp(out))


class NodeClassifier(nn.Module):
    def __init__(self, name: str, num_values: int, num_classes: int, channels: int,
                 layers: int, heads: int, rwse: int, dropout: float = 0.0):
        super().__init__()
        self.name, self.channels = name, channels
        self.embed = nn.Embedding(num_values, channels)
        self.rwse = nn.Linear(rwse, channels)
        local, global_kind = MODELS[name]
        if global_kind == 'gpsconv':
            self.layers = nn.ModuleList(
                GPSConv(channels, resolve_local_conv('gin', channels), heads=heads,
                        dropout=dropout) for _ in range(layers))
        else:
            self.layers = nn.ModuleList(Layer(channels, heads, local, global_kind, dropout)
                                        for _ in range(layers))
        self.head = nn.Linear(channels, num_classes)
        self.needs_hierarchy = global_kind == 'hsa'

    def forward(self, data) -> Tensor:
        x = self.embed(data.x) + self.rwse(data.rwse)
        hierarchy = hierarchy_from_data(data) if self.needs_hierarchy else None
        for layer in self.layers:
            if isinstance(layer, GPSConv):
                x = layer(x, data.edge_index, data.batch)
            else:
                x = layer(x, data.edge_index, data.batch, hierarchy)
        return self.head(x)


def build_model(name: str, args) -> NodeClassifier:
    r"""Model :obj:`name` at the width whose parameter count is closest to
    :data:`REFERENCE`'s at :obj:`args.hidden`."""
    recipe = RECIPES[args.dataset]
    num_values = recipe.num_communities + 1 if args.dataset == 'CLUSTER' else recipe.vocab_size

    def make(width, name=name):
        return NodeClassifier(name, num_values, recipe.num_classes, width, args.layers,
                              args.heads, args.rwse, args.dropout)

    target = count_parameters(make(args.hidden, REFERENCE))
    return make(matched_width(make, target, args.heads, 4 * args.hidden))


# ---------------------------------------------------------------- training
def weighted_loss(logits: Tensor, target: Tensor, num_classes: int) -> Tensor:
    r"""The suite's class-weighted cross entropy: a class weighs
    :math:`(V - V_c) / V` in a batch of :math:`V` nodes, :math:`V_c` of it."""
    count = torch.bincount(target, minlength=num_classes).float()
    weight = (target.numel() - count) / target.numel() * (count > 0).float()
    return F.cross_entropy(logits, target, weight=weight)


@torch.no_grad()
def class_counts(model, graphs, num_classes: int, batch_size: int) -> np.ndarray:
    r"""Per test graph and class: correct nodes and nodes, ``[G, C, 2]``
    (the weighted accuracy of any set of graphs follows from it)."""
    model.eval()
    counts = []
    for data in DataLoader(graphs, batch_size=batch_size):
        prediction = model(data).argmax(1)
        right = (prediction == data.y).long()
        index = data.batch * num_classes + data.y
        size = data.num_graphs * num_classes
        correct = torch.zeros(size, dtype=torch.long).index_add_(0, index, right)
        total = torch.bincount(index, minlength=size)
        counts.append(torch.stack([correct, total], 1).view(data.num_graphs, num_classes, 2))
    model.train()
    return torch.cat(counts).numpy()


def encode_counts(counts: np.ndarray) -> Dict:
    r"""``[G, C, 2]`` counts as a shape and one string of numbers (a JSON
    list would take a line per number)."""
    return {'shape': list(counts.shape), 'values': ' '.join(map(str, counts.reshape(-1).tolist()))}


def decode_counts(encoded: Dict) -> np.ndarray:
    return np.array(encoded['values'].split(), dtype=np.int64).reshape(encoded['shape'])


def accuracy_of(counts: np.ndarray) -> float:
    r'''Weighted accuracy (percent) of graphs' ``[G, C, 2]`` counts.'''
    correct, total = counts[..., 0].sum(0), counts[..., 1].sum(0)
    per_class = np.where(total > 0, correct / np.maximum(total, 1), 0.0)
    return float(100.0 * per_class.mean())


def learning_rate(args, step: int, total_steps: int) -> float:
    r"""The learning rate at optimiser step :obj:`step` of :obj:`total_steps`:
    :obj:`args.lr`, or its cosine decay to zero with :obj:`args.schedule`
    ``'cosine'``."""
    if args.schedule == 'constant':
        return args.lr
    return 0.5 * args.lr * (1.0 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))


def train_one(name: str, seed: int, data: Dict[str, list], args) -> Dict:
    recipe = RECIPES[args.dataset]
    config = config_of(args, {'model': name, 'seed': seed})
    for key in ('models', 'report_only', 'resamples', 'data_dir'):
        config.pop(key, None)
    set_seed(seed)
    model = build_model(name, args)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    state = load_checkpoint(osp.join(args.checkpoint_dir, f'checkpoint_{name}_{seed}.pt'), config)
    history: List[Dict] = []
    epoch, best, seconds = 0, None, 0.0
    if state is not None:
        model.load_state_dict(state['model'])
        optimiser.load_state_dict(state['optimiser'])
        epoch, history, best, seconds = (state['epoch'], state['history'], state['best'],
                                         state['seconds'])
        torch.set_rng_state(state['torch_rng'])
        print(f'{name} seed {seed}: resumed after epoch {epoch}', flush=True)
    loader = DataLoader(data['train'], batch_size=args.batch_size, shuffle=True)
    total_steps = args.epochs * len(loader)
    while epoch < args.epochs:
        start, losses = time.perf_counter(), []
        for step, batch in enumerate(loader, start=epoch * len(loader)):
            for group in optimiser.param_groups:
                group['lr'] = learning_rate(args, step, total_steps)
            loss = weighted_loss(model(batch), batch.y, recipe.num_classes)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        seconds += time.perf_counter() - start
        epoch += 1
        valid = accuracy_of(class_counts(model, data['valid'], recipe.num_classes,
                                         args.batch_size))
        history.append({'epoch': epoch, 'train_loss': float(np.mean(losses)),
                        'valid_accuracy': valid, 'train_seconds': seconds,
                        'load': os.getloadavg()[0]})
        print(f'{name} seed {seed} epoch {epoch}: loss {history[-1]["train_loss"]:.4f} '
              f'valid {valid:.2f} ({seconds:.0f} s)', flush=True)
        if best is None or valid > best['valid_accuracy']:
            best = {'epoch': epoch, 'valid_accuracy': valid,
                    'model': {k: v.clone() for k, v in model.state_dict().items()}}
        save_checkpoint(osp.join(args.checkpoint_dir, f'checkpoint_{name}_{seed}.pt'), {
            'config': config, 'model': model.state_dict(), 'optimiser': optimiser.state_dict(),
            'epoch': epoch, 'history': history, 'best': best, 'seconds': seconds,
            'torch_rng': torch.get_rng_state()})
    model.load_state_dict(best['model'])
    counts = class_counts(model, data['test'], recipe.num_classes, args.batch_size)
    run = {'model': name, 'seed': seed, 'width': model.channels,
           'parameters': count_parameters(model), 'epochs': epoch,
           'best_epoch': best['epoch'], 'valid_accuracy': best['valid_accuracy'],
           'test_accuracy': accuracy_of(counts), 'test_counts': encode_counts(counts),
           'train_seconds': seconds, 'seconds_per_epoch': seconds / max(epoch, 1),
           'history': history, 'load_at_end': os.getloadavg()[0]}
    print(f'{name} seed {seed}: test {run["test_accuracy"]:.2f}', flush=True)
    write_json(osp.join(args.checkpoint_dir, f'run_{name}_{seed}.json'), run)
    return run


def control_runs(args) -> List[Dict]:
    r"""The runs of :obj:`args.control_runs` (``LABEL=DIR``), each model
    renamed ``'<model> [LABEL]'``."""
    runs = []
    for entry in args.control_runs:
        label, separator, directory = entry.partition('=')
        if not separator or not label or not directory:
            raise ExampleError(f"--control-runs takes LABEL=DIR, not {entry!r}")
        runs += [dict(run, model=f"{run['model']} [{label}]")
                 for run in gather_runs(osp.expanduser(directory), [])]
    return runs


def report(runs: List[Dict], args) -> Dict:
    runs = runs + control_runs(args)
    names = list(MODELS) + sorted({r['model'] for r in runs} - set(MODELS))
    summary = {}
    for name in names:
        mine = [r for r in runs if r['model'] == name]
        if mine:
            summary[name] = {'test_accuracy': mean_std(r['test_accuracy'] for r in mine),
                             'valid_accuracy': mean_std(r['valid_accuracy'] for r in mine),
                             'parameters': mine[0]['parameters'], 'width': mine[0]['width'],
                             'seconds_per_epoch': mean_std(r['seconds_per_epoch'] for r in mine),
                             'epochs': sorted({r['epochs'] for r in mine})}
    comparisons = []
    for first in HSA_MODELS:
        for second in names:
            comparison = compare_runs(runs, first, second,
                                      lambda run: decode_counts(run['test_counts']),
                                      args.resamples, accuracy_of)
            if comparison is not None:
                comparisons.append(comparison)
    return {'dataset': args.dataset, **report_header(args),
            'budget': {'epochs': sorted({r['epochs'] for r in runs}),
                       'batch_size': args.batch_size},
            'published': {'CLUSTER': {'GraphGPS': 78.016}, 'PATTERN': {'GraphGPS': 86.685}},
            'summary': summary, 'comparisons': comparisons,
            'runs': runs}


def main(argv=None):
    result = run_experiment(parse_args(argv), load_data, train_one, report)
    for name, row in result['summary'].items():
        print(f"{name:12s} test {row['test_accuracy']['mean']:.2f} "
              f"(params {row['parameters']}, {row['seconds_per_epoch']['mean']:.0f} s/epoch)")


if __name__ == '__main__':
    run_main(main)
