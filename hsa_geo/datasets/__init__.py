r"""Offline generators of benchmark data whose hierarchy carries the answer:
seeded, deterministic, nothing downloaded."""
from hsa_geo.datasets.listops import (GENERALISATION_RECIPES, LRA_SPLITS, ListOpsRecipe,
                                      ListOpsSplit, evaluate, generate_listops,
                                      generate_splits)
from hsa_geo.datasets.sbm import (CLUSTER, PATTERN, SBMRecipe, generate_sbm, generate_sbm_splits,
                                  weighted_accuracy)

__all__ = [
    'ListOpsRecipe',
    'ListOpsSplit',
    'generate_listops',
    'generate_splits',
    'evaluate',
    'LRA_SPLITS',
    'GENERALISATION_RECIPES',
    'SBMRecipe',
    'CLUSTER',
    'PATTERN',
    'generate_sbm',
    'generate_sbm_splits',
    'weighted_accuracy',
]
