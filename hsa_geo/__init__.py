r"""hsa_geo: Hierarchical Self-Attention (Amizadeh et al., NeurIPS 2025) for
PyTorch Geometric."""
from hsa_geo.hierarchy import Hierarchy
from hsa_geo import functional
from hsa_geo.nn import HSAConv
from hsa_geo.data import NestedSignal, hierarchy_from_data

__version__ = '0.1.0'

__all__ = ['Hierarchy', 'HSAConv', 'NestedSignal', 'hierarchy_from_data', 'functional',
           '__version__']
