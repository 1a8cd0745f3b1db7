r"""A hierarchy's derived tensors from the compiled tree analysis
(``hsa_geo/csrc/tree_tables.cpp``): depths, leaf counts, first and last
leaves and the CPU kernel's :class:`~hsa_geo.hierarchy.plan.FamilyTables`,
in one linear pass instead of a few dozen tensor operations and sorts.

:meth:`~hsa_geo.Hierarchy.from_parent` and
:meth:`~hsa_geo.Hierarchy.batch_hierarchies` use it when the compiled code
is available (:mod:`hsa_geo.native`); the results equal those of the
PyTorch build. Invalid parent pointers are only detected here: the PyTorch
checks then raise the error that names the node.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from hsa_geo import native
from hsa_geo.hierarchy.plan import FamilyTables


class TreeAnalysis(NamedTuple):
    depth: Tensor  #: ``[N + M]`` (roots 0)
    num_leaves_below: Tensor  #: ``[N + M]`` (leaves 1)
    first_leaf: Tensor  #: ``[N + M]`` smallest leaf id below every node
    last_leaf: Tensor  #: ``[N + M]`` largest leaf id below every node
    tables: FamilyTables


def analyse_tree(parent: Tensor, num_leaves: int) -> Optional[TreeAnalysis]:
    r"""The :class:`TreeAnalysis` of ``int64`` CPU parent pointers, or
    :obj:`None` when the compiled code is off or unavailable, the pointers
    are not on the CPU, or they are invalid (out of range, a leaf with
    children, a cluster without children, a cycle)."""
    if not (native.ENABLED_BY_ENVIRONMENT and parent.device.type == 'cpu'
            and parent.dtype == torch.long and native.load()):
        return None
    result = torch.ops.hsa_geo_cpu.analyse_tree(parent, num_leaves)
    if len(result) == 1:  # invalid: (code, node)
        return None
    _, depth, count, first, last, family_node, child_ptr, children, pair_ptr, level_ptr = result
    tables = FamilyTables(family_node=family_node, child_ptr=child_ptr, children=children,
                          pair_ptr=pair_ptr, level_ptr=level_ptr, num_nodes=parent.numel())
    return TreeAnalysis(depth, count, first, last, tables)
