r"""The fused HSA sweeps as a compiled CPU kernel (``hsa_geo/csrc/hsa_sweeps.cpp``).

On batches of small graphs the tensor sweeps of
:mod:`hsa_geo.functional.sweep` are dominated by the fixed cost and memory
traffic of a few hundred small tensor operations, not by arithmetic (a
batch of 128 molecules has ~19k sibling pairs: a few MFLOPs). The kernel
runs the same dynamic programme as plain loops, one family at a time (the
families of a level in parallel), forward and backward, with the same
formulas (docs/derivation.rst): one call per sweep instead of a few dozen
operations per block.

It is compiled on first use with :func:`torch.utils.cpp_extension.load`
(a C++ compiler and ninja are needed; ``make setup`` builds it ahead) and
cached by torch between runs. Without a compiler HSA falls back to the
tensor sweeps with a warning; ``HSA_GEO_CPU_KERNEL=0`` turns the kernel off,
and :func:`hsa_geo.functional.engine` picks the engine within a block (the
tests run both). The tensor sweeps remain the engine on GPUs.

The kernel reads the hierarchy as :class:`~hsa_geo.hierarchy.plan.FamilyTables`
(cheaper to build than the slot layout, which it does not need); its
per-pair order is that of :meth:`~hsa_geo.Hierarchy.sibling_pairs`, so a
pair bias and its gradient pass as they are.
"""
from __future__ import annotations

import warnings
from typing import List, Optional

import torch
from torch import Tensor

from hsa_geo import native
from hsa_geo.functional.engines import engine, node_major_inputs
from hsa_geo.functional.engines import prepare  # noqa: F401 (the loader's name for it)
from hsa_geo.functional.family_sweeps import FamilySweeps
from hsa_geo.hierarchy.plan import FamilyTables


def load(verbose: bool = False) -> bool:
    r"""Compiles (once) and loads the kernel (:func:`hsa_geo.native.load`);
    returns whether it is available."""
    return native.load(verbose)


def available(tensor: Tensor) -> bool:
    r"""Deprecated alias of :func:`hsa_geo.functional.node_major_inputs`
    (whether HSA on :obj:`tensor`'s device runs on the kernel)."""
    return node_major_inputs(tensor)


def use_cpu_kernel(enabled: bool):
    r"""Deprecated: use :func:`hsa_geo.functional.engine` (``engine('auto')``
    or ``engine('tensor')``)."""
    warnings.warn("hsa_geo.functional.kernel.use_cpu_kernel is deprecated; use "
                  "hsa_geo.functional.engine('auto' or 'tensor')", DeprecationWarning,
                  stacklevel=2)
    return engine('auto' if enabled else 'tensor')


def _arguments(tables: FamilyTables) -> List[Tensor]:
    return [tables.family_node, tables.child_ptr, tables.children, tables.pair_ptr,
            tables.level_ptr]


def kernel_forward(q: Tensor, k: Tensor, v: Tensor, pair_bias: Optional[Tensor],
                   tables: FamilyTables, scale: float, euclidean: bool = False,
                   causal: bool = False):
    r"""HSA output ``[N, H, D_v]`` of ``[N, H, D]`` inputs (pair bias
    ``[H, E]`` in :meth:`~hsa_geo.Hierarchy.sibling_pairs` order) and the state of
    the backward pass, ``(means, weights, log_mass)``: the clusters' rows
    (mean query, key, value, :math:`\phi`, mean squared key norm), the
    weights of every sibling pair ``[H, pairs]`` and :math:`\log P` of
    every node ``[N + M, H]``."""
    if not load():
        raise RuntimeError("hsa_geo's CPU kernel is not available (see the warning above)")
    out, means, weights, log_mass = torch.ops.hsa_geo_cpu.sweeps_forward(
        q, k, v, pair_bias, *_arguments(tables), tables.num_nodes, float(scale), euclidean,
        causal)
    return out, (means, weights, log_mass)


def kernel_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, tables: FamilyTables,
                    state, scale: float, euclidean: bool = False, causal: bool = False,
                    bias_grad: bool = False, summary_nodes: Optional[Tensor] = None,
                    summary_grad: Optional[Tensor] = None,
                    leaf_log_mass_grad: Optional[Tensor] = None):
    r"""Gradients of q, k, v and (with :obj:`bias_grad`, else an empty
    tensor) of the pair bias ``[H, E]``; :obj:`summary_grad` ``[S, H, C]``
    adds upstream gradients of the rows of the clusters
    :obj:`summary_nodes` (see
    :func:`~hsa_geo.functional.family_sweeps.summary_rows`), and
    :obj:`leaf_log_mass_grad` ``[N, H]`` those of the leaves'
    :math:`\log P(i) = \log a_{ii}`."""
    if summary_grad is not None:
        width = state[0].size(2)
        if summary_grad.size(2) < width:  # the key-norm column of the dot energy
            summary_grad = torch.cat([summary_grad, summary_grad.new_zeros(
                *summary_grad.shape[:2], width - summary_grad.size(2))], dim=2)
    return torch.ops.hsa_geo_cpu.sweeps_backward(
        grad_out, q, k, v, *state, *_arguments(tables), float(scale), euclidean, causal,
        bias_grad, summary_nodes, summary_grad, leaf_log_mass_grad)


#: the CPU kernel's two passes, for :class:`~hsa_geo.functional.family_sweeps.FamilySweepsFunction`
KERNEL_SWEEPS = FamilySweeps(kernel_forward, kernel_backward)
