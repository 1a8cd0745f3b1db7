"""The examples of the builder docs pages (docs/builders/*.rst) run and
print what the pages say."""
import doctest
from pathlib import Path

import pytest

PAGES = sorted((Path(__file__).resolve().parents[1] / 'docs' / 'builders').glob('*.rst'))


def test_every_family_has_a_page():
    names = {page.stem for page in PAGES}
    assert {'index', 'partitions', 'networkx', 'dendrogram', 'metis', 'sequences', 'grid',
            'compose', 'transforms'} <= names


@pytest.mark.parametrize('page', PAGES, ids=[page.stem for page in PAGES])
def test_page_examples(page):
    needs = {'metis': 'pymetis', 'compose': 'rdkit'}  # optional extras
    if page.stem in needs:
        pytest.importorskip(needs[page.stem])
    result = doctest.testfile(str(page), module_relative=False,
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f'{result.failed} example(s) failed in {page.name}'
    assert result.attempted > 0, f'{page.name} has no runnable example'
