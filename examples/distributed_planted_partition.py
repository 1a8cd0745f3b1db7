r"""Node classification on a planted-partition graph of 4 M nodes with
exact global HSA split across ranks (``hsa_geo.distributed``).

The graph (generated, nothing downloaded): :math:`2^{22}` nodes in
communities of 64, nested 8 by 8 into larger groups (a balanced 8-ary
tree: node → 8 → 64 → 512 → 4096 → ...); edges join random pairs within a
community. Every *group of 4096 nodes* has a class; a node's 16 features
are its group's class centre plus Gaussian noise twice as large as
the distance between centres, so one node alone says little, its graph
neighbours a little more, and the mean over its group nearly everything.
Labels therefore need attention beyond the neighbourhood: over thousands
of nodes, which HSA gives in linear time, and exactly across ranks.

Rank 0 builds the hierarchy (the planted tree, as a clustering would
recover it) and partitions it (``partition_hierarchy``); each rank receives
only its shard (``scatter_shards``), generates its own nodes' features and
edges, and trains ``Linear → SAGEConv → HSAConv → Linear`` full-batch.
Every rank's loss is its share of the global mean, and the parameter
gradients are summed over ranks after backward: the update equals
single-process training on the whole graph. Edges between ranks' nodes are
not generated (the SAGE layer would need a halo exchange; HSA needs none).
A baseline without the HSA layer (``--model sage``) shows what global
attention adds.

On this machine (4 ranks on 2 cores)::

    torchrun --nproc_per_node=4 examples/distributed_planted_partition.py

On a cluster of CPU machines (2 machines x 8 processes; run on every one)::

    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK \
        --rdzv_backend=c10d --rdzv_endpoint=$MASTER_HOST:29500 \
        examples/distributed_planted_partition.py --num-nodes 134217728

On GPUs add ``--backend nccl --device cuda`` (one GPU per process; this path
has not run on a GPU here: the machine that wrote it has none).

A small run (``--num-nodes 32768 --epochs 5``) takes seconds.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import os.path as osp
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch_geometric import seed_everything
from torch_geometric.nn import SAGEConv
from torch_geometric.utils import to_undirected

from hsa_geo import Hierarchy, HSAConv
from hsa_geo.distributed import all_reduce_gradients, partition_hierarchy, scatter_shards

HERE = osp.dirname(osp.abspath(__file__))
# the examples' helpers lie beside this file, the benchmarks' one folder up
sys.path[:0] = [HERE, osp.dirname(HERE)]
import common  # noqa: E402
from benchmarks.scaling import balanced_parent  # noqa: E402
from benchmarks.timing import machine_info, peak_rss_bytes  # noqa: E402

BRANCHING, COMMUNITY, GROUP = 8, 64, 4096


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='planted partition, 4 M nodes, distributed HSA')
    p.add_argument('--num-nodes', type=int, default=2**22)
    p.add_argument('--classes', type=int, default=4)
    p.add_argument('--features', type=int, default=16)
    p.add_argument('--noise', type=float, default=2.0,
                   help='noise std relative to the distance between class centres')
    p.add_argument('--degree', type=int, default=4, help='edges drawn per node')
    p.add_argument('--hidden', type=int, default=32)
    p.add_argument('--heads', type=int, default=4)
    p.add_argument('--epochs', type=int, default=150)
    p.add_argument('--eval-every', type=int, default=10)
    p.add_argument('--lr', type=float, default=2e-2)
    p.add_argument('--model', default='hsa', choices=['hsa', 'sage'])
    p.add_argument('--energy', default='dot', choices=['dot', 'euclidean'])
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--backend', default='gloo', choices=['gloo', 'nccl'])
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'],
                   help='cuda: each process uses the GPU LOCAL_RANK (with --backend nccl)')
    p.add_argument('--out', default=None, help='JSON of the run (written by rank 0)')
    args = p.parse_args(argv)
    if args.num_nodes % GROUP:
        p.error(f'--num-nodes must be a multiple of {GROUP}')
    return args


def planted_graph(leaves: torch.Tensor, args):
    r"""Features ``[n, F]``, labels ``[n]``, a uniform number per node for
    the split ``[n]`` and the local edges ``[2, E]`` of the nodes
    :obj:`leaves` (sorted global ids). Every group of 4096 nodes is drawn
    from its own seed, so the graph is the same whatever the number of
    ranks. Edges join every node to :obj:`degree` random nodes of its
    community, which lies inside one rank's part."""
    centres = torch.randn(args.classes, args.features,
                          generator=torch.Generator().manual_seed(args.seed))
    centres *= 1.0 / (centres[0] - centres[1]).norm()  # unit distance between two centres
    x = torch.empty(leaves.numel(), args.features)
    uniform = torch.empty(leaves.numel())
    sources, targets = [], []
    group_of_leaf = leaves // GROUP
    groups = torch.unique_consecutive(group_of_leaf)
    bounds = torch.searchsorted(group_of_leaf, torch.cat([groups, groups[-1:] + 1]))
    for index, group in enumerate(groups.tolist()):
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + group)
        noise = torch.randn(GROUP, args.features, generator=generator)
        draws = torch.rand(GROUP, generator=generator)
        offset = torch.randint(COMMUNITY, (GROUP, args.degree), generator=generator)
        first, last = int(bounds[index]), int(bounds[index + 1])
        within = leaves[first:last] - group * GROUP
        x[first:last] = args.noise * noise[within]
        uniform[first:last] = draws[within]
        source = leaves[first:last, None].expand(-1, args.degree)
        sources.append(source.reshape(-1))
        targets.append((source // COMMUNITY * COMMUNITY + offset[within]).reshape(-1))
    label = (group_of_leaf * 2654435761 + args.seed) % 2**32 % args.classes
    x += centres[label]
    source, target = torch.cat(sources), torch.cat(targets)
    local_source = torch.searchsorted(leaves, source)
    local_target = torch.searchsorted(leaves, target).clamp(max=leaves.numel() - 1)
    keep = (leaves[local_target] == target) & (local_source != local_target)
    edge_index = to_undirected(torch.stack([local_source[keep], local_target[keep]]),
                               num_nodes=leaves.numel())
    return x, label, uniform, edge_index


class Model(torch.nn.Module):
    def __init__(self, args):
        super().__init__()
        self.encode = torch.nn.Linear(args.features, args.hidden)
        self.local = SAGEConv(args.hidden, args.hidden)
        self.attend = (HSAConv(args.hidden, args.hidden // args.heads, heads=args.heads,
                               energy=args.energy)
                       if args.model == 'hsa' else None)
        self.classify = torch.nn.Linear(args.hidden, args.classes)

    def forward(self, x, edge_index, shard):
        x = F.relu(self.encode(x))
        x = F.relu(self.local(x, edge_index)) + x
        if self.attend is not None:
            x = F.relu(self.attend(x, shard)) + x
        return self.classify(x)


def all_sum(*values: float, device='cpu') -> list:
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def main(argv=None) -> int:
    args = parse_args(argv)
    dist.init_process_group(args.backend, timeout=datetime.timedelta(minutes=30))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device('cpu')
    if args.device == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    seed_everything(args.seed)
    started = time.perf_counter()
    partition = None
    if rank == 0:
        hierarchy = Hierarchy.from_parent(balanced_parent(args.num_nodes, BRANCHING),
                                          args.num_nodes)
        partition = partition_hierarchy(hierarchy, world_size)
        print(f'{hierarchy}\n{partition}', flush=True)
        del hierarchy
    shard = scatter_shards(partition, src=0)
    del partition
    x, y, split, edge_index = planted_graph(shard.leaves, args)
    train, test = split < 0.5, split >= 0.8
    x, y, edge_index, train, test = (t.to(device) for t in (x, y, edge_index, train, test))
    num_train, num_test = all_sum(float(train.sum()), float(test.sum()), device=device)
    setup_s = time.perf_counter() - started
    model = Model(args).to(device)
    for parameter in model.parameters():  # the same start on every rank
        dist.broadcast(parameter.data, src=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
    history = []
    for epoch in range(1, args.epochs + 1):
        step_started = time.perf_counter()
        model.train()
        optimizer.zero_grad()
        logits = model(x, edge_index, shard)
        # this rank's share of the global mean: the summed gradients are those of the mean
        loss = F.cross_entropy(logits[train], y[train], reduction='sum') / num_train
        loss.backward()
        all_reduce_gradients(model)  # a rank whose part leaves a parameter out adds zeros
        optimizer.step()
        schedule.step()
        step_s = time.perf_counter() - step_started
        if epoch % args.eval_every and epoch != args.epochs:
            continue
        with torch.no_grad():
            model.eval()
            predicted = model(x, edge_index, shard).argmax(-1)
        total_loss, train_correct, test_correct = all_sum(
            loss.item(), float((predicted[train] == y[train]).sum()),
            float((predicted[test] == y[test]).sum()), device=device)
        history.append({'epoch': epoch, 'loss': total_loss, 'train_acc': train_correct / num_train,
                        'test_acc': test_correct / num_test, 'step_seconds': step_s})
        if rank == 0:
            print(f'epoch {epoch:3d}  loss {total_loss:.4f}  train {train_correct / num_train:.4f}'
                  f'  test {test_correct / num_test:.4f}  step {step_s:.1f} s', flush=True)
    peak = all_sum(*[float(peak_rss_bytes()) if r == rank else 0.0
                     for r in range(world_size)], device=device)
    if rank == 0 and args.out:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump({'config': vars(args), 'world_size': world_size, 'setup_s': setup_s,
                       'peak_rss_bytes_per_rank': peak, 'history': history,
                       'machine': machine_info()}, f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == '__main__':
    common.run_main(main)
