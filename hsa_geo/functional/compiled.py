r"""The fused sweeps as a :mod:`torch.library` custom operator, so that
:func:`torch.compile` traces HSA as one opaque node with a registered
fake (shape) implementation and a registered autograd formula, without a
graph break (``fullgraph=True`` works).

A hierarchy is a Python object that changes with every batch; a compiled
graph must not depend on it. The operator receives its parent pointers
instead, an ``int64`` tensor that becomes an input of the graph like the
features: at run time :meth:`Hierarchy.of_parent
<hsa_geo.Hierarchy.of_parent>` finds the hierarchy that holds that tensor,
with everything cached for it (family tables, slot layout), and if it is
gone (the batch dropped before the backward pass, say) the pointers rebuild
it. Shapes in the graph are the inputs' lengths only, so with dynamic shapes
a model compiles once for all batches. The checks that read the hierarchy
run inside the operator, the boundary of the compiled graph.

The pair bias crosses the operator in one layout, ``[E, H]`` in
:meth:`~hsa_geo.Hierarchy.sibling_pairs` order, and so does its gradient;
the operator puts it in its engine's order. The engine is an argument,
chosen when the graph is traced (:func:`hsa_geo.functional.engine`), so
the backward pass runs on the engine of its forward pass. On the CPU kernel
the forward operator also returns the kernel's state (the clusters' rows,
the pair weights, :math:`\log P`: nothing quadratic), which the backward
operator reads, as in eager mode; the tensor sweeps' backward operator
recomputes their forward sweeps (one more forward sweep than in eager
mode).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from hsa_geo.functional.engines import sibling_pair_positions, slot_layout
from hsa_geo.functional.kernel import kernel_backward, kernel_forward
from hsa_geo.functional.sweep import autocast_off, backward_sweeps, forward_sweeps
from hsa_geo.functional.terms import ScoreTerms
from hsa_geo.hierarchy.hierarchy import Hierarchy


def hierarchy_of(parent: Tensor, num_leaves: int) -> Hierarchy:
    r"""The hierarchy that holds :obj:`parent`, or one rebuilt from it."""
    hierarchy = Hierarchy.of_parent(parent)
    if hierarchy is None:
        hierarchy = Hierarchy.from_parent(parent, num_leaves)
    return hierarchy


def _engine_bias(pair_bias: Optional[Tensor], hierarchy: Hierarchy, device,
                 cpu_kernel: bool) -> Optional[Tensor]:
    # [E, H] in sibling-pair order to the engine's order: [H, E] for the
    # kernel, [H, P] padded as the slot layout's for the tensor sweeps
    if pair_bias is None:
        return None
    bias = pair_bias.t()
    if cpu_kernel:
        return bias.contiguous()
    positions, sources = sibling_pair_positions(hierarchy, device, with_sources=True)
    if sources.numel() > bias.size(1):  # one zero column for the padding pairs
        bias = torch.cat([bias, bias.new_zeros(bias.size(0), 1)], dim=1)
    return bias.index_select(1, sources)


def _checked(q: Tensor, pair_bias: Optional[Tensor], parent: Tensor, causal: bool):
    # what the graph could not check without reading the hierarchy
    hierarchy = hierarchy_of(parent, q.size(0))
    if q.size(0) != hierarchy.num_leaves:
        raise ValueError(f"q has {q.size(0)} rows but the hierarchy has "
                         f"{hierarchy.num_leaves} leaves (one row per leaf needed)")
    if pair_bias is not None and pair_bias.size(0) != hierarchy.num_sibling_pairs:
        raise ValueError(f"'pair_bias' has {pair_bias.size(0)} rows, but the hierarchy has "
                         f"E={hierarchy.num_sibling_pairs} ordered sibling pairs "
                         f"(hierarchy.sibling_pairs())")
    if pair_bias is not None and not bool(torch.isfinite(pair_bias).all()):
        raise ValueError("'pair_bias' is not finite; to keep two subtrees apart, split the "
                         "hierarchy or use causal=True rather than an infinite bias")
    if causal:
        hierarchy.check_contiguous()
    return hierarchy


@torch.library.custom_op('hsa_geo::fused_hsa', mutates_args=())
def fused_hsa_with_state(q: Tensor, k: Tensor, v: Tensor, pair_bias: Optional[Tensor],
                         parent: Tensor, scale: float, euclidean: bool, causal: bool,
                         cpu_kernel: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""HSA output ``[N, H, D_v]`` of ``[N, H, D]`` inputs over the
    hierarchy with parent pointers :obj:`parent` (pair bias ``[E, H]`` in
    sibling-pair order), then the state the backward operator reads: on the
    CPU kernel its clusters' rows ``[M, H, 2D + D_v + 2]``, pair weights
    ``[H, E]`` and :math:`\log P` ``[N + M, H]``; on the tensor sweeps
    three empty tensors."""
    hierarchy = _checked(q, pair_bias, parent, causal)
    bias = _engine_bias(pair_bias, hierarchy, q.device, cpu_kernel)
    if cpu_kernel:
        out, state = kernel_forward(q, k, v, bias, hierarchy.family_tables(), scale, euclidean,
                                    causal)
        return (out, *state)
    _, result = forward_sweeps(q, k, v, slot_layout(hierarchy, q.device), scale,
                               ScoreTerms(bias, euclidean, causal))
    empty = q.new_empty(0)
    return result.out.contiguous(), empty, empty.clone(), empty.clone()


@fused_hsa_with_state.register_fake
def _(q, k, v, pair_bias, parent, scale, euclidean, causal, cpu_kernel):
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    if not cpu_kernel:
        return out, q.new_empty(0), q.new_empty(0), q.new_empty(0)
    heads, num_nodes = q.shape[1], parent.shape[0]
    means = q.new_empty(num_nodes - q.shape[0], heads, 2 * q.shape[2] + v.shape[2] + 2)
    num_pairs = (pair_bias.shape[0] if pair_bias is not None
                 else torch.library.get_ctx().new_dynamic_size())
    return out, means, q.new_empty(heads, num_pairs), q.new_empty(num_nodes, heads)


def fused_hsa(q: Tensor, k: Tensor, v: Tensor, pair_bias: Optional[Tensor], parent: Tensor,
              scale: float, euclidean: bool, causal: bool, cpu_kernel: bool) -> Tensor:
    r"""The output of :func:`fused_hsa_with_state` (differentiable in q, k,
    v and the pair bias)."""
    return fused_hsa_with_state(q, k, v, pair_bias, parent, scale, euclidean, causal,
                                cpu_kernel)[0]


@torch.library.custom_op('hsa_geo::fused_hsa_backward', mutates_args=())
def fused_hsa_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                       pair_bias: Optional[Tensor], parent: Tensor, means: Tensor,
                       weights: Tensor, log_mass: Tensor, scale: float, euclidean: bool,
                       causal: bool, cpu_kernel: bool, bias_grad: bool) -> List[Tensor]:
    r"""Gradients for q, k, v and (when :obj:`bias_grad`, else an empty
    tensor) the pair bias ``[E, H]``, from the kernel's state or, on the
    tensor sweeps, recomputing the forward sweeps."""
    hierarchy = hierarchy_of(parent, q.size(0))
    if cpu_kernel:
        grads = kernel_backward(grad_out, q, k, v, hierarchy.family_tables(),
                                (means, weights, log_mass), scale, euclidean, causal, bias_grad)
        grad_q, grad_k, grad_v, grad_bias = grads
        if bias_grad:
            grad_bias = grad_bias.t()
        return [t.contiguous() for t in (grad_q, grad_k, grad_v, grad_bias)]
    layout = slot_layout(hierarchy, q.device)
    terms = ScoreTerms(_engine_bias(pair_bias, hierarchy, q.device, False), euclidean, causal)
    state, result = forward_sweeps(q, k, v, layout, scale, terms)
    leaf_log_mass, family_log_mass = result.leaf_log_mass, result.family_log_mass
    held = [state._replace(self_log=None, leaf_phi=None, leaf_key_norm=None)]  # handed over
    del result, state
    with autocast_off(q.device):
        grad_q, grad_k, grad_v, grad_bias = backward_sweeps(
            grad_out, q, k, v, layout, scale, held.pop(), leaf_log_mass, family_log_mass,
            terms, grad_pair_bias=bias_grad, release=True)
    if grad_bias is None:
        grad_bias = q.new_empty(0)
    else:  # padded [H, P] back to [E, H]
        grad_bias = grad_bias.index_select(1, sibling_pair_positions(hierarchy, q.device)).t()
    return [t.contiguous() for t in (grad_q, grad_k, grad_v, grad_bias)]


@fused_hsa_backward.register_fake
def _(grad_out, q, k, v, pair_bias, parent, means, weights, log_mass, scale, euclidean, causal,
      cpu_kernel, bias_grad):
    # contiguous, as the real gradients are (empty_like would copy the
    # strides of q, k, v, often views of one projection)
    bias = (pair_bias.new_empty(pair_bias.shape) if bias_grad and pair_bias is not None
            else q.new_empty(0))
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), bias]


def _setup_context(ctx, inputs, output):
    q, k, v, pair_bias, parent, scale, euclidean, causal, cpu_kernel = inputs
    _, means, weights, log_mass = output
    ctx.save_for_backward(q, k, v, pair_bias, parent, means, weights, log_mass)
    ctx.options = (scale, euclidean, causal, cpu_kernel)


def _backward(ctx, grad_out, *state_grads):
    q, k, v, pair_bias, parent, means, weights, log_mass = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(v)
    bias_grad = pair_bias is not None and ctx.needs_input_grad[3]
    grad_q, grad_k, grad_v, grad_bias = fused_hsa_backward(
        grad_out, q, k, v, pair_bias, parent, means, weights, log_mass, *ctx.options, bias_grad)
    return grad_q, grad_k, grad_v, grad_bias if bias_grad else None, None, None, None, None, None


fused_hsa_with_state.register_autograd(_backward, setup_context=_setup_context)
