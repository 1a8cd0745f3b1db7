r"""Hierarchies (nested-signal trees): the data structure, its sweep plan and
the builders that make one from data.

Construction lives here; attention computation lives in
:mod:`hsa_geo.functional`."""
from hsa_geo.hierarchy.hierarchy import Hierarchy
from hsa_geo.hierarchy.plan import FamilyBlock, SweepPlan
from hsa_geo.hierarchy import builders
from hsa_geo.hierarchy.builders import *  # noqa: F401,F403 (the builders' public API)
from hsa_geo.hierarchy.subgraph import subhierarchy

__all__ = ['Hierarchy', 'SweepPlan', 'FamilyBlock', 'subhierarchy'] + builders.__all__
