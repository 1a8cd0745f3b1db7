r"""Multi-modal molecules (HSA paper §4.2 in spirit): every molecule is one
record with two modalities, its atom graph and its SMILES string.

* graph:  atoms as leaves, clustered by Louvain (``from_networkx``);
* smiles: SMILES tokens (regex tokeniser) as leaves, chunked into a
          balanced tree (``chunk_sequence``);
* both are composed under one root (``compose``), and a
  :class:`~hsa_geo.nn.models.MultiModalEncoder` embeds atoms (OGB
  AtomEncoder) and tokens (token + position embeddings) into one width.

Variants, same model (GIN local layer on bonds / token neighbours + global
attention + FFN, readout at the root), width, depth, epochs and optimiser:

* ``graph``      graph only, HSA;
* ``smiles``     SMILES only, HSA;
* ``both-hsa``   both modalities, HSA over the composed tree;
* ``both-flat``  both modalities, flat softmax attention over the
                 concatenated leaves (a flat tree: exact softmax).

Data: the molhiv-format folder built by ``datasets/build_offline_ogb.py``
(real OGB loader and Evaluator; SMILES from ``mapping/mol.csv.gz``).

Example::

    python examples/multimodal_molecules.py --root data/offline_ogb --seeds 0 1 2 \
        --out benchmarks/results/multimodal_chembl.json
"""
from __future__ import annotations

import argparse
import os.path as osp
import re
import sys
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import common  # noqa: E402
from common import ExampleError  # noqa: E402

VARIANTS = ('graph', 'smiles', 'both-hsa', 'both-flat')
# The SMILES tokeniser of Schwaller et al. (Molecular Transformer).
SMILES_TOKEN = re.compile(r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|"
                          r"\/|:|~|@|\?|>|\*|\$|%[0-9]{2}|[0-9])")


def tokenize(smiles: str) -> List[str]:
    tokens = SMILES_TOKEN.findall(smiles)
    if ''.join(tokens) != smiles:
        raise ExampleError(f"cannot tokenise SMILES {smiles!r}")
    return tokens


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='graph + SMILES molecules with HSA')
    p.add_argument('--root', default='data/offline_ogb')
    p.add_argument('--dataset', default='ogbg-molhiv')
    p.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=VARIANTS)
    p.add_argument('--seeds', type=int, nargs='+', default=[0])
    p.add_argument('--epochs', type=int, default=15)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--hidden', type=int, default=64)
    p.add_argument('--layers', type=int, default=2)
    p.add_argument('--heads', type=int, default=4)
    p.add_argument('--dropout', type=float, default=0.1)
    p.add_argument('--chunk-size', type=int, default=4, help='SMILES tokens per chunk')
    p.add_argument('--max-children', type=int, default=8)
    p.add_argument('--limit-train', type=int, default=None)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--out', default=None)
    p.add_argument('--no-progress', action='store_true')
    return p.parse_args(argv)


def build_records(dataset, smiles: List[str], vocab: Dict[str, int], args,
                  progress: bool) -> Dict[str, List]:
    r"""Four views of every molecule, one per variant (NestedSignals)."""
    from hsa_geo.data import NestedSignal
    from hsa_geo.hierarchy import Hierarchy, chunk_sequence, compose
    records: Dict[str, List] = {v: [] for v in VARIANTS}
    for index in common.progress_bar(range(len(dataset)), progress, desc='molecule records',
                                     leave=False):
        data = dataset[index]
        n_atoms = data.num_nodes
        tokens = tokenize(smiles[index])
        ids = torch.tensor([vocab.get(t, 1) for t in tokens])
        n_tok = ids.numel()
        x_atom = data.x.long()
        x_tok = torch.zeros(n_tok, x_atom.size(1), dtype=torch.long)
        x_tok[:, 0], x_tok[:, 1] = ids, torch.arange(n_tok)
        bonds = data.edge_index
        src = torch.arange(n_tok - 1)
        chain = torch.cat([torch.stack([src, src + 1]), torch.stack([src + 1, src])], 1)
        h_graph = common.graph_hierarchy(n_atoms, bonds, 'louvain', args.max_children)
        h_seq = chunk_sequence(n_tok, args.chunk_size, max_children=args.max_children) \
            if n_tok > 1 else None
        y = data.y
        records['graph'].append(NestedSignal.from_hierarchy(
            x_atom, h_graph, edge_index=bonds, y=y,
            modality=torch.zeros(n_atoms, dtype=torch.long)))
        h_seq = h_seq if h_seq is not None else Hierarchy.flat(n_tok)
        records['smiles'].append(NestedSignal.from_hierarchy(
            x_tok, h_seq, edge_index=chain, y=y, modality=torch.ones(n_tok, dtype=torch.long)))
        composed = compose({'graph': h_graph, 'smiles': h_seq})
        x_both = torch.cat([x_atom, x_tok])
        edges = torch.cat([bonds, chain + n_atoms], 1)
        records['both-hsa'].append(NestedSignal.from_hierarchy(
            x_both, composed.hierarchy, edge_index=edges, y=y, modality=composed.modality))
        records['both-flat'].append(NestedSignal.from_hierarchy(
            x_both, Hierarchy.flat(n_atoms + n_tok), edge_index=edges, y=y,
            modality=composed.modality))
    return records


def build_model(args, vocab_size: int, num_tasks: int):
    from hsa_geo.nn.models import (AtomFeatureEncoder, HSAGraphModel, MultiModalEncoder,
                                   TokenEncoder)
    encoder = MultiModalEncoder({'graph': AtomFeatureEncoder(args.hidden),
                                 'smiles': TokenEncoder(vocab_size, args.hidden)}, args.hidden)
    return HSAGraphModel(encoder, args.hidden, num_tasks, num_layers=args.layers, conv='gin',
                         heads=args.heads, dropout=args.dropout, readout='hierarchy')


def forward(model, batch):
    from hsa_geo.data import hierarchy_from_data
    hierarchy = hierarchy_from_data(batch)
    return model(batch.x, batch.edge_index, hierarchy, num_graphs=batch.num_graphs,
                 modality=batch.modality)


@torch.no_grad()
def evaluate(model, loader, evaluator):
    model.eval()
    ys, preds = [], []
    for batch in loader:
        preds.append(forward(model, batch))
        ys.append(batch.y.view(preds[-1].shape).float())
    try:
        return evaluator.eval({'y_true': torch.cat(ys), 'y_pred': torch.cat(preds)})
    except RuntimeError as e:
        return {evaluator.eval_metric: float('nan'), 'note': str(e)}


def main(argv=None) -> int:
    import pandas as pd
    from torch_geometric.loader import DataLoader
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    dataset, split, evaluator = common.load_graph_dataset(args.root, args.dataset)
    mapping = osp.join(args.root, args.dataset.replace('-', '_'), 'mapping', 'mol.csv.gz')
    if not osp.isfile(mapping):
        raise ExampleError(f"{mapping} not found: the SMILES of every graph are needed")
    smiles = pd.read_csv(mapping)['smiles'].tolist()
    if len(smiles) != len(dataset):
        raise ExampleError(f"{mapping} has {len(smiles)} SMILES for {len(dataset)} graphs")
    counts: Dict[str, int] = {}
    for i in split['train'].tolist():
        for t in tokenize(smiles[i]):
            counts[t] = counts.get(t, 0) + 1
    vocab = {t: i + 2 for i, t in enumerate(sorted(counts))}  # 0 pad, 1 unknown
    records = build_records(dataset, smiles, vocab, args, not args.no_progress)
    metric = evaluator.eval_metric
    payload: Dict[str, Any] = {'script': 'examples/multimodal_molecules.py',
                               'argv': sys.argv[1:] if argv is None else argv,
                               'config': vars(args), 'vocab_size': len(vocab) + 2, 'runs': []}
    for variant in args.variants:
        for seed in args.seeds:
            subset = {k: [records[variant][int(i)] for i in split[k]] for k in split}
            if args.limit_train is not None:
                subset['train'] = subset['train'][:args.limit_train]
            common.set_seed(seed)
            model = build_model(args, len(vocab) + 2, dataset.num_tasks)
            optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
            generator = torch.Generator().manual_seed(seed)
            train_loader = DataLoader(subset['train'], batch_size=args.batch_size, shuffle=True,
                                      generator=generator)
            valid_loader = DataLoader(subset['valid'], batch_size=256)
            test_loader = DataLoader(subset['test'], batch_size=256)
            history = []
            for epoch in range(args.epochs):
                model.train()
                total, count = 0.0, 0
                with common.Timer() as timer:
                    for batch in common.progress_bar(
                            train_loader, not args.no_progress, leave=False,
                            desc=f'{variant} seed {seed} epoch {epoch + 1}'):
                        out = forward(model, batch)
                        loss = F.binary_cross_entropy_with_logits(
                            out, batch.y.view(out.shape).float())
                        optimizer.zero_grad()
                        loss.backward()
                        optimizer.step()
                        total += loss.item() * batch.num_graphs
                        count += batch.num_graphs
                valid = evaluate(model, valid_loader, evaluator)[metric]
                test = evaluate(model, test_loader, evaluator)[metric]
                history.append({'epoch': epoch + 1, 'train_loss': total / max(count, 1),
                                f'valid_{metric}': valid, f'test_{metric}': test,
                                'epoch_seconds': timer.seconds})
            best = max(history, key=lambda r: r[f'valid_{metric}']
                       if r[f'valid_{metric}'] == r[f'valid_{metric}'] else -1)
            payload['runs'].append({
                'model': variant, 'seed': seed, 'history': history, 'best_epoch': best['epoch'],
                f'best_valid_{metric}': best[f'valid_{metric}'],
                f'test_{metric}_at_best_valid': best[f'test_{metric}'],
                'mean_epoch_seconds': sum(r['epoch_seconds'] for r in history) / len(history),
                'num_parameters': sum(p.numel() for p in model.parameters()),
                'mean_leaves': sum(r.num_nodes for r in records[variant]) / len(records[variant]),
            })
            common.write_json(args.out, payload)
    import ogbg_molhiv
    payload['summary'] = ogbg_molhiv.summarise(payload['runs'], metric)
    common.write_json(args.out, payload)
    print(ogbg_molhiv.format_table(payload['summary'], metric))
    if args.out:
        print(f"metrics written to {args.out}")
    return 0


if __name__ == '__main__':
    common.run_main(main)
