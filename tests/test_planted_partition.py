r"""The hierarchical planted-partition example on a tiny graph: the generator
is deterministic, the tree is built from the edges alone, and the script
writes a report with every model."""
import json
import os.path as osp
import sys

import pytest
import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'examples'))

import planted_partition as planted  # noqa: E402

SMALL = dict(num_nodes=2048, label_size=512, classes=3, features=4)


def test_generator_is_deterministic_and_nested():
    first, second = planted.planted_graph(**SMALL), planted.planted_graph(**SMALL)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    other = planted.planted_graph(**SMALL, seed=1)
    assert not torch.equal(first['edge_index'], other['edge_index'])
    source, target = first['edge_index']
    assert bool((source != target).all())
    # undirected: every edge comes with its reverse
    assert torch.equal(torch.sort(source * 2048 + target).values,
                       torch.sort(target * 2048 + source).values)
    # most edges stay within a planted group: the structure is in the graph
    assert float((first['group'][source] == first['group'][target]).float().mean()) > 0.7
    # labels are constant on planted groups
    group, y = first['group'], first['y']
    assert all(y[group == g].unique().numel() == 1 for g in group.unique().tolist())


def test_tree_comes_from_the_edges_not_the_labels():
    graph = planted.planted_graph(**SMALL, label_seed=0)
    relabelled = planted.planted_graph(**SMALL, label_seed=5)
    assert torch.equal(graph['edge_index'], relabelled['edge_index'])
    assert not torch.equal(graph['y'], relabelled['y'])
    tree = planted.build_tree(graph['edge_index'], SMALL['num_nodes'])
    again = planted.build_tree(relabelled['edge_index'], SMALL['num_nodes'])
    assert torch.equal(tree.parent, again.parent)
    rows = planted.purity_by_depth(tree, graph['group'], graph['y'])
    assert rows[0]['depth'] == 0 and rows[0]['leaves'] == SMALL['num_nodes']
    assert all(0 < row['group_purity'] <= row['label_purity'] <= 1 for row in rows)
    assert all(0 < row['group_completeness'] <= 1 for row in rows)
    assert rows[0]['group_completeness'] == 1  # the root holds every group whole


def test_script_writes_every_model(tmp_path):
    out = tmp_path / 'report.json'
    argv = ['--num-nodes', '2048', '--label-size', '512', '--classes', '3', '--features', '4',
            '--hidden', '8', '--heads', '2', '--epochs', '2', '--eval-every', '1', '--seeds', '0',
            '--resamples', '20', '--in-process', '--cache-dir', str(tmp_path / 'cache'),
            '--out', str(out)]
    planted.main(argv)
    report = json.loads(out.read_text())
    assert set(report['summary']) == set(planted.MODELS)
    assert {c['second'] for c in report['comparisons']} == set(planted.MODELS) - {'sage_hsa'}
    assert len(report['runs']) == len(planted.MODELS)
    parameters = [row['parameters'] for row in report['summary'].values()]
    assert max(parameters) <= 1.1 * report['summary']['sage_hsa']['parameters']
    assert min(parameters) >= 0.9 * report['summary']['sage_hsa']['parameters']
    assert report['graph']['build_seconds'] > 0 and report['budget']['epochs'] == 2
    assert len(report['machine']['load_average']) == 3
    # a rerun reads the cached graph, tree and runs instead of rebuilding
    def written():
        return {p: p.stat().st_mtime_ns for p in (tmp_path / 'cache').rglob('*')}
    cached = written()
    planted.main(argv)
    assert written() == cached
    assert json.loads(out.read_text())['runs'] == report['runs']


def test_learning_rates_are_selected_per_model_on_validation(tmp_path):
    out = tmp_path / 'grid.json'
    argv = ['--num-nodes', '2048', '--label-size', '512', '--classes', '3', '--features', '4',
            '--hidden', '8', '--heads', '2', '--epochs', '3', '--eval-every', '1', '--seeds', '0,1',
            '--models', 'sage_hsa,sage', '--lr', '0.001,0.05', '--resamples', '20',
            '--in-process', '--cache-dir', str(tmp_path / 'cache'), '--out', str(out)]
    planted.main(argv)
    report = json.loads(out.read_text())
    assert len(report['runs']) == 4  # the selected learning rate's two seeds, per model
    assert report['budget']['optimiser'].endswith('selected on validation from 0.001, 0.05')
    for kind in ('sage_hsa', 'sage'):
        grid = report['lr_grid'][kind]
        assert set(grid) == {'0.001', '0.05'}
        best = max(grid, key=lambda lr: grid[lr]['valid_acc']['mean'])
        assert report['summary'][kind]['selected_lr'] == float(best)
        assert report['summary'][kind]['test_acc'] == grid[best]['test_acc']
        assert {r['lr'] for r in report['runs'] if r['model'] == kind} == {float(best)}
    # a second run takes each model's selected rate from the report
    again = tmp_path / 'again.json'
    planted.main(argv[:argv.index('--lr')] + argv[argv.index('--lr') + 2:]
                 + ['--lr-from', str(out), '--seeds', '0', '--out', str(again)])
    chosen = json.loads(again.read_text())
    for kind in ('sage_hsa', 'sage'):
        assert chosen['summary'][kind]['selected_lr'] == report['summary'][kind]['selected_lr']
        assert set(chosen['lr_grid'][kind]) == {repr(report['summary'][kind]['selected_lr'])}
    with pytest.raises(SystemExit):
        planted.parse_args(['--lr', '0,0.1'])


def test_an_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    argv = ['--num-nodes', '2048', '--label-size', '512', '--classes', '3', '--features', '4',
            '--hidden', '8', '--heads', '2', '--epochs', '4', '--eval-every', '1',
            '--patience', '9', '--models', 'sage_hsa', '--seeds', '0', '--resamples', '20',
            '--cache-dir', str(tmp_path / 'cache')]
    args = planted.parse_args(argv)
    data = planted.load_or_build(args)
    whole = planted.train_one('sage_hsa', 0, data, args, str(tmp_path / 'whole.pt'))
    save = planted.save_checkpoint

    def save_then_stop(path, state):
        save(path, state)
        if state['epoch'] == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(planted, 'save_checkpoint', save_then_stop)
    path = planted.checkpoint_path(args, 'sage_hsa', 0)
    try:
        planted.train_one('sage_hsa', 0, data, args, path)
    except KeyboardInterrupt:
        pass
    assert json.loads(open(path[:-3] + '.json').read())['history'][-1]['epoch'] == 2
    # the report of unfinished runs reads the checkpoint, flagged as such
    planted.main(argv + ['--partial', '--out', str(tmp_path / 'partial.json')])
    partial = json.loads((tmp_path / 'partial.json').read_text())
    assert partial['summary']['sage_hsa']['finished'] is False
    assert partial['runs'][0]['epochs_run'] == 2
    resumed = planted.train_one('sage_hsa', 0, data, args, path)
    assert resumed['resumed_at_epochs'] == [2]
    assert resumed['history'] == whole['history']
    assert resumed['test_correct'] == whole['test_correct']
