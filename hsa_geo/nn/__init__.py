r"""Neural-network modules: thin wrappers owning parameters around
:mod:`hsa_geo.functional`."""
from hsa_geo.nn.conv import HSAConv

__all__ = ['HSAConv']
