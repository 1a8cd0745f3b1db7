r"""The exact HSA dynamic program: one bottom-up and one top-down sweep over
the families of a :class:`~hsa_geo.hierarchy.plan.SweepPlan`, plus the
hand-derived backward pass (two more sweeps). docs/derivation.md derives
every line; the notation here follows it:

* ``t[f, h, b, c]`` = :math:`\bar s(B, C) + \log|C|` for siblings
  :math:`B \neq C`, and :math:`-\phi(B)` on the diagonal;
* ``log_z`` = :math:`\log Z_B`, ``alpha`` = ``t - log_z`` (log block masses);
* ``log_mass`` = :math:`\log P(B)`, the product of the masses :math:`\mu`
  kept inside every subtree on the path from the root to :math:`B`.

Tensors are ``[nodes, heads, dim]``; node buffers hold all
:math:`N + M` nodes, cluster buffers only the :math:`M` clusters.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from hsa_geo.hierarchy.plan import FamilyBlock, SweepPlan


def gather_children(leaf: Tensor, cluster: Tensor, block: FamilyBlock) -> Tensor:
    r"""``[F, b, ...]`` rows of the children of :obj:`block`, read from the
    leaf tensor or the cluster tensor (a view when children are a leaf
    range)."""
    family, size = block.children.shape
    rest = leaf.shape[1:]
    if block.leaf_range is not None:
        start, end = block.leaf_range
        return leaf[start:end].view(family, size, *rest)
    if block.leaf_slot.numel() == 0:
        return cluster[block.cluster_id].view(family, size, *rest)
    out = leaf.new_empty((family * size, ) + rest)
    out[block.leaf_slot] = leaf[block.leaf_id]
    out[block.cluster_slot] = cluster[block.cluster_id]
    return out.view(family, size, *rest)


def scatter_children(values: Tensor, cluster: Tensor, block: FamilyBlock) -> Tensor:
    r"""Writes the cluster children's rows of ``values`` (``[F, b, ...]``)
    into :obj:`cluster`; returns the leaf children's rows, in the order of
    ``block.leaf_id``."""
    flat = values.reshape((-1, ) + values.shape[2:])
    if block.cluster_slot.numel() > 0:
        cluster[block.cluster_id] = flat[block.cluster_slot]
    if block.leaf_range is not None:
        return flat
    return flat[block.leaf_slot]


def leaf_rows(leaf: Tensor, block: FamilyBlock) -> Tensor:
    r"""Rows of :obj:`leaf` for the leaf children of :obj:`block`."""
    if block.leaf_range is not None:
        return leaf[block.leaf_range[0]:block.leaf_range[1]]
    return leaf[block.leaf_id]


def write_leaf_rows(leaf: Tensor, values: Tensor, block: FamilyBlock) -> None:
    if block.leaf_range is not None:
        leaf[block.leaf_range[0]:block.leaf_range[1]] = values
    else:
        leaf[block.leaf_id] = values


def family_scores(block: FamilyBlock, query: Tensor, key: Tensor, phi: Tensor,
                  scale: float, log_count: Tensor) -> Tensor:
    r"""``t[f, h, b, c]``: scaled mean-query/mean-key products plus
    :math:`\log|C|`, with :math:`-\phi` of each child on the diagonal."""
    t = torch.einsum('fbhd,fchd->fhbc', query, key) * scale
    t = t + log_count[:, None, None, :]
    t.diagonal(dim1=-2, dim2=-1).copy_(-phi[block.children].transpose(1, 2))
    return t


def bottom_up(q: Tensor, k: Tensor, v: Tensor, plan: SweepPlan, scale: float):
    r"""Means of q, k, v per cluster, :math:`\phi` and :math:`\log Z` per node.

    Differentiable by autograd (used for :math:`\phi` on its own); the fused
    HSA function calls it without grad.
    """
    num_leaves, heads = q.size(0), q.size(1)
    num_nodes = plan.num_nodes
    mean_q = q.new_zeros((plan.num_clusters, ) + q.shape[1:])
    mean_k = k.new_zeros((plan.num_clusters, ) + k.shape[1:])
    mean_v = v.new_zeros((plan.num_clusters, ) + v.shape[1:])
    phi = q.new_zeros(num_nodes, heads)
    phi[:num_leaves] = -scale * (q * k).sum(-1)
    log_z = q.new_zeros(num_nodes, heads)
    for block in plan.blocks:
        count = block.child_count.to(q.dtype)
        share = count / block.parent_count.to(q.dtype)[:, None]
        query = gather_children(q, mean_q, block)
        key = gather_children(k, mean_k, block)
        mean_q[block.parents] = torch.einsum('fb,fbhd->fhd', share, query)
        mean_k[block.parents] = torch.einsum('fb,fbhd->fhd', share, key)
        mean_v[block.parents] = torch.einsum('fb,fbhd->fhd', share,
                                             gather_children(v, mean_v, block))
        block_log_z = torch.logsumexp(family_scores(block, query, key, phi, scale, count.log()), -1)
        log_z[block.children] = block_log_z.transpose(1, 2)
        phi[num_leaves + block.parents] = -(share[:, None, :] * block_log_z).sum(-1)
    return mean_q, mean_k, mean_v, phi, log_z


class _FamilyState:
    r"""What the top-down and backward sweeps recompute for one block."""

    def __init__(self, block, q, k, v, mean_q, mean_k, mean_v, phi, log_z, scale):
        self.count = block.child_count.to(q.dtype)
        self.query = gather_children(q, mean_q, block)
        self.key = gather_children(k, mean_k, block)
        self.value = gather_children(v, mean_v, block)
        t = family_scores(block, self.query, self.key, phi, scale, self.count.log())
        self.alpha = t - log_z[block.children].transpose(1, 2)[..., None]
        self.weight = self.alpha.exp()  # row-stochastic over c


def hsa_sweeps(q: Tensor, k: Tensor, v: Tensor, plan: SweepPlan,
               scale: float) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    r"""Forward HSA without autograd: returns the output and the per-node
    state the backward pass needs."""
    num_leaves = q.size(0)
    mean_q, mean_k, mean_v, phi, log_z = bottom_up(q, k, v, plan, scale)
    log_mass = q.new_zeros(plan.num_nodes, q.size(1))
    out_cluster = v.new_zeros(mean_v.shape)
    out = v.new_empty(v.shape)
    out[plan.isolated_leaves] = v[plan.isolated_leaves]
    for block in reversed(plan.blocks):
        state = _FamilyState(block, q, k, v, mean_q, mean_k, mean_v, phi, log_z, scale)
        child_log_mass = state.alpha.diagonal(dim1=-2, dim2=-1).transpose(1, 2)  # [F, b, H]
        weight = state.weight
        weight.diagonal(dim1=-2, dim2=-1).zero_()
        message = torch.einsum('fhbc,fchd->fbhd', weight, state.value)
        parent_log_mass = log_mass[num_leaves + block.parents]  # [F, H]
        child_log_mass = parent_log_mass[:, None, :] + child_log_mass
        log_mass[block.children] = child_log_mass
        child_out = out_cluster[block.parents][:, None] + parent_log_mass.exp()[:, None, :, None] * message
        leaf_out = scatter_children(child_out, out_cluster, block)
        if leaf_out.numel() > 0:
            leaf_mass = leaf_rows(log_mass, block).exp()[..., None]
            write_leaf_rows(out, leaf_out + leaf_mass * leaf_rows(v, block), block)
    return out, (mean_q, mean_k, mean_v, phi, log_z, log_mass)


def hsa_sweeps_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, plan: SweepPlan,
                        scale: float, mean_q, mean_k, mean_v, phi, log_z, log_mass):
    r"""Gradients of :math:`L = \sum_i g_i \cdot y_i` with respect to q, k, v
    by two more sweeps (docs/derivation.md, "Backward pass")."""
    num_leaves = q.size(0)
    grad_cluster = grad_out.new_zeros(mean_v.shape)
    # through[B] = dL/dlog P(B): everything below B scaled by the masses.
    through = q.new_zeros(plan.num_nodes, q.size(1))
    through[:num_leaves] = log_mass[:num_leaves].exp() * (grad_out * v).sum(-1)
    for block in plan.blocks:
        state = _FamilyState(block, q, k, v, mean_q, mean_k, mean_v, phi, log_z, scale)
        grad = gather_children(grad_out, grad_cluster, block)
        grad_cluster[block.parents] = grad.sum(1)
        weight = state.weight
        weight.diagonal(dim1=-2, dim2=-1).zero_()
        coupling = torch.einsum('fbhd,fchd->fhbc', grad, state.value)
        parent = num_leaves + block.parents
        through[parent] = (log_mass[parent].exp() * (weight * coupling).sum((-1, -2))
                           + through[block.children].sum(1))

    # delta[B] = dL/dt_BB, the gradient of B's own (diagonal) score.
    delta = q.new_zeros(plan.num_nodes, q.size(1))
    acc_q, acc_k = q.new_zeros(mean_q.shape), k.new_zeros(mean_k.shape)
    acc_v = v.new_zeros(mean_v.shape)
    grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k), torch.empty_like(v)
    grad_v[plan.isolated_leaves] = grad_out[plan.isolated_leaves]
    for block in reversed(plan.blocks):
        state = _FamilyState(block, q, k, v, mean_q, mean_k, mean_v, phi, log_z, scale)
        grad = gather_children(grad_out, grad_cluster, block)
        parent = num_leaves + block.parents
        parent_mass = log_mass[parent].exp()[:, :, None, None]  # [F, H, 1, 1]
        weight = state.weight
        grad_alpha = parent_mass * weight * torch.einsum('fbhd,fchd->fhbc', grad, state.value)
        grad_alpha.diagonal(dim1=-2, dim2=-1).copy_(through[block.children].transpose(1, 2))
        share = state.count / block.parent_count.to(q.dtype)[:, None]
        from_phi = delta[parent][:, :, None] * share[:, None, :]  # dL/dlog Z via phi(parent)
        grad_t = grad_alpha - weight * (grad_alpha.sum(-1) - from_phi)[..., None]
        delta[block.children] = grad_t.diagonal(dim1=-2, dim2=-1).transpose(1, 2)
        grad_t.diagonal(dim1=-2, dim2=-1).zero_()
        weight.diagonal(dim1=-2, dim2=-1).zero_()
        inverse_count = (1.0 / state.count)[..., None, None]
        new_q = acc_q[block.parents][:, None] + inverse_count * scale * torch.einsum(
            'fhbc,fchd->fbhd', grad_t, state.key)
        new_k = acc_k[block.parents][:, None] + inverse_count * scale * torch.einsum(
            'fhbc,fbhd->fchd', grad_t, state.query)
        new_v = acc_v[block.parents][:, None] + inverse_count * torch.einsum(
            'fhbc,fbhd->fchd', parent_mass * weight, grad)
        leaf_q = scatter_children(new_q, acc_q, block)
        leaf_k = scatter_children(new_k, acc_k, block)
        leaf_v = scatter_children(new_v, acc_v, block)
        if leaf_q.numel() > 0:
            leaf_delta = scale * leaf_rows(delta, block)[..., None]
            write_leaf_rows(grad_q, leaf_q + leaf_delta * leaf_rows(k, block), block)
            write_leaf_rows(grad_k, leaf_k + leaf_delta * leaf_rows(q, block), block)
            leaf_mass = leaf_rows(log_mass, block).exp()[..., None]
            write_leaf_rows(grad_v, leaf_v + leaf_mass * leaf_rows(grad_out, block), block)
    return grad_q, grad_k, grad_v


class HSAFunction(torch.autograd.Function):
    r"""Autograd wrapper: saves only per-node state (no per-pair tensors)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: SweepPlan, scale: float) -> Tensor:
        out, state = hsa_sweeps(q, k, v, plan, scale)
        ctx.save_for_backward(q, k, v, *state)
        ctx.plan, ctx.scale = plan, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, *state = ctx.saved_tensors
        grads = hsa_sweeps_backward(grad_out.contiguous(), q, k, v, ctx.plan, ctx.scale, *state)
        return grads + (None, None)
