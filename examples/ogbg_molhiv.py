r"""Graph classification on ogbg-molhiv (or an OGB-format folder built
offline by ``datasets/build_offline_ogb.py``) with HSA and baselines.

Models, same hidden width / depth / epochs / optimiser:

* ``hsa``      GPS-style blocks: GINE (bond features) + global HSA over a
               Louvain hierarchy of each molecule + FFN; readout at the root
               of the hierarchy (:class:`hsa_geo.nn.HierarchyReadout`).
* ``hsa-flat`` the same model over a flat tree per molecule (exact softmax
               attention over all atoms, through the same HSA code).
* ``gcn``, ``gin``  AtomEncoder + GCNConv / GINEConv (BondEncoder), mean pool.
* ``gps``      PyG ``GPSConv`` (GINE local + ``torch.nn.MultiheadAttention``,
               flat softmax global attention), mean pool.

Examples::

    python datasets/build_offline_ogb.py --out data/offline_ogb
    python examples/ogbg_molhiv.py --root data/offline_ogb --model hsa --seeds 0 1 2
    python examples/ogbg_molhiv.py --root data/offline_ogb --model gin gcn gps hsa \
        --epochs 30 --out benchmarks/results/molhiv_offline.json
    torchrun --nproc_per_node=2 examples/ogbg_molhiv.py --root data/offline_ogb --model hsa

Checkpoints (``--checkpoint-dir``, one file per model and seed, written
every epoch) and ``--resume``: an interrupted run continues from its last
finished epoch and ends with the same numbers as an uninterrupted one. A
checkpoint written under other options is refused with the differing
options named.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import common  # noqa: E402
from common import ExampleError  # noqa: E402

HSA_MODELS = ('hsa', 'hsa-flat')
MODELS = ('hsa', 'hsa-flat', 'gcn', 'gin', 'gps')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description='ogbg-molhiv: HSA vs GCN / GIN / flat attention')
    p.add_argument('--root', default='data/offline_ogb', help='folder holding ogbg_molhiv/')
    p.add_argument('--dataset', default='ogbg-molhiv')
    p.add_argument('--model', nargs='+', default=['hsa'], choices=MODELS)
    p.add_argument('--seeds', type=int, nargs='+', default=[0])
    p.add_argument('--epochs', type=int, default=30)
    p.add_argument('--batch-size', type=int, default=32, help='global batch (split over ranks)')
    p.add_argument('--workers', type=int, default=0,
                   help='DataLoader worker processes (HSA plans each batch there; default: 0)')
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--weight-decay', type=float, default=0.0)
    p.add_argument('--hidden', type=int, default=64)
    p.add_argument('--layers', type=int, default=3)
    p.add_argument('--heads', type=int, default=4)
    p.add_argument('--dropout', type=float, default=0.1)
    p.add_argument('--norm', default='batch_norm', help="batch_norm, layer_norm or none")
    p.add_argument('--readout', default='hierarchy', choices=['hierarchy', 'mean', 'sum'],
                   help='graph readout of the HSA models')
    p.add_argument('--hierarchy', default='louvain', help='builder method for AddHierarchy')
    p.add_argument('--max-children', type=int, default=8)
    p.add_argument('--limit-train', type=int, default=None,
                   help='train on the first LIMIT training graphs only (quick runs, tests)')
    p.add_argument('--max-steps', type=int, default=None,
                   help='stop each seed after this many optimiser steps (tests)')
    p.add_argument('--checkpoint-dir', default=None)
    p.add_argument('--resume', action='store_true')
    p.add_argument('--out', default=None, help='JSON of per-epoch metrics and the summary')
    p.add_argument('--cpu', action='store_true', help='stay on the CPU even with a GPU')
    p.add_argument('--threads', type=int, default=1,
                   help='torch CPU threads; 1 is much faster for HSA\'s many small ops on a '
                        'shared machine (default: 1; 0 keeps torch\'s default)')
    p.add_argument('--no-deterministic', action='store_true',
                   help='allow nondeterministic (multi-threaded) reductions: faster, but an '
                        'interrupted run then resumes only to within float noise')
    p.add_argument('--no-progress', action='store_true')
    args = p.parse_args(argv)
    if args.norm == 'none':
        args.norm = None
    return args


# ------------------------------------------------------------------ models
class MolBaseline(torch.nn.Module):
    r"""AtomEncoder + ``num_layers`` convs (GCN, GINE or PyG GPSConv with
    multi-head softmax attention) with residuals, then mean pooling."""

    def __init__(self, kind: str, hidden: int, out_channels: int, num_layers: int,
                 dropout: float, norm: Optional[str], heads: int):
        super().__init__()
        from ogb.graphproppred.mol_encoder import AtomEncoder, BondEncoder
        from torch_geometric.nn import GCNConv, GINEConv, GPSConv
        from torch_geometric.nn.resolver import normalization_resolver
        from hsa_geo.nn.models import resolve_local_conv
        self.kind = kind
        self.dropout = dropout
        self.atom = AtomEncoder(hidden)
        self.bond = BondEncoder(hidden) if kind in ('gin', 'gps') else None
        self.convs = torch.nn.ModuleList()
        self.norms = torch.nn.ModuleList()
        for _ in range(num_layers):
            if kind == 'gcn':
                self.convs.append(GCNConv(hidden, hidden))
            elif kind == 'gin':
                self.convs.append(resolve_local_conv('gine', hidden, hidden, norm))
            elif kind == 'gps':
                local = resolve_local_conv('gine', hidden, hidden, norm)
                self.convs.append(GPSConv(hidden, local, heads=heads, dropout=dropout,
                                          attn_type='multihead', norm=norm))
            else:
                raise ValueError(kind)
            self.norms.append(normalization_resolver(norm, hidden) if kind != 'gps' and norm
                              else torch.nn.Identity())
        self.head = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                                        torch.nn.Dropout(dropout),
                                        torch.nn.Linear(hidden, out_channels))

    def forward(self, x, edge_index, edge_attr, batch, num_graphs):
        from torch_geometric.nn import global_mean_pool
        h = self.atom(x)
        e = self.bond(edge_attr) if self.bond is not None else None
        for conv, norm in zip(self.convs, self.norms):
            if self.kind == 'gcn':
                out = conv(h, edge_index)
            elif self.kind == 'gin':
                out = conv(h, edge_index, edge_attr=e)
            else:
                out = conv(h, edge_index, batch, edge_attr=e)
            if self.kind != 'gps':  # GPSConv has its own residuals and norms
                out = F.dropout(F.relu(norm(out)), self.dropout, self.training) + h
            h = out
        return self.head(global_mean_pool(h, batch, num_graphs))


def build_model(name: str, args, num_tasks: int) -> torch.nn.Module:
    from ogb.graphproppred.mol_encoder import AtomEncoder, BondEncoder
    from hsa_geo.nn.models import HSAGraphModel
    if name in HSA_MODELS:
        return HSAGraphModel(AtomEncoder(args.hidden), args.hidden, num_tasks,
                             num_layers=args.layers, conv='gine', heads=args.heads,
                             dropout=args.dropout, norm=args.norm, readout=args.readout,
                             edge_encoder=BondEncoder(args.hidden))
    return MolBaseline(name, args.hidden, num_tasks, args.layers, args.dropout, args.norm,
                       args.heads)


def model_forward(name: str, model, batch) -> torch.Tensor:
    from hsa_geo.data import hierarchy_from_data
    from hsa_geo.nn.models import flat_hierarchy
    if name == 'hsa':
        hierarchy = hierarchy_from_data(batch)
        return model(batch.x, batch.edge_index, hierarchy, batch.edge_attr,
                     num_graphs=batch.num_graphs)
    if name == 'hsa-flat':
        hierarchy = flat_hierarchy(batch.batch, batch.num_graphs)
        return model(batch.x, batch.edge_index, hierarchy, batch.edge_attr,
                     num_graphs=batch.num_graphs)
    return model(batch.x, batch.edge_index, batch.edge_attr, batch.batch, batch.num_graphs)


# ---------------------------------------------------------------- training
@torch.no_grad()
def evaluate(name, model, loader, evaluator, device=None) -> Dict[str, float]:
    model.eval()
    ys, preds = [], []
    for batch in loader:
        batch = batch.to(device) if device is not None else batch
        preds.append(model_forward(name, model, batch).cpu())
        ys.append(batch.y.view(preds[-1].shape).float().cpu())
    y_true, y_pred = torch.cat(ys), torch.cat(preds)
    try:
        return evaluator.eval({'y_true': y_true, 'y_pred': y_pred})
    except RuntimeError as e:  # OGB refuses a split with one class only
        return {evaluator.eval_metric: float('nan'), 'note': str(e)}


def prepare_data(args, models: List[str], dist_info: Dict[str, Any]):
    dataset, split, evaluator = common.load_graph_dataset(args.root, args.dataset)
    data = {'plain': dataset}
    if any(m == 'hsa' for m in models):
        train = split['train'].tolist()
        if args.limit_train is not None:
            train = train[:args.limit_train]
        needed = sorted(set(train) | set(split['valid'].tolist()) | set(split['test'].tolist()))
        nested = common.attach_hierarchies(
            [dataset[i] for i in needed], args.hierarchy, args.max_children, seed=0,
            progress=not args.no_progress and dist_info['rank'] == 0,
            desc='building hierarchies')
        data['nested'] = dict(zip(needed, nested))
    return dataset, data, split, evaluator


def run_seed(name: str, seed: int, args, dataset, data, split, evaluator,
             dist_info: Dict[str, Any]) -> Dict[str, Any]:
    device = dist_info['device']
    from torch.utils.data import DistributedSampler
    from functools import partial

    from torch_geometric.loader import DataLoader
    from tqdm.auto import tqdm

    from hsa_geo.loader import HierarchyLoader

    world, rank = dist_info['world_size'], dist_info['rank']
    if args.batch_size % world:
        raise ExampleError(f"--batch-size {args.batch_size} must be divisible by the "
                           f"{world} processes")
    graphs = data['nested'] if name == 'hsa' else data['plain']
    indices = {k: split[k].tolist() for k in ('train', 'valid', 'test')}
    if args.limit_train is not None:
        indices['train'] = indices['train'][:args.limit_train]
    subset = {k: [graphs[i] for i in idx] for k, idx in indices.items()}
    common.set_seed(seed)
    model = build_model(name, args, dataset.num_tasks).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    config = common.config_of(args, {'model': name, 'seed': seed, 'world_size': world})

    history: List[Dict[str, Any]] = []
    start_epoch, steps = 0, 0
    ckpt = (osp.join(args.checkpoint_dir, f'{args.dataset}_{name}_seed{seed}.pt')
            if args.checkpoint_dir else None)
    if ckpt and args.resume:
        state = common.load_checkpoint(ckpt, config)
        if state is not None:
            model.load_state_dict(state['model'])
            model.to(device)
            optimizer.load_state_dict(state['optimizer'])
            common.set_rng_state(state['rng'])
            history, start_epoch, steps = state['history'], state['epoch'] + 1, state['steps']
            if rank == 0:
                print(f"[{name} seed {seed}] resumed from {ckpt} after epoch {state['epoch']}")
    elif ckpt and osp.isfile(ckpt) and rank == 0:
        print(f"[{name} seed {seed}] note: overwriting {ckpt} (pass --resume to continue it)")

    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    sampler = DistributedSampler(subset['train'], num_replicas=world, rank=rank, shuffle=True,
                                 seed=seed)
    # HSA's batches come with their forest and sweep layout planned by the
    # loader (in its workers, with --workers > 0), not in the training step
    loader = partial(HierarchyLoader, layout_device=device) if name == 'hsa' else DataLoader
    # workers that outlive an epoch: no process start in every epoch's time
    train_loader = loader(subset['train'], batch_size=args.batch_size // world, sampler=sampler,
                          num_workers=args.workers, persistent_workers=args.workers > 0)
    valid_loader = loader(subset['valid'], batch_size=256)
    test_loader = loader(subset['test'], batch_size=256)
    metric = evaluator.eval_metric

    for epoch in range(start_epoch, args.epochs):
        if args.max_steps is not None and steps >= args.max_steps:
            break
        sampler.set_epoch(epoch)
        train_model.train()
        total, count = 0.0, 0
        with common.Timer() as timer:
            bar = common.progress_bar(train_loader, not args.no_progress and rank == 0,
                                      desc=f'{name} seed {seed} epoch {epoch + 1}/{args.epochs}',
                                      leave=False)
            for batch in bar:
                batch = batch.to(device)
                out = model_forward(name, train_model, batch)
                y = batch.y.view(out.shape).float()
                labelled = y == y
                loss = F.binary_cross_entropy_with_logits(out[labelled], y[labelled])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                steps += 1
                total += loss.item() * batch.num_graphs
                count += batch.num_graphs
                bar.set_postfix(loss=f'{total / count:.4f}')
                if args.max_steps is not None and steps >= args.max_steps:
                    break
        valid = evaluate(name, model, valid_loader, evaluator, device)
        test = evaluate(name, model, test_loader, evaluator, device)
        record = {'epoch': epoch + 1, 'steps': steps,
                  'train_loss': common.mean_over_ranks(total, count, device),
                  f'valid_{metric}': valid[metric], f'test_{metric}': test[metric],
                  'epoch_seconds': timer.seconds}
        history.append(record)
        if rank == 0:
            if args.no_progress is False:
                tqdm.write(f"[{name} seed {seed}] epoch {epoch + 1}: loss {record['train_loss']:.4f} "
                           f"valid {metric} {valid[metric]:.4f} test {test[metric]:.4f} "
                           f"({timer.seconds:.1f}s)")
            if ckpt:
                common.save_checkpoint(ckpt, {
                    'config': config, 'epoch': epoch, 'steps': steps, 'history': history,
                    'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                    'rng': common.rng_state()})
    return summarise_run(name, seed, history, metric, model)


def summarise_run(name, seed, history, metric, model) -> Dict[str, Any]:
    valid_key, test_key = f'valid_{metric}', f'test_{metric}'
    scored = [r for r in history if r[valid_key] == r[valid_key]]
    best = max(scored, key=lambda r: r[valid_key]) if scored else (history[-1] if history else None)
    times = [r['epoch_seconds'] for r in history]
    return {
        'model': name, 'seed': seed, 'history': history,
        'best_epoch': best['epoch'] if best else None,
        f'best_valid_{metric}': best[valid_key] if best else None,
        f'test_{metric}_at_best_valid': best[test_key] if best else None,
        'final_state': {k: v.detach().clone() for k, v in model.state_dict().items()},
        'mean_epoch_seconds': sum(times) / len(times) if times else None,
        'num_parameters': sum(p.numel() for p in model.parameters()),
    }


def summarise(runs: List[Dict[str, Any]], metric: str) -> Dict[str, Dict[str, Any]]:
    table: Dict[str, Dict[str, Any]] = {}
    for name in dict.fromkeys(r['model'] for r in runs):
        mine = [r for r in runs if r['model'] == name]
        table[name] = {
            f'test_{metric}': common.mean_std([100 * r[f'test_{metric}_at_best_valid'] for r in mine]),
            f'valid_{metric}': common.mean_std([100 * r[f'best_valid_{metric}'] for r in mine]),
            'epoch_seconds': common.mean_std([r['mean_epoch_seconds'] for r in mine]),
            'num_parameters': mine[0]['num_parameters'],
        }
    return table


def format_table(table: Dict[str, Dict[str, Any]], metric: str) -> str:
    lines = [f"{'model':<10} {'test ' + metric:>18} {'valid ' + metric:>18} {'s/epoch':>9} "
             f"{'params':>8} {'seeds':>5}",
             '-' * 74]
    for name, row in table.items():
        t, v, s = row[f'test_{metric}'], row[f'valid_{metric}'], row['epoch_seconds']
        lines.append(f"{name:<10} {t['mean']:>10.2f} ± {t['std']:<5.2f} {v['mean']:>10.2f} ± "
                     f"{v['std']:<5.2f} {s['mean']:>9.2f} {row['num_parameters']:>8d} {t['n']:>5d}")
    return '\n'.join(lines)


def run(args) -> Dict[str, Any]:
    if args.cpu:
        os.environ['HSA_GEO_FORCE_GLOO'] = '1'
    dist_info = common.init_distributed()
    use_cuda = torch.cuda.is_available() and not args.cpu
    dist_info['device'] = (torch.device('cuda', dist_info['local_rank']) if use_cuda
                           else torch.device('cpu'))
    if use_cuda:
        torch.cuda.set_device(dist_info['device'])
    if args.threads:
        torch.set_num_threads(args.threads)
    # Multi-threaded scatter reductions sum in varying order; the resulting
    # 1e-7 differences grow over an epoch, so resume would not be exact.
    # On CUDA some ops have no deterministic kernel: warn there instead of failing.
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(not args.no_deterministic, warn_only=use_cuda)
    try:
        dataset, data, split, evaluator = prepare_data(args, args.model, dist_info)
        metric = evaluator.eval_metric
        runs = []
        payload: Dict[str, Any] = {'script': 'examples/ogbg_molhiv.py', 'argv': sys.argv[1:],
                                   'config': vars(args), 'world_size': dist_info['world_size'],
                                   'runs': []}
        # seed-major: the models take turns, so a slow phase of a shared
        # host does not fall on one model's runs only (seconds per epoch are
        # compared across models)
        for seed in args.seeds:
            for name in args.model:
                result = run_seed(name, seed, args, dataset, data, split, evaluator, dist_info)
                runs.append(result)
                payload['runs'].append({k: v for k, v in result.items() if k != 'final_state'})
                if dist_info['rank'] == 0:
                    common.write_json(args.out, payload)
        payload['summary'] = summarise(runs, metric)
        if dist_info['rank'] == 0:
            common.write_json(args.out, payload)
            if not getattr(args, 'quiet_table', False):  # the demo prints its own
                print(format_table(payload['summary'], metric))
            if args.out:
                print(f"metrics written to {args.out}")
        payload['_runs'] = runs
        return payload
    finally:
        common.finish_distributed(dist_info)


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == '__main__':
    common.run_main(main)
