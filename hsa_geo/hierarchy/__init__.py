r"""Hierarchies (nested-signal trees): the data structure and its sweep plan.

Construction lives here; attention computation lives in
:mod:`hsa_geo.functional`."""
from hsa_geo.hierarchy.hierarchy import Hierarchy
from hsa_geo.hierarchy.plan import FamilyBlock, SweepPlan

__all__ = ['Hierarchy', 'SweepPlan', 'FamilyBlock']
