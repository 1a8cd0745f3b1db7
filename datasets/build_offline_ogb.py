r"""Builds OGB-format dataset folders offline from real data shipped with rdkit.

Nothing here downloads. The folders are read by the *real* OGB loaders
(:class:`ogb.graphproppred.PygGraphPropPredDataset` and
:class:`ogb.nodeproppred.PygNodePropPredDataset`), so the example scripts run
unchanged on them and, with ``--root``, on a real OGB download elsewhere.

``ogbg-molhiv`` format (``<out>/ogbg_molhiv``)
    The 1017 molecules of ChEMBL assay CHEMBL2321810 shipped in
    ``rdkit/Contrib/FreeWilson/data`` with their measured pIC50 (column
    ``Act``, merged on ``Name``). Label: ``pIC50 >= --threshold`` (default 7.0).
    Graphs from :func:`ogb.utils.smiles2graph` (the same 9 atom and 3 bond
    features as molhiv; one row per bond, OGB adds the reverse edges).
    Split: Bemis-Murcko scaffold split 80/10/10 (largest scaffold groups to
    train first, as in OGB/MoleculeNet).

``ogbn-arxiv`` format (``<out>/ogbn_arxiv``)
    A node-classification graph over the same real molecules: nodes are
    molecules, node features the 128-bit Morgan fingerprint (radius 2), a
    directed edge from every molecule to its ``--knn`` most Tanimoto-similar
    molecules (2048-bit fingerprints), label ``floor(pIC50)`` shifted to start
    at 0 (< 40 classes). Split 60/20/20 by a seeded random order, written as
    ``node_year`` so that train < valid < test in "time" as in OGB's split
    (ChEMBL compound-id order would shift the labels almost completely).

Molecules rdkit cannot parse are skipped and counted (and listed in
``<folder>/skipped.csv``). The scaffold split is computed over *all* input
rows first, an unparsable molecule forming its own singleton group, and the
skipped rows are removed afterwards, so a bad row never moves another
molecule to a different split.

Usage::

    python datasets/build_offline_ogb.py --out data/offline_ogb
    python datasets/build_offline_ogb.py --out data/offline_ogb --only molhiv --threshold 6.5
"""
from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import os
import os.path as osp
import sys
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

DEFAULT_THRESHOLD = 7.0


class DatasetBuildError(RuntimeError):
    r"""Raised with a message saying which input is missing or malformed."""


# ---------------------------------------------------------------- inputs
def chembl_paths() -> Tuple[str, str]:
    r"""Paths of rdkit's shipped CHEMBL2321810 SMILES and activity files."""
    try:
        from rdkit import RDConfig
    except ImportError as e:  # pragma: no cover - rdkit is in the data extra
        raise DatasetBuildError("rdkit is required: pip install rdkit") from e
    base = osp.join(RDConfig.RDContribDir, 'FreeWilson', 'data')
    return osp.join(base, 'CHEMBL2321810.smi'), osp.join(base, 'CHEMBL2321810_act.csv')


def read_chembl(smi_path: str, act_path: str) -> List[Tuple[str, str, float]]:
    r"""Reads ``(name, smiles, pIC50)`` rows, merged on the name, in the order
    of the SMILES file. Raises :class:`DatasetBuildError` for a missing file,
    a missing column or a non-numeric activity."""
    for path in (smi_path, act_path):
        if not osp.isfile(path):
            raise DatasetBuildError(f"input file not found: {path}")
    activity: Dict[str, float] = {}
    with open(act_path, newline='') as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {'Name', 'Act'} <= set(reader.fieldnames):
            raise DatasetBuildError(f"{act_path}: expected columns 'Name' and 'Act' "
                                    f"(got {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):
            try:
                value = float(row['Act'])
            except (TypeError, ValueError):
                raise DatasetBuildError(f"{act_path}:{line}: activity {row['Act']!r} of "
                                        f"{row['Name']!r} is not a number") from None
            if not math.isfinite(value):
                raise DatasetBuildError(f"{act_path}:{line}: activity of {row['Name']!r} "
                                        f"is {value}")
            activity[row['Name'].strip()] = value
    rows, unmatched = [], []
    with open(smi_path) as f:
        for line, text in enumerate(f, start=1):
            parts = text.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise DatasetBuildError(f"{smi_path}:{line}: expected 'SMILES NAME'")
            smiles, name = parts[0], parts[1]
            if name not in activity:
                unmatched.append(name)
                continue
            rows.append((name, smiles, activity[name]))
    if unmatched:
        print(f"[build_offline_ogb] {len(unmatched)} SMILES rows have no activity and "
              f"were left out (e.g. {unmatched[:3]})", file=sys.stderr)
    if not rows:
        raise DatasetBuildError(f"no molecule of {smi_path} has an activity in {act_path}")
    return rows


def parse_molecules(rows: Sequence[Tuple[str, str, float]]):
    r"""rdkit molecules (or :obj:`None` where rdkit cannot parse the SMILES)."""
    from rdkit import Chem, RDLogger
    RDLogger.DisableLog('rdApp.*')
    mols = [Chem.MolFromSmiles(smiles) for _, smiles, _ in rows]
    RDLogger.EnableLog('rdApp.*')
    return [m if m is not None and m.GetNumAtoms() > 0 else None for m in mols]


def scaffold_split(mols, frac=(0.8, 0.1, 0.1)) -> List[int]:
    r"""Split id (0 train, 1 valid, 2 test) of every row. Groups by
    Bemis-Murcko scaffold; groups sorted by size (then first row) fill train,
    then valid, then test. A row whose molecule is :obj:`None` is its own
    group, so dropping it later changes no other row's split."""
    from rdkit.Chem.Scaffolds import MurckoScaffold
    groups: Dict[str, List[int]] = defaultdict(list)
    for i, mol in enumerate(mols):
        key = (f'__unparsable_{i}' if mol is None else
               MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=True))
        groups[key].append(i)
    ordered = sorted(groups.values(), key=lambda g: (-len(g), g[0]))
    n = len(mols)
    train_cut, valid_cut = frac[0] * n, (frac[0] + frac[1]) * n
    split = [0] * n
    filled = [0, 0, 0]
    for group in ordered:
        if filled[0] + len(group) <= train_cut:
            which = 0
        elif filled[0] + filled[1] + len(group) <= valid_cut:
            which = 1
        else:
            which = 2
        filled[which] += len(group)
        for i in group:
            split[i] = which
    return split


# ---------------------------------------------------------------- writing
def _write_csv_gz(path: str, rows) -> None:
    os.makedirs(osp.dirname(path), exist_ok=True)
    with gzip.open(path, 'wt', newline='') as f:
        writer = csv.writer(f)
        for row in rows:
            writer.writerow(row if isinstance(row, (list, tuple)) else [row])


def _release_file(folder: str) -> None:
    # Without RELEASE_v1.txt the OGB loader asks on stdin whether to update.
    with open(osp.join(folder, 'RELEASE_v1.txt'), 'w') as f:
        f.write('Built offline by datasets/build_offline_ogb.py (hsa_geo)\n')


def _write_skipped(folder: str, rows, skipped: List[int]) -> None:
    with open(osp.join(folder, 'skipped.csv'), 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['row', 'name', 'smiles', 'reason'])
        for i in skipped:
            writer.writerow([i, rows[i][0], rows[i][1], 'rdkit could not parse the SMILES'])


def build_molhiv(out: str, rows, threshold: float = DEFAULT_THRESHOLD,
                 name: str = 'ogbg-molhiv') -> Dict[str, object]:
    r"""Writes ``<out>/ogbg_molhiv`` and returns a summary dict."""
    from ogb.utils import smiles2graph
    folder = osp.join(out, name.replace('-', '_'))
    if osp.isdir(osp.join(folder, 'processed')):
        # The OGB loader would silently reuse stale processed tensors.
        import shutil
        shutil.rmtree(osp.join(folder, 'processed'))
    raw = osp.join(folder, 'raw')
    mols = parse_molecules(rows)
    split_of_row = scaffold_split(mols)
    kept = [i for i, m in enumerate(mols) if m is not None]
    skipped = [i for i, m in enumerate(mols) if m is None]

    edges, node_feat, edge_feat, num_nodes, num_edges, labels, mapping = [], [], [], [], [], [], []
    from rdkit import Chem
    for i in kept:
        graph = smiles2graph(Chem.MolToSmiles(mols[i]))
        ei = graph['edge_index']
        one_way = ei[0] < ei[1]  # smiles2graph gives both directions of each bond
        edges.extend(ei[:, one_way].T.tolist())
        edge_feat.extend(graph['edge_feat'][one_way].tolist())
        node_feat.extend(graph['node_feat'].tolist())
        num_nodes.append(graph['num_nodes'])
        num_edges.append(int(one_way.sum()))
        label = int(rows[i][2] >= threshold)
        labels.append(label)
        mapping.append((label, rows[i][1], rows[i][0], rows[i][2]))
    _write_csv_gz(osp.join(raw, 'edge.csv.gz'), edges)
    _write_csv_gz(osp.join(raw, 'node-feat.csv.gz'), node_feat)
    _write_csv_gz(osp.join(raw, 'edge-feat.csv.gz'), edge_feat)
    _write_csv_gz(osp.join(raw, 'num-node-list.csv.gz'), num_nodes)
    _write_csv_gz(osp.join(raw, 'num-edge-list.csv.gz'), num_edges)
    _write_csv_gz(osp.join(raw, 'graph-label.csv.gz'), labels)
    new_index = {row: j for j, row in enumerate(kept)}
    for which, split_name in enumerate(('train', 'valid', 'test')):
        idx = [new_index[i] for i in kept if split_of_row[i] == which]
        _write_csv_gz(osp.join(folder, 'split', 'scaffold', f'{split_name}.csv.gz'), idx)
    os.makedirs(osp.join(folder, 'mapping'), exist_ok=True)
    with gzip.open(osp.join(folder, 'mapping', 'mol.csv.gz'), 'wt', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['HIV_active', 'smiles', 'chembl_name', 'pIC50'])
        writer.writerows(mapping)
    _write_skipped(folder, rows, skipped)
    _release_file(folder)
    summary = {
        'folder': folder, 'source': 'rdkit Contrib/FreeWilson CHEMBL2321810 (pIC50)',
        'threshold': threshold, 'num_input_rows': len(rows), 'num_graphs': len(kept),
        'num_skipped_unparsable': len(skipped),
        'skipped_by_split': {s: sum(split_of_row[i] == k for i in skipped)
                             for k, s in enumerate(('train', 'valid', 'test'))},
        'positive_fraction': float(np.mean(labels)),
        'split_sizes': {s: sum(split_of_row[i] == k for i in kept)
                        for k, s in enumerate(('train', 'valid', 'test'))},
    }
    with open(osp.join(folder, 'build_info.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    return summary


def build_arxiv(out: str, rows, knn: int = 5, name: str = 'ogbn-arxiv',
                split_seed: int = 0) -> Dict[str, object]:
    r"""Writes ``<out>/ogbn_arxiv`` (molecule-similarity graph) and returns a summary."""
    from rdkit import DataStructs
    from rdkit.Chem import rdFingerprintGenerator
    folder = osp.join(out, name.replace('-', '_'))
    if osp.isdir(osp.join(folder, 'processed')):
        import shutil
        shutil.rmtree(osp.join(folder, 'processed'))
    raw = osp.join(folder, 'raw')
    mols = parse_molecules(rows)
    kept = [i for i, m in enumerate(mols) if m is not None]
    skipped = [i for i, m in enumerate(mols) if m is None]
    if len(kept) <= knn:
        raise DatasetBuildError(f"need more than knn={knn} parsable molecules (got {len(kept)})")
    small = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=128)
    large = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    features = np.array([small.GetFingerprintAsNumPy(mols[i]) for i in kept], dtype=np.float32)
    fps = [large.GetFingerprint(mols[i]) for i in kept]
    edges = []
    for u, fp in enumerate(fps):
        sim = np.array(DataStructs.BulkTanimotoSimilarity(fp, fps))
        sim[u] = -1.0
        # stable order: most similar first, ties by node id
        for v in np.lexsort((np.arange(len(sim)), -sim))[:knn]:
            edges.append((u, int(v)))
    pic50 = np.array([rows[i][2] for i in kept])
    label = np.floor(pic50).astype(np.int64)
    label -= label.min()
    if label.max() >= 40:
        raise DatasetBuildError(f"label range {label.max() + 1} exceeds arxiv's 40 classes")
    # ChEMBL id order would be the natural "time", but in this congeneric
    # series it shifts the labels completely (the newest 20 % are almost all
    # one class), so the split is a seeded random order, written as node_year.
    order = np.random.RandomState(split_seed).permutation(len(kept))
    rank = np.empty(len(kept), dtype=np.int64)
    rank[order] = np.arange(len(kept))
    n = len(kept)
    train = np.sort(order[:int(0.6 * n)])
    valid = np.sort(order[int(0.6 * n):int(0.8 * n)])
    test = np.sort(order[int(0.8 * n):])
    _write_csv_gz(osp.join(raw, 'edge.csv.gz'), edges)
    _write_csv_gz(osp.join(raw, 'node-feat.csv.gz'), [[f'{v:.1f}' for v in r] for r in features])
    _write_csv_gz(osp.join(raw, 'node-label.csv.gz'), label.tolist())
    _write_csv_gz(osp.join(raw, 'node_year.csv.gz'), rank.tolist())
    _write_csv_gz(osp.join(raw, 'num-node-list.csv.gz'), [n])
    _write_csv_gz(osp.join(raw, 'num-edge-list.csv.gz'), [len(edges)])
    for split_name, idx in (('train', train), ('valid', valid), ('test', test)):
        _write_csv_gz(osp.join(folder, 'split', 'time', f'{split_name}.csv.gz'), idx.tolist())
    _write_skipped(folder, rows, skipped)
    _release_file(folder)
    summary = {
        'folder': folder,
        'source': 'CHEMBL2321810 molecules; Morgan-128 features; Tanimoto kNN edges',
        'knn': knn, 'split': f'seeded random 60/20/20 (seed {split_seed})', 'num_nodes': n,
        'num_edges': len(edges), 'num_classes': int(label.max()) + 1,
        'num_skipped_unparsable': len(skipped),
        'split_sizes': {'train': len(train), 'valid': len(valid), 'test': len(test)},
    }
    with open(osp.join(folder, 'build_info.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    return summary


def build(out: str, only: Optional[str] = None, threshold: float = DEFAULT_THRESHOLD,
          knn: int = 5, smi: Optional[str] = None, act: Optional[str] = None,
          limit: Optional[int] = None, quiet: bool = False) -> Dict[str, Dict[str, object]]:
    r"""Builds the requested folders under :obj:`out`; returns their summaries."""
    default_smi, default_act = chembl_paths()
    rows = read_chembl(smi or default_smi, act or default_act)
    if limit is not None:
        rows = rows[:limit]
    result = {}
    if only in (None, 'molhiv'):
        result['ogbg-molhiv'] = build_molhiv(out, rows, threshold)
    if only in (None, 'arxiv'):
        result['ogbn-arxiv'] = build_arxiv(out, rows, knn)
    if not quiet:
        for key, summary in result.items():
            print(f"[build_offline_ogb] {key}: " + json.dumps(summary))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='data/offline_ogb', help='root folder (OGB --root)')
    parser.add_argument('--only', choices=['molhiv', 'arxiv'], default=None)
    parser.add_argument('--threshold', type=float, default=DEFAULT_THRESHOLD,
                        help='pIC50 at or above which a molecule is active (label 1)')
    parser.add_argument('--knn', type=int, default=5, help='out-degree of the arxiv-format graph')
    parser.add_argument('--smi', default=None, help='SMILES file (default: rdkit CHEMBL2321810.smi)')
    parser.add_argument('--act', default=None, help='activity CSV with Name,Act')
    parser.add_argument('--limit', type=int, default=None, help='use only the first LIMIT rows')
    args = parser.parse_args(argv)
    try:
        build(args.out, args.only, args.threshold, args.knn, args.smi, args.act, args.limit)
    except DatasetBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
