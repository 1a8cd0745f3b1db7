r"""The example scripts end to end on tiny settings, on the offline OGB
folders: metrics JSON, checkpoint + resume, 2-process DDP vs 1 process,
and the `make demo` entry point."""
import importlib.util
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
EXAMPLES = osp.join(REPO, 'examples')
sys.path.insert(0, EXAMPLES)

pytest.importorskip('rdkit')

TINY = ['--hidden', '16', '--layers', '1', '--heads', '2', '--batch-size', '16', '--no-progress']


@pytest.fixture(scope='module')
def offline_root(tmp_path_factory):
    spec = importlib.util.spec_from_file_location(
        'build_offline_ogb', osp.join(REPO, 'datasets', 'build_offline_ogb.py'))
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    root = str(tmp_path_factory.mktemp('offline_ogb'))
    builder.build(root, quiet=True)
    return root


@pytest.fixture(autouse=True)
def restore_torch_settings():
    # the scripts pin threads and deterministic algorithms for the process
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def test_molhiv_script_runs_every_model(offline_root, tmp_path):
    import ogbg_molhiv
    out = str(tmp_path / 'metrics.json')
    ogbg_molhiv.main(['--root', offline_root, '--model', *ogbg_molhiv.MODELS, '--epochs', '1',
                      '--limit-train', '16', '--out', out, *TINY])
    payload = json.load(open(out))
    assert [r['model'] for r in payload['runs']] == list(ogbg_molhiv.MODELS)
    for run in payload['runs']:
        (epoch, ) = run['history']
        assert epoch['steps'] == 1 and 0.0 <= epoch['test_rocauc'] <= 1.0
        assert epoch['train_loss'] > 0 and epoch['epoch_seconds'] > 0
    assert set(payload['summary']) == set(ogbg_molhiv.MODELS)


def test_molhiv_resume_reproduces_an_uninterrupted_run(offline_root, tmp_path):
    import ogbg_molhiv
    common_args = ['--root', offline_root, '--model', 'hsa', '--limit-train', '32', *TINY]
    ogbg_molhiv.main([*common_args, '--epochs', '2', '--checkpoint-dir', str(tmp_path / 'a'),
                      '--out', str(tmp_path / 'a.json')])
    # "interrupted" after one epoch, then resumed to two
    ogbg_molhiv.main([*common_args, '--epochs', '1', '--checkpoint-dir', str(tmp_path / 'b')])
    ogbg_molhiv.main([*common_args, '--epochs', '2', '--checkpoint-dir', str(tmp_path / 'b'),
                      '--resume', '--out', str(tmp_path / 'b.json')])
    a = json.load(open(tmp_path / 'a.json'))['runs'][0]['history']
    b = json.load(open(tmp_path / 'b.json'))['runs'][0]['history']
    strip = [{k: v for k, v in r.items() if k != 'epoch_seconds'} for r in a]
    assert strip == [{k: v for k, v in r.items() if k != 'epoch_seconds'} for r in b]
    state_a = torch.load(tmp_path / 'a' / 'ogbg-molhiv_hsa_seed0.pt', weights_only=False)['model']
    state_b = torch.load(tmp_path / 'b' / 'ogbg-molhiv_hsa_seed0.pt', weights_only=False)['model']
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    # a different configuration is refused, and the checkpoint survives
    from common import ExampleError
    with pytest.raises(ExampleError, match='lr: checkpoint 0.001 vs now 0.01'):
        ogbg_molhiv.main([*common_args, '--epochs', '3', '--lr', '0.01',
                          '--checkpoint-dir', str(tmp_path / 'b'), '--resume'])
    state_c = torch.load(tmp_path / 'b' / 'ogbg-molhiv_hsa_seed0.pt', weights_only=False)
    assert state_c['epoch'] == 1


def test_ddp_two_cpu_processes_match_one(offline_root, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    # no dropout and per-graph norms: the 2x8 split of each 16-graph batch
    # then gives the same averaged gradient as one process
    args = [osp.join(EXAMPLES, 'ogbg_molhiv.py'), '--root', offline_root, '--model', 'hsa',
            '--epochs', '1', '--limit-train', '48', '--dropout', '0', '--norm', 'layer_norm',
            *TINY]
    single = subprocess.run([sys.executable, *args, '--checkpoint-dir', str(tmp_path / 'one')],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                          '--nproc_per_node=2', *args, '--checkpoint-dir', str(tmp_path / 'two')],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = torch.load(tmp_path / 'one' / 'ogbg-molhiv_hsa_seed0.pt', weights_only=False)
    two = torch.load(tmp_path / 'two' / 'ogbg-molhiv_hsa_seed0.pt', weights_only=False)
    assert one['config']['world_size'] == 1 and two['config']['world_size'] == 2
    assert one['steps'] == two['steps'] == 3
    for key, value in one['model'].items():
        torch.testing.assert_close(two['model'][key], value, atol=2e-5, rtol=1e-4)
    # training moved the weights, so the comparison is not vacuous
    assert not torch.equal(one['model']['head.lins.0.weight'], _initial_head(offline_root))
    h1, h2 = one['history'][0], two['history'][0]
    assert abs(h1['test_rocauc'] - h2['test_rocauc']) < 1e-3
    # the logged loss covers both ranks' graphs, not rank 0's share
    assert abs(h1['train_loss'] - h2['train_loss']) < 1e-4 * abs(h1['train_loss'])


def _initial_head(offline_root):
    import ogbg_molhiv
    import common
    args = ogbg_molhiv.parse_args(['--root', offline_root, '--dropout', '0', '--norm',
                                   'layer_norm', *TINY])
    common.set_seed(0)
    return ogbg_molhiv.build_model('hsa', args, 1).state_dict()['head.lins.0.weight']


def test_arxiv_script(offline_root, tmp_path):
    import ogbn_arxiv
    out = str(tmp_path / 'arxiv.json')
    ogbn_arxiv.main(['--root', offline_root, '--model', *ogbn_arxiv.MODELS, '--epochs', '2',
                     '--hidden', '16', '--heads', '2', '--out', out, '--no-progress',
                     '--checkpoint-dir', str(tmp_path / 'ck')])
    payload = json.load(open(out))
    assert [r['model'] for r in payload['runs']] == list(ogbn_arxiv.MODELS)
    assert all(len(r['history']) == 2 for r in payload['runs'])
    # resuming a finished run changes nothing
    ogbn_arxiv.main(['--root', offline_root, '--model', 'hsa', '--epochs', '2', '--hidden', '16',
                     '--heads', '2', '--out', out, '--no-progress', '--resume',
                     '--checkpoint-dir', str(tmp_path / 'ck')])
    again = json.load(open(out))['runs'][0]
    assert again['history'] == payload['runs'][0]['history']


def test_multimodal_script(offline_root, tmp_path):
    import multimodal_molecules as mm
    out = str(tmp_path / 'mm.json')
    mm.main(['--root', offline_root, '--epochs', '1', '--limit-train', '16', '--hidden', '16',
             '--layers', '1', '--heads', '2', '--out', out, '--no-progress'])
    payload = json.load(open(out))
    runs = {r['model']: r for r in payload['runs']}
    assert set(runs) == set(mm.VARIANTS)
    # the composed record holds both modalities' leaves
    assert runs['both-hsa']['mean_leaves'] == pytest.approx(
        runs['graph']['mean_leaves'] + runs['smiles']['mean_leaves'])
    assert mm.tokenize('Clc1ccc(Br)cc1[N+](=O)[O-]') == [
        'Cl', 'c', '1', 'c', 'c', 'c', '(', 'Br', ')', 'c', 'c', '1', '[N+]', '(', '=', 'O', ')',
        '[O-]']


def test_demo_quick_writes_table_and_figure(tmp_path, capsys):
    import demo
    demo.main(['--quick', '--out-dir', str(tmp_path), '--models', 'hsa', 'gin', '--no-progress'])
    text = capsys.readouterr().out
    assert 'hsa ' in text and 'gin ' in text and 'test rocauc' in text
    figure = tmp_path / 'hsa_demo.png'
    assert figure.is_file() and figure.stat().st_size > 20_000
    assert str(figure) in text
    assert json.load(open(tmp_path / 'demo_metrics.json'))['summary'].keys() == {'hsa', 'gin'}


def test_progress_bars_stay_quiet_when_the_output_is_not_a_terminal():
    code = ("import sys; sys.path.insert(0, 'examples'); import common; "
            "bar = common.progress_bar(range(500), True, desc='x'); "
            "[None for _ in bar]; print('disabled', bar.disable)")
    done = subprocess.run([sys.executable, '-c', code], cwd=osp.dirname(EXAMPLES),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert 'disabled True' in done.stdout
    assert done.stderr.count('\r') == 0  # no redraws in a log
