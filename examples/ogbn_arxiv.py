r"""Node classification on ogbn-arxiv (or the arxiv-format folder built
offline by ``datasets/build_offline_ogb.py``) with HSA and baselines.

Full-batch training. Models, same width / depth / epochs / optimiser:

* ``hsa``   GPS-style blocks: GraphSAGE + global HSA over one Louvain
            hierarchy of the whole graph (``from_networkx``) + FFN;
* ``gcn``, ``sage``  GCNConv / SAGEConv stacks with norms and residuals;
* ``gps``   PyG ``GPSConv`` (SAGE local + ``torch.nn.MultiheadAttention``:
            flat softmax attention over all nodes; quadratic, so only for
            small graphs such as the offline one, not the real arxiv).

Example::

    python examples/ogbn_arxiv.py --root data/offline_ogb --model hsa sage gcn gps \
        --seeds 0 1 2 --out benchmarks/results/arxiv_offline_chembl.json

``--checkpoint-dir`` / ``--resume`` behave as in ``ogbg_molhiv.py``.
"""
from __future__ import annotations

import argparse
import os.path as osp
import sys
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import common  # noqa: E402

MODELS = ('hsa', 'gcn', 'sage', 'gps')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='ogbn-arxiv: HSA vs GCN / GraphSAGE / flat attention')
    p.add_argument('--root', default='data/offline_ogb')
    p.add_argument('--dataset', default='ogbn-arxiv')
    p.add_argument('--model', nargs='+', default=['hsa'], choices=MODELS)
    p.add_argument('--seeds', type=int, nargs='+', default=[0])
    p.add_argument('--epochs', type=int, default=100)
    p.add_argument('--lr', type=float, default=5e-3)
    p.add_argument('--hidden', type=int, default=64)
    p.add_argument('--layers', type=int, default=2)
    p.add_argument('--heads', type=int, default=4)
    p.add_argument('--dropout', type=float, default=0.3)
    p.add_argument('--hierarchy', default='louvain')
    p.add_argument('--max-children', type=int, default=8)
    p.add_argument('--checkpoint-dir', default=None)
    p.add_argument('--resume', action='store_true')
    p.add_argument('--out', default=None)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--no-progress', action='store_true')
    return p.parse_args(argv)


class NodeBaseline(torch.nn.Module):
    def __init__(self, kind, in_channels, hidden, out_channels, layers, dropout, heads):
        super().__init__()
        from torch_geometric.nn import GCNConv, GPSConv, SAGEConv
        self.kind, self.dropout = kind, dropout
        self.lin_in = torch.nn.Linear(in_channels, hidden)
        self.convs = torch.nn.ModuleList()
        self.norms = torch.nn.ModuleList()
        for _ in range(layers):
            if kind == 'gcn':
                self.convs.append(GCNConv(hidden, hidden))
            elif kind == 'sage':
                self.convs.append(SAGEConv(hidden, hidden))
            else:
                self.convs.append(GPSConv(hidden, SAGEConv(hidden, hidden), heads=heads,
                                          dropout=dropout, attn_type='multihead'))
            self.norms.append(torch.nn.BatchNorm1d(hidden))
        self.head = torch.nn.Linear(hidden, out_channels)

    def forward(self, x, edge_index):
        h = F.dropout(self.lin_in(x), self.dropout, self.training)
        for conv, norm in zip(self.convs, self.norms):
            if self.kind == 'gps':
                h = conv(h, edge_index)
            else:
                h = h + F.dropout(F.relu(norm(conv(h, edge_index))), self.dropout, self.training)
        return self.head(h)


def build_model(name, args, in_channels, num_classes):
    from hsa_geo.nn.models import HSANodeModel
    if name == 'hsa':
        return HSANodeModel(in_channels, args.hidden, num_classes, num_layers=args.layers,
                            conv='sage', heads=args.heads, dropout=args.dropout)
    return NodeBaseline(name, in_channels, args.hidden, num_classes, args.layers, args.dropout,
                        args.heads)


def main(argv=None) -> int:
    from torch_geometric.utils import to_undirected
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    dataset, split, evaluator = common.load_node_dataset(args.root, args.dataset)
    data = dataset[0]
    data.x = data.x.float()
    edge_index = to_undirected(data.edge_index, num_nodes=data.num_nodes)
    hierarchy = None
    if 'hsa' in args.model:
        hierarchy = common.graph_hierarchy(data.num_nodes, edge_index, args.hierarchy,
                                           args.max_children)
        print(f"hierarchy: {hierarchy.summary()}")
    y = data.y.view(-1)
    payload: Dict[str, Any] = {'script': 'examples/ogbn_arxiv.py', 'config': vars(args),
                               'runs': []}
    for name in args.model:
        for seed in args.seeds:
            common.set_seed(seed)
            model = build_model(name, args, data.x.size(1), dataset.num_classes)
            optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
            config = common.config_of(args, {'model': name, 'seed': seed})
            history: List[Dict[str, Any]] = []
            start = 0
            ckpt = (osp.join(args.checkpoint_dir, f'{args.dataset}_{name}_seed{seed}.pt')
                    if args.checkpoint_dir else None)
            if ckpt and args.resume:
                state = common.load_checkpoint(ckpt, config)
                if state is not None:
                    model.load_state_dict(state['model'])
                    optimizer.load_state_dict(state['optimizer'])
                    common.set_rng_state(state['rng'])
                    history, start = state['history'], state['epoch'] + 1

            def forward():
                if name == 'hsa':
                    return model(data.x, edge_index, hierarchy)
                return model(data.x, edge_index)

            bar = common.progress_bar(range(start, args.epochs), not args.no_progress,
                                      desc=f'{name} seed {seed}')
            for epoch in bar:
                with common.Timer() as timer:
                    model.train()
                    out = forward()
                    loss = F.cross_entropy(out[split['train']], y[split['train']])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                model.eval()
                with torch.no_grad():
                    pred = forward().argmax(-1, keepdim=True)
                acc = {k: evaluator.eval({'y_true': data.y[split[k]],
                                          'y_pred': pred[split[k]]})['acc']
                       for k in ('train', 'valid', 'test')}
                history.append({'epoch': epoch + 1, 'train_loss': loss.item(),
                                **{f'{k}_acc': v for k, v in acc.items()},
                                'epoch_seconds': timer.seconds})
                bar.set_postfix(loss=f'{loss.item():.3f}', valid=f"{acc['valid']:.3f}")
                if ckpt:
                    common.save_checkpoint(ckpt, {
                        'config': config, 'epoch': epoch, 'history': history,
                        'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                        'rng': common.rng_state()})
            best = max(history, key=lambda r: r['valid_acc'])
            payload['runs'].append({
                'model': name, 'seed': seed, 'history': history, 'best_epoch': best['epoch'],
                'best_valid_acc': best['valid_acc'], 'test_acc_at_best_valid': best['test_acc'],
                'mean_epoch_seconds': sum(r['epoch_seconds'] for r in history) / len(history),
                'num_parameters': sum(p.numel() for p in model.parameters())})
            common.write_json(args.out, payload)
    import ogbg_molhiv
    payload['summary'] = ogbg_molhiv.summarise(payload['runs'], 'acc')
    common.write_json(args.out, payload)
    print(ogbg_molhiv.format_table(payload['summary'], 'acc'))
    return 0


if __name__ == '__main__':
    common.run_main(main)
