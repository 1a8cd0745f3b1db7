r"""HSA as message passing: the same recursion as :mod:`.sweep`, written with
edge lists and :func:`torch_geometric.utils.scatter` (which dispatches to
``torch_scatter`` when it is installed) and differentiated by autograd.

Sibling pairs are edges :math:`C \to B`; :math:`\log Z_B` is a
scatter-log-sum-exp over the edges into :math:`B`, :math:`\phi` of a parent
a scatter-sum over its children, and every leaf collects the messages of
its ancestors through leaf-ancestor edges. It keeps autograd's full graph
(so it supports double backward) at the cost of :math:`O(\sum_A b_A^2 \cdot
HD)` memory: the backend for moderate sizes and for cross-checking the
fused sweeps, which are the default.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch_geometric.utils import scatter

from hsa_geo.hierarchy.plan import SweepPlan
from hsa_geo.functional.terms import ScoreTerms


class Level(NamedTuple):
    r"""Sibling pairs of all families whose parents share one depth."""
    row: Tensor  #: ``[E]`` node B (the attending child)
    col: Tensor  #: ``[E]`` node C (the attended sibling; ``row == col`` on the diagonal)
    children: Tensor  #: ``[K]`` every child at this level
    parent: Tensor  #: ``[K]`` its parent
    families: Tensor  #: ``[F]`` the parents, each once
    pair: Tensor  #: ``[E]`` position of each pair in the plan's sibling-pair order


class ScatterPlan(NamedTuple):
    levels: List[Level]  #: deepest parents first
    ancestor_leaf: Tensor  #: ``[P]`` leaf of each leaf-ancestor pair
    ancestor_node: Tensor  #: ``[P]`` the ancestor (the leaf itself included)
    parent: Tensor  #: ``[N + M]`` parent of every node, ``-1`` at roots
    num_leaves_below: Tensor  #: ``[N + M]``
    sibling_index: Tensor  #: ``[N + M]`` position among siblings
    #: ``[N]`` position of the pair :math:`(i, i)` of every leaf, -1 for a
    #: leaf that is a root of its own
    leaf_pair: Tensor


def build_scatter_plan(plan: SweepPlan) -> ScatterPlan:
    r"""Edge lists of :obj:`plan`'s families, level by level."""
    parent = plan.parent
    by_depth = {}
    for block in plan.blocks:
        by_depth.setdefault(block.depth, []).append(block)
    levels = []
    leaf_pair = torch.full((plan.num_leaves, ), -1, dtype=torch.long, device=parent.device)
    for depth in sorted(by_depth, reverse=True):
        pairs, children, parents, positions = [], [], [], []
        for block in by_depth[depth]:
            family, size = block.children.shape
            pairs.append(block.sibling_pairs())
            children.append(block.children.reshape(-1))
            parents.append((block.parents + plan.num_leaves)[:, None].expand(family, size).reshape(-1))
            positions.append(torch.arange(block.pair_slice.start, block.pair_slice.stop,
                                          device=parent.device))
        families = torch.cat([block.parents for block in by_depth[depth]]) + plan.num_leaves
        row, col = torch.cat(pairs, dim=1)
        position = torch.cat(positions)
        own_leaf = (row == col) & (row < plan.num_leaves)
        leaf_pair[row[own_leaf]] = position[own_leaf]
        levels.append(Level(row, col, torch.cat(children), torch.cat(parents), families,
                            position))
    leaf = torch.arange(plan.num_leaves, device=parent.device)
    node = leaf.clone()
    pairs_leaf, pairs_node = [leaf], [node]
    while True:  # climb one level per step from every leaf still below a root
        has_parent = parent[node] >= 0
        leaf, node = leaf[has_parent], parent[node[has_parent]]
        if node.numel() == 0:
            break
        pairs_leaf.append(leaf)
        pairs_node.append(node)
    return ScatterPlan(levels, torch.cat(pairs_leaf), torch.cat(pairs_node), parent,
                       plan.num_leaves_below, plan.sibling_index, leaf_pair)


#: ``aggregate(x, edge_index, weight, dim_size)``: ``[dim_size, ...]``, at
#: every target ``edge_index[1]`` the sum over its edges of ``weight * x``
#: of the source ``edge_index[0]`` (``weight`` ``[E]``, ``[E, H]`` or None
#: for 1).
Aggregate = Callable[[Tensor, Tensor, Optional[Tensor], int], Tensor]


def weighted(x: Tensor, weight: Optional[Tensor]) -> Tensor:
    r""":obj:`x` ``[E, ...]`` times :obj:`weight` (None, ``[E]`` or ``[E, H]``),
    broadcast over the trailing dimensions."""
    if weight is None:
        return x
    return weight.view(*weight.shape, *([1] * (x.dim() - weight.dim()))) * x


def scatter_aggregate(x: Tensor, edge_index: Tensor, weight: Optional[Tensor],
                      dim_size: int) -> Tensor:
    r"""The default :data:`Aggregate`: a gather and a scatter-sum."""
    return scatter(weighted(x[edge_index[0]], weight), edge_index[1], 0, dim_size=dim_size,
                   reduce='sum')


def scatter_logsumexp(src: Tensor, index: Tensor, dim_size: int) -> Tensor:
    top = scatter(src.detach(), index, 0, dim_size=dim_size, reduce='max')
    total = scatter((src - top[index]).exp(), index, 0, dim_size=dim_size, reduce='sum')
    return total.log() + top


def subtree_mean(x: Tensor, plan: ScatterPlan, leaf_count: Optional[Tensor] = None) -> Tensor:
    r"""``[N + M, ...]`` mean over the leaves below every node of per-leaf
    rows ``[N, ...]``; with :obj:`leaf_count` ``[N]``, the mean weighted by
    it (a leaf standing for that many leaves with :obj:`x` their mean)."""
    if leaf_count is None:
        return scatter(x[plan.ancestor_leaf], plan.ancestor_node, 0,
                       dim_size=plan.parent.numel(), reduce='mean')
    weight = leaf_count.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    total = scatter((weight * x)[plan.ancestor_leaf], plan.ancestor_node, 0,
                    dim_size=plan.parent.numel(), reduce='sum')
    count = scatter(weight[plan.ancestor_leaf], plan.ancestor_node, 0,
                    dim_size=plan.parent.numel(), reduce='sum')
    return total / count


def leaf_self_scores(q: Tensor, k: Tensor, leaf_pair: Optional[Tensor], scale: float,
                     terms: ScoreTerms = ScoreTerms()) -> Tensor:
    r"""``[N, H]`` :math:`s_{ii}`: the energy of a leaf with itself (its
    column term; the row term cancels) plus the bias of its own pair
    (:obj:`leaf_pair` ``[N]``, its position, -1 for a leaf that is a root of
    its own and has none)."""
    self_score = scale * (q * k).sum(-1)
    column = terms.column_term(k, scale)
    if column is not None:
        self_score = self_score + column
    pair_bias = terms.pair_bias
    if pair_bias is not None and pair_bias.size(0) > 0:  # no pairs: only isolated leaves
        has_pair = (leaf_pair >= 0)[:, None]
        self_score = self_score + torch.where(has_pair, pair_bias[leaf_pair.clamp(min=0)], 0.0)
    return self_score


class NodeSummaries(NamedTuple):
    r"""What the bottom-up sweep reads of every node."""
    count: Tensor  #: ``[N + M]`` leaves below (a summary leaf stands for several)
    query: Tensor  #: ``[N + M, H, D]`` mean query
    key: Tensor  #: ``[N + M, H, D]`` mean key
    #: ``[N + M, H]`` mean column term :math:`c_j` (Euclidean energy), or None
    column_term: Optional[Tensor]
    leaf_phi: Tensor  #: ``[N, H]`` :math:`\phi` of the leaves


def scatter_bottom_up(q: Tensor, k: Tensor, plan: ScatterPlan, scale: float,
                      terms: ScoreTerms = ScoreTerms(),
                      aggregate: Aggregate = scatter_aggregate):
    r""":math:`\phi` of every node (``[N + M, H]``; without the row term)
    and, level by level, the log-weights of the kept sibling pairs and those
    pairs (autograd, twice differentiable)."""
    column = terms.column_term(k, scale)
    self_score = leaf_self_scores(q, k, plan.leaf_pair, scale, terms)
    nodes = NodeSummaries(plan.num_leaves_below.to(q.dtype), subtree_mean(q, plan),
                          subtree_mean(k, plan),
                          None if column is None else subtree_mean(column, plan), -self_score)
    return summaries_bottom_up(nodes, plan, scale, terms, aggregate)


def summaries_bottom_up(nodes: NodeSummaries, plan: ScatterPlan, scale: float,
                        terms: ScoreTerms = ScoreTerms(),
                        aggregate: Aggregate = scatter_aggregate):
    r""":func:`scatter_bottom_up` from per-node summaries: the leaves may
    stand for whole subtrees (their :math:`\phi`, count and means given)."""
    num_leaves, num_nodes = nodes.leaf_phi.size(0), plan.parent.numel()
    count, mean_q, mean_k, column = nodes.count, nodes.query, nodes.key, nodes.column_term
    pair_bias = terms.pair_bias
    phi = torch.cat([nodes.leaf_phi, mean_q.new_zeros(num_nodes - num_leaves, mean_q.size(1))])
    log_weights, kept_pairs = [], []
    for level in plan.levels:  # bottom-up: phi of each parent from its children
        row, col, pair = level.row, level.col, level.pair
        if terms.causal:  # only earlier siblings (and the child itself)
            keep = plan.sibling_index[col] <= plan.sibling_index[row]
            row, col, pair = row[keep], col[keep], pair[keep]
        kept_pairs.append((row, col))
        diagonal = row == col
        score = scale * (mean_q[row] * mean_k[col]).sum(-1) + count[col].log()[:, None]
        if column is not None:
            score = score + column[col]
        if pair_bias is not None:
            score = score + pair_bias[pair]
        score = torch.where(diagonal[:, None], -phi[row], score)
        log_z = scatter_logsumexp(score, row, num_nodes)
        share = count[level.children] / count[level.parent]  # children -> parent
        parent_phi = -aggregate(log_z, torch.stack([level.children, level.parent]), share,
                                num_nodes)
        phi = phi.index_put((level.families, ), parent_phi[level.families])
        log_weights.append(score - log_z[row])
    return phi, log_weights, kept_pairs


def hsa_scatter(q: Tensor, k: Tensor, v: Tensor, plan: ScatterPlan, scale: float,
                terms: ScoreTerms = ScoreTerms(), aggregate: Aggregate = scatter_aggregate
                ) -> Tuple[Tensor, Tensor, Tensor]:
    r"""HSA on ``[N, H, D]`` inputs by scatter operations (autograd), with
    the score terms :obj:`terms` (a pair bias ``[E, H]``, the Euclidean
    energy's column term -- its row term cancels -- and the causal
    restriction to earlier siblings): the output ``[N, H, D_v]``,
    :math:`\phi` of every node ``[N + M, H]`` and the leaves'
    :math:`\log a_{ii}` ``[N, H]``."""
    phi, log_weights, kept_pairs = scatter_bottom_up(q, k, plan, scale, terms, aggregate)
    out, leaf_log_mass = summaries_top_down(v, subtree_mean(v, plan), plan, log_weights,
                                            kept_pairs, aggregate)
    return out, phi, leaf_log_mass


def summaries_top_down(v: Tensor, node_v: Tensor, plan: ScatterPlan, log_weights: List[Tensor],
                       kept_pairs, aggregate: Aggregate = scatter_aggregate
                       ) -> Tuple[Tensor, Tensor]:
    r"""The leaves' outputs ``[N, H, D_v]`` and :math:`\log P` ``[N, H]``
    from the weights of the bottom-up sweep, the leaves' values :obj:`v` and
    every node's mean value :obj:`node_v`. Going down, every node :math:`B`
    takes from its parent :math:`\log P` and the values collected by its
    ancestors, and adds :math:`P(\mathrm{parent})\sum_{C \neq B} w_{BC}
    \bar v_C` from its siblings."""
    num_leaves, num_nodes = v.size(0), plan.parent.numel()
    # per node: log P, then the values it passes down, [N + M, H, 1 + D_v]
    down = v.new_zeros(num_nodes, v.size(1), 1 + v.size(-1))
    for level, (row, col), log_weight in zip(reversed(plan.levels), reversed(kept_pairs),
                                             reversed(log_weights)):  # top-down
        diagonal = row == col
        off = ~diagonal
        received = aggregate(node_v, torch.stack([col[off], row[off]]), log_weight[off].exp(),
                             num_nodes)  # siblings -> B
        from_parent = aggregate(down, torch.stack([level.parent, level.children]), None,
                                num_nodes)  # parent -> children
        parent_log_mass = from_parent[:, :, 0]
        log_mass = parent_log_mass.index_put((row[diagonal], ), log_weight[diagonal],
                                             accumulate=True)
        passed = from_parent[:, :, 1:] + parent_log_mass.exp()[..., None] * received
        down = down.index_put((level.children, ), torch.cat(
            [log_mass[level.children, :, None], passed[level.children]], dim=-1))
    leaf_log_mass = down[:num_leaves, :, 0]
    own = leaf_log_mass.exp()[..., None] * v
    return down[:num_leaves, :, 1:] + own, leaf_log_mass
