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
and :func:`use_cpu_kernel` switches it within a block (the tests run both
engines). The tensor sweeps remain the engine on GPUs.

The kernel reads the hierarchy as :class:`~hsa_geo.hierarchy.plan.FamilyTables`
(cheaper to build than the slot layout, which it does not need); its
per-pair order is that of :meth:`~hsa_geo.Hierarchy.sibling_pairs`, so a
pair bias and its gradient pass as they are.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

import torch
from torch import Tensor

from hsa_geo import native
from hsa_geo.functional.sweep import refuse_double_backward
from hsa_geo.hierarchy.plan import FamilyTables

#: switched by :func:`use_cpu_kernel`
_ENABLED = native.ENABLED_BY_ENVIRONMENT


def load(verbose: bool = False) -> bool:
    r"""Compiles (once) and loads the kernel (:func:`hsa_geo.native.load`);
    returns whether it is available."""
    return native.load(verbose)


def available(tensor: Tensor) -> bool:
    r"""Whether HSA on :obj:`tensor`'s device runs on the kernel (a CPU
    tensor, the kernel enabled and built)."""
    return _ENABLED and tensor.device.type == 'cpu' and load()


@contextlib.contextmanager
def use_cpu_kernel(enabled: bool) -> Iterator[None]:
    r"""Runs the block with the CPU kernel on or off (off: the tensor
    sweeps, as on a GPU)."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, enabled
    try:
        yield
    finally:
        _ENABLED = previous


def prepare(hierarchy, device) -> None:
    r"""Builds what the fused sweeps will read on :obj:`device` (on the CPU,
    in a data-loading worker, say): the family tables for the kernel, or
    the slot layout of the tensor sweeps."""
    if torch.device(device).type == 'cpu' and _ENABLED:
        hierarchy.family_tables()
    else:
        hierarchy.prepare_layout(device)


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
                    bias_grad: bool = False, grad_phi: Optional[Tensor] = None):
    r"""Gradients of q, k, v and (with :obj:`bias_grad`, else an empty
    tensor) of the pair bias ``[H, E]``; :obj:`grad_phi` ``[M, H]`` is an
    upstream gradient of the clusters' :math:`\phi` (see
    :func:`cluster_log_partition`)."""
    return torch.ops.hsa_geo_cpu.sweeps_backward(
        grad_out, q, k, v, *state, *_arguments(tables), float(scale), euclidean, causal,
        bias_grad, grad_phi)


def cluster_log_partition(state) -> Tensor:
    r""":math:`\phi` of every cluster ``[M, H]`` from the kernel's forward
    state (a view of its cluster rows; with the Euclidean energy without the
    row term, as the sweeps compute it)."""
    means = state[0]
    value_dim_end = means.size(2) - 2  # columns: q, k, v, phi, key norm
    return means[..., value_dim_end]


class KernelHSAFunction(torch.autograd.Function):
    r"""Fused HSA on the CPU kernel: ``[N, H, D]`` inputs (any memory
    layout), a pair bias ``[H, E]`` or None. Saves the clusters' rows, the
    pair weights and :math:`\log P` of every node: nothing quadratic. With
    :obj:`with_phi`, also returns the clusters' :math:`\phi` ``[M, H]``
    (differentiable)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, pair_bias: Optional[Tensor],
                tables: FamilyTables, scale: float, euclidean: bool = False,
                causal: bool = False, with_phi: bool = False):
        out, state = kernel_forward(q, k, v, pair_bias, tables, scale, euclidean, causal)
        ctx.save_for_backward(q, k, v, *state)
        ctx.tables, ctx.options = tables, (scale, euclidean, causal)
        ctx.set_materialize_grads(False)
        if with_phi:
            return out, cluster_log_partition(state).clone()
        return out

    @staticmethod
    def backward(ctx, grad_out: Optional[Tensor], grad_phi: Optional[Tensor] = None):
        refuse_double_backward()
        q, k, v, *state = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(v)
        bias_grad = ctx.needs_input_grad[3]
        grad_q, grad_k, grad_v, grad_bias = kernel_backward(
            grad_out, q, k, v, ctx.tables, state, *ctx.options, bias_grad, grad_phi)
        return (grad_q, grad_k, grad_v, grad_bias if bias_grad else None, None, None, None,
                None, None)
