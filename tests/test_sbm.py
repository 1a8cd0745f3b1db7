r"""CLUSTER and PATTERN: the offline SBM generators follow the benchmarking
suite's recipes, the weighted accuracy is the suite's, and the comparison
script trains, reports and resumes on tiny settings."""
import json
import os.path as osp
import sys

import numpy as np
import pytest
import torch

from hsa_geo.datasets.sbm import (CLUSTER, PATTERN, SBMRecipe, generate_sbm,
                                  generate_sbm_splits, weighted_accuracy)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'examples'))


def test_cluster_follows_the_recipe():
    graphs = generate_sbm(CLUSTER, 40, seed=0)
    inside, across = [0, 0], [0, 0]
    for g in graphs:
        counts = torch.bincount(g.y, minlength=6)
        assert counts.min() >= 5 and counts.max() <= 34
        # one labelled node per community, carrying its community + 1
        labelled = g.x.nonzero().squeeze(1)
        assert sorted((g.x[labelled] - 1).tolist()) == list(range(6))
        assert torch.equal(g.x[labelled] - 1, g.y[labelled])
        dense = torch.zeros(g.num_nodes, g.num_nodes, dtype=torch.bool)
        dense[g.edge_index[0], g.edge_index[1]] = True
        assert torch.equal(dense, dense.T) and not dense.diagonal().any()
        same = g.y[:, None] == g.y[None, :]
        off = ~torch.eye(g.num_nodes, dtype=torch.bool)
        inside[0] += int(dense[same & off].sum())
        inside[1] += int((same & off).sum())
        across[0] += int(dense[~same].sum())
        across[1] += int((~same).sum())
    assert abs(inside[0] / inside[1] - 0.55) < 0.02
    assert abs(across[0] / across[1] - 0.25) < 0.02


def test_pattern_follows_the_recipe():
    graphs = generate_sbm(PATTERN, 40, seed=0)
    link = [0, 0]
    patterns = set()
    for g in graphs:
        assert int(g.y.sum()) == 20 and g.x.max() <= 2 and g.x.min() >= 0
        assert 25 + 20 <= g.num_nodes <= 5 * 34 + 20
        dense = torch.zeros(g.num_nodes, g.num_nodes, dtype=torch.bool)
        dense[g.edge_index[0], g.edge_index[1]] = True
        in_pattern = g.y.bool()
        link[0] += int(dense[in_pattern][:, ~in_pattern].sum())
        link[1] += int(in_pattern.sum()) * int((~in_pattern).sum())
        patterns.add(tuple(g.x[in_pattern].sort().values.tolist()))
    assert abs(link[0] / link[1] - 0.5) < 0.02
    assert len(patterns) > 1  # graphs draw from a bank of patterns


def test_generators_are_deterministic_and_shuffle_nodes():
    a, b = generate_sbm(CLUSTER, 3, seed=4), generate_sbm(CLUSTER, 3, seed=4)
    for g, h in zip(a, b):
        assert torch.equal(g.edge_index, h.edge_index) and torch.equal(g.y, h.y)
    # nodes are not sorted by community
    assert any(not torch.equal(g.y, g.y.sort().values) for g in a)
    splits = generate_sbm_splits(PATTERN, seed=0, sizes={'train': 2, 'test': 2})
    assert [len(v) for v in splits.values()] == [2, 2]
    assert dict(CLUSTER.splits) == {'train': 10_000, 'valid': 1_000, 'test': 1_000}
    assert dict(PATTERN.splits) == {'train': 10_000, 'valid': 2_000, 'test': 2_000}


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match='num_graphs'):
        generate_sbm(CLUSTER, -1, seed=0)
    with pytest.raises(ValueError, match='unknown SBM recipe'):
        generate_sbm(SBMRecipe('OTHER', 2, 5, 6, 0.5, 0.1), 1, seed=0)
    with pytest.raises(ValueError, match='shape'):
        weighted_accuracy(torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long), 2)


def test_weighted_accuracy_is_the_mean_per_class_accuracy():
    target = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    prediction = torch.tensor([0, 0, 0, 1, 1, 0, 2])
    # class 0: 3/4, class 1: 1/1, class 2: 1/2 -> mean 0.75
    assert weighted_accuracy(prediction, target, 3) == pytest.approx(75.0)
    # an absent class counts as 0, as in the suite
    assert weighted_accuracy(prediction, target, 4) == pytest.approx(56.25)


TINY = ['--epochs', '1', '--train-size', '12', '--valid-size', '6', '--test-size', '6',
        '--hidden', '16', '--layers', '1', '--heads', '2', '--batch-size', '6',
        '--resamples', '40']


def test_cluster_pattern_script_trains_every_model_and_resumes(tmp_path):
    pytest.importorskip('pymetis')
    import cluster_pattern as script
    from common import ExampleError
    threads = torch.get_num_threads()
    common = [*TINY, '--data-dir', str(tmp_path / 'data'), '--checkpoint-dir',
              str(tmp_path / 'runs'), '--out', str(tmp_path / 'out.json')]
    try:
        script.main(common)
        report = json.load(open(tmp_path / 'out.json'))
        assert set(report['summary']) == set(script.MODELS)
        sizes = [row['parameters'] for row in report['summary'].values()]
        reference = report['summary'][script.REFERENCE]['parameters']
        assert max(abs(s - reference) for s in sizes) <= 0.1 * reference
        for run in report['runs']:
            counts = script.decode_counts(run['test_counts'])
            assert counts.shape == (6, 6, 2) and counts[..., 1].sum() > 0
            assert run['test_accuracy'] == pytest.approx(script.accuracy_of(counts))
        comparison = report['comparisons'][0]
        assert comparison['ci95'][0] <= comparison['difference'] <= comparison['ci95'][1]
        # a second epoch resumes from the checkpoint of the first
        script.main([*common, '--models', 'gps_hsa', '--epochs', '2'])
        again = json.load(open(tmp_path / 'out.json'))
        (run, ) = [r for r in again['runs'] if r['model'] == 'gps_hsa']
        assert [h['epoch'] for h in run['history']] == [1, 2]
        # the control tree's runs join the report under their label, paired
        # with the HSA models on the same test graphs
        control = [*TINY, '--data-dir', str(tmp_path / 'data'), '--checkpoint-dir',
                   str(tmp_path / 'control'), '--out', str(tmp_path / 'control.json'),
                   '--hierarchy', 'metis_shuffled', '--models', 'gps_hsa']
        script.main(control)
        script.main([*common, '--report-only', '--control-runs',
                     f'shuffled={tmp_path / "control"}'])
        joined = json.load(open(tmp_path / 'out.json'))
        assert 'gps_hsa [shuffled]' in joined['summary']
        assert any(c['first'] == 'gps_hsa' and c['second'] == 'gps_hsa [shuffled]'
                   for c in joined['comparisons'])
        with pytest.raises(ExampleError, match='LABEL=DIR'):
            script.main([*common, '--report-only', '--control-runs', str(tmp_path / 'control')])
    finally:
        torch.set_num_threads(threads)


def test_shuffled_leaves_control_keeps_the_tree_shape_and_drops_the_structure():
    pytest.importorskip('pymetis')
    import cluster_pattern as script
    from hsa_geo.data import hierarchy_from_data
    from hsa_geo.transforms import AddHierarchy
    controls = [script.ShuffledLeaves('metis', 16, seed=0) for _ in range(2)]
    # pairs of leaves sharing a cluster, and those of them in one community
    pairs = {'built': [0, 0], 'shuffled': [0, 0]}
    for graph in generate_sbm(CLUSTER, 6, seed=1):
        built = hierarchy_from_data(AddHierarchy('metis', max_children=16, seed=0)(graph))
        shuffled, again = (control(graph) for control in controls)
        assert torch.equal(shuffled.parent, again.parent)  # deterministic
        leaves = built.num_leaves
        assert torch.equal(shuffled.parent[leaves:], built.parent[leaves:])
        assert sorted(shuffled.parent[:leaves].tolist()) == sorted(built.parent[:leaves].tolist())
        community = graph.y[:, None] == graph.y[None, :]
        for name, hierarchy in (('built', built), ('shuffled', shuffled)):
            mates = hierarchy.parent[:leaves, None] == hierarchy.parent[None, :leaves]
            mates.fill_diagonal_(False)
            pairs[name][0] += int((mates & community).sum())
            pairs[name][1] += int(mates.sum())
    # METIS puts a community's nodes together well above chance (1/6 of
    # pairs); the shuffled tree does not
    built_rate, shuffled_rate = (same / total for same, total in pairs.values())
    assert built_rate > 0.3 and shuffled_rate < built_rate - 0.1, (built_rate, shuffled_rate)


def test_cosine_schedule_decays_from_the_rate_to_zero_over_the_run():
    import cluster_pattern as script
    args = script.parse_args(['--lr', '0.002', '--schedule', 'cosine'])
    rates = [script.learning_rate(args, step, 100) for step in range(101)]
    assert rates[0] == pytest.approx(0.002) and rates[50] == pytest.approx(0.001)
    assert rates[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    constant = script.parse_args(['--lr', '0.002'])
    assert {script.learning_rate(constant, step, 100) for step in range(101)} == {0.002}


def test_script_accuracy_matches_the_metric():
    import cluster_pattern as script
    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.integers(3, size=50))
    prediction = torch.from_numpy(rng.integers(3, size=50))
    graph = torch.from_numpy(rng.integers(4, size=50))
    counts = np.zeros((4, 3, 2), dtype=np.int64)
    np.add.at(counts, (graph.numpy(), target.numpy(), 0), (prediction == target).numpy())
    np.add.at(counts, (graph.numpy(), target.numpy(), 1), 1)
    assert script.accuracy_of(counts) == pytest.approx(weighted_accuracy(prediction, target, 3))


def test_the_gps_softmax_layer_is_pygs_gpsconv():
    # the shared layer with a GIN branch and softmax attention computes what
    # PyG's GPSConv computes, so the swapped global branches sit in GPSConv
    import cluster_pattern as script
    from torch_geometric.loader import DataLoader
    graphs = generate_sbm(CLUSTER, 4, seed=1)
    for graph in graphs:
        graph.rwse = torch.rand(graph.num_nodes, 4)
    batch = next(iter(DataLoader(graphs, batch_size=4)))
    outputs = []
    for name in ('gps_softmax', 'gpsconv'):
        torch.manual_seed(0)
        model = script.NodeClassifier(name, 7, 6, 16, 2, 2, 4).eval()
        outputs.append(model(batch))
    torch.testing.assert_close(outputs[0], outputs[1])


def test_results_tables_render_the_reports(tmp_path):
    sys.path.insert(0, osp.join(REPO, 'docs', '_ext'))
    import results_tables
    assert 'is not there yet' in results_tables.render('sbm', 'missing.json', str(tmp_path))
    with pytest.raises(ValueError, match='unknown kind'):
        results_tables.render('other', 'x.json', str(tmp_path))
    page = '.. results-table:: sbm missing.json\n'
    assert 'cluster_pattern.py' in results_tables.fill(page, str(tmp_path))
