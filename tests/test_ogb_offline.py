import csv
import gzip
import importlib.util
import os.path as osp
import shutil
import sys

import pytest
import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'examples'))

pytest.importorskip('rdkit')
import common  # noqa: E402


def _load_builder():
    spec = importlib.util.spec_from_file_location(
        'build_offline_ogb', osp.join(REPO, 'datasets', 'build_offline_ogb.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


builder = _load_builder()


@pytest.fixture(scope='session')
def offline_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('offline_ogb'))
    builder.build(root, quiet=True)
    return root


def _read_activity():
    _, act = builder.chembl_paths()
    with open(act) as f:
        return {row['Name']: float(row['Act']) for row in csv.DictReader(f)}


def test_molhiv_folder_loads_with_the_real_ogb_loader(offline_root):
    dataset, split, evaluator = common.load_graph_dataset(offline_root)
    assert len(dataset) == 1017
    assert dataset.num_tasks == 1 and evaluator.eval_metric == 'rocauc'
    # labels: pIC50 >= 7, counted straight from rdkit's activity file
    expected = sum(v >= 7.0 for v in _read_activity().values())
    assert int(dataset._data.y.sum()) == expected
    data = dataset[0]
    assert data.x.shape[1] == 9 and data.edge_attr.shape[1] == 3
    assert data.edge_index.size(1) % 2 == 0  # OGB added the reverse of each bond
    ids = [set(split[k].tolist()) for k in ('train', 'valid', 'test')]
    assert sum(map(len, ids)) == 1017 and set.union(*ids) == set(range(1017))
    assert len(ids[0]) > 0.75 * 1017


def test_scaffold_split_keeps_scaffolds_apart(offline_root):
    from rdkit import Chem
    from rdkit.Chem.Scaffolds import MurckoScaffold
    dataset, split, _ = common.load_graph_dataset(offline_root)
    with gzip.open(osp.join(offline_root, 'ogbg_molhiv', 'mapping', 'mol.csv.gz'), 'rt') as f:
        smiles = [row['smiles'] for row in csv.DictReader(f)]
    scaffold = [MurckoScaffold.MurckoScaffoldSmiles(mol=Chem.MolFromSmiles(s),
                                                    includeChirality=True) for s in smiles]
    sets = {k: {scaffold[i] for i in split[k].tolist()} for k in ('train', 'valid', 'test')}
    assert not sets['train'] & sets['test']
    assert not sets['train'] & sets['valid']
    assert not sets['valid'] & sets['test']


def test_arxiv_format_folder(offline_root):
    dataset, split, evaluator = common.load_node_dataset(offline_root)
    data = dataset[0]
    assert data.x.shape == (1017, 128)
    assert torch.all(torch.bincount(data.edge_index[0], minlength=1017) == 5)
    assert int(data.y.max()) < dataset.num_classes
    year = data.node_year.view(-1)
    assert year[split['train']].max() < year[split['valid']].min()
    assert year[split['valid']].max() < year[split['test']].min()
    assert evaluator.eval_metric == 'acc'


def _write_inputs(folder, rows):
    smi, act = osp.join(folder, 'in.smi'), osp.join(folder, 'act.csv')
    with open(smi, 'w') as f:
        f.writelines(f'{s} {n}\n' for n, s, _ in rows)
    with open(act, 'w') as f:
        f.write('Name,Act\n')
        f.writelines(f'{n},{a}\n' for n, _, a in rows)
    return smi, act


ROWS = [('1', 'c1ccccc1O', 7.5), ('2', 'c1ccccc1N', 6.0), ('3', 'C1CCCCC1C', 8.0),
        ('4', 'C1CC', 7.1),  # unclosed ring: rdkit cannot parse it
        ('5', 'c1ccncc1', 5.0), ('6', 'CCO', 7.0), ('7', 'c1ccc2ccccc2c1', 6.5),
        ('8', 'CCN', 7.7), ('9', 'C1CCOC1', 5.5), ('10', 'c1ccccc1Cl', 7.2)]


def test_unparsable_molecule_is_skipped_and_counted_without_moving_others(tmp_path):
    smi, act = _write_inputs(str(tmp_path), ROWS)
    out = str(tmp_path / 'out')
    info = builder.build(out, only='molhiv', smi=smi, act=act, quiet=True)['ogbg-molhiv']
    assert info['num_skipped_unparsable'] == 1 and info['num_graphs'] == 9
    with open(osp.join(out, 'ogbg_molhiv', 'skipped.csv')) as f:
        skipped = list(csv.DictReader(f))
    assert [r['name'] for r in skipped] == ['4']
    # every kept molecule sits in the split computed over all ten rows
    mols = builder.parse_molecules(builder.read_chembl(smi, act))
    expected = builder.scaffold_split(mols)
    kept = [i for i, m in enumerate(mols) if m is not None]
    folder = osp.join(out, 'ogbg_molhiv', 'split', 'scaffold')
    for which, name in enumerate(('train', 'valid', 'test')):
        with gzip.open(osp.join(folder, f'{name}.csv.gz'), 'rt') as f:
            got = sorted(int(line) for line in f)
        assert got == [j for j, i in enumerate(kept) if expected[i] == which]
    with gzip.open(osp.join(out, 'ogbg_molhiv', 'raw', 'graph-label.csv.gz'), 'rt') as f:
        labels = [int(line) for line in f]
    assert labels == [int(a >= 7.0) for n, s, a in ROWS if n != '4']


def test_bad_inputs_give_clear_messages(tmp_path, capsys):
    smi, act = _write_inputs(str(tmp_path), ROWS)
    with pytest.raises(builder.DatasetBuildError, match='input file not found'):
        builder.build(str(tmp_path / 'o'), smi=smi, act=str(tmp_path / 'missing.csv'))
    with open(act, 'a') as f:
        f.write('11,not-a-number\n')
    with pytest.raises(builder.DatasetBuildError, match=r'act.csv:12: activity .* not a number'):
        builder.read_chembl(smi, act)
    assert builder.main(['--out', str(tmp_path / 'o'), '--smi', smi, '--act', act]) == 2
    assert 'not a number' in capsys.readouterr().err


def test_arxiv_neighbor_loader_script(offline_root, tmp_path, monkeypatch):
    # HSA in NeighborLoader batches (each gets the whole tree restricted to
    # its nodes): a few steps. Without a sampler backend, a stand-in replaces
    # only the compiled sampling op.
    import json

    import torch_geometric.typing as pyg_typing
    from torch_geometric.sampler import NeighborSampler

    import arxiv_neighbor_loader
    from sampling_stand_in import first_neighbors
    if not (pyg_typing.WITH_PYG_LIB or pyg_typing.WITH_TORCH_SPARSE):
        monkeypatch.setattr(arxiv_neighbor_loader, 'check_sampler_backend', lambda: None)
        monkeypatch.setattr(NeighborSampler, '_sample', first_neighbors)
    out = str(tmp_path / 'arxiv_sampled.json')
    assert arxiv_neighbor_loader.main(
        ['--root', offline_root, '--epochs', '2', '--max-steps', '3', '--batch-size', '32',
         '--hidden', '16', '--heads', '2', '--no-progress', '--out', out]) == 0
    with open(out) as f:
        payload = json.load(f)
    assert [row['epoch'] for row in payload['history']] == [1, 2]
    assert all(0.0 <= row['valid_acc'] <= 1.0 for row in payload['history'])


def _copy_folder(offline_root, tmp_path):
    root = str(tmp_path / 'copy')
    shutil.copytree(osp.join(offline_root, 'ogbg_molhiv'), osp.join(root, 'ogbg_molhiv'),
                    ignore=shutil.ignore_patterns('processed'))
    return root


def test_loader_reports_missing_files_and_bad_labels(offline_root, tmp_path):
    with pytest.raises(common.ExampleError, match='not found.*build_offline_ogb'):
        common.load_graph_dataset(str(tmp_path / 'nowhere'))
    root = _copy_folder(offline_root, tmp_path)
    raw = osp.join(root, 'ogbg_molhiv', 'raw')
    label_path = osp.join(raw, 'graph-label.csv.gz')
    with gzip.open(label_path, 'rt') as f:
        labels = f.read().split()
    labels[3] = '2'
    with gzip.open(label_path, 'wt') as f:
        f.write('\n'.join(labels) + '\n')
    with pytest.raises(common.ExampleError, match=r'binary labels must be 0 or 1 \(found \[2\]\)'):
        common.load_graph_dataset(root)
    shutil.rmtree(osp.join(root, 'ogbg_molhiv', 'processed'))
    import os
    os.remove(osp.join(raw, 'edge.csv.gz'))
    with pytest.raises(common.ExampleError, match=r"missing \['edge.csv.gz'\]"):
        common.load_graph_dataset(root)
    os.remove(osp.join(root, 'ogbg_molhiv', 'RELEASE_v1.txt'))
    with pytest.raises(common.ExampleError, match='RELEASE_v1.txt is missing'):
        common.load_graph_dataset(root)


def test_checkpoint_from_another_configuration_is_refused(tmp_path):
    path = str(tmp_path / 'ckpt.pt')
    common.save_checkpoint(path, {'config': {'hidden': 64, 'lr': 0.001}, 'epoch': 3})
    before = open(path, 'rb').read()
    assert common.load_checkpoint(path, {'hidden': 64, 'lr': 0.001})['epoch'] == 3
    with pytest.raises(common.ExampleError, match=r'hidden: checkpoint 64 vs now 32'):
        common.load_checkpoint(path, {'hidden': 32, 'lr': 0.001})
    assert open(path, 'rb').read() == before
    with open(path, 'wb') as f:
        f.write(b'garbage')
    with pytest.raises(common.ExampleError, match='cannot be read'):
        common.load_checkpoint(path, {})
    assert common.load_checkpoint(str(tmp_path / 'none.pt'), {}) is None
