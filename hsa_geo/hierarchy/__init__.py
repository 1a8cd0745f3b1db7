r"""Hierarchies (nested-signal trees): the data structure and its sweep plan.

Construction lives here; attention computation lives in
:mod:`hsa_geo.functional`."""
from hsa_geo.hierarchy.hierarchy import Hierarchy
from hsa_geo.hierarchy.plan import FamilyBlock, SweepPlan
from hsa_geo.hierarchy.builders import (DEFAULT_MAX_CHILDREN, Composed, chunk_sequence,
                                        compose, from_edge_index_metis, from_features,
                                        from_linkage, from_nested_lengths, from_networkx,
                                        from_partitions, from_segments, grid_quadtree,
                                        limit_children)

__all__ = [
    'Hierarchy',
    'SweepPlan',
    'FamilyBlock',
    'DEFAULT_MAX_CHILDREN',
    'from_partitions',
    'from_networkx',
    'from_segments',
    'from_nested_lengths',
    'chunk_sequence',
    'from_edge_index_metis',
    'from_linkage',
    'from_features',
    'grid_quadtree',
    'compose',
    'Composed',
    'limit_children',
]
