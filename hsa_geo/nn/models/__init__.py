r"""Models built around :class:`~hsa_geo.nn.HSAConv`: GPS-style encoder
blocks (any local PyG conv + global HSA + FFN), node- and graph-level
predictors with a readout at the root of the hierarchy, and per-modality
input encoders for multi-modal nested signals."""
from hsa_geo.nn.models.encoder import HSABlock, HSAEncoder, HSAGPSConv, resolve_local_conv
from hsa_geo.nn.models.heads import HSAGraphModel, HSANodeModel, flat_hierarchy
from hsa_geo.nn.models.multimodal import AtomFeatureEncoder, MultiModalEncoder, TokenEncoder
from hsa_geo.nn.models.readout import (HierarchyReadout, hierarchy_leaf_weights,
                                       leaf_ancestor_pairs, subtree_means)

__all__ = [
    'HSABlock',
    'HSAEncoder',
    'HSAGPSConv',
    'resolve_local_conv',
    'HSAGraphModel',
    'HSANodeModel',
    'flat_hierarchy',
    'HierarchyReadout',
    'hierarchy_leaf_weights',
    'leaf_ancestor_pairs',
    'subtree_means',
    'AtomFeatureEncoder',
    'TokenEncoder',
    'MultiModalEncoder',
]
