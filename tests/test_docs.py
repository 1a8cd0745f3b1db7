"""The documentation cannot rot: every ``>>>`` example in docs/ and in the
docstrings of the documented core modules runs here, and the Sphinx build
must stay free of warnings."""
import doctest
import importlib
import io
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, 'docs')
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _pages_with_examples():
    pages = []
    for folder, dirs, files in os.walk(DOCS):
        dirs[:] = [d for d in dirs if not d.startswith('_')]  # skip _build
        for name in sorted(files):
            path = os.path.join(folder, name)
            if name.endswith('.rst'):
                with open(path, encoding='utf-8') as f:
                    if '>>>' in f.read():
                        pages.append(os.path.relpath(path, DOCS))
    return sorted(pages)


def _run(tests):
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in tests:
        runner.run(test, out=out.write)
    return runner.summarize(verbose=False), out.getvalue()


def test_the_core_pages_have_examples():
    # If a page loses its examples, the test below silently stops covering it.
    assert {'quickstart.rst', 'tutorial.rst', 'derivation.rst',
            'complexity.rst'} <= set(_pages_with_examples())


@pytest.mark.parametrize('page', _pages_with_examples())
def test_page_examples(page):
    path = os.path.join(DOCS, page)
    with open(path, encoding='utf-8') as f:
        text = f.read()
    test = doctest.DocTestParser().get_doctest(text, {'__name__': '__docs__'}, page, path, 0)
    result, report = _run([test])
    assert result.attempted > 0
    assert result.failed == 0, report


DOCUMENTED_MODULES = [
    'hsa_geo.hierarchy.hierarchy',
    'hsa_geo.hierarchy.plan',
    'hsa_geo.functional.attention',
    'hsa_geo.functional.dense',
    'hsa_geo.functional.sweep',
    'hsa_geo.nn.conv.hsa_conv',
    'hsa_geo.data',
    'hsa_geo.nn.positional',
]


@pytest.mark.parametrize('name', DOCUMENTED_MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result, report = _run(doctest.DocTestFinder().find(module))
    assert result.failed == 0, report


def _docs_conf():
    sys.path.insert(0, DOCS)
    try:
        return importlib.import_module('conf')
    finally:
        sys.path.remove(DOCS)


def test_optional_pages_join_the_toctree(tmp_path):
    conf = _docs_conf()
    (tmp_path / 'builders').mkdir()
    (tmp_path / 'extra').mkdir()
    (tmp_path / '_build').mkdir()
    for page in ('builders/graphs.rst', 'builders/sequences.rst', 'extra/index.rst',
                 'extra/part.rst', '_build/x.rst', 'results_text.rst', 'models.rst',
                 'geometry.rst', 'api.rst', 'index.rst', 'conf.py'):
        (tmp_path / page).write_text('Title\n=====\n')
    assert conf._existing_optional_pages(str(tmp_path)) == [
        'builders/graphs', 'builders/sequences', 'models', 'results_text',
        'extra/index', 'geometry']
    (tmp_path / 'builders' / 'index.rst').write_text('Builders\n========\n')
    assert conf._existing_optional_pages(str(tmp_path))[:2] == ['builders/index', 'models']
    assert conf._existing_optional_pages(str(tmp_path / '_build')) == ['x']


@pytest.mark.slow
def test_sphinx_build_has_no_warnings(tmp_path):
    result = subprocess.run(
        [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q', '-b', 'html',
         '-d', str(tmp_path / 'doctrees'), DOCS, str(tmp_path / 'html')],
        capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert 'WARNING' not in result.stderr, result.stderr
