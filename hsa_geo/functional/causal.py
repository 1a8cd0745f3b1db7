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

from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from hsa_geo.functional.scatter_sweep import ScatterPlan, leaf_self_scores, subtree_mean
from hsa_geo.hierarchy.plan import SweepPlan
from hsa_geo.functional.terms import ScoreTerms


class FamilyGroup(NamedTuple):
    r"""Families with :math:`b` children whose leaves are gathered into a
    padded ``[F, L]`` matrix."""
    children: Tensor  #: ``[F, b]`` children in sequence order
    leaf: Tensor  #: ``[F, L]`` leaves below each family, ``N`` as padding
    child_position: Tensor  #: ``[F, L]`` column of the child holding the leaf (0 for padding)
    first_pair: Tensor  #: ``[F]`` position of the family's pair (first child, first child)
    #: ``(start, end)`` when the leaves are exactly ``start..end-1`` in
    #: row-major order (no padding), so gathering them is a view
    leaf_range: Optional[Tuple[int, int]] = None


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
    leaf_range = None
    if bool(valid.all()):
        first = int(leaf[0, 0])
        if torch.equal(leaf.reshape(-1), torch.arange(first, first + leaf.numel(),
                                                      device=leaf.device)):
            leaf_range = (first, first + leaf.numel())
    return FamilyGroup(children, torch.where(valid, leaf, num_leaves),
                       torch.where(valid, position, 0), first_pair, leaf_range)


def hsa_strict_causal(q: Tensor, k: Tensor, v: Tensor, plan: SweepPlan,
                      scatter_plan: ScatterPlan, groups: List[FamilyGroup], scale: float,
                      terms: ScoreTerms = ScoreTerms()) -> Tensor:
    r"""Strictly causal hierarchical attention on ``[N, H, D]`` inputs
    (autograd; double backward included), computed heads-first.
    :obj:`scatter_plan` supplies each leaf's own pair."""
    num_leaves, heads = q.size(0), q.size(1)
    q_heads, k_heads, v_heads = (t.transpose(0, 1) for t in (q, k, v))  # [H, N, D] views
    node_k = subtree_mean(k, scatter_plan).transpose(0, 1)  # [H, N + M, D]
    node_v = subtree_mean(v, scatter_plan).transpose(0, 1)
    column = terms.column_term(k, scale)  # the row term cancels within a row
    if column is not None:  # its mean below every node
        column = subtree_mean(column, scatter_plan).t()  # [H, N + M]
    self_score = leaf_self_scores(q, k, scatter_plan.leaf_pair, scale, terms).t()  # [H, N]
    bias = None if terms.pair_bias is None else terms.pair_bias.t()  # [H, E]
    log_count = plan.num_leaves_below.to(q.dtype).log()
    # one padding row / column (leaf id N) that every group may point at
    padded_q = torch.cat([q_heads, q_heads.new_zeros(heads, 1, q.size(2))], dim=1)

    scores = []  # per group [H, F, L, b]: each leaf below a family against its children
    for group in groups:
        size = group.children.size(1)
        query = _leaf_rows(padded_q, group)
        score = torch.matmul(query, node_k[:, group.children].transpose(-1, -2)) * scale
        score = score + log_count[group.children][None, :, None, :]
        if column is not None:
            score = score + column[:, group.children][:, :, None, :]
        if bias is not None:  # pair (X, C): X holds the leaf, C is the column
            pair = (group.first_pair[:, None, None] + group.child_position[..., None] * size
                    + torch.arange(size, device=q.device))
            score = score + bias[:, pair]
        earlier = torch.arange(size, device=q.device) < group.child_position[..., None]
        scores.append(score.masked_fill(~earlier, float('-inf')))

    # one softmax per leaf over its own score and all its frontier blocks;
    # padding rows are fully masked and land in the extra column N
    top = torch.cat([self_score.detach(), self_score.new_zeros(heads, 1)], dim=1)
    for group, score in zip(groups, scores):
        rows = group.leaf.reshape(1, -1).expand(heads, -1)
        top = top.scatter_reduce(1, rows, score.detach().amax(-1).reshape(heads, -1), 'amax')
    # the padding column gets a total of 1: a finite log Z, so its weights
    # are exp(-inf) = 0 and not NaN (a NaN there poisons v's gradient)
    total = torch.cat([(self_score - top[:, :num_leaves]).exp(),
                       self_score.new_ones(heads, 1)], dim=1)
    for group, score in zip(groups, scores):
        mass = (score - _leaf_rows(top, group)[..., None]).exp().sum(-1)
        total = total.index_add(1, group.leaf.reshape(-1), mass.reshape(heads, -1))
    log_z = top + total.log()

    out = torch.cat([(self_score - log_z[:, :num_leaves]).exp()[..., None] * v_heads,
                     v_heads.new_zeros(heads, 1, v.size(2))], dim=1)
    for group, score in zip(groups, scores):
        weight = (score - _leaf_rows(log_z, group)[..., None]).exp()
        received = torch.matmul(weight, node_v[:, group.children])  # [H, F, L, D_v]
        out = out.index_add(1, group.leaf.reshape(-1), received.reshape(heads, -1, v.size(2)))
    return out[:, :num_leaves].transpose(0, 1)


def _leaf_rows(buffer: Tensor, group: FamilyGroup) -> Tensor:
    r"""``[H, F, L, ...]`` rows of a heads-first buffer ``[H, N + 1, ...]``
    for the leaves of :obj:`group` (a view for a leaf range)."""
    family, width = group.leaf.shape
    if group.leaf_range is not None:
        start, end = group.leaf_range
        return buffer[:, start:end].reshape(buffer.size(0), family, width, *buffer.shape[2:])
    return buffer[:, group.leaf]
