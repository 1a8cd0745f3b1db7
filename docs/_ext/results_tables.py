r"""Tables of the results pages, rendered from the JSON files under
``benchmarks/results/`` when the docs are built, so a number on a page
cannot drift from the file it cites.

A page asks for a table with a line of its own::

    .. results-table:: listops benchmarks/results/listops_generalisation.json

and gets a ``list-table`` (or a note saying which command writes the file,
when it does not exist yet). Kinds: ``listops``, ``listops-step``, ``sbm``.
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable, Dict, List

MARKER = re.compile(r'^\.\. results-table:: (\S+) (\S+)\s*$', re.MULTILINE)
COMMANDS = {
    'listops': 'python examples/listops.py',
    'listops-step': 'python benchmarks/listops_step.py',
    'sbm': 'python examples/cluster_pattern.py',
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
    pairs = [c for c in result['comparisons'] if c['first'] == 'hsa']
    if pairs:
        header = ['HSA minus', 'split', 'difference (points)', '95 % interval']
        rows = [[f"``{c['second']}``", c['split'], f"{100 * c['difference']:+.1f}",
                 f"[{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}]"] for c in pairs]
        table += '\n' + _table(header, rows)
    budget = result['budget']
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


def _sbm(result: Dict) -> str:
    header = ['model', 'parameters', 'test weighted accuracy (%)', 'valid (%)', 's / epoch']
    rows = [[f'``{name}``', str(row['parameters']), _mean_std(row['test_accuracy']),
             _mean_std(row['valid_accuracy']), f"{row['seconds_per_epoch']['mean']:.0f}"]
            for name, row in result['summary'].items()]
    table = _table(header, rows)
    pairs = [c for c in result['comparisons'] if c['first'] == 'gps_hsa']
    if pairs:
        header = ['GIN + HSA minus', 'difference (points)', '95 % interval']
        rows = [[f"``{c['second']}``", f"{c['difference']:+.2f}",
                 f"[{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]"] for c in pairs]
        table += '\n' + _table(header, rows)
    published = result['published'][result['dataset']]['GraphGPS']
    table += (f"\nBudget: {result['budget']['epochs']} epochs of batches of "
              f"{result['budget']['batch_size']} graphs, {result['config']['layers']} layers; "
              f"GraphGPS publishes {published:.2f} after 100 epochs of a 16- or 6-layer "
              f"model.\n")
    return table


RENDERERS: Dict[str, Callable[[Dict], str]] = {'listops': _listops,
                                                'listops-step': _listops_step, 'sbm': _sbm}


def render(kind: str, path: str, root: str) -> str:
    if kind not in RENDERERS:
        raise ValueError(f"results-table: unknown kind {kind!r}; choose one of "
                         f"{sorted(RENDERERS)}")
    full = os.path.join(root, path)
    if not os.path.isfile(full):
        return (f".. note::\n\n   ``{path}`` is not there yet: ``{COMMANDS[kind]}`` "
                f"writes it.\n")
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
