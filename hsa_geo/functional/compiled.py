r"""The fused sweeps as a :mod:`torch.library` custom operator, so that
:func:`torch.compile` traces HSA as one opaque node with a registered
fake (shape) implementation and a registered autograd formula instead of
graph-breaking into :class:`torch.autograd.Function` internals.

A hierarchy is a Python object that changes with every batch; a compiled
graph must not depend on it. The operator therefore receives the layout as
a *key*: a small ``int64`` CPU tensor ``[id, num_leaves, parent...]``
(:func:`layout_key`). At run time the key's id finds the layout in a small
registry of recent layouts; if the layout was dropped (the batch's
hierarchy is gone by the time the backward pass runs, say), the parent
pointers in the key rebuild it. Shapes in the graph are the inputs' and
the key's lengths only, so with dynamic shapes a model compiles once for
all batches.

The backward operator recomputes the forward sweeps (the forward pass
returns only the output, as a compiled graph wants), so under
:func:`torch.compile` a forward+backward costs one more forward sweep than
in eager mode, where :class:`~hsa_geo.functional.sweep.HSAFunction` keeps
the state.
"""
from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from typing import List, Optional

import torch
from torch import Tensor

from hsa_geo.functional.sweep import ScoreTerms, backward_sweeps, forward_sweeps
from hsa_geo.hierarchy.layout import SlotLayout

#: Layouts kept by id for the custom operator (most recent last).
_REGISTRY: 'OrderedDict[int, SlotLayout]' = OrderedDict()
_REGISTRY_SIZE = 64
_NEXT_ID = itertools.count(1)
#: The key of every layout that has one (dropped with the layout).
_KEYS: 'weakref.WeakKeyDictionary[SlotLayout, Tensor]' = weakref.WeakKeyDictionary()


def layout_key(hierarchy, device: torch.device) -> Tensor:
    r"""The key of :obj:`hierarchy`'s layout on :obj:`device` (created
    once per hierarchy; registers the layout)."""
    layout = hierarchy.layout(device)
    key = _KEYS.get(layout)
    if key is None:
        identity = next(_NEXT_ID)
        key = _KEYS[layout] = torch.cat([torch.tensor([identity, hierarchy.num_leaves]),
                                         hierarchy.parent.cpu().to(torch.long)])
    _remember(int(key[0]), layout)
    return key


def _remember(identity: int, layout: SlotLayout) -> None:
    _REGISTRY[identity] = layout
    _REGISTRY.move_to_end(identity)
    while len(_REGISTRY) > _REGISTRY_SIZE:
        _REGISTRY.popitem(last=False)


def layout_from_key(key: Tensor, device: torch.device) -> SlotLayout:
    r"""The layout a key names: from the registry, or rebuilt from the
    parent pointers the key carries."""
    identity = int(key[0])
    layout = _REGISTRY.get(identity)
    if layout is None or layout.node_slot.device != device:
        from hsa_geo.hierarchy.hierarchy import Hierarchy
        hierarchy = Hierarchy.from_parent(key[2:].clone(), int(key[1]))
        layout = hierarchy.layout(device)
        _KEYS[layout] = key
        _remember(identity, layout)
    return layout


@torch.library.custom_op('hsa_geo::fused_hsa', mutates_args=())
def fused_hsa(q: Tensor, k: Tensor, v: Tensor, pair_bias: Optional[Tensor], key: Tensor,
              scale: float, euclidean: bool, causal: bool) -> Tensor:
    r"""HSA output ``[N, H, D_v]`` of ``[N, H, D]`` inputs over the layout
    named by :obj:`key` (pair bias ``[H, P]`` padded as the layout's)."""
    layout = layout_from_key(key, q.device)
    _, result = forward_sweeps(q, k, v, layout, scale, ScoreTerms(pair_bias, euclidean, causal))
    return result.out.contiguous()


@fused_hsa.register_fake
def _(q, k, v, pair_bias, key, scale, euclidean, causal):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])


@torch.library.custom_op('hsa_geo::fused_hsa_backward', mutates_args=())
def fused_hsa_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                       pair_bias: Optional[Tensor], key: Tensor, scale: float, euclidean: bool,
                       causal: bool, bias_grad: bool) -> List[Tensor]:
    r"""Gradients for q, k, v and (when :obj:`bias_grad`) the padded pair
    bias, recomputing the forward sweeps."""
    layout = layout_from_key(key, q.device)
    terms = ScoreTerms(pair_bias, euclidean, causal)
    state, result = forward_sweeps(q, k, v, layout, scale, terms)
    leaf_log_mass, family_log_mass = result.leaf_log_mass, result.family_log_mass
    held = [state._replace(self_log=None, leaf_phi=None, leaf_key_norm=None)]  # handed over
    del result, state
    with torch.autocast(q.device.type, enabled=False):
        grad_q, grad_k, grad_v, grad_bias = backward_sweeps(
            grad_out, q, k, v, layout, scale, held.pop(), leaf_log_mass, family_log_mass,
            terms, grad_pair_bias=bias_grad, release=True)
    if grad_bias is None:
        grad_bias = q.new_empty(0)
    return [t.contiguous() for t in (grad_q, grad_k, grad_v, grad_bias)]


@fused_hsa_backward.register_fake
def _(grad_out, q, k, v, pair_bias, key, scale, euclidean, causal, bias_grad):
    bias = (pair_bias.new_empty(pair_bias.shape) if bias_grad and pair_bias is not None
            else q.new_empty(0))
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), bias]


def _setup_context(ctx, inputs, output):
    q, k, v, pair_bias, key, scale, euclidean, causal = inputs
    ctx.save_for_backward(q, k, v, pair_bias, key)
    ctx.options = (scale, euclidean, causal)


def _backward(ctx, grad_out):
    q, k, v, pair_bias, key = ctx.saved_tensors
    bias_grad = pair_bias is not None and ctx.needs_input_grad[3]
    grad_q, grad_k, grad_v, grad_bias = fused_hsa_backward(grad_out, q, k, v, pair_bias, key,
                                                           *ctx.options, bias_grad)
    return grad_q, grad_k, grad_v, grad_bias if bias_grad else None, None, None, None, None


fused_hsa.register_autograd(_backward, setup_context=_setup_context)
