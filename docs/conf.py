# Sphinx configuration for hsa_geo. Build (must stay warning-free):
#     .venv/bin/python -m sphinx -W -q -b html docs docs/_build/html
# Plain reStructuredText, built-in theme, no network access at build time.
import os
import sys

sys.path.insert(0, os.path.abspath('..'))
sys.path.insert(0, os.path.abspath('_ext'))

import hsa_geo  # noqa: E402

project = 'hsa_geo'
author = 'hsa_geo developers'
copyright = '2026, hsa_geo developers'
release = hsa_geo.__version__
version = release

extensions = [
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
    'sphinx.ext.doctest',
    'results_tables',  # docs/_ext: tables rendered from benchmarks/results/*.json
]

exclude_patterns = ['_build', '_ext']
root_doc = 'index'
html_theme = 'alabaster'
html_static_path = []
pygments_style = 'sphinx'

autodoc_member_order = 'bysource'
autodoc_typehints = 'description'
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# PyG-style docstrings end with a "Shapes:" section.
napoleon_custom_sections = ['Shapes']

# Pages written for later issues (hierarchy builders, models, the text
# experiments, signal geometry) join the table of contents of index.rst as
# they appear: every page other than the core ones below, builders first. A
# toctree glob that matches nothing warns (and -W fails), and Sphinx cannot
# suppress that warning, so index.rst holds a placeholder line that is
# replaced by a toctree of the pages present at build time. A folder with an
# index.rst contributes only that page (it lists the rest itself).
CORE_PAGES = ['index', 'quickstart', 'tutorial', 'derivation', 'complexity', 'api']
FIRST_PAGES = ['builders', 'models', 'where_hsa_helps', 'results_text']
_PLACEHOLDER = '.. optional-pages::'


def _existing_optional_pages(srcdir):
    pages = []
    for entry in sorted(os.listdir(srcdir)):
        path = os.path.join(srcdir, entry)
        if entry.startswith(('_', '.')):
            continue
        if os.path.isdir(path):
            names = sorted(name[:-len('.rst')] for name in os.listdir(path)
                           if name.endswith('.rst') and not name.startswith(('_', '.')))
            if 'index' in names:
                names = ['index']
            pages.extend(f'{entry}/{name}' for name in names)
        elif entry.endswith('.rst') and entry[:-len('.rst')] not in CORE_PAGES:
            pages.append(entry[:-len('.rst')])

    def rank(page):
        top = page.split('/')[0]
        return (FIRST_PAGES.index(top) if top in FIRST_PAGES else len(FIRST_PAGES), page)

    return sorted(pages, key=rank)


def _fill_optional_toctree(app, docname, source):
    if docname != 'index' or _PLACEHOLDER not in source[0]:
        return
    pages = _existing_optional_pages(app.srcdir)
    block = ''
    if pages:
        block = ('.. toctree::\n   :maxdepth: 2\n'
                 '   :caption: Hierarchies, models and experiments\n\n'
                 + ''.join(f'   {page}\n' for page in pages))
    source[0] = source[0].replace(_PLACEHOLDER, block)


def _index_always_outdated(app, env, added, changed, removed):
    # A page added or removed elsewhere changes index.rst's toctree.
    return ['index']


def setup(app):
    app.connect('source-read', _fill_optional_toctree)
    app.connect('env-get-outdated', _index_always_outdated)

# `make doctest` style runs (`sphinx -b doctest docs ...`) see the package.
doctest_global_setup = 'import torch\ntorch.manual_seed(0)'
