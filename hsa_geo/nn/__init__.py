r"""Neural-network modules: thin wrappers owning parameters around
:mod:`hsa_geo.functional`."""
from hsa_geo.nn.positional import SiblingPositionBias
from hsa_geo.nn.conv import HSAConv
from hsa_geo.nn.models import (HSABlock, HSAEncoder, HSAGPSConv, HSAGraphModel, HSANodeModel,
                               HierarchyReadout, MultiModalEncoder)

__all__ = ['HSAConv', 'SiblingPositionBias', 'HSABlock', 'HSAEncoder', 'HSAGPSConv',
           'HSAGraphModel', 'HSANodeModel', 'HierarchyReadout', 'MultiModalEncoder']
