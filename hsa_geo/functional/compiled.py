r"""The fused sweeps as a :mod:`torch.library` custom operator, so that
:func:`torch.compile` traces HSA as one opaque node with a registered
fake (shape) implementation and a registered autograd formula instead of
graph-breaking into :class:`torch.autograd.Function` internals.

A hierarchy is a Python object that changes with every batch; a compiled
graph must not depend on it. The operator therefore receives it as a
*key*: a small ``int64`` CPU tensor ``[id, num_leaves, parent...]``
(:func:`hierarchy_key`). At run time the key's id finds the hierarchy (with
its cached plans) in a small registry of recent hierarchies; if it was
dropped (the batch is gone by the time the backward pass runs, say), the
parent pointers in the key rebuild it. Shapes in the graph are the inputs'
and the key's lengths only, so with dynamic shapes a model compiles once
for all batches.

The operator runs either engine of the fused backend (:obj:`cpu_kernel`:
:mod:`hsa_geo.functional.kernel`, else the tensor sweeps of
:mod:`hsa_geo.functional.sweep`); the choice is an argument, so the
backward pass uses the engine (and pair-bias order) of its forward. The
backward operator recomputes the forward sweeps (the forward pass returns
only the output, as a compiled graph wants), so under :func:`torch.compile`
a forward+backward costs one more forward sweep than in eager mode.
"""
from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from typing import List, Optional

import torch
from torch import Tensor

from hsa_geo.functional.kernel import kernel_backward, kernel_forward
from hsa_geo.functional.sweep import ScoreTerms, autocast_off, backward_sweeps, forward_sweeps
from hsa_geo.hierarchy.hierarchy import Hierarchy

#: Hierarchies kept by id for the custom operator (most recent last).
_REGISTRY: 'OrderedDict[int, Hierarchy]' = OrderedDict()
_REGISTRY_SIZE = 64
_NEXT_ID = itertools.count(1)
#: The key of every hierarchy that has one (dropped with the hierarchy).
_KEYS: 'weakref.WeakKeyDictionary[Hierarchy, Tensor]' = weakref.WeakKeyDictionary()


def hierarchy_key(hierarchy: Hierarchy) -> Tensor:
    r"""The key of :obj:`hierarchy` (created once per hierarchy; registers
    it)."""
    key = _KEYS.get(hierarchy)
    if key is None:
        identity = next(_NEXT_ID)
        key = _KEYS[hierarchy] = torch.cat([torch.tensor([identity, hierarchy.num_leaves]),
                                            hierarchy.parent.cpu().to(torch.long)])
    _remember(int(key[0]), hierarchy)
    return key


def _remember(identity: int, hierarchy: Hierarchy) -> None:
    _REGISTRY[identity] = hierarchy
    _REGISTRY.move_to_end(identity)
    while len(_REGISTRY) > _REGISTRY_SIZE:
        _REGISTRY.popitem(last=False)


def hierarchy_from_key(key: Tensor) -> Hierarchy:
    r"""The hierarchy a key names: from the registry, or rebuilt from the
    parent pointers the key carries."""
    identity = int(key[0])
    hierarchy = _REGISTRY.get(identity)
    if hierarchy is None:
        hierarchy = Hierarchy.from_parent(key[2:].clone(), int(key[1]))
        _KEYS[hierarchy] = key
        _remember(identity, hierarchy)
    return hierarchy


@torch.library.custom_op('hsa_geo::fused_hsa', mutates_args=())
def fused_hsa(q: Tensor, k: Tensor, v: Tensor, pair_bias: Optional[Tensor], key: Tensor,
              scale: float, euclidean: bool, causal: bool, cpu_kernel: bool) -> Tensor:
    r"""HSA output ``[N, H, D_v]`` of ``[N, H, D]`` inputs over the
    hierarchy named by :obj:`key`; the pair bias is ``[H, E]`` for the CPU
    kernel, ``[H, P]`` padded as the slot layout's for the tensor sweeps."""
    hierarchy = hierarchy_from_key(key)
    if cpu_kernel:
        out, _ = kernel_forward(q, k, v, pair_bias, hierarchy.family_tables(), scale, euclidean,
                                causal)
        return out
    _, result = forward_sweeps(q, k, v, hierarchy.layout(q.device), scale,
                               ScoreTerms(pair_bias, euclidean, causal))
    return result.out.contiguous()


@fused_hsa.register_fake
def _(q, k, v, pair_bias, key, scale, euclidean, causal, cpu_kernel):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])


@torch.library.custom_op('hsa_geo::fused_hsa_backward', mutates_args=())
def fused_hsa_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                       pair_bias: Optional[Tensor], key: Tensor, scale: float, euclidean: bool,
                       causal: bool, cpu_kernel: bool, bias_grad: bool) -> List[Tensor]:
    r"""Gradients for q, k, v and (when :obj:`bias_grad`) the pair bias,
    recomputing the forward sweeps."""
    hierarchy = hierarchy_from_key(key)
    if cpu_kernel:
        tables = hierarchy.family_tables()
        _, state = kernel_forward(q, k, v, pair_bias, tables, scale, euclidean, causal)
        grads = kernel_backward(grad_out, q, k, v, tables, state, scale, euclidean, causal,
                                bias_grad)
        return [t.contiguous() for t in grads]
    layout = hierarchy.layout(q.device)
    terms = ScoreTerms(pair_bias, euclidean, causal)
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
    return [t.contiguous() for t in (grad_q, grad_k, grad_v, grad_bias)]


@fused_hsa_backward.register_fake
def _(grad_out, q, k, v, pair_bias, key, scale, euclidean, causal, cpu_kernel, bias_grad):
    # contiguous, as the real gradients are (empty_like would copy the
    # strides of q, k, v, often views of one projection)
    bias = (pair_bias.new_empty(pair_bias.shape) if bias_grad and pair_bias is not None
            else q.new_empty(0))
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), bias]


def _setup_context(ctx, inputs, output):
    q, k, v, pair_bias, key, scale, euclidean, causal, cpu_kernel = inputs
    ctx.save_for_backward(q, k, v, pair_bias, key)
    ctx.options = (scale, euclidean, causal, cpu_kernel)


def _backward(ctx, grad_out):
    q, k, v, pair_bias, key = ctx.saved_tensors
    bias_grad = pair_bias is not None and ctx.needs_input_grad[3]
    grad_q, grad_k, grad_v, grad_bias = fused_hsa_backward(grad_out, q, k, v, pair_bias, key,
                                                           *ctx.options, bias_grad)
    return grad_q, grad_k, grad_v, grad_bias if bias_grad else None, None, None, None, None, None


fused_hsa.register_autograd(_backward, setup_context=_setup_context)
