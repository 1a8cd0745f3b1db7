r"""Strictly causal hierarchical attention: every leaf's weights come from
its own query and from subtrees wholly in its past, so no input of a later
leaf reaches it (what autoregressive training and generation need).

Causal HSA (``causal=True``) is the KL projection of causal softmax
attention onto matrices constant on every past sibling block
:math:`\ell(B) \times \ell(C)`; that ties the rows of :math:`B` together,
and through :math:`\bar q_B` and :math:`\phi(B)` a leaf's weights depend on
the queries and keys of later leaves of :math:`B`. Here each row is
projected on its own: row :math:`i` must be constant on every *frontier*
block, an earlier sibling :math:`C` of a node :math:`X` on the path from
:math:`i` up to its root, and the KL-closest such row is

.. math::
    a_{ij} = \frac{e^{\bar s_i(C)}}{Z_i} \ (j \in \ell(C)), \qquad
    a_{ii} = \frac{e^{s_{ii}}}{Z_i}, \qquad
    \bar s_i(C) = \frac{1}{|C|} \sum_{j \in \ell(C)} s_{ij}
               = \tau\, q_i^\top \bar k_C + \beta(X, C),

with :math:`Z_i` normalising the row (docs/derivation.rst). A leaf meets
:math:`O(b \cdot \mathrm{depth})` frontier blocks, so the cost is
:math:`O(N\, b\, \mathrm{depth}\, H D)` time and memory (autograd),
against :math:`O((N + M)\, b\, H D)` for the tied sweeps.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch_geometric.utils import scatter

from hsa_geo.functional.scatter_sweep import (ScatterPlan, leaf_self_scores, scatter_logsumexp,
                                              subtree_mean)
from hsa_geo.hierarchy.plan import SweepPlan


class Frontier(NamedTuple):
    r"""Every (leaf, past block) pair of a contiguous hierarchy."""
    leaf: Tensor  #: ``[P]`` the attending leaf i
    block: Tensor  #: ``[P]`` node C, an earlier sibling of an ancestor X of i
    pair: Tensor  #: ``[P]`` position of (X, C) in the sibling-pair order


def build_frontier(plan: SweepPlan, first_leaf: Tensor) -> Frontier:
    r"""The frontier pairs of a hierarchy whose subtrees are intervals of
    the leaf order (children ordered by first leaf, as in the plan)."""
    device = plan.parent.device
    later, earlier, pairs = [], [], []
    for block in plan.blocks:
        family, size = block.children.shape
        position = torch.arange(size, device=device)
        row, col = torch.meshgrid(position, position, indexing='ij')
        before = (col < row).reshape(-1)
        pair = (block.pair_start + torch.arange(family * size * size, device=device)
                ).view(family, -1)
        later.append(block.children[:, row.reshape(-1)[before]].reshape(-1))
        earlier.append(block.children[:, col.reshape(-1)[before]].reshape(-1))
        pairs.append(pair[:, before].reshape(-1))
    empty = torch.empty(0, dtype=torch.long, device=device)
    later = torch.cat(later) if later else empty
    earlier = torch.cat(earlier) if earlier else empty
    pairs = torch.cat(pairs) if pairs else empty
    # every leaf below the later sibling X sees the block C
    count = plan.num_leaves_below[later]
    offset = torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    leaf = (torch.repeat_interleave(first_leaf[later], count)
            + torch.arange(int(count.sum()), device=device) - offset)
    return Frontier(leaf, torch.repeat_interleave(earlier, count),
                    torch.repeat_interleave(pairs, count))


def hsa_strict_causal(q: Tensor, k: Tensor, v: Tensor, plan: ScatterPlan, frontier: Frontier,
                      scale: float, pair_bias: Optional[Tensor] = None,
                      euclidean: bool = False) -> Tensor:
    r"""Strictly causal hierarchical attention on ``[N, H, D]`` inputs
    (autograd; double backward included). :obj:`plan` supplies the
    leaf-ancestor pairs and each leaf's own pair."""
    num_leaves = q.size(0)
    mean_k, mean_v = subtree_mean(k, plan), subtree_mean(v, plan)
    key_norm = subtree_mean((k * k).sum(-1), plan) if euclidean else None
    self_score = leaf_self_scores(q, k, plan, scale, pair_bias, key_norm)
    log_count = plan.num_leaves_below.to(q.dtype).log()
    score = (scale * (q[frontier.leaf] * mean_k[frontier.block]).sum(-1)
             + log_count[frontier.block, None])
    if key_norm is not None:  # the row term -scale/2 |q_i|^2 cancels within row i
        score = score - 0.5 * scale * key_norm[frontier.block]
    if pair_bias is not None:
        score = score + pair_bias[frontier.pair]
    rows = torch.cat([torch.arange(num_leaves, device=q.device), frontier.leaf])
    log_z = scatter_logsumexp(torch.cat([self_score, score]), rows, num_leaves)
    weight = (score - log_z[frontier.leaf]).exp()[..., None]
    out = scatter(weight * mean_v[frontier.block], frontier.leaf, 0, dim_size=num_leaves,
                  reduce='sum')
    return out + (self_score - log_z).exp()[..., None] * v
