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
:math:`O(N\, b\, \mathrm{depth}\, H D)` time, against
:math:`O((N + M)\, b\, H D)` for the tied sweeps. Families are processed
in groups of equal branching and similar size: the leaves below a family
(consecutive ids) against its children's mean keys is one matrix product,
padded to at most twice the group's smallest family.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
from torch import Tensor
from torch_geometric.utils import scatter

from hsa_geo.functional.scatter_sweep import ScatterPlan, leaf_self_scores, subtree_mean
from hsa_geo.hierarchy.plan import SweepPlan


class FamilyGroup(NamedTuple):
    r"""Families with :math:`b` children whose leaves are gathered into a
    padded ``[F, L]`` matrix."""
    children: Tensor  #: ``[F, b]`` children in sequence order
    leaf: Tensor  #: ``[F, L]`` leaves below each family, ``N`` as padding
    child_position: Tensor  #: ``[F, L]`` column of the child holding the leaf (0 for padding)
    first_pair: Tensor  #: ``[F]`` position of the family's pair (first child, first child)


def build_family_groups(plan: SweepPlan, first_leaf: Tensor) -> List[FamilyGroup]:
    r"""Groups the families of a hierarchy whose subtrees are intervals of
    the leaf order by branching and by :math:`\lceil \log_2 |A| \rceil`."""
    groups = []
    for block in plan.blocks:
        family, size = block.children.shape
        if size < 2:
            continue  # a single child has no earlier sibling
        parent_count = block.parent_count.to(torch.long)
        bucket = torch.ceil(torch.log2(parent_count.to(torch.float64))).to(torch.long)
        for value in torch.unique(bucket).tolist():
            members = (bucket == value).nonzero().view(-1)
            groups.append(_family_group(block, members, first_leaf, plan.num_leaves))
    return groups


def _family_group(block, members: Tensor, first_leaf: Tensor, num_leaves: int) -> FamilyGroup:
    children = block.children[members]
    count = block.child_count[members].to(torch.long)  # [F, b]
    width = int(count.sum(1).max())
    offset = torch.arange(width, device=children.device)
    start = first_leaf[children[:, 0]]
    leaf = start[:, None] + offset
    valid = offset < count.sum(1, keepdim=True)
    # column of the child holding each leaf: how many child boundaries lie at or before it
    boundary = torch.cumsum(count, 1)[:, :-1]  # [F, b - 1]
    position = (offset[None, :, None] >= boundary[:, None, :]).sum(-1)
    size = block.num_children
    first_pair = block.pair_start + members * size * size
    return FamilyGroup(children, torch.where(valid, leaf, num_leaves),
                       torch.where(valid, position, 0), first_pair)


def hsa_strict_causal(q: Tensor, k: Tensor, v: Tensor, plan: ScatterPlan,
                      groups: List[FamilyGroup], scale: float,
                      pair_bias: Optional[Tensor] = None, euclidean: bool = False) -> Tensor:
    r"""Strictly causal hierarchical attention on ``[N, H, D]`` inputs
    (autograd; double backward included). :obj:`plan` supplies the
    leaf-ancestor pairs and each leaf's own pair."""
    num_leaves, heads = q.size(0), q.size(1)
    mean_k, mean_v = subtree_mean(k, plan), subtree_mean(v, plan)
    key_norm = subtree_mean((k * k).sum(-1), plan) if euclidean else None
    self_score = leaf_self_scores(q, k, plan, scale, pair_bias, key_norm)
    log_count = plan.num_leaves_below.to(q.dtype).log()
    padded_q = torch.cat([q, q.new_zeros(1, heads, q.size(2))])

    scores = []  # per group [F, L, H, b]: leaf against each child of its family
    for group in groups:
        size = group.children.size(1)
        score = torch.einsum('flhd,fchd->flhc', padded_q[group.leaf], mean_k[group.children])
        score = score * scale + log_count[group.children][:, None, None, :]
        if key_norm is not None:  # the row term -scale/2 |q_i|^2 cancels within row i
            score = score - 0.5 * scale * key_norm[group.children].transpose(1, 2)[:, None]
        if pair_bias is not None:  # pair (X, C): X holds the leaf, C is the column
            pair = (group.first_pair[:, None, None] + group.child_position[..., None] * size
                    + torch.arange(size, device=q.device))
            score = score + pair_bias[pair].transpose(-1, -2)
        earlier = torch.arange(size, device=q.device) < group.child_position[..., None]
        scores.append(score.masked_fill(~earlier[:, :, None, :], float('-inf')))

    # one softmax per leaf over its own score and all its frontier blocks;
    # padding rows are fully masked, so what they add to leaf N - 1 is zero
    top = self_score.detach().clone()
    for group, score in zip(groups, scores):
        rows = group.leaf.reshape(-1, 1).clamp(max=num_leaves - 1).expand(-1, heads)
        top = top.scatter_reduce(0, rows, score.detach().amax(-1).reshape(-1, heads), 'amax')
    top_padded = torch.cat([top, top.new_zeros(1, heads)])
    total = (self_score - top).exp()
    for group, score in zip(groups, scores):
        mass = (score - top_padded[group.leaf][..., None]).exp().sum(-1)
        total = total.index_add(0, group.leaf.reshape(-1).clamp(max=num_leaves - 1),
                                mass.reshape(-1, heads))
    log_z = torch.cat([top + total.log(), top.new_zeros(1, heads)])

    out = (self_score - log_z[:num_leaves]).exp()[..., None] * v
    for group, score in zip(groups, scores):
        weight = (score - log_z[group.leaf][..., None]).exp()
        received = torch.einsum('flhc,fchd->flhd', weight, mean_v[group.children])
        out = out.index_add(0, group.leaf.reshape(-1).clamp(max=num_leaves - 1),
                            received.reshape(-1, heads, v.size(2)))
    return out

