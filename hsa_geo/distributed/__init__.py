r"""Exact HSA across processes and machines.

A hierarchy is cut into parts (:func:`partition_hierarchy`); every rank
holds the subtrees of its parts and a copy of the small top tree above
them (:class:`HierarchyShard`). :func:`distributed_hsa` computes exactly
what :func:`hsa_geo.functional.hsa` computes over the whole hierarchy,
exchanging one summary per part: the communication does not grow with the
number of leaves. docs/distributed.rst derives it.
"""
from hsa_geo.distributed.attention import distributed_hsa
from hsa_geo.distributed.collectives import (CommunicationMeter, all_reduce_gradients,
                                             count_communication, scatter_shards)
from hsa_geo.distributed.partition import (HierarchyPartition, HierarchyShard, TopTree,
                                           partition_hierarchy)

__all__ = [
    'distributed_hsa',
    'partition_hierarchy',
    'HierarchyPartition',
    'HierarchyShard',
    'TopTree',
    'scatter_shards',
    'all_reduce_gradients',
    'count_communication',
    'CommunicationMeter',
]
