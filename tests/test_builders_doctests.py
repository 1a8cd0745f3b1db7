"""Runs the doctest examples of the builders, the transform and the plot
helper (every builder's docstring has one), so CI checks they stay true."""
import doctest
import importlib

import pytest

MODULES = [
    'hsa_geo.hierarchy.builders.brackets',
    'hsa_geo.hierarchy.builders.compose',
    'hsa_geo.hierarchy.builders.dendrogram',
    'hsa_geo.hierarchy.builders.graph',
    'hsa_geo.hierarchy.builders.grid',
    'hsa_geo.hierarchy.builders.limits',
    'hsa_geo.hierarchy.builders.metis',
    'hsa_geo.hierarchy.builders.partitions',
    'hsa_geo.hierarchy.builders.sequence',
    'hsa_geo.hierarchy.hierarchy',
    'hsa_geo.transforms',
    'hsa_geo.plot',
    'hsa_geo.datasets.listops',
    'hsa_geo.datasets.sbm',
]


@pytest.mark.parametrize('name', MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f'{result.failed} doctest(s) failed in {name}'
    assert result.attempted > 0, f'no doctest in {name}'


def test_every_public_builder_has_a_doctest_example():
    import hsa_geo.hierarchy as hierarchy

    for name in hierarchy.builders.__all__:
        obj = getattr(hierarchy, name)
        if callable(obj) and not isinstance(obj, type) and name != 'DEFAULT_MAX_CHILDREN':
            doc = obj.__doc__ or ''
            assert '>>>' in doc, f'{name} has no example'
            assert 'Complexity' in doc, f'{name} states no complexity'
            assert 'Returns' in doc, f'{name} states no output'
