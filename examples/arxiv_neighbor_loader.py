r"""Node classification on ogbn-arxiv (or the arxiv-format folder built
offline by ``datasets/build_offline_ogb.py``) with HSA in mini-batches of
PyG's :class:`~torch_geometric.loader.NeighborLoader`, the way large graphs
are trained.

The hierarchy is built once over the whole graph
(:class:`~hsa_geo.transforms.AddHierarchy`, METIS or Louvain). Every batch
holds a few seed nodes and their sampled neighbours; its nodes carry their
leaves (``hierarchy_leaf``, selected by PyG with the other node
attributes), so :func:`~hsa_geo.data.hierarchy_from_data` gives the tree
restricted to them, and HSA attends among the batch's nodes with the
blocks of the whole graph's tree. The loss and the predictions are those
of the seed nodes (the first ``batch.batch_size`` rows).

Needs a sampler backend for NeighborLoader: ``torch-sparse`` (``make
sampler`` builds it) or ``pyg-lib``.

Example::

    python examples/arxiv_neighbor_loader.py --root data/offline_ogb --epochs 5
"""
from __future__ import annotations

import argparse
import os.path as osp
import sys
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='ogbn-arxiv with HSA in NeighborLoader batches')
    p.add_argument('--root', default='data/offline_ogb')
    p.add_argument('--dataset', default='ogbn-arxiv')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--epochs', type=int, default=10)
    p.add_argument('--max-steps', type=int, default=None,
                   help='stop each epoch after this many batches (smoke tests)')
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--num-neighbors', type=int, nargs='+', default=[10, 5])
    p.add_argument('--lr', type=float, default=5e-3)
    p.add_argument('--hidden', type=int, default=64)
    p.add_argument('--layers', type=int, default=2)
    p.add_argument('--heads', type=int, default=4)
    p.add_argument('--dropout', type=float, default=0.3)
    p.add_argument('--hierarchy', default='metis')
    p.add_argument('--max-children', type=int, default=8)
    p.add_argument('--out', default=None)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--no-progress', action='store_true')
    return p.parse_args(argv)


def check_sampler_backend() -> None:
    r"""NeighborLoader samples with pyg-lib or torch-sparse: say so up
    front rather than at the first batch."""
    import torch_geometric.typing as pyg_typing
    if not (pyg_typing.WITH_PYG_LIB or pyg_typing.WITH_TORCH_SPARSE):
        raise common.ExampleError(
            "NeighborLoader needs a sampler backend: install torch-sparse "
            "(make sampler, or pip install --no-build-isolation torch-sparse: 30-60 minutes "
            "to compile on two cores) "
            "or pyg-lib")


def nested_graph(data, method: str, max_children: int, seed: int):
    r"""The whole graph, undirected, as a nested signal: every node knows its
    leaf of the hierarchy, so sampled batches get the tree restricted to
    them."""
    from torch_geometric.data import Data
    from torch_geometric.utils import to_undirected

    from hsa_geo.transforms import AddHierarchy
    graph = Data(x=data.x.float(), y=data.y.view(-1),
                 edge_index=to_undirected(data.edge_index, num_nodes=data.num_nodes))
    return AddHierarchy(method, max_children=max_children, seed=seed)(graph)


def batches(graph, nodes, args, shuffle: bool):
    from torch_geometric.loader import NeighborLoader
    return NeighborLoader(graph, num_neighbors=args.num_neighbors, batch_size=args.batch_size,
                          input_nodes=nodes, shuffle=shuffle)


def seed_logits(model, batch) -> torch.Tensor:
    r"""The model on one sampled batch; rows of its seed nodes."""
    from hsa_geo.data import hierarchy_from_data
    hierarchy = hierarchy_from_data(batch)  # the whole tree, restricted to the batch
    return model(batch.x, batch.edge_index, hierarchy)[:batch.batch_size]


def train_epoch(model, optimizer, loader, max_steps: Optional[int]) -> float:
    model.train()
    total, count = 0.0, 0
    for step, batch in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        loss = F.cross_entropy(seed_logits(model, batch), batch.y[:batch.batch_size])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total, count = total + loss.item() * batch.batch_size, count + batch.batch_size
    return total / max(count, 1)


@torch.no_grad()
def accuracy(model, graph, nodes, args, evaluator) -> float:
    model.eval()
    pred, seen = [], []
    for step, batch in enumerate(batches(graph, nodes, args, shuffle=False)):
        if args.max_steps is not None and step >= args.max_steps:
            break
        pred.append(seed_logits(model, batch).argmax(-1))
        seen.append(batch.n_id[:batch.batch_size])
    seen = torch.cat(seen)
    return evaluator.eval({'y_true': graph.y[seen].view(-1, 1),
                           'y_pred': torch.cat(pred).view(-1, 1)})['acc']


def main(argv=None) -> int:
    from hsa_geo.nn.models import HSANodeModel
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    check_sampler_backend()
    dataset, split, evaluator = common.load_node_dataset(args.root, args.dataset)
    common.set_seed(args.seed)
    graph = nested_graph(dataset[0], args.hierarchy, args.max_children, args.seed)
    print(f"{graph.num_nodes} nodes, hierarchy of {int(graph.num_clusters)} clusters")
    model = HSANodeModel(graph.x.size(1), args.hidden, dataset.num_classes,
                         num_layers=args.layers, conv='sage', heads=args.heads,
                         dropout=args.dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    train_loader = batches(graph, split['train'], args, shuffle=True)
    history: List[Dict[str, Any]] = []
    bar = common.progress_bar(range(args.epochs), not args.no_progress, desc='hsa')
    for epoch in bar:
        with common.Timer() as timer:
            loss = train_epoch(model, optimizer, train_loader, args.max_steps)
        acc = {k: accuracy(model, graph, split[k], args, evaluator) for k in ('valid', 'test')}
        history.append({'epoch': epoch + 1, 'train_loss': loss,
                        **{f'{k}_acc': v for k, v in acc.items()},
                        'epoch_seconds': timer.seconds})
        bar.set_postfix(loss=f'{loss:.3f}', valid=f"{acc['valid']:.3f}")
    best = max(history, key=lambda r: r['valid_acc'])
    payload = {'script': 'examples/arxiv_neighbor_loader.py', 'config': vars(args),
               'history': history, 'best_epoch': best['epoch'],
               'best_valid_acc': best['valid_acc'], 'test_acc_at_best_valid': best['test_acc']}
    common.write_json(args.out, payload)
    print(f"best valid accuracy {best['valid_acc']:.3f} (epoch {best['epoch']}), "
          f"test {best['test_acc']:.3f}")
    return 0


if __name__ == '__main__':
    common.run_main(main)
