"""The results tables of docs/ are rendered from benchmarks/results/*.json
when the docs are built (docs/_ext/results_tables.py). Here every
``.. results-table::`` line of every page renders against the real files
into valid reStructuredText, and numbers read from each file appear in what
it renders, so a page cannot show a figure its JSON does not hold."""
import glob
import io
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, 'docs')
sys.path.insert(0, os.path.join(DOCS, '_ext'))
import results_tables  # noqa: E402


def _markers():
    found = []
    for folder, dirs, files in os.walk(DOCS):
        dirs[:] = sorted(d for d in dirs if not d.startswith('_'))  # skip _build, _ext
        for name in sorted(files):
            if name.endswith('.rst'):
                path = os.path.join(folder, name)
                with open(path, encoding='utf-8') as handle:
                    for match in results_tables.MARKER.finditer(handle.read()):
                        found.append((os.path.relpath(path, DOCS), match.group(1),
                                      match.group(2)))
    return found


MARKERS = _markers()


def _files(path):
    return sorted(glob.glob(os.path.join(ROOT, path)))


def _load(path):
    with open(path) as handle:
        return json.load(handle)


def _assert_valid_rst(text):
    from docutils.core import publish_doctree
    messages = io.StringIO()
    publish_doctree(text, settings_overrides={'warning_stream': messages, 'report_level': 2,
                                              'halt_level': 5})
    assert messages.getvalue() == '', messages.getvalue()


# Numbers each kind must show, read from its JSON file(s) here, independently
# of the renderer.
def _scaling(result):
    slope = result['slopes']['hsa_forward_backward']['value']
    return [f'{slope:.2f}'] + [f"{t['measured']:.3g}" for t in result['targets']]


def _engines(result):
    return [f"{row['kernel / tensor sweeps']:.2f}×" for row in result['rows']]


def _batches(result):
    return [f"{w['num_leaves']:,}" for w in result['workloads']] + [
        f"{w['forward_backward']['ratio_to_sdpa']['hsa']:.2f}×" for w in result['workloads']]


def _energy_terms(result):
    largest = result['sizes'][-1]['ratios']
    return [f"{ratios['forward']:.2f}× / {ratios['forward_backward']:.2f}×"
            for ratios in largest.values()]


def _distributed(result):
    runs = result['weak'] + result['strong']
    return ([f"{run['communication_bytes']:,}" for run in runs]
            + [f"{run['seconds_per_layer']:.2f}" for run in runs]
            + [f"{c['bytes']:,}" for c in result['communication']])


def _planted_partition(results):
    return [f"{r['history'][-1]['test_acc']:.3f}" for r in results] + [
        f"{r['config']['num_nodes']:,}" for r in results]


def _max_children(result):
    return [f"{row['forward_backward_ms']:.1f} ms" for row in result['max_children']['rows']]


def _metis(result):
    bench = result['metis_vs_louvain']
    return [f"{100 * bench[tree]['leaf_family_block_purity']:.1f} %"
            for tree in ('metis', 'louvain_split_louvain', 'louvain_split_chunk')] + [
        f"{result['metis_rerun_with_cpu_time']['seconds']:.1f}"]


def _ogb(result):
    expected = []
    for name, row in result['summary'].items():
        test = next(key for key in row if key.startswith('test_'))
        expected += [f'``{name}``', f"{row[test]['mean']:.2f}"]
    return expected


def _listops(result):
    return [f'``{name}``' for name in result['summary']]


def _listops_step(result):
    return [f'{seconds:.3f}' for seconds in result['median_seconds'].values()]


def _listops_probe(result):
    return [f"{100 * point['test_accuracy']:.1f}" for run in result['runs'].values()
            for point in run['curve']]


def _listops_inner(result):
    return [f"{100 * entry['accuracy']:.1f}" for model in result['models'].values()
            for entry in model.values() if isinstance(entry, dict)]


def _sbm(result):
    return [f'``{name}``' for name in result['summary']] + [
        f"{c['difference']:+.2f}" for c in result['comparisons'] if c['first'] == 'gps_hsa']


def _planted_built(result):
    return ([f'``{name}``' for name in result['summary']]
            + [f"{100 * c['difference']:+.1f}" for c in result['comparisons']]
            + [f"{result['graph']['build_seconds']:.1f} s"]
            + [f"{row['selected_lr']:g}" for row in result['summary'].values()
               if 'selected_lr' in row]
            + [f"{100 * cell['valid_acc']['mean']:.1f} / "
               for cells in result.get('lr_grid', {}).values() for cell in cells.values()])


def _zero_shot(result):
    return [f"{row['cosine']['mean']:.4f}" for row in result['rows']] + [
        f"{c['cosine_difference']['mean']:+.4f}" for c in result['comparisons']]


def _imdb(result):
    return [f"{row['test_acc_mean']:.4f} ± {row['test_acc_std']:.4f}"
            for row in result['summary'].values()] + [
        f"{c['difference_mean']:+.4f}" for c in result.get('comparisons') or []]


EXPECTED = {'zero-shot': _zero_shot, 'imdb': _imdb, 'scaling': _scaling, 'engines': _engines,
            'batches': _batches,
            'energy-terms': _energy_terms, 'distributed': _distributed,
            'planted-partition': _planted_partition, 'max-children': _max_children,
            'metis': _metis, 'ogb': _ogb, 'listops': _listops, 'listops-step': _listops_step,
            'listops-probe': _listops_probe, 'listops-inner': _listops_inner, 'sbm': _sbm,
            'planted-built': _planted_built}


def test_the_pages_ask_for_the_new_kinds():
    # If a page loses its marker, the tests below silently stop covering it.
    kinds = {kind for _, kind, _ in MARKERS}
    assert {'scaling', 'engines', 'batches', 'energy-terms', 'distributed',
            'planted-partition', 'max-children', 'metis', 'ogb'} <= kinds


def test_every_kind_has_a_command_and_a_check():
    kinds = set(results_tables.RENDERERS) | set(results_tables.RENDERERS_OF_MANY)
    assert kinds <= set(results_tables.COMMANDS)
    assert kinds <= set(EXPECTED)


@pytest.mark.parametrize('page, kind, path', MARKERS,
                         ids=[f'{page}:{kind}:{os.path.basename(path)}'
                              for page, kind, path in MARKERS])
def test_every_table_renders_what_its_json_holds(page, kind, path):
    text = results_tables.render(kind, path, ROOT)
    _assert_valid_rst(text)
    files = _files(path)
    if not files:  # not run yet: the page names the command that writes it
        assert 'is not there yet' in text
        assert results_tables.COMMANDS[kind].split(' --out')[0] in text
        return
    assert '.. list-table::' in text
    for full in files:
        assert f'``{os.path.relpath(full, ROOT)}``' in text
    if kind in results_tables.RENDERERS_OF_MANY:
        expected = EXPECTED[kind]([_load(full) for full in files])
    else:
        expected = EXPECTED[kind](_load(files[0]))
    assert expected
    missing = [number for number in expected if number not in text]
    assert not missing, f'{page}: {kind} table lacks {missing} from {path}'


def test_a_missing_file_names_its_command(tmp_path):
    for kind, path in (('scaling', 'benchmarks/results/scaling.json'),
                       ('ogb', 'benchmarks/results/molhiv.json'),
                       ('planted-partition', 'benchmarks/results/planted_partition_[0-9]*.json')):
        text = results_tables.render(kind, path, str(tmp_path))
        assert text.startswith('.. note::') and f'``{path}``' in text
        assert 'FILE' not in text
    text = results_tables.render('ogb', 'benchmarks/results/molhiv.json', str(tmp_path))
    assert '--out benchmarks/results/molhiv.json' in text


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown kind 'scalling'"):
        results_tables.render('scalling', 'benchmarks/results/scaling.json', ROOT)


def test_fill_replaces_only_marker_lines(tmp_path):
    (tmp_path / 'r.json').write_text(json.dumps(_load(
        os.path.join(ROOT, 'benchmarks/results/engines.json'))))
    source = 'Title\n=====\n\nText.\n\n.. results-table:: engines r.json\n\nMore text.\n'
    filled = results_tables.fill(source, str(tmp_path))
    assert filled.startswith('Title\n=====\n\nText.\n\nFrom ``r.json``:')
    assert filled.endswith('\nMore text.\n') and 'results-table' not in filled
