r"""Dense HSA attention straight from the definition, by a code path that
shares nothing with the sweeps: node means from a leaf-membership matrix,
:math:`\phi` by recursion over the tree, and every entry :math:`a_{ij}`
from the lowest common ancestor of :math:`i` and :math:`j`. Quadratic in
:math:`N` (and Python loops): for tests, inspection and plots."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from hsa_geo.hierarchy.hierarchy import Hierarchy


def hsa_dense(q: Tensor, k: Tensor, hierarchy: Hierarchy,
              scale: Optional[float] = None) -> Tensor:
    r"""The full HSA attention matrix.

    For leaves :math:`i \neq j` with lowest common ancestor :math:`A`, where
    :math:`B \ni i` and :math:`C \ni j` are children of :math:`A`,

    .. math::
        a_{ij} = \Big(\prod_{X \in \mathrm{path}(\mathrm{root} \to A],\,
        X \neq \mathrm{root}} \mu(X)\Big)\,
        \frac{\exp \bar s(B, C)}{Z_B},
        \qquad a_{ii} = \prod_{X \in \mathrm{path}(\mathrm{root} \to i]} \mu(X),

    with :math:`\mu(X) = e^{-\phi(X)} / Z_X`.

    Args:
        q (torch.Tensor): Queries ``[N, H, D]`` or ``[N, D]``.
        k (torch.Tensor): Keys, same shape as :obj:`q`.
        hierarchy (Hierarchy): The tree over the :math:`N` leaves.
        scale (float, optional): Score scale. (default: :math:`1/\sqrt{D}`)

    Returns:
        ``[H, N, N]`` (``[N, N]`` for two-dimensional input); rows sum to 1.
    """
    single_head = q.dim() == 2
    if single_head:
        q, k = q.unsqueeze(1), k.unsqueeze(1)
    num_leaves, heads, dim = q.shape
    if num_leaves != hierarchy.num_leaves:
        raise ValueError(f"q has {num_leaves} rows but the hierarchy has "
                         f"{hierarchy.num_leaves} leaves")
    scale = dim ** -0.5 if scale is None else scale
    parent: List[int] = hierarchy.parent.tolist()
    num_nodes = len(parent)
    children: Dict[int, List[int]] = {}
    for node, up in enumerate(parent):
        if up >= 0:
            children.setdefault(up, []).append(node)
    paths = [_path_to_root(leaf, parent) for leaf in range(num_leaves)]

    membership = q.new_zeros(num_nodes, num_leaves)
    for leaf, path in enumerate(paths):
        membership[path, leaf] = 1.0
    size = membership.sum(1)
    mean_q = (membership @ q.reshape(num_leaves, -1) / size[:, None]).view(num_nodes, heads, dim)
    mean_k = (membership @ k.reshape(num_leaves, -1) / size[:, None]).view(num_nodes, heads, dim)
    mean_score = scale * torch.einsum('uhd,whd->huw', mean_q, mean_k)  # [H, nodes, nodes]

    phi: Dict[int, Tensor] = {}
    log_z: Dict[int, Tensor] = {}

    def solve(node: int) -> Tensor:
        if node < num_leaves:
            phi[node] = -mean_score[:, node, node]
            return phi[node]
        family = children[node]
        for child in family:
            solve(child)
        total = 0.0
        for child in family:
            terms = [-phi[child]] + [size[other].log() + mean_score[:, child, other]
                                     for other in family if other != child]
            log_z[child] = torch.logsumexp(torch.stack(terms), 0)
            total = total + size[child] / size[node] * log_z[child]
        phi[node] = -total
        return phi[node]

    for root in (node for node, up in enumerate(parent) if up < 0):
        solve(root)

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
            above = log_kept[lca] if parent[lca] >= 0 else 0.0
            log_attention[:, i, j] = above + mean_score[:, branch_i, branch_j] - log_z[branch_i]
    attention = log_attention.exp()
    return attention[0] if single_head else attention


def _path_to_root(node: int, parent: List[int]) -> List[int]:
    r"""Nodes from :obj:`node` up to its root, both included."""
    path = [node]
    while parent[path[-1]] >= 0:
        path.append(parent[path[-1]])
    return path
