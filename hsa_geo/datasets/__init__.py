r"""Offline generators of benchmark data whose hierarchy carries the answer:
seeded, deterministic, nothing downloaded."""
from hsa_geo.datasets.listops import (GENERALISATION_RECIPES, LRA_SPLITS, ListOpsRecipe,
                                      ListOpsSplit, evaluate, generate_listops,
                                      generate_splits)

__all__ = [
    'ListOpsRecipe',
    'ListOpsSplit',
    'generate_listops',
    'generate_splits',
    'evaluate',
    'LRA_SPLITS',
    'GENERALISATION_RECIPES',
]
