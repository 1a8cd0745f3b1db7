r"""What an HSA layer needs from the functional core, so that no module
outside :mod:`hsa_geo.functional` asks which engine runs: the queries, keys
and values in the layout of that engine (:func:`project_qkv`) and the
leaf-to-leaf attention on given pairs of leaves (:func:`attention_on_edges`).
HSA through a caller's aggregation along edges is
:func:`~hsa_geo.functional.attention.hsa_propagate`, beside :func:`hsa`,
whose input handling it shares.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from hsa_geo.functional.attention import BlockAttention
from hsa_geo.functional.engines import node_major_inputs
from hsa_geo.hierarchy.hierarchy import Hierarchy


def project_qkv(x: Tensor, weight: Tensor, bias: Optional[Tensor], heads: int,
                normalize: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Queries, keys and values ``[N, H, C]`` of leaf features :obj:`x`
    ``[N, F]`` by one product with :obj:`weight` ``[3HC, F]`` (the query,
    key and value projections stacked) and :obj:`bias` ``[3HC]`` (or
    None): one matrix product forward and two backward instead of three and
    six. The result is laid out as the engine that will run HSA on
    :obj:`x`'s device reads it: node-major for the CPU kernel, views of
    heads-first ``[H, N, C]`` tensors for the tensor sweeps (no transpose
    copy on the way in or back). With :obj:`normalize`, queries and keys
    are layer-normalised per head (no affine parameters)."""
    channels = weight.size(0) // (3 * heads)
    if node_major_inputs(x):
        out = F.linear(x, weight, bias).view(-1, 3 * heads, channels)
        query, key, value = out.split(heads, dim=1)
    else:
        out = torch.matmul(x, weight.view(3 * heads, channels, -1).transpose(1, 2))
        if bias is not None:
            out = out + bias.view(3 * heads, 1, channels)
        query, key, value = (t.transpose(0, 1) for t in out.split(heads))
    if normalize:
        query = F.layer_norm(query, (channels, ))
        key = F.layer_norm(key, (channels, ))
    return query, key, value


@torch.no_grad()
def attention_on_edges(attention: BlockAttention, hierarchy: Hierarchy,
                       edge_index: Tensor) -> Tensor:
    r"""HSA's leaf-to-leaf weight :math:`a_{ij}` on every edge
    :math:`j \to i` of :obj:`edge_index` ``[2, E]`` (source :math:`j` in row
    0, target :math:`i` in row 1, as PyG's messages), i.e. the dense
    matrix of :func:`~hsa_geo.functional.block_attention_to_dense`
    restricted to the edges, from :obj:`attention`
    (:func:`~hsa_geo.functional.hsa_block_weights`): :math:`a_{ij} =
    P(\mathrm{parent}(B))\, w_{BC}` for the siblings :math:`B \ni i` and
    :math:`C \ni j` below the lowest common ancestor, :math:`P(i)` on a
    self-loop, 0 between trees. ``[E, H]`` (``[E]`` for one head);
    :math:`O(E \cdot \mathrm{depth})`."""
    num_leaves = hierarchy.num_leaves
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"edge_index must be [2, E] (got shape {tuple(edge_index.shape)})")
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_leaves):
        bad = ((edge_index < 0) | (edge_index >= num_leaves)).any(0).nonzero()[0, 0]
        raise ValueError(f"edge {int(bad)} {tuple(edge_index[:, bad].tolist())} of edge_index "
                         f"is not between leaves of the hierarchy (ids 0..{num_leaves - 1})")
    single_head = attention.pair_weight.dim() == 1
    pair_weight = attention.pair_weight[:, None] if single_head else attention.pair_weight
    mass = attention.subtree_mass[:, None] if single_head else attention.subtree_mass
    device = pair_weight.device
    parent, depth = hierarchy.parent.to(device), hierarchy.depth.to(device)
    target, source = edge_index.to(device)[1], edge_index.to(device)[0]
    node_i, node_j = target, source
    for _ in range(hierarchy.max_depth):  # lift the deeper one to the other's depth
        depth_i, depth_j = depth[node_i], depth[node_j]
        node_i = torch.where(depth_i > depth_j, parent[node_i], node_i)
        node_j = torch.where(depth_j > depth_i, parent[node_j], node_j)
    for _ in range(hierarchy.max_depth):  # climb together until siblings (or two roots)
        climb = (node_i != node_j) & (parent[node_i] != parent[node_j])
        node_i = torch.where(climb, parent[node_i], node_i)
        node_j = torch.where(climb, parent[node_j], node_j)
    rows, cols = attention.pair_index.to(device)
    num_nodes = hierarchy.num_nodes
    keys, order = (rows * num_nodes + cols).sort()
    wanted = node_i * num_nodes + node_j
    position = torch.searchsorted(keys, wanted).clamp(max=max(keys.numel() - 1, 0))
    same_tree = parent[node_i] >= 0  # siblings below a common parent
    if keys.numel():
        same_tree = same_tree & (keys[position] == wanted)
        between = mass[parent[node_i].clamp(min=0)] * pair_weight[order[position]]
    else:
        between = mass.new_zeros(target.numel(), mass.size(1))
    weight = torch.where(same_tree[:, None], between, 0.0)
    weight = torch.where((target == source)[:, None], mass[target], weight)
    return weight[:, 0] if single_head else weight
