r"""Builders: one obvious way to turn each kind of data into a
:class:`~hsa_geo.Hierarchy` that HSA runs fast on.

Every builder bounds the number of children of a cluster by
:obj:`max_children` (HSA costs :math:`\sum_A b_A^2`) and removes
single-child clusters unless asked to keep them (see
:mod:`hsa_geo.hierarchy.builders.limits`).

=========================  ==================================================
data                       builder
=========================  ==================================================
nested partitions          :func:`from_partitions`
a networkx graph           :func:`from_networkx` (Louvain, greedy modularity,
                           label propagation, Girvan-Newman, fluid)
a dendrogram / features    :func:`from_linkage`, :func:`from_features`
features, two levels       :func:`from_kmeans` (a root over k-means clusters)
a large PyG graph          :func:`from_edge_index_metis`
text / sequences           :func:`from_segments`, :func:`from_nested_lengths`,
                           :func:`chunk_sequence`
bracketed expressions      :func:`from_brackets` (the parse tree)
images / grids             :func:`grid_quadtree`
several modalities         :func:`compose`
an existing hierarchy      :func:`limit_children`
=========================  ==================================================
"""
from hsa_geo.hierarchy.builders.brackets import from_brackets
from hsa_geo.hierarchy.builders.compose import Composed, compose
from hsa_geo.hierarchy.builders.dendrogram import from_features, from_linkage
from hsa_geo.hierarchy.builders.graph import from_networkx
from hsa_geo.hierarchy.builders.grid import grid_quadtree
from hsa_geo.hierarchy.builders.kmeans import from_kmeans
from hsa_geo.hierarchy.builders.limits import DEFAULT_MAX_CHILDREN, limit_children
from hsa_geo.hierarchy.builders.metis import from_edge_index_metis
from hsa_geo.hierarchy.builders.partitions import from_partitions
from hsa_geo.hierarchy.builders.sequence import (chunk_sequence, from_nested_lengths,
                                                 from_segments)

__all__ = [
    'DEFAULT_MAX_CHILDREN',
    'from_partitions',
    'from_networkx',
    'from_segments',
    'from_nested_lengths',
    'chunk_sequence',
    'from_brackets',
    'from_edge_index_metis',
    'from_linkage',
    'from_features',
    'from_kmeans',
    'grid_quadtree',
    'compose',
    'Composed',
    'limit_children',
]
