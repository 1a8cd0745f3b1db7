r"""Neural-network modules: thin wrappers owning parameters around
:mod:`hsa_geo.functional`."""
from hsa_geo.nn.conv import HSAConv

__all__ = ['HSAConv']
from hsa_geo.nn.models import (HSABlock, HSAEncoder, HSAGraphModel, HSANodeModel,  # noqa: E402
                               HierarchyReadout, MultiModalEncoder)
__all__ += ['HSABlock', 'HSAEncoder', 'HSAGraphModel', 'HSANodeModel', 'HierarchyReadout', 'MultiModalEncoder']
from hsa_geo.nn.positional import SiblingPositionBias  # noqa: E402
__all__ += ['SiblingPositionBias']
