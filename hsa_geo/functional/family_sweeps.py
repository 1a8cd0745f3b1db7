r"""The autograd of the engines that run HSA's sweeps one family at a time:
the compiled CPU kernel (:mod:`hsa_geo.functional.kernel`) and the Triton
programs (:mod:`hsa_geo.functional.triton_sweeps`).

Both take the hierarchy as family tables, keep the same state between the
passes -- the clusters' rows (mean query, key, value, :math:`\phi`, mean
squared key norm) ``[M, H, C]``, the weights of every sibling pair ``[H,
E]`` and :math:`\log P` of every node ``[N + M, H]``: nothing quadratic --
and differ only in the two functions that run the sweeps
(:class:`FamilySweeps`); :class:`FamilySweepsFunction` is their one
autograd Function.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from hsa_geo.functional.sweep import refuse_double_backward


class FamilySweeps(NamedTuple):
    r"""An engine's two passes.

    ``forward(q, k, v, pair_bias, tables, scale, euclidean, causal)``
    returns the output ``[N, H, D_v]`` and the state ``(means, weights,
    log_mass)``; ``backward(grad_out, q, k, v, tables, state, scale,
    euclidean, causal, bias_grad, summary_nodes, summary_grad,
    leaf_log_mass_grad)`` the gradients of q, k, v and the pair bias."""
    forward: Callable
    backward: Callable


def summary_rows(state, nodes: Tensor, num_leaves: int, euclidean: bool) -> Tensor:
    r"""``[S, H, C]`` rows of the clusters :obj:`nodes` from the forward
    state: mean query, key and value, :math:`\phi` (with the Euclidean
    energy without the row term, as the sweeps hold it) and, for that
    energy, the mean squared key norm."""
    means = state[0]
    width = means.size(2) - (0 if euclidean else 1)
    return means[nodes - num_leaves, :, :width]


class FamilySweepsFunction(torch.autograd.Function):
    r"""Fused HSA on a family-at-a-time engine :obj:`sweeps`
    (:class:`FamilySweeps`): ``[N, H, D]`` inputs, a pair bias ``[H, E]``
    or None, the engine's tables. With :obj:`summary_nodes` (cluster ids),
    also returns those clusters' rows ``[S, H, C]`` (:func:`summary_rows`),
    and with :obj:`self_weight` the leaves' :math:`\log a_{ii}` ``[N, H]``;
    both differentiable. Differentiable once."""

    @staticmethod
    def forward(ctx, sweeps: FamilySweeps, q: Tensor, k: Tensor, v: Tensor,
                pair_bias: Optional[Tensor], tables, scale: float, euclidean: bool = False,
                causal: bool = False, summary_nodes: Optional[Tensor] = None,
                self_weight: bool = False):
        out, state = sweeps.forward(q, k, v, pair_bias, tables, scale, euclidean, causal)
        ctx.save_for_backward(q, k, v, *state)
        ctx.sweeps, ctx.tables, ctx.options = sweeps, tables, (scale, euclidean, causal)
        ctx.summary_nodes, ctx.self_weight = summary_nodes, self_weight
        ctx.set_materialize_grads(False)
        outputs = [out]
        if summary_nodes is not None:
            outputs.append(summary_rows(state, summary_nodes, q.size(0), euclidean))
        if self_weight:
            outputs.append(state[2][:q.size(0)].clone())
        return tuple(outputs) if len(outputs) > 1 else out

    @staticmethod
    def backward(ctx, grad_out: Optional[Tensor], *extra_grads: Optional[Tensor]):
        refuse_double_backward()
        q, k, v, *state = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(v)
        extra_grads = list(extra_grads)
        summary_grad = extra_grads.pop(0) if ctx.summary_nodes is not None else None
        self_weight_grad = extra_grads.pop(0) if ctx.self_weight else None
        bias_grad = ctx.needs_input_grad[4]
        grad_q, grad_k, grad_v, grad_bias = ctx.sweeps.backward(
            grad_out, q, k, v, ctx.tables, state, *ctx.options, bias_grad,
            ctx.summary_nodes if summary_grad is not None else None, summary_grad,
            self_weight_grad)
        return (None, grad_q, grad_k, grad_v, grad_bias if bias_grad else None, None, None,
                None, None, None, None)
