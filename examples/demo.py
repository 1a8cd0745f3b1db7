r"""`make demo`: HSA on real molecules, offline, in a few minutes on 2 CPU cores.

1. builds the molhiv-format dataset from rdkit's shipped ChEMBL assay
   CHEMBL2321810 (1017 molecules, measured pIC50, active = pIC50 >= 7,
   scaffold split) with ``datasets/build_offline_ogb.py``;
2. builds a Louvain hierarchy over the atoms of every molecule;
3. trains HSA (GINE + global HSA, readout at the hierarchy root) and the
   baselines GIN, GCN and flat softmax attention (PyG GPSConv) with the same
   width, depth, epochs and optimiser, with the real OGB loader and
   ``Evaluator``;
4. prints a results table (test ROC-AUC at the best validation epoch,
   mean ± std over seeds, seconds per epoch);
5. writes a figure: learning curves, and for one test molecule its
   hierarchy and the block structure of HSA's attention.

Usage::

    python examples/demo.py                      # ~ a few minutes
    python examples/demo.py --quick              # seconds: a smoke run
    python examples/demo.py --out-dir demo_output --epochs 15 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import os.path as osp
import sys
import time
from typing import Any, Dict, List

import torch

HERE = osp.dirname(osp.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402
import ogbg_molhiv  # noqa: E402

MODEL_LABELS = {'hsa': 'HSA (GINE + hierarchical attention)', 'gin': 'GIN', 'gcn': 'GCN',
                'gps': 'flat softmax attention (GPSConv)', 'hsa-flat': 'HSA code, flat tree'}


def load_builder():
    path = osp.join(common.REPO, 'datasets', 'build_offline_ogb.py')
    spec = importlib.util.spec_from_file_location('build_offline_ogb', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='hsa_geo demo on real offline molecules')
    p.add_argument('--out-dir', default='demo_output', help='where data, JSON and the plot go')
    p.add_argument('--epochs', type=int, default=10)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--models', nargs='+', default=['hsa', 'gin', 'gcn', 'gps'],
                   choices=list(MODEL_LABELS))
    p.add_argument('--hidden', type=int, default=64)
    p.add_argument('--threshold', type=float, default=7.0)
    p.add_argument('--quick', action='store_true', help='2 epochs, 1 seed, 96 training graphs')
    p.add_argument('--no-progress', action='store_true')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    os.makedirs(args.out_dir, exist_ok=True)
    root = osp.join(args.out_dir, 'offline_ogb')

    print('[1/4] building the offline molhiv-format dataset (rdkit CHEMBL2321810, '
          f'active = pIC50 >= {args.threshold}) ...')
    info = load_builder().build(root, only='molhiv', threshold=args.threshold,
                                quiet=True)['ogbg-molhiv']
    print(f"      {info['num_graphs']} molecules ({info['num_skipped_unparsable']} unparsable "
          f"skipped), {100 * info['positive_fraction']:.1f}% active, scaffold split "
          f"{info['split_sizes']}")

    epochs, seeds = (2, [0]) if args.quick else (args.epochs, args.seeds)
    train_argv = ['--root', root, '--model', *args.models, '--seeds', *map(str, seeds),
                  '--epochs', str(epochs), '--hidden', str(args.hidden),
                  '--out', osp.join(args.out_dir, 'demo_metrics.json')]
    if args.quick:
        train_argv += ['--limit-train', '96']
    if args.no_progress:
        train_argv.append('--no-progress')
    print(f"[2/4] building hierarchies and training {', '.join(args.models)} "
          f"({epochs} epochs x {len(seeds)} seed(s)) ...")
    train_args = ogbg_molhiv.parse_args(train_argv)
    train_args.quiet_table = True
    payload = ogbg_molhiv.run(train_args)

    print('[3/4] results (offline CHEMBL2321810 set, not the real molhiv; '
          'test ROC-AUC at the best validation epoch):')
    print(ogbg_molhiv.format_table(payload['summary'], 'rocauc'))

    print('[4/4] plotting ...')
    plot_path = osp.join(args.out_dir, 'hsa_demo.png')
    make_figure(payload, root, plot_path, args)
    print(f"\nwrote the figure to {osp.abspath(plot_path)}")
    print(f"wrote per-epoch metrics to {osp.abspath(osp.join(args.out_dir, 'demo_metrics.json'))}")
    print(f"total time {time.perf_counter() - start:.0f}s")
    return 0


# ------------------------------------------------------------------ figure
def make_figure(payload: Dict[str, Any], root: str, path: str, args) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    runs = payload['_runs']
    fig, axes = plt.subplots(2, 3, figsize=(17, 10))
    colors = {'hsa': 'C3', 'gin': 'C0', 'gcn': 'C2', 'gps': 'C1', 'hsa-flat': 'C4'}
    for name in dict.fromkeys(r['model'] for r in runs):
        mine = [r['history'] for r in runs if r['model'] == name]
        epochs = [h['epoch'] for h in mine[0]]
        for key, ax in (('valid_rocauc', axes[0, 0]), ('train_loss', axes[0, 1])):
            values = torch.tensor([[h[key] for h in hist] for hist in mine], dtype=torch.float64)
            mean = values.mean(0)
            ax.plot(epochs, mean, label=MODEL_LABELS.get(name, name), color=colors.get(name))
            if values.size(0) > 1:
                std = values.std(0)
                ax.fill_between(epochs, mean - std, mean + std, alpha=0.15, color=colors.get(name))
    axes[0, 0].set(title='validation ROC-AUC (mean ± std over seeds)', xlabel='epoch')
    axes[0, 1].set(title='training loss (BCE)', xlabel='epoch')
    axes[0, 0].legend(fontsize=8)
    summary = payload['summary']
    names = list(summary)
    means = [summary[n]['test_rocauc']['mean'] for n in names]
    stds = [summary[n]['test_rocauc']['std'] for n in names]
    axes[0, 2].bar(names, means, yerr=stds, color=[colors.get(n, 'gray') for n in names])
    axes[0, 2].set(title='test ROC-AUC at best validation epoch', ylim=(0, 100))
    for i, m in enumerate(means):
        axes[0, 2].text(i, m + 0.5, f'{m:.1f}', ha='center', fontsize=9)

    hsa_runs = [r for r in runs if r['model'] == 'hsa']
    if hsa_runs:
        draw_molecule_panels(hsa_runs[0], root, axes[1], args)
    else:
        for ax in axes[1]:
            ax.axis('off')
    fig.suptitle('hsa_geo demo: ChEMBL assay CHEMBL2321810 (rdkit-shipped, real pIC50), '
                 'molhiv format, scaffold split', fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tree_layout(parent: List[int], num_leaves: int):
    r"""x = leaf order (leaves in DFS order), y = height; clusters centred."""
    children: Dict[int, List[int]] = {}
    for v, p in enumerate(parent):
        if p >= 0:
            children.setdefault(p, []).append(v)
    root = parent.index(-1)
    pos, order = {}, []

    def place(v):
        if v < num_leaves:
            pos[v] = (len(order), 0.0)
            order.append(v)
            return 0
        heights = [place(c) for c in children[v]]
        h = max(heights) + 1
        pos[v] = (sum(pos[c][0] for c in children[v]) / len(children[v]), float(h))
        return h

    place(root)
    return pos, order, children, root


def draw_molecule_panels(run: Dict[str, Any], root: str, axes, args) -> None:
    import matplotlib.pyplot as plt
    import numpy as np
    from rdkit import Chem
    from rdkit.Chem import AllChem

    from hsa_geo.data import hierarchy_from_data
    from hsa_geo.functional import block_attention_to_dense

    dataset, split, _ = common.load_graph_dataset(root)
    index = int(split['test'][0])
    data = common.attach_hierarchies([dataset[index]], progress=False)[0]
    hierarchy = hierarchy_from_data(data)
    mapping = osp.join(root, 'ogbg_molhiv', 'mapping', 'mol.csv.gz')
    import pandas as pd
    smiles = pd.read_csv(mapping)['smiles'][index]
    mol = Chem.MolFromSmiles(smiles)

    model = ogbg_molhiv.build_model('hsa', ogbg_molhiv.parse_args(['--hidden', str(args.hidden)]),
                                    dataset.num_tasks)
    model.load_state_dict(run['final_state'])
    model.eval()
    with torch.no_grad():
        logit, details = model(data.x, data.edge_index, hierarchy, data.edge_attr,
                               return_details=True)
    attention = details['attention'][-1]
    dense = block_attention_to_dense(attention, hierarchy)  # [H, N, N] or [N, N]
    dense = dense[0] if dense.dim() == 3 else dense
    leaf_weight = details['leaf_weights'][:, 0].numpy()

    parent = hierarchy.parent.tolist()
    n = hierarchy.num_leaves
    pos, order, children, tree_root = tree_layout(parent, n)
    top = {c: i for i, c in enumerate(children[tree_root])}

    def top_cluster(v):
        while parent[v] != tree_root and parent[v] >= 0:
            v = parent[v]
        return top.get(v, 0)

    cmap = plt.get_cmap('tab10')
    atom_color = [cmap(top_cluster(i) % 10) for i in range(n)]

    ax = axes[0]
    AllChem.Compute2DCoords(mol)
    xy = np.array([list(mol.GetConformer().GetAtomPosition(i))[:2] for i in range(n)])
    for bond in mol.GetBonds():
        a, b = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        ax.plot(xy[[a, b], 0], xy[[a, b], 1], color='0.6', lw=1.5, zorder=1)
    size = 60 + 600 * leaf_weight / max(leaf_weight.max(), 1e-9)
    ax.scatter(xy[:, 0], xy[:, 1], s=size, c=atom_color, edgecolors='k', zorder=2)
    for i, atom in enumerate(mol.GetAtoms()):
        ax.text(xy[i, 0], xy[i, 1], atom.GetSymbol(), ha='center', va='center', fontsize=7,
                zorder=3)
    prob = torch.sigmoid(logit).item()
    label = int(dataset[index].y.item())
    ax.set_title(f'test molecule #{index}: colour = top-level cluster,\nsize = readout weight; '
                 f'P(active) = {prob:.2f}, label = {label}', fontsize=9)
    ax.set_aspect('equal')
    ax.axis('off')

    ax = axes[1]
    for v, p in enumerate(parent):
        if p >= 0:
            (x0, y0), (x1, y1) = pos[v], pos[p]
            ax.plot([x0, x0, x1], [y0, y1, y1], color='0.4', lw=1)
    symbols = [a.GetSymbol() for a in mol.GetAtoms()]
    for leaf in range(n):
        ax.scatter(*pos[leaf], color=atom_color[leaf], s=60, edgecolors='k', zorder=3)
        ax.text(pos[leaf][0], -0.35, f'{symbols[leaf]}{leaf}', rotation=90, ha='center',
                va='top', fontsize=6)
    clusters = [v for v in range(n, len(parent))]
    ax.scatter([pos[v][0] for v in clusters], [pos[v][1] for v in clusters], marker='s',
               color='k', s=25, zorder=3)
    summary = hierarchy.summary()
    ax.set_title(f"its Louvain hierarchy: {n} atoms, {summary['num_clusters']} clusters, "
                 f"depth {summary['max_depth']}", fontsize=9)
    ax.set_ylim(-2.5, max(p[1] for p in pos.values()) + 0.5)
    ax.axis('off')

    ax = axes[2]
    perm = torch.tensor(order)
    matrix = dense[perm][:, perm].numpy()
    im = ax.imshow(matrix, cmap='viridis')
    # block boundaries: top-level clusters along the leaf order
    groups = [top_cluster(leaf) for leaf in order]
    for i in range(1, n):
        if groups[i] != groups[i - 1]:
            ax.axhline(i - 0.5, color='w', lw=0.8)
            ax.axvline(i - 0.5, color='w', lw=0.8)
    ax.set_title('HSA attention of the last layer (head 1), leaves in tree order:\n'
                 'constant on blocks of sibling subtrees', fontsize=9)
    plt.colorbar(im, ax=ax, fraction=0.046)


if __name__ == '__main__':
    common.run_main(main)
