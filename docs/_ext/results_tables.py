r"""Tables of the results pages, rendered from the JSON files under
``benchmarks/results/`` when the docs are built, so a number on a page
cannot drift from the file it cites.

A page asks for a table with a line of its own::

    .. results-table:: listops benchmarks/results/listops_generalisation.json

and gets a ``list-table`` (or a note saying which command writes the file,
when it does not exist yet). Kinds: ``listops``, ``listops-step``, ``listops-probe``, ``sbm``
and ``zero-shot`` (docs/where_hsa_helps.rst, docs/results_text.rst); ``imdb``
(docs/results_text.rst); ``scaling`` (also its CUDA run), ``engines``,
``batches``, ``energy-terms`` (docs/results_speed.rst); ``distributed`` and
``planted-partition`` (docs/distributed.rst); ``planted-built``
(docs/planted_partition_built.rst); ``max-children`` and
``metis`` (docs/builders); ``ogb`` (docs/results_graphs.rst).

A kind renders only what its file holds. The path of ``planted-partition``
is a glob (``benchmarks/results/planted_partition_[0-9]*.json``): its table
puts the runs of every file side by side.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Callable, Dict, List

MARKER = re.compile(r'^\.\. results-table:: (\S+) (\S+)\s*$', re.MULTILINE)
COMMANDS = {
    'listops': 'python examples/listops.py',
    'listops-step': 'python -m benchmarks.listops_step',
    'listops-probe': 'python examples/listops_family_probe.py',
    'listops-inner': 'python examples/listops_inner_lists.py --out FILE',
    'sbm': 'python examples/cluster_pattern.py',
    'scaling': 'python -m benchmarks.scaling',
    'engines': 'python -m benchmarks.engines',
    'batches': 'python -m benchmarks.batches',
    'energy-terms': 'python -m benchmarks.energy_terms',
    'distributed': 'python -m benchmarks.distributed',
    'planted-partition': ('torchrun --standalone --nproc_per_node=4 '
                          'examples/distributed_planted_partition.py --out FILE'),
    'planted-built': 'python examples/planted_partition.py --out FILE',
    'max-children': 'python -m benchmarks.builders --only max_children',
    'metis': 'python -m benchmarks.builders --only metis',
    'ogb': 'python examples/ogbg_molhiv.py (or ogbn_arxiv.py, multimodal_molecules.py) --out FILE',
    'zero-shot': 'python examples/zero_shot_minilm.py --out FILE',
    'imdb': 'python examples/imdb_hsa.py --out FILE',
}


def _table(header: List[str], rows: List[List[str]]) -> str:
    lines = ['.. list-table::', '   :header-rows: 1', '']
    for row in [header] + rows:
        lines.append('   * - ' + row[0])
        lines.extend('     - ' + cell for cell in row[1:])
    return '\n'.join(lines) + '\n'


def _mean_std(entry: Dict, scale: float = 1.0) -> str:
    if entry['n'] > 1:
        return f"{scale * entry['mean']:.1f} ± {scale * entry['std']:.1f}"
    return f"{scale * entry['mean']:.1f}"


def _listops(result: Dict) -> str:
    splits = [s for s in ('test', 'test_long', 'test_deep')
              if any(s in row for row in result['summary'].values())]
    header = ['model', 'parameters'] + [f'{s} (%)' for s in splits] + ['s / step']
    rows = []
    for name, row in result['summary'].items():
        rows.append([f'``{name}``', str(row['parameters'])]
                    + [_mean_std(row[s], 100) for s in splits]
                    + [f"{row['seconds_per_step']['mean']:.2f}"])
    table = _table(header, rows)
    by_operator = {name: row['test_by_operator'] for name, row in result['summary'].items()
                   if 'test_by_operator' in row}
    if by_operator:
        operators = list(next(iter(by_operator.values())))
        header = ['model'] + [f'outer {op} (%)' for op in operators]
        rows = [[f'``{name}``'] + [_mean_std(row[op], 100) for op in operators]
                for name, row in by_operator.items()]
        table += ('\nTest accuracy by the operator of the outer list:\n\n'
                  + _table(header, rows))
    # HSA against every model, and the GPS design with HSA and the bottom-up
    # HSA model against the others
    pairs = [c for c in result['comparisons']
             if c['first'] in ('hsa', 'gps_hsa', 'hsa_bottom_up', 'hsa_values')]
    if pairs:
        header = ['model', 'minus', 'split', 'difference (points)', '95 % interval']
        rows = [[f"``{c['first']}``", f"``{c['second']}``", c['split'],
                 f"{100 * c['difference']:+.1f}",
                 f"[{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}]"] for c in pairs]
        table += '\n' + _table(header, rows)
    budget = result['budget']
    curriculum = [c for c in budget.get('curriculum_steps', []) if c]
    if curriculum:
        table += (f"\nCurriculum: the first {curriculum} of those steps on flat lists "
                  f"of all four operators ({', '.join(map(str, budget['curriculum_batch_size']))} a step; "
                  f"{budget['flat_lists_seen']} flat lists seen), the rest on the training "
                  f"split"
                  + (f" with {budget['mixed_flat_lists']} flat lists beside every batch"
                     if any(budget['mixed_flat_lists']) else '')
                  + (f" at a learning rate of {budget['lr_after_curriculum']}"
                     if budget['lr_after_curriculum'] else '') + ".\n")
    table += (f"\nBudget: {budget['steps']} steps of {budget['batch_size']} expressions "
              f"({budget['examples_seen']} expressions seen), one seed per model unless "
              f"the table shows ± (seeds: "
              f"{sorted({r['seed'] for r in result['runs']})}).\n")
    return table


def _listops_step(result: Dict) -> str:
    header = ['model', 'median s / step', 'ratio to softmax']
    rows = [[f'``{name}``', f'{seconds:.3f}', f"{result['ratio_to_softmax'][name]:.2f}"]
            for name, seconds in result['median_seconds'].items()]
    lengths = result['tokens_per_expression']
    return (_table(header, rows) + f"\n{result['batch_size']} expressions of "
            f"{min(lengths)}-{max(lengths)} tokens, {result['iterations']} iterations of the "
            f"block, {result['rounds']} interleaved rounds on {result['threads']} thread(s); "
            f"load average {result['load_average']['before']:.1f} before, "
            f"{result['load_average']['after']:.1f} after.\n")


def _listops_probe(result: Dict) -> str:
    steps = [point['step'] for point in next(iter(result['runs'].values()))['curve']]
    header = ['model', 'parameters'] + [f'step {step} (%)' for step in steps]
    rows = [[f'``{name}``', str(run['parameters'])]
            + [f"{100 * point['test_accuracy']:.1f}" for point in run['curve']]
            for name, run in result['runs'].items()]
    config = result['config']
    return (_table(header, rows) + f"\nTest accuracy on 1,000 flat ``{result['operator']}`` "
            f"lists, {config['batch_size']} lists a step, seed {config['seed']}; "
            f"load average {result['load_average']:.1f}.\n")


#: heights of inner lists shown one by one; deeper ones are pooled
INNER_HEIGHTS = 4


def _listops_inner(result: Dict) -> str:
    header = (['model', 'operator', 'all lists (%)']
              + [f'height {h} (%)' for h in range(INNER_HEIGHTS)]
              + [f'height {INNER_HEIGHTS}+ (%)'])
    rows = []
    for name, model in result['models'].items():
        for operator, entry in model.items():
            if not isinstance(entry, dict):
                continue
            by_height = {int(h): row for h, row in entry['by_height'].items()}
            cells = [f"{100 * by_height[h]['accuracy']:.1f}" if h in by_height else '--'
                     for h in range(INNER_HEIGHTS)]
            deep = [row for h, row in by_height.items() if h >= INNER_HEIGHTS]
            lists = sum(row['lists'] for row in deep)
            right = sum(round(row['lists'] * row['accuracy']) for row in deep)
            cells.append(f'{100 * right / lists:.1f}' if lists else '--')
            rows.append([f'``{name}``', operator, f"{100 * entry['accuracy']:.1f}"] + cells)
    return (_table(header, rows) + f"\nEvery list of the first {result['count']} "
            f"``{result['split']}`` expressions ({result['setting']} setting), "
            f"checkpoints of ``{os.path.basename(result['checkpoint_dir'])}``.\n")


def _sbm(result: Dict) -> str:
    header = ['model', 'parameters', 'seeds', 'test weighted accuracy (%)', 'valid (%)',
              's / epoch']
    rows = [[f'``{name}``', str(row['parameters']), str(row['test_accuracy']['n']),
             _mean_std(row['test_accuracy']), _mean_std(row['valid_accuracy']),
             f"{row['seconds_per_epoch']['mean']:.0f}"]
            for name, row in result['summary'].items()]
    table = _table(header, rows)
    pairs = [c for c in result['comparisons'] if c['first'] == 'gps_hsa']
    if pairs:
        header = ['GIN + HSA minus', 'seeds', 'difference (points)', '95 % interval']
        rows = [[f"``{c['second']}``", str(len(c['seeds'])), f"{c['difference']:+.2f}",
                 f"[{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]"] for c in pairs]
        table += '\n' + _table(header, rows)
    published = result['published'][result['dataset']]['GraphGPS']
    config = result['config']
    # reports written before --schedule existed trained at a constant rate
    schedule = config.get('schedule', 'constant')
    rate = (f"learning rate {config['lr']:g}" if schedule == 'constant'
            else f"learning rate {config['lr']:g} with a {schedule} decay to 0")
    table += (f"\nBudget: {result['budget']['epochs']} epochs of batches of "
              f"{result['budget']['batch_size']} graphs, {config['layers']} layers, {rate}; "
              f"GraphGPS publishes {published:.2f} after 100 epochs of a 16- or 6-layer "
              f"model.\n")
    return table


# ------------------------------------------------ formats shared by the kinds below
def _seconds(value) -> str:
    if value is None:
        return '–'
    if value >= 1:
        return f'{value:.2f} s'
    if value >= 0.01:
        return f'{1e3 * value:.1f} ms'
    return f'{1e3 * value:.2f} ms'


def _times(value) -> str:
    if value is None:
        return '–'
    if value >= 100:
        return f'{value:.0f}×'
    if value >= 10:
        return f'{value:.1f}×'
    return f'{value:.2f}×'


def _gib(num_bytes) -> str:
    return f'{num_bytes / 2 ** 30:.2f} GiB'


def _mib(num_bytes) -> str:
    return f'{num_bytes / 2 ** 20:.0f} MiB'


def _log2(num_leaves: int) -> str:
    exponent = num_leaves.bit_length() - 1
    return f'2^{exponent}' if num_leaves == 1 << exponent else f'{num_leaves:,}'


def _targets(targets: List[Dict]) -> str:
    if not targets:
        return ''
    rows = [[t['name'], f"{t['measured']:.3g}",
             f"{t.get('threshold', t.get('limit')):g}", t['status']] for t in targets]
    return '\n' + _table(['target', 'measured', 'limit', 'status'], rows)


def _machine(machine: Dict) -> str:
    r"""One sentence on where and on what code a benchmark ran, from its
    ``machine`` record."""
    device = machine.get('cuda_device') or f"{machine.get('cpu_count', '?')}-core CPU"
    commit = machine.get('git_commit') or 'unknown'
    dirty = ' with uncommitted changes' if machine.get('git_dirty') else ''
    load = machine.get('load_average')
    load = f", load average {load[0]:.1f} at the start" if load else ''
    return (f"\nRun of {machine.get('date', '?')[:10]} on a {device}, torch "
            f"{machine.get('torch', '?')}, {machine.get('torch_threads', '?')} thread(s), "
            f"commit ``{commit[:7]}``{dirty}{load}: ``{machine.get('command', '?')}``.\n")


# --------------------------------------------------------------- the HSA core
def _scaling(result: Dict) -> str:
    header = ['N', 'HSA fwd', 'HSA fwd+bwd', 'floor fwd', 'dense SDPA fwd+bwd',
              'SGFormer fwd+bwd', 'dense / HSA (fwd+bwd)', 'HSA / floor (fwd)', 'HSA peak memory']
    rows = []
    for size in result['sizes']:
        methods, ratios = size['methods'], size['ratios']

        def time(method, stage):
            return _seconds(methods[method][stage]) if method in methods else '–'

        memory = methods['hsa'].get('memory', {})
        rows.append([_log2(size['num_leaves']), time('hsa', 'forward_s'),
                     time('hsa', 'forward_backward_s'), time('floor', 'forward_s'),
                     time('dense', 'forward_backward_s'), time('sgformer', 'forward_backward_s'),
                     _times(ratios.get('dense_over_hsa_forward_backward')),
                     _times(ratios.get('hsa_over_floor_forward')),
                     _gib(memory['peak_bytes']) if 'peak_bytes' in memory else '–'])
    config = result['config']
    kind = result['sizes'][0]['methods']['hsa'].get('memory', {}).get('kind')
    memory = {'rss': 'the absolute peak RSS of one forward+backward in a fresh process '
                     '(interpreter, torch and inputs included)',
              'cuda_allocated': "the peak of ``torch.cuda.memory_allocated`` during one "
                                "forward+backward"}.get(kind, 'not recorded')
    slope = result['slopes']['hsa_forward_backward']
    normalised = slope.get('value_load_normalised')
    normalised = f' (load-normalised {normalised:.2f})' if normalised is not None else ''
    return (_table(header, rows)
            + f"\nBalanced trees of branching {config['branching']}, {config['heads']} heads × "
            f"{config['head_dim']}, {config['dtype']}, on {config['device']}; medians of "
            f"{config['repeats']} rounds. Peak memory is {memory}. Log-log slope of HSA's forward+backward time over "
            f"N ≥ 2^{slope['min_log2']}: {slope['value']:.2f}{normalised}.\n"
            + _targets(result['targets']) + _machine(result['machine']))


def _engines(result: Dict) -> str:
    header = ['branching', 'threads', 'CPU kernel (fwd+bwd)', 'tensor sweeps (fwd+bwd)',
              'kernel / tensor sweeps']
    rows = [[str(row['branching']), str(row['threads']), _seconds(row['seconds']['kernel']),
             _seconds(row['seconds']['tensor sweeps']), _times(row['kernel / tensor sweeps'])]
            for row in result['rows']]
    config = result['config']
    return (_table(header, rows) + f"\nBalanced trees of 2^{config['log2']} leaves, "
            f"{config['heads']} heads × {config['dim']}, {config['repeats']} interleaved "
            f"rounds; ratios are medians of per-round ratios.\n" + _machine(result['machine']))


def _batches(result: Dict) -> str:
    methods = list(result['workloads'][0]['forward_backward']['seconds'])
    compared = [m for m in result['workloads'][0]['forward_backward']['ratio_to_sdpa']
                if m.startswith('hsa')]
    header = (['batch', 'leaves', 'sibling pairs'] + [f'{m}' for m in methods]
              + [f'{m} / sdpa' for m in compared])
    rows = []
    for workload in result['workloads']:
        stage = workload['forward_backward']
        rows.append([workload['name'], f"{workload['num_leaves']:,}",
                     f"{workload['sibling_pairs']:,}"]
                    + [_seconds(stage['seconds'].get(m)) for m in methods]
                    + [_times(stage['ratio_to_sdpa'].get(m)) for m in compared])
    config = result['config']
    return (_table(header, rows) + f"\nForward+backward of the attention alone, q, k, v "
            f"``[T, {config['heads']}, {config['dim']}]`` {config['dtype']} on "
            f"{config['device']}, {config['threads']} thread(s), {config['repeats']} interleaved "
            f"rounds (medians; ratios are medians of per-round ratios).\n"
            + _targets(result['targets']) + _machine(result['machine']))


def _energy_terms(result: Dict) -> str:
    variants = [v for v in result['config']['variants'] if v != 'hsa']
    header = ['N', 'plain HSA fwd', 'plain HSA fwd+bwd'] + [
        f'``{v}`` fwd / fwd+bwd' for v in variants]
    rows = []
    for size in result['sizes']:
        plain, ratios = size['methods']['hsa'], size['ratios']
        rows.append([_log2(size['num_leaves']), _seconds(plain['forward_s']),
                     _seconds(plain['forward_backward_s'])]
                    + [f"{_times(ratios[v]['forward'])} / {_times(ratios[v]['forward_backward'])}"
                       for v in variants])
    config = result['config']
    options = '; '.join(f'``{name}``: ' + ', '.join(f'{k}={v!r}' for k, v in options.items())
                        for name, options in result['definitions']['variants'].items() if options)
    return (_table(header, rows) + f"\nRatios to plain HSA in the same rounds (medians of "
            f"per-round ratios); balanced trees of branching {config['branching']}, "
            f"{config['heads']} heads × {config['head_dim']}, {config['dtype']}, "
            f"{config['threads']} thread(s), {config['repeats']} rounds. Variants: {options}.\n"
            + _targets(result['targets']) + _machine(result['machine']))


# ------------------------------------------------------------- across ranks
def _distributed(result: Dict) -> str:
    header = ['series', 'ranks', 'N (leaves in all)', 'parts', 's / layer (slowest rank)',
              'peak per rank (layer)', 'bytes per layer']
    rows = []
    for series in ('weak', 'strong'):
        for run in result[series]:
            rows.append([series, str(run['world_size']), _log2(run['num_leaves']),
                         str(run['parts']), f"{run['seconds_per_layer']:.2f}",
                         _mib(run['max_layer_peak_bytes']), f"{run['communication_bytes']:,}"])
    table = _table(header, rows)
    header = ['ranks', 'N', 'parts', 'bytes per layer']
    rows = [[str(c['world_size']), _log2(c['num_leaves']), str(c['parts']), f"{c['bytes']:,}"]
            for c in result['communication']]
    config = result['config']
    return (table + '\nCommunication at two sizes on the largest world:\n\n' + _table(header, rows)
            + f"\nBalanced trees of branching {config['branching']}, {config['heads']} heads × "
            f"{config['dim']}, {config['dtype']}, {config['backend']} ranks with "
            f"{config['threads_per_rank']} thread(s) each; a layer is ``distributed_hsa`` "
            f"forward+backward, best of {config['repeats']}.\n"
            + _targets(result['targets']) + _machine(result['machine']))


def _planted_partition(results: Dict[str, Dict]) -> str:
    runs: Dict = {}
    for result in results.values():
        config = result['config']
        runs.setdefault((config['num_nodes'], config['epochs']), {})[config['model']] = result
    models = sorted({model for by_model in runs.values() for model in by_model})
    header = (['nodes', 'epochs', 'ranks'] + [f'test accuracy, ``{m}``' for m in models]
              + [f'median s / step, ``{m}``' for m in models]
              + [f'peak RSS per rank, ``{m}``' for m in models])
    rows = []
    for (nodes, epochs), by_model in sorted(runs.items()):
        ranks = {r['world_size'] for r in by_model.values()}
        cells = [f'{nodes:,}', str(epochs), '/'.join(map(str, sorted(ranks)))]
        for column in ('accuracy', 'step', 'memory'):
            for model in models:
                result = by_model.get(model)
                if result is None:
                    cells.append('–')
                elif column == 'accuracy':
                    cells.append(f"{result['history'][-1]['test_acc']:.3f}")
                elif column == 'step':
                    steps = sorted(h['step_seconds'] for h in result['history'])
                    cells.append(f'{steps[len(steps) // 2]:.2f}')
                else:
                    cells.append(_gib(max(result['peak_rss_bytes_per_rank'])))
        rows.append(cells)
    return (_table(header, rows) + "\nTest accuracy after the last epoch; seconds per step "
            "are the median over the logged epochs; peak RSS is the largest rank's.\n")


def _planted_built(result: Dict) -> str:
    graph = result['graph']
    header = ['model', 'parameters', 'test accuracy (%)', 'seeds', 'finished', 's / epoch',
              'peak memory']
    if any('selected_lr' in row for row in result['summary'].values()):
        header.insert(1, 'learning rate')
    rows = [[f'``{name}``']
            + ([f"{row['selected_lr']:g}"] if 'selected_lr' in row else [])
            + [str(row['parameters']),
             _mean_std(row['test_acc'], 100),
             ', '.join(map(str, row['seeds'])), 'yes' if row['finished'] else '**no**',
             f"{row['seconds_per_epoch']['mean']:.1f}",
             _gib(row['peak_rss_bytes']) if row['peak_rss_bytes'] else '–']
            for name, row in result['summary'].items()]
    table = _table(header, rows)
    if result['comparisons']:
        header = ['``sage_hsa`` minus', 'difference (points)', '95 % interval',
                  'both finished (epochs)']
        rows = [[f"``{c['second']}``", f"{100 * c['difference']:+.1f}",
                 f"[{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}]",
                 ('yes' if c['finished'] else '**no**') + ' ('
                 + '; '.join(f"{m}: {', '.join(map(str, e))}"
                             for m, e in c['epochs_run'].items()) + ')']
                for c in result['comparisons']]
        table += '\n' + _table(header, rows)
    if result.get('lr_grid'):
        table += '\n' + _learning_rate_grid(result)
    header = ['depth', 'clusters', 'mean size', 'group purity', 'group completeness',
              'label purity']
    rows = [[str(row['depth']), f"{row['clusters']:,}", f"{row['mean_size']:,.0f}",
             f"{row['group_purity']:.2f}", f"{row['group_completeness']:.2f}",
             f"{row['label_purity']:.2f}"] for row in graph['purity']]
    table += '\n' + _table(header, rows)
    budget = result['budget']
    return (table + f"\n{graph['num_nodes']:,} nodes, {graph['num_edges']:,} edges; tree "
            f"built by ``{graph['build_method']}`` in {graph['build_seconds']:.1f} s. "
            f"Budget: {budget['epochs']} epochs ({budget['optimiser']}), test accuracy at "
            f"the best validation epoch (every {budget['eval_every']} epochs; stop after "
            f"{budget['patience_evaluations']} evaluations without progress).\n")


def _learning_rate_grid(result: Dict) -> str:
    r"""Validation and test accuracy of every model at every learning rate
    it trained at; the rate selected (best mean validation) in bold."""
    grid = result['lr_grid']
    rates = sorted({float(lr) for cells in grid.values() for lr in cells})
    header = ['model'] + [f'lr {lr:g}: valid / test (%)' for lr in rates]
    rows = []
    for name, cells in grid.items():
        selected = result['summary'].get(name, {}).get('selected_lr')
        row = [f'``{name}``']
        for lr in rates:
            cell = cells.get(repr(lr))
            text = ('–' if cell is None else
                    f"{100 * cell['valid_acc']['mean']:.1f} / {_mean_std(cell['test_acc'], 100)}")
            row.append(f'**{text}**' if cell is not None and lr == selected else text)
        rows.append(row)
    return _table(header, rows)


# ------------------------------------------------------------------- builders
def _max_children(result: Dict) -> str:
    bench = result['max_children']
    sizes = sorted({row['num_leaves'] for row in bench['rows']})
    by_key = {(row['max_children'], row['num_leaves']): row for row in bench['rows']}
    header = ['b'] + [cell for n in sizes for cell in (f'depth, N = {n:,}',
                                                        f'fwd+bwd, N = {n:,}')]
    rows = []
    for b in sorted({row['max_children'] for row in bench['rows']}):
        cells = [str(b)]
        for n in sizes:
            row = by_key.get((b, n))
            cells += ([str(row['depth']), f"{row['forward_backward_ms']:.1f} ms"] if row
                      else ['–', '–'])
        rows.append(cells)
    best = '; '.join(f"N = {int(n):,}: fastest b = {v['fastest']}, within 25 % "
                     f"b = {', '.join(map(str, v['within_25_percent']))}"
                     for n, v in bench['best'].items())
    load = result.get('machine', {}).get('load_average_at_start')
    load = f', load average {load[0]:.1f} at the start' if load else ''
    return (_table(header, rows) + f"\n{bench['heads']} heads of dimension {bench['head_dim']} "
            f"on {bench['device']}; {bench['tree']}; {bench['timing']}. {best}. Written by "
            f"``{result['max_children_command']}``{load}.\n")


def _metis(result: Dict) -> str:
    bench = result['metis_vs_louvain']
    columns = [('METIS', bench['metis']),
               ('Louvain, then Louvain sub-clustering', bench['louvain_split_louvain']),
               ('Louvain, then balanced chunks', bench['louvain_split_chunk'])]
    rerun = result.get('metis_rerun_with_cpu_time')

    def time(name, tree):
        text = f"{tree['seconds']:.1f}"
        if name == 'METIS' and rerun:
            text += f" (rerun: {rerun['seconds']:.1f}; {rerun['cpu_seconds']:.1f} of processor)"
        return text

    rows = [
        ['time (s)'] + [time(n, t) for n, t in columns],
        ['depth (max / mean over leaves)'] + [f"{t['max_depth']} / {t['mean_leaf_depth']:.1f}"
                                              for _, t in columns],
        ['mean children per cluster'] + [f"{t['mean_children']:.1f}" for _, t in columns],
        [r'HSA cost :math:`\sum_A b_A^2`'] + [f"{t['hsa_cost'] / 1e6:.1f} M" for _, t in columns],
        ['edges inside one leaf family'] + [f"{100 * t['edges_within_leaf_family']:.1f} %"
                                            for _, t in columns],
        ['edges inside one depth-2 subtree'] + [
            f"{100 * t['edges_within_depth_2_subtree']:.0f} %" for _, t in columns],
        ["leaves in their family's majority block"] + [
            f"{100 * t['leaf_family_block_purity']:.1f} %" for _, t in columns],
    ]
    graph = bench['graph']
    runs = []
    for command, machine in (('metis_vs_louvain_command', 'metis_vs_louvain_machine'),
                             ('metis_rerun_command', 'metis_rerun_machine')):
        if command in result:
            load = result.get(machine, {}).get('load_average_at_start')
            load = f' (load average {load[0]:.1f} at the start)' if load else ''
            runs.append(f'``{result[command]}``{load}')
    return (_table([''] + [name for name, _ in columns], rows)
            + f"\nGraph: {graph['kind']}; {graph['num_nodes']:,} nodes, "
            f"{graph['num_undirected_edges']:,} undirected edges, {graph['num_blocks']} blocks; "
            f"``max_children={bench['max_children']}``. Written by {' and '.join(runs)}.\n")


# ----------------------------------------------------------- graph models
def _ogb(result: Dict) -> str:
    first = next(iter(result['summary'].values()))
    test = next(key for key in first if key.startswith('test_'))
    valid = test.replace('test_', 'valid_')
    metric = 'ROC-AUC' if 'rocauc' in test else 'accuracy (%)'

    def mean_std(entry):
        if entry['n'] > 1:
            return f"{entry['mean']:.2f} ± {entry['std']:.2f}"
        return f"{entry['mean']:.2f}"

    header = ['model', 'parameters', f'test {metric}', f'valid {metric}', 's / epoch']
    rows = [[f'``{name}``', f"{row['num_parameters']:,}", mean_std(row[test]),
             mean_std(row[valid]), f"{row['epoch_seconds']['mean']:.2f}"]
            for name, row in result['summary'].items()]
    config = result['config']
    command = f"``python {result['script']} {' '.join(result['argv'])}``" if 'argv' in result \
        else f"``{result['script']}`` (options in the file's ``config``)"
    return (_table(header, rows) + f"\nTest metric at the best validation epoch, mean ± std "
            f"over seeds {config['seeds']}; {config['epochs']} epochs, hidden "
            f"{config['hidden']}, {config['layers']} layers, {config['threads']} thread(s). "
            f"Written by {command}.\n")


#: the zero-shot methods as the tables name them
ZERO_SHOT_METHODS = {'original': 'original', 'hsa': 'HSA (text tree)',
                     'hsa_global': 'HSA (text tree) + global',
                     'hsa_key_clusters': 'HSA (key clusters) + global',
                     'hsa_layered': 'HSA (text tree below, key clusters above) + global',
                     'block_global': 'sentence blocks + global',
                     'window_global': 'sliding window + global',
                     'cluster_global': 'key-cluster blocks + global'}


def _interval(summary: Dict, spec: str = '.4f') -> str:
    low, high = summary['ci95']
    return f"{summary['mean']:{spec}} [{low:{spec}}, {high:{spec}}]"


def _zero_shot(result: Dict) -> str:
    header = ['layers replaced', 'method', 'FLOPs / original (clustering)',
              'cosine to original [95 % CI]', 'probe accuracy [95 % CI]', 'encode time']
    rows = []
    for row in result['rows']:
        layers = ', '.join(str(layer + 1) for layer in row['layers']) or '--'
        flops = f"{row['flops_ratio']:.3f}"
        if row.get('clustering_flops_ratio'):
            flops += f" ({row['clustering_flops_ratio']:.3f})"
        rows.append([f"{row['pattern']} ({layers})", ZERO_SHOT_METHODS[row['method']], flops,
                     _interval(row['cosine']), _interval(row['probe_accuracy']),
                     f"{row['encode_time_ratio']:.2f}"])
    table = _table(header, rows)
    header = ['layers', 'method', 'minus', 'cosine difference [95 % CI]',
              'probe accuracy difference [95 % CI]']
    rows = [[c['pattern'], ZERO_SHOT_METHODS[c['method']], ZERO_SHOT_METHODS[c['baseline']],
             _interval(c['cosine_difference'], '+.4f'),
             _interval(c['probe_accuracy_difference'], '+.4f')]
            for c in result['comparisons']]
    data, model = result['data'], result['model']
    table += '\n' + _table(header, rows)
    return table + (f"\n{model['name']}, {data['test']} test reviews (probe fitted on "
                    f"{data['train']}), {data['mean_tokens_per_review']:.0f} word pieces on "
                    f"average; paired bootstrap intervals over the test reviews. FLOPs count "
                    f"attention (and, in brackets, the share of building the key clusters, "
                    f"included in the total). Written by ``{result['command']}``.\n")


def _imdb(result: Dict) -> str:
    # runs are named "model" or "model/positions/embeddings"
    header = ['run', 'test accuracy (mean ± std)', 'seeds', 'best validation accuracy',
              's / training step', 'attention MFLOPs / review']
    rows = []
    for name, row in result['summary'].items():
        step = row.get('seconds_per_step_mean')
        valid = row.get('best_valid_acc_mean')
        rows.append([f'``{name}``', f"{row['test_acc_mean']:.4f} ± {row['test_acc_std']:.4f}",
                     str(row['seeds']), '--' if valid is None else f'{valid:.4f}',
                     '--' if step is None else f'{step:.3f}',
                     f"{row['attention_flops_per_review'] / 1e6:.2f}"])
    table = _table(header, rows)
    comparisons = result.get('comparisons') or []
    if comparisons:
        header = ['run', 'minus', 'difference (mean over seeds)', '95 % interval', 'note']
        rows = [[f"``{c['first']}``", f"``{c['second']}``", f"{c['difference_mean']:+.4f}",
                 f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]", c.get('kind', '')]
                for c in comparisons]
        table += '\n' + _table(header, rows)
    return table + f"\nWritten by ``{result['command']}``.\n"


RENDERERS: Dict[str, Callable[[Dict], str]] = {'zero-shot': _zero_shot, 'imdb': _imdb,
                                                'listops': _listops,
                                                'listops-step': _listops_step,
                                                'listops-probe': _listops_probe,
                                                'listops-inner': _listops_inner, 'sbm': _sbm,
                                                'scaling': _scaling, 'engines': _engines,
                                                'batches': _batches,
                                                'energy-terms': _energy_terms,
                                                'distributed': _distributed,
                                                'max-children': _max_children,
                                                'metis': _metis, 'ogb': _ogb,
                                                'planted-built': _planted_built}
# kinds whose path is a glob: the renderer gets {path: result} of every match
RENDERERS_OF_MANY: Dict[str, Callable[[Dict[str, Dict]], str]] = {
    'planted-partition': _planted_partition}


def _missing(kind: str, path: str) -> str:
    return (f".. note::\n\n   ``{path}`` is not there yet: "
            f"``{COMMANDS[kind].replace('FILE', path)}`` writes it.\n")


def render(kind: str, path: str, root: str) -> str:
    if kind in RENDERERS_OF_MANY:
        found = sorted(glob.glob(os.path.join(root, path)))
        if not found:
            return _missing(kind, path)
        results = {}
        for full in found:
            with open(full) as handle:
                results[os.path.relpath(full, root)] = json.load(handle)
        return (f"From {', '.join(f'``{name}``' for name in results)}:\n\n"
                + RENDERERS_OF_MANY[kind](results))
    if kind not in RENDERERS:
        raise ValueError(f"results-table: unknown kind {kind!r}; choose one of "
                         f"{sorted(RENDERERS) + sorted(RENDERERS_OF_MANY)}")
    full = os.path.join(root, path)
    if not os.path.isfile(full):
        return _missing(kind, path)
    with open(full) as handle:
        return f"From ``{path}``:\n\n" + RENDERERS[kind](json.load(handle))


def fill(source: str, root: str) -> str:
    return MARKER.sub(lambda match: render(match.group(1), match.group(2), root), source)


def setup(app):
    root = os.path.dirname(os.path.abspath(app.srcdir))

    def on_source_read(app, docname, source):
        if MARKER.search(source[0]):
            source[0] = fill(source[0], root)

    app.connect('source-read', on_source_read)
    return {'parallel_read_safe': True}
