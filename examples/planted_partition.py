r"""Node classification on a hierarchical planted-partition graph, with the
hierarchy *built from the edges* by METIS (no oracle tree), against SAGE,
SGFormer and Polynormer in the same slot (issue 21).

The graph (generated from :obj:`--graph-seed`, nothing downloaded):

* :math:`N` nodes in *communities* of 64, nested 8 by 8 into *groups*
  (64 → 512 → 4096 → 32768 → ...), a balanced planted tree.
* Edges: every node draws :obj:`--degrees` ``d_0,d_1,...,d_L`` partners,
  :math:`d_\ell` uniformly within its planted group of
  :math:`64 \cdot 8^\ell` nodes for :math:`\ell < L` and the last
  :math:`d_L` uniformly over the whole graph; the graph is then made
  undirected (repeated edges and self-loops dropped). With the default
  ``3,2,1,1`` a node has about 14 neighbours, 6 of them in its community,
  4 more in its group of 512, 2 more in its group of 4096 and about 2
  anywhere: the nested structure *is* in the edges, and a partitioner that
  cuts few edges finds it.
* Labels: every planted group of :obj:`--label-size` (4096) nodes has a
  class drawn uniformly from :obj:`--classes` (4), from its own stream
  (:obj:`--label-seed`), so labels can change while the edges do not.
* Features: the node's class centre plus Gaussian noise :obj:`--noise`
  (2.0) times the mean distance between two centres in every one of
  :obj:`--features` (16) dimensions: a node alone, or the mean of its
  14 neighbours (a few of them in other groups), says little; the mean over
  a group of thousands nearly everything.
* Node ids are a random permutation of the planted order (the builder sees
  nothing but the edges), and every node draws its split: 50 % train,
  20 % valid, 30 % test.

The hierarchy comes from :func:`hsa_geo.hierarchy.from_edge_index_metis`
over the edges only (``max_children=8``); the report gives its build time
and how well it recovers the planted groups: at every depth of the built
tree, the *group purity* (share of nodes whose built cluster's majority
planted group of :obj:`--label-size` is their own), the *group
completeness* (mean share of a node's planted group inside its built
cluster) and the *label purity* (purity with classes; see
:func:`purity_by_depth`). Graph and tree are cached under
``~/.cache/hsa_geo/planted/``, so reruns do not rebuild.

Models (full batch, the same Adam budget, widths matched to within 10 % of
``sage_hsa``'s parameter count):

====================  =======================================================
``sage``              Linear → SAGEConv → Linear (wider, to match parameters)
``sage_hsa``          Linear → SAGEConv → HSAConv over the built tree → Linear
``sage_sgformer``     ... SAGEConv → PyG ``SGFormerAttention`` (one head,
                      as SGFormer's default) and a linear output → Linear
``sage_polynormer``   ... SAGEConv → PyG ``PolynormerAttention`` → Linear
====================  =======================================================

Each layer after the encoder adds its ReLU output to its input (residual).
Training: Adam, cosine schedule over :obj:`--epochs`, validation every
:obj:`--eval-every` epochs, stopping after :obj:`--patience` evaluations
without a better validation accuracy; test accuracy is read at the best
validation epoch. Every (model, seed) runs in its own process (so its peak
memory is its own), checkpoints at every evaluation (with its curve so far
as ``checkpoint_<model>_<seed>.json``), resumes there when rerun, and
leaves ``run_<model>_<seed>.json`` in the run folder; a rerun skips
finished runs. With several learning rates (``--lr 0.005,0.01,0.02``)
every model trains at each of them, with the same seeds, and the report
takes, per model, the learning rate with the best mean *validation*
accuracy over the seeds (test accuracy plays no part in the choice); the
whole grid stays in the report (``lr_grid``). The report (:obj:`--out`) holds every
run, and the paired bootstrap 95 % interval of ``sage_hsa`` minus every
other model over the seeds and test nodes.

A small run takes seconds::

    python examples/planted_partition.py --num-nodes 32768 --epochs 20 --seeds 0

The published runs (100 epochs; the learning rate chosen per model on
validation at 131 k nodes, from three, and used at 1 M)::

    python examples/planted_partition.py --num-nodes 131072 --epochs 100 --seeds 0,1,2 \
        --lr 0.005,0.01,0.02 --out benchmarks/results/planted_partition_lr_131072.json
    python examples/planted_partition.py --num-nodes 1048576 --epochs 100 --seeds 0 \
        --lr-from benchmarks/results/planted_partition_lr_131072.json \
        --out benchmarks/results/planted_partition_lr_1048576.json

(``--lr-from`` trains every model at the learning rate a report selected
for it). The earlier runs at 0.02 for every model are
``planted_partition_built_131072.json`` and
``planted_partition_built_1048576.json``.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import json
import os
import os.path as osp
import platform
import resource
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import SAGEConv
from torch_geometric.nn.attention import PolynormerAttention, SGFormerAttention
from torch_geometric.utils import coalesce, to_torch_csr_tensor

from hsa_geo import Hierarchy, HSAConv
from hsa_geo.hierarchy import from_edge_index_metis

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from common import (ExampleError, compare_runs, count_parameters, matched_width,  # noqa: E402
                    mean_std, run_main, save_checkpoint, set_seed, write_json)

MODELS = ('sage', 'sage_hsa', 'sage_sgformer', 'sage_polynormer')
COMMUNITY, BRANCHING = 64, 8
SPLIT = (0.5, 0.7)  # uniform draw below 0.5: train; below 0.7: valid; else test


# ------------------------------------------------------------------ graph
def planted_graph(num_nodes: int, degrees: Sequence[int] = (3, 2, 1, 1),
                  label_size: int = 4096, classes: int = 4, features: int = 16,
                  noise: float = 2.0, seed: int = 0,
                  label_seed: Optional[int] = None) -> Dict[str, Tensor]:
    r"""The hierarchical planted-partition graph of the module docstring.

    Returns a dict of ``x [N, F]``, ``y [N]``, ``edge_index [2, E]``
    (undirected, coalesced), ``group [N]`` (the planted group of
    :obj:`label_size` nodes of every node), ``split [N]`` (0 train,
    1 valid, 2 test). Edges, permutation and split depend on :obj:`seed`
    only; labels and features on :obj:`label_seed` (default :obj:`seed`)
    too."""
    if num_nodes % label_size or label_size % COMMUNITY:
        raise ExampleError(f"--num-nodes must be a multiple of --label-size ({label_size}), "
                           f"itself a multiple of {COMMUNITY}")
    if len(degrees) < 1 or min(degrees) < 0:
        raise ExampleError(f"--degrees must be non-negative counts (got {list(degrees)})")
    label_seed = seed if label_seed is None else label_seed
    generator = torch.Generator().manual_seed(seed)
    position = torch.arange(num_nodes)  # planted order: groups are ranges
    sources, targets = [], []
    for level, count in enumerate(degrees):
        if count == 0:
            continue
        size = num_nodes if level == len(degrees) - 1 else \
            min(num_nodes, COMMUNITY * BRANCHING ** level)
        offset = torch.randint(size, (num_nodes, count), generator=generator)
        sources.append(position.repeat_interleave(count))
        targets.append((position // size * size).view(-1, 1).add(offset).view(-1))
    node_of = torch.randperm(num_nodes, generator=generator)  # planted position -> node id
    split = torch.rand(num_nodes, generator=generator)
    source, target = node_of[torch.cat(sources)], node_of[torch.cat(targets)]
    keep = source != target
    edge_index = torch.stack([torch.cat([source[keep], target[keep]]),
                              torch.cat([target[keep], source[keep]])])
    edge_index = coalesce(edge_index, num_nodes=num_nodes)

    labels = torch.Generator().manual_seed(label_seed)
    centres = torch.randn(classes, features, generator=labels)
    centres /= torch.pdist(centres).mean()  # mean distance between two centres: 1
    group = torch.empty(num_nodes, dtype=torch.long)
    group[node_of] = position // label_size
    y = torch.randint(classes, (num_nodes // label_size, ), generator=labels)[group]
    x = centres[y] + noise * torch.randn(num_nodes, features, generator=labels)
    split_id = (split >= SPLIT[0]).long() + (split >= SPLIT[1]).long()
    return {'x': x, 'y': y, 'edge_index': edge_index, 'group': group, 'split': split_id}


def build_tree(edge_index: Tensor, num_nodes: int, max_children: int = 8,
               seed: int = 0) -> Hierarchy:
    r"""The hierarchy HSA uses: METIS on the edges alone."""
    return from_edge_index_metis(edge_index, num_nodes, max_children=max_children, seed=seed)


def purity_by_depth(hierarchy: Hierarchy, group: Tensor, y: Tensor) -> List[Dict]:
    r"""For every depth of the built tree: its clusters' number and mean
    size; the *purity*, the share of the leaves under them whose cluster's
    majority planted group (and class) is their own; and the group
    *completeness*, the mean over those leaves of the share of their
    planted group that lies in their cluster. Purity is 1 where every
    cluster lies within one planted group, completeness where every cluster
    is a union of whole groups; both, where the clusters are the groups."""
    leaf, node = (t.numpy() for t in hierarchy.leaf_ancestor_pairs())
    inner = node >= hierarchy.num_leaves
    leaf, node = leaf[inner], node[inner] - hierarchy.num_leaves
    depth = hierarchy.depth[hierarchy.num_leaves:].numpy()
    size = hierarchy.num_leaves_below[hierarchy.num_leaves:].numpy()
    group_size = torch.bincount(group).numpy()
    rows, majority = [], {}
    for name, member in (('group', group.numpy()), ('label', y.numpy())):
        width = int(member.max()) + 1
        key, count = np.unique(node * width + member[leaf], return_counts=True)
        best = np.zeros(hierarchy.num_clusters, dtype=np.int64)
        np.maximum.at(best, key // width, count)
        majority[name] = best
        if name == 'group':  # sum over a cluster's leaves of the share of their group inside
            inside = np.zeros(hierarchy.num_clusters)
            np.add.at(inside, key // width, count * count / group_size[key % width])
    for d in np.unique(depth).tolist():
        at = depth == d
        leaves = size[at].sum()
        rows.append({'depth': d, 'clusters': int(at.sum()),
                     'mean_size': float(size[at].mean()), 'leaves': int(leaves),
                     'group_purity': float(majority['group'][at].sum() / leaves),
                     'group_completeness': float(inside[at].sum() / leaves),
                     'label_purity': float(majority['label'][at].sum() / leaves)})
    return rows


def graph_key(args) -> str:
    recipe = {k: getattr(args, k) for k in ('num_nodes', 'degrees', 'label_size', 'classes',
                                            'features', 'noise', 'graph_seed', 'label_seed',
                                            'max_children')}
    recipe['version'] = 1
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def load_or_build(args) -> Dict:
    r"""Graph, built tree and their statistics, from the cache when there."""
    path = osp.join(args.cache_dir, f'graph_{args.num_nodes}_{graph_key(args)}.pt')
    if osp.isfile(path):
        return torch.load(path, weights_only=False)
    started = time.perf_counter()
    data = planted_graph(args.num_nodes, args.degrees, args.label_size, args.classes,
                         args.features, args.noise, args.graph_seed, args.label_seed)
    generate_s = time.perf_counter() - started
    started = time.perf_counter()
    hierarchy = build_tree(data['edge_index'], args.num_nodes, args.max_children,
                           args.graph_seed)
    build_s = time.perf_counter() - started
    data['parent'] = hierarchy.parent
    data['stats'] = {
        'num_nodes': args.num_nodes, 'num_edges': int(data['edge_index'].size(1)),
        'mean_degree': data['edge_index'].size(1) / args.num_nodes,
        'generate_seconds': generate_s, 'build_seconds': build_s,
        'build_method': f'from_edge_index_metis(max_children={args.max_children}, '
                        f'seed={args.graph_seed})',
        'build_load_average': list(os.getloadavg()),
        'tree': {'num_clusters': hierarchy.num_clusters, 'max_depth': hierarchy.max_depth},
        'split_sizes': torch.bincount(data['split'], minlength=3).tolist(),
    }
    os.makedirs(args.cache_dir, exist_ok=True)
    torch.save(data, path + '.tmp')
    os.replace(path + '.tmp', path)
    return data


# ----------------------------------------------------------------- models
class Net(nn.Module):
    r"""Linear → SAGEConv → [global layer] → Linear, residual ReLU layers."""

    def __init__(self, kind: str, features: int, hidden: int, classes: int, heads: int):
        super().__init__()
        self.kind = kind
        self.encode = nn.Linear(features, hidden)
        self.local = SAGEConv(hidden, hidden)
        self.attend: Optional[nn.Module] = None
        if kind == 'sage_hsa':
            self.attend = HSAConv(hidden, hidden // heads, heads=heads)
        elif kind == 'sage_sgformer':
            self.attend = nn.Sequential(SGFormerAttention(hidden, heads=1, head_channels=hidden),
                                        nn.Linear(hidden, hidden))
        elif kind == 'sage_polynormer':
            self.attend = PolynormerAttention(hidden, heads, head_channels=hidden // heads)
        self.classify = nn.Linear(hidden, classes)

    def forward(self, x: Tensor, edge_index: Tensor, hierarchy: Hierarchy) -> Tensor:
        x = F.relu(self.encode(x))
        x = F.relu(self.local(x, edge_index)) + x
        if self.kind == 'sage_hsa':
            x = F.relu(self.attend(x, hierarchy)) + x
        elif self.attend is not None:  # PyG's global attention takes [batch, nodes, F]
            x = F.relu(self.attend(x.unsqueeze(0)).squeeze(0)) + x
        return self.classify(x)


def build_model(kind: str, args) -> Net:
    def make(width):
        return Net(kind, args.features, width, args.classes, args.heads)
    if kind != 'sage':
        return make(args.hidden)
    # no global slot: widen until the parameters match sage_hsa's
    target = count_parameters(Net('sage_hsa', args.features, args.hidden, args.classes,
                                  args.heads))
    return make(matched_width(make, target, 1, 8 * args.hidden))


# --------------------------------------------------------------- training
def pack(bits: Tensor) -> str:
    return base64.b64encode(np.packbits(bits.numpy().astype(np.uint8)).tobytes()).decode()


def unpack(text: str, length: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:length]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def train_one(kind: str, seed: int, data: Dict, args, checkpoint: Optional[str] = None) -> Dict:
    r"""Trains one model; with :obj:`checkpoint`, saves its state there at
    every evaluation (and the curve so far beside it, as JSON) and resumes
    from it when it exists."""
    hierarchy = Hierarchy.from_parent(data['parent'], args.num_nodes)
    x, y, split = data['x'], data['y'], data['split']
    # SAGEConv aggregates by a sparse product instead of one message per edge
    # ([E, F], 2 GB at 1 M nodes); the graph is symmetric, so adj_t = adj
    edge_index = to_torch_csr_tensor(data['edge_index'], size=(args.num_nodes, args.num_nodes))
    train, valid, test = (split == 0), (split == 1), (split == 2)
    set_seed(seed)
    model = build_model(kind, args)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
    state = {'epoch': 0, 'history': [], 'step_seconds': [], 'eval_seconds': [],
             'best': {'valid_acc': -1.0}, 'stale': 0, 'load_start': list(os.getloadavg()),
             'resumed_at': []}
    if checkpoint and osp.isfile(checkpoint):
        saved = torch.load(checkpoint, weights_only=False)
        for owner, key in ((model, 'model'), (optimizer, 'optimizer'), (schedule, 'schedule')):
            owner.load_state_dict(saved.pop(key))
        state = saved
        state['resumed_at'].append(state['epoch'])
    history, step_seconds, eval_seconds = (state[k] for k in ('history', 'step_seconds',
                                                             'eval_seconds'))
    epoch = state['epoch']
    while epoch < args.epochs and state['stale'] < args.patience:
        epoch += 1
        started = time.perf_counter()
        model.train()
        optimizer.zero_grad()
        out = model(x, edge_index, hierarchy)
        loss = F.cross_entropy(out[train], y[train])
        loss.backward()
        optimizer.step()
        schedule.step()
        step_seconds.append(time.perf_counter() - started)
        if epoch % args.eval_every and epoch != args.epochs:
            continue
        started = time.perf_counter()
        model.eval()
        with torch.no_grad():
            correct = model(x, edge_index, hierarchy).argmax(-1) == y
        eval_seconds.append(time.perf_counter() - started)
        row = {'epoch': epoch, 'loss': loss.item(),
               **{f'{name}_acc': float(correct[mask].float().mean())
                  for name, mask in (('train', train), ('valid', valid), ('test', test))}}
        history.append(row)
        print(f'{kind:16s} seed {seed} epoch {epoch:3d} loss {row["loss"]:.4f} '
              f'train {row["train_acc"]:.4f} valid {row["valid_acc"]:.4f} '
              f'test {row["test_acc"]:.4f} step {step_seconds[-1]:.2f} s', flush=True)
        if row['valid_acc'] > state['best']['valid_acc']:
            state['best'], state['stale'] = {**row, 'test_correct': pack(correct[test])}, 0
        else:
            state['stale'] += 1
        state['epoch'] = epoch
        if checkpoint:
            # the curve so far, readable while a long run goes on
            write_json(checkpoint[:-len('.pt')] + '.json',
                       {'model': kind, 'seed': seed, 'finished': False,
                        'load_average': list(os.getloadavg()),
                        'seconds_per_epoch': float(np.median(step_seconds)),
                        'best_epoch': state['best']['epoch'], 'history': history})
            save_checkpoint(checkpoint, {**state, 'model': model.state_dict(),
                                         'optimizer': optimizer.state_dict(),
                                         'schedule': schedule.state_dict()})
    best = state['best']
    return {'model': kind, 'seed': seed, 'parameters': count_parameters(model),
            'hidden': model.encode.out_features, 'epochs_run': epoch,
            'best_epoch': best['epoch'], 'valid_acc': best['valid_acc'],
            'test_acc': best['test_acc'], 'num_test': int(test.sum()),
            'test_correct': best['test_correct'],
            'seconds_per_epoch': float(np.median(step_seconds)),
            'first_epoch_seconds': step_seconds[0],
            'eval_seconds': float(np.median(eval_seconds)),
            'peak_rss_bytes': peak_rss_bytes(), 'threads': torch.get_num_threads(),
            'load_average_start': state['load_start'], 'load_average_end': list(os.getloadavg()),
            'resumed_at_epochs': state['resumed_at'], 'history': history}


def training_key(args) -> str:
    config = {k: getattr(args, k) for k in ('hidden', 'heads', 'lr', 'epochs', 'eval_every',
                                            'patience')}
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]


def run_path(args, kind: str, seed: int) -> str:
    folder = osp.join(args.cache_dir, f'runs_{args.num_nodes}_{graph_key(args)}_'
                                      f'{training_key(args)}')
    return osp.join(folder, f'run_{kind}_{seed}.json')


def checkpoint_path(args, kind: str, seed: int) -> str:
    return osp.join(osp.dirname(run_path(args, kind, seed)), f'checkpoint_{kind}_{seed}.pt')


def unfinished_run(args, kind: str, seed: int, num_test: int) -> Optional[Dict]:
    r"""An unfinished run as its checkpoint holds it, at its best
    validation epoch so far (:obj:`None` without a checkpoint)."""
    path = checkpoint_path(args, kind, seed)
    if not osp.isfile(path):
        return None
    state = torch.load(path, weights_only=False)
    model = build_model(kind, args)
    best = state['best']
    return {'model': kind, 'seed': seed, 'finished': False,
            'parameters': count_parameters(model), 'hidden': model.encode.out_features,
            'epochs_run': state['epoch'], 'best_epoch': best['epoch'],
            'valid_acc': best['valid_acc'], 'test_acc': best['test_acc'],
            'num_test': num_test, 'test_correct': best['test_correct'],
            'seconds_per_epoch': float(np.median(state['step_seconds'])),
            'peak_rss_bytes': None, 'load_average_start': state['load_start'],
            'resumed_at_epochs': state['resumed_at'], 'history': state['history']}


# ----------------------------------------------------------------- report
def select_learning_rates(runs: List[Dict]) -> Tuple[Dict[str, float], Dict[str, Dict]]:
    r"""Per model, the learning rate whose runs have the best mean
    validation accuracy over their seeds, and the grid it was chosen from
    (validation and test accuracy per learning rate)."""
    selected, grid = {}, {}
    for kind in sorted({r['model'] for r in runs}):
        rates = sorted({r['lr'] for r in runs if r['model'] == kind})
        grid[kind] = {}
        for lr in rates:
            mine = [r for r in runs if r['model'] == kind and r['lr'] == lr]
            grid[kind][repr(lr)] = {'valid_acc': mean_std([r['valid_acc'] for r in mine]),
                                    'test_acc': mean_std([r['test_acc'] for r in mine]),
                                    'seeds': [r['seed'] for r in mine]}
        selected[kind] = max(rates, key=lambda lr: grid[kind][repr(lr)]['valid_acc']['mean'])
    return selected, grid


def report(runs: List[Dict], stats: Dict, args) -> Dict:
    selected, grid = select_learning_rates(runs)
    runs = [r for r in runs if r['lr'] == selected[r['model']]]
    summary = {}
    for kind in args.models:
        mine = [r for r in runs if r['model'] == kind]
        if mine:
            summary[kind] = {
                'selected_lr': selected[kind],
                'test_acc': mean_std([r['test_acc'] for r in mine]),
                'parameters': mine[0]['parameters'], 'hidden': mine[0]['hidden'],
                'seconds_per_epoch': mean_std([r['seconds_per_epoch'] for r in mine]),
                'peak_rss_bytes': max((r['peak_rss_bytes'] for r in mine
                                       if r['peak_rss_bytes'] is not None), default=None),
                'seeds': [r['seed'] for r in mine],
                'finished': all(r['finished'] for r in mine)}

    def correct(run):
        return unpack(run['test_correct'], run['num_test'])
    comparisons = [c for c in (compare_runs(runs, 'sage_hsa', other, correct, args.resamples)
                               for other in args.models if other != 'sage_hsa') if c]
    for c in comparisons:  # with --partial, runs may stand at different epochs
        paired = [r for r in runs if r['model'] in (c['first'], c['second'])
                  and r['seed'] in c['seeds']]
        c['finished'] = all(r['finished'] for r in paired)
        c['epochs_run'] = {m: [r['epochs_run'] for r in paired if r['model'] == m]
                           for m in (c['first'], c['second'])}
    # 'lr' is one worker's rate; the report's rates are in lr_grid
    private = ('cache_dir', 'out', 'run', 'in_process', 'partial', 'lr')
    return {'config': {k: v for k, v in vars(args).items() if k not in private},
            'budget': {'epochs': args.epochs, 'patience_evaluations': args.patience,
                       'eval_every': args.eval_every,
                       'optimiser': 'Adam, cosine, learning rate per model '
                                    + ('from ' + args.lr_from if args.lr_from else
                                       'selected on validation from '
                                       + ', '.join(f'{lr:g}' for lr in sorted(
                                           {lr for rates in args.lr_grid.values()
                                            for lr in rates}))),
                       'seeds': args.seeds},
            'graph': stats, 'summary': summary, 'lr_grid': grid, 'comparisons': comparisons,
            'runs': sorted(runs, key=lambda r: (r['seed'], MODELS.index(r['model']))),
            'machine': {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(),
                        'load_average': list(os.getloadavg()), 'cpu_count': os.cpu_count(),
                        'threads': args.threads, 'torch': torch.__version__,
                        'python': platform.python_version(),
                        'command': ' '.join([osp.basename(sys.executable)] + sys.argv)}}


# ------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description='hierarchical planted partition, built tree')
    p.add_argument('--num-nodes', type=int, default=131072)
    p.add_argument('--degrees', default='3,2,1,1',
                   help='partners per node within its group of 64, 512, ..., then anywhere')
    p.add_argument('--label-size', type=int, default=4096)
    p.add_argument('--classes', type=int, default=4)
    p.add_argument('--features', type=int, default=16)
    p.add_argument('--noise', type=float, default=2.0)
    p.add_argument('--graph-seed', type=int, default=0)
    p.add_argument('--label-seed', type=int, default=None)
    p.add_argument('--max-children', type=int, default=8)
    p.add_argument('--models', default=','.join(MODELS))
    p.add_argument('--seeds', default='0,1,2')
    p.add_argument('--hidden', type=int, default=32)
    p.add_argument('--heads', type=int, default=4)
    p.add_argument('--lr', default='0.02',
                   help='learning rate, or several comma-separated: each model trains at '
                        'each, and the report takes the best on validation per model')
    p.add_argument('--lr-from', default=None, metavar='REPORT',
                   help="train every model at the learning rate REPORT (this script's "
                        'JSON, from a grid of them) selected for it')
    p.add_argument('--epochs', type=int, default=200)
    p.add_argument('--eval-every', type=int, default=5)
    p.add_argument('--patience', type=int, default=8, help='evaluations without improvement')
    p.add_argument('--resamples', type=int, default=1000)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--cache-dir', default=osp.join(osp.expanduser('~'), '.cache', 'hsa_geo',
                                                   'planted'))
    p.add_argument('--in-process', action='store_true',
                   help='train every run in this process (peak memory then shared)')
    p.add_argument('--partial', action='store_true',
                   help='train nothing: report the finished runs and, of the unfinished, '
                        'their best validation epoch so far (flagged finished: false)')
    p.add_argument('--run', default=None, help=argparse.SUPPRESS)  # MODEL:SEED, one worker
    p.add_argument('--out', default=None)
    args = p.parse_args(argv)
    args.degrees = [int(d) for d in args.degrees.split(',') if d]
    args.models = [m for m in args.models.split(',') if m]
    unknown = set(args.models) - set(MODELS)
    if unknown:
        p.error(f'unknown models {sorted(unknown)}; choose from {list(MODELS)}')
    args.seeds = [int(s) for s in args.seeds.split(',') if s]
    args.lr_grid = learning_rates(p, args)
    # the rate train_one uses: a worker's one --lr (main hands every run its
    # own, with_lr); the report lists the grid
    args.lr = args.lr_grid[args.models[0]][0] if args.models else float(args.lr.split(',')[0])
    return args


def learning_rates(parser, args) -> Dict[str, List[float]]:
    r"""The learning rates every model trains at: those of ``--lr``, or the
    one ``--lr-from``'s report selected for it."""
    if not args.lr_from:
        rates = [float(rate) for rate in args.lr.split(',') if rate]
        if not rates or min(rates) <= 0:
            parser.error(f'--lr needs positive learning rates, got {args.lr!r}')
        return {kind: rates for kind in args.models}
    with open(args.lr_from) as handle:
        summary = json.load(handle)['summary']
    missing = [kind for kind in args.models if 'selected_lr' not in summary.get(kind, {})]
    if missing:
        parser.error(f'{args.lr_from} selected no learning rate for {missing} '
                     '(run the grid for them first)')
    return {kind: [summary[kind]['selected_lr']] for kind in args.models}


def with_lr(args, lr: float):
    r""":obj:`args` with one learning rate (a run's)."""
    return argparse.Namespace(**{**vars(args), 'lr': lr})


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_or_build(args)
    if args.run:  # a worker: one run, then exit
        kind, seed = args.run.split(':')
        seed = int(seed)
        write_json(run_path(args, kind, seed),
                   train_one(kind, seed, data, args, checkpoint_path(args, kind, seed)))
        return 0
    hierarchy = Hierarchy.from_parent(data['parent'], args.num_nodes)
    data['stats']['purity'] = purity_by_depth(hierarchy, data['group'], data['y'])
    print(json.dumps({k: v for k, v in data['stats'].items() if k != 'purity'}), flush=True)
    for row in data['stats']['purity']:
        print(row, flush=True)
    stats = data['stats']
    if not args.in_process:  # the workers load their own copy
        del data, hierarchy
    runs = []
    for seed in args.seeds:
        for kind in args.models:
            for lr in args.lr_grid[kind]:
                run_args = with_lr(args, lr)
                path = run_path(run_args, kind, seed)
                if args.partial and not osp.isfile(path):
                    unfinished = unfinished_run(run_args, kind, seed, stats['split_sizes'][2])
                    if unfinished is not None:
                        runs.append({**unfinished, 'lr': lr})
                    continue
                if not osp.isfile(path):
                    if args.in_process:
                        write_json(path, train_one(kind, seed, data, run_args))
                    else:
                        subprocess.run([sys.executable, osp.abspath(__file__), *argv,
                                        '--lr', repr(lr), '--lr-from', '',
                                        '--run', f'{kind}:{seed}'], check=True)
                with open(path) as handle:
                    runs.append({**json.load(handle), 'finished': True, 'lr': lr})
    result = report(runs, stats, args)
    write_json(args.out, result)
    for kind, row in result['summary'].items():
        print(f"{kind:16s} lr {row['selected_lr']:g} "
              f"test {row['test_acc']['mean']:.4f} ± {row['test_acc']['std']:.4f} "
              f"params {row['parameters']} {row['seconds_per_epoch']['mean']:.2f} s/epoch")
    for c in result['comparisons']:
        print(f"sage_hsa - {c['second']}: {c['difference']:+.4f} "
              f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]")
    return 0


if __name__ == '__main__':
    run_main(main)
