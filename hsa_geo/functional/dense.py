r"""Dense HSA attention straight from the definition, by a code path that
shares nothing with the sweeps: node means from a leaf-membership matrix,
:math:`\phi` by recursion over the tree, and every entry :math:`a_{ij}`
from the lowest common ancestor of :math:`i` and :math:`j`. Quadratic in
:math:`N` (and Python loops): for tests, inspection and plots."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from hsa_geo.functional.checks import check_terms, prepare_inputs, resolve_scale
from hsa_geo.hierarchy.hierarchy import Hierarchy


def hsa_dense(q: Tensor, k: Tensor, hierarchy: Hierarchy,
              scale: Optional[float] = None, *, pair_bias: Optional[Tensor] = None,
              energy: str = 'dot', causal: bool = False) -> Tensor:
    r"""The full HSA attention matrix.

    Starts from the full score matrix :math:`s_{ij}` (dot or Euclidean
    energy, plus the bias of the sibling pair whose block holds
    :math:`(i, j)`) and takes block means :math:`\bar s(B, C)` of it
    directly. For leaves :math:`i \neq j` with lowest common ancestor
    :math:`A`, where :math:`B \ni i` and :math:`C \ni j` are children of
    :math:`A`,

    .. math::
        a_{ij} = \Big(\prod_{X \in \mathrm{path}(\mathrm{root} \to A],\,
        X \neq \mathrm{root}} \mu(X)\Big)\,
        \frac{\exp \bar s(B, C)}{Z_B},
        \qquad a_{ii} = \prod_{X \in \mathrm{path}(\mathrm{root} \to i]} \mu(X),

    with :math:`\mu(X) = e^{-\phi(X)} / Z_X`. With :obj:`causal`,
    :math:`Z_X` sums over :math:`X` and its earlier siblings only and
    :math:`a_{ij} = 0` for :math:`j > i` (siblings ordered by their
    leaves, which must be consecutive in every subtree). With
    :obj:`causal="strict"`, row :math:`i` is the softmax over its own
    score and the row means :math:`\bar s_i(C)` of the blocks of its past,
    each spread evenly over :math:`\ell(C)`.

    Args:
        q (torch.Tensor): Queries ``[N, H, D]`` or ``[N, D]``.
        k (torch.Tensor): Keys, same shape as :obj:`q`.
        hierarchy (Hierarchy): The tree over the :math:`N` leaves.
        scale (float, optional): Score scale. (default: :math:`1/\sqrt{D}`)
        pair_bias (torch.Tensor, optional): ``[E, H]`` or ``[E]`` bias per
            ordered sibling pair, as in :func:`hsa_geo.functional.hsa`.
            (default: :obj:`None`)
        energy (str, optional): :obj:`"dot"` or :obj:`"euclidean"`.
            (default: :obj:`"dot"`)
        causal (bool or str, optional): :obj:`True` or :obj:`"strict"`
            causal HSA. (default: :obj:`False`)

    Returns:
        ``[H, N, N]`` (``[N, N]`` for two-dimensional input); rows sum to 1.
    """
    _, single_head, _ = prepare_inputs((q, k), hierarchy)
    if single_head:
        q, k = q.unsqueeze(1), k.unsqueeze(1)
    pair_bias = check_terms(pair_bias, energy, causal, hierarchy, q)
    num_leaves, heads, dim = q.shape
    scale = resolve_scale(scale, q)
    parent: List[int] = hierarchy.parent.tolist()
    num_nodes = len(parent)
    children: Dict[int, List[int]] = {}
    for node, up in enumerate(parent):
        if up >= 0:
            children.setdefault(up, []).append(node)
    paths = [path_to_root(leaf, parent) for leaf in range(num_leaves)]

    membership = q.new_zeros(num_nodes, num_leaves)
    for leaf, path in enumerate(paths):
        membership[path, leaf] = 1.0
    size = membership.sum(1)
    if causal:
        _check_leaf_intervals(membership)
    first_leaf = [int(row.nonzero()[0]) for row in membership]

    scores = _leaf_scores(q, k, scale, energy)  # [H, N, N]
    if pair_bias is not None:
        scores = scores + _bias_per_leaf_pair(pair_bias, hierarchy, membership, heads)
    # block means straight from the definition: 1/(|u||w|) sum over l(u) x l(w)
    mean_score = (torch.einsum('ui,hij,wj->huw', membership, scores, membership)
                  / (size[:, None] * size[None, :]))  # [H, nodes, nodes]

    def attends(child: int, other: int) -> bool:
        return not causal or first_leaf[other] < first_leaf[child]

    if causal == 'strict':
        return _strict_causal_dense(scores, membership, size, paths, parent, children,
                                    attends, single_head)

    phi: Dict[int, Tensor] = {}
    log_z: Dict[int, Tensor] = {}

    # children before parents (deepest first): no recursion, any depth
    for node in torch.argsort(hierarchy.depth.cpu(), descending=True, stable=True).tolist():
        if node < num_leaves:
            phi[node] = -mean_score[:, node, node]
            continue
        family = children[node]
        total = 0.0
        for child in family:
            terms = [-phi[child]] + [size[other].log() + mean_score[:, child, other]
                                     for other in family
                                     if other != child and attends(child, other)]
            log_z[child] = torch.logsumexp(torch.stack(terms), 0)
            total = total + size[child] / size[node] * log_z[child]
        phi[node] = -total

    log_attention = q.new_full((heads, num_leaves, num_leaves), float('-inf'))
    for i, path_i in enumerate(paths):
        # log of the mass kept down to each node of i's path (root excluded)
        kept, log_kept = 0.0, {}
        for node in reversed(path_i[:-1]):
            kept = kept - phi[node] - log_z[node]
            log_kept[node] = kept
        log_kept[path_i[-1]] = 0.0
        on_path = {node: depth for depth, node in enumerate(path_i)}
        for j, path_j in enumerate(paths):
            if i == j:
                log_attention[:, i, i] = log_kept[i] if len(path_i) > 1 else 0.0
                continue
            lca_at = next((at for at, node in enumerate(path_j) if node in on_path), None)
            if lca_at is None:  # different trees: no attention
                continue
            lca = path_j[lca_at]
            branch_i, branch_j = path_i[on_path[lca] - 1], path_j[lca_at - 1]
            if not attends(branch_i, branch_j):
                continue
            above = log_kept[lca] if parent[lca] >= 0 else 0.0
            log_attention[:, i, j] = above + mean_score[:, branch_i, branch_j] - log_z[branch_i]
    attention = log_attention.exp()
    return attention[0] if single_head else attention


def _strict_causal_dense(scores, membership, size, paths, parent, children, attends,
                         single_head: bool) -> Tensor:
    r"""Row by row: a softmax over the leaf's own score and one logit
    :math:`\log|C| + \bar s_i(C)` per past block, spread over
    :math:`\ell(C)`."""
    heads, num_leaves = scores.size(0), scores.size(1)
    row_block_mean = scores @ membership.t() / size  # [H, N, nodes]: mean of s_ij over l(C)
    attention = scores.new_zeros(heads, num_leaves, num_leaves)
    for i, path in enumerate(paths):
        blocks = [other for node in path[:-1] for other in children[parent[node]]
                  if other != node and attends(node, other)]
        logits = torch.stack([scores[:, i, i]] + [size[c].log() + row_block_mean[:, i, c]
                                                   for c in blocks])
        weights = torch.softmax(logits, 0)
        attention[:, i, i] = weights[0]
        for weight, block in zip(weights[1:], blocks):
            leaves = membership[block].nonzero().view(-1)
            attention[:, i, leaves] = (weight / size[block])[:, None]
    return attention[0] if single_head else attention


def _leaf_scores(q: Tensor, k: Tensor, scale: float, energy: str) -> Tensor:
    r"""``[H, N, N]`` scores :math:`s_{ij}` of every pair of leaves."""
    if energy == 'dot':
        return scale * torch.einsum('ihd,jhd->hij', q, k)
    if energy == 'euclidean':
        difference = q.transpose(0, 1)[:, :, None, :] - k.transpose(0, 1)[:, None, :, :]
        return -0.5 * scale * (difference ** 2).sum(-1)
    raise ValueError(f"Unknown energy {energy!r}; choose 'dot' or 'euclidean'")


def _bias_per_leaf_pair(pair_bias: Tensor, hierarchy: Hierarchy, membership: Tensor,
                        heads: int) -> Tensor:
    r"""``[H, N, N]``: the bias of the sibling pair :math:`(B, C)` on every
    leaf pair of the block :math:`\ell(B) \times \ell(C)`, and of a
    leaf's own pair on the diagonal."""
    num_leaves = membership.size(1)
    bias = pair_bias  # [E, H], checked by check_terms
    out = bias.new_zeros(heads, num_leaves, num_leaves)
    rows, cols = hierarchy.sibling_pairs().tolist()
    for pair, (row, col) in enumerate(zip(rows, cols)):
        if row == col and row >= num_leaves:
            continue  # a cluster's own pair has no block
        block = membership[row][:, None] * membership[col][None, :]
        out = out + block * bias[pair][:, None, None]
    return out


def _check_leaf_intervals(membership: Tensor) -> None:
    for node, row in enumerate(membership):
        leaves = row.nonzero().view(-1)
        if int(leaves[-1] - leaves[0]) + 1 != leaves.numel():
            raise ValueError(f"Causal HSA needs consecutive leaves below every node; "
                             f"node {node} has leaves {leaves.tolist()}")


def path_to_root(node: int, parent: List[int]) -> List[int]:
    r"""Nodes from :obj:`node` up to its root, both included."""
    path = [node]
    while parent[path[-1]] >= 0:
        path.append(parent[path[-1]])
    return path
