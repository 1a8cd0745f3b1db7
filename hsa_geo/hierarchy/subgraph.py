r"""A hierarchy restricted to a subset of its leaves: what HSA runs on when
a loader samples nodes of a large graph (PyG's
:class:`~torch_geometric.loader.NeighborLoader`, Cluster-GCN batches).

The restricted tree keeps the chosen leaves, in the order given, and their
ancestors; a cluster with no chosen leaf below it goes. For chosen leaves
:math:`i \neq j` with lowest common ancestor :math:`A` and branches
:math:`B \ni i`, :math:`C \ni j` in the full tree, the restricted tree has
the same lowest common ancestor and the branches :math:`B \cap S`,
:math:`C \cap S` (as leaf sets, :math:`S` the chosen leaves): its sibling
blocks are the full tree's blocks cut down to :math:`S \times S`. So HSA
over the restricted tree is the best block-constant approximation
(:doc:`derivation`) of softmax attention among the chosen leaves, with the
blocks the full tree draws between them.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from hsa_geo.hierarchy.builders.limits import collapse_chains
from hsa_geo.hierarchy.hierarchy import Hierarchy

LeafIds = Union[Tensor, Sequence[int], np.ndarray]


def subhierarchy(hierarchy: Hierarchy, leaves: LeafIds, keep_chains: bool = False,
                 return_node_id: bool = False) -> Union[Hierarchy, Tuple[Hierarchy, Tensor]]:
    r"""Restricts :obj:`hierarchy` to the leaves :obj:`leaves`, in that
    order: leaf :obj:`leaves[i]` becomes leaf :obj:`i` of the result, the
    ancestors of the chosen leaves are kept (in their relative order, after
    the leaves) and every other node is dropped; depths and leaf counts are
    those of the new tree.

    Clusters left with a single child are removed unless
    :obj:`keep_chains` (as the builders do): such a cluster has the same
    leaves as its child, so HSA is the same either way. With or without
    them, for queries and keys :math:`q, k` of the full tree's leaves,
    ``hsa_dense(q[leaves], k[leaves], subhierarchy(h, leaves))`` is HSA
    among the chosen leaves with the blocks of :obj:`h` cut down to them
    (see :mod:`hsa_geo.hierarchy.subgraph`); with every leaf chosen it is
    ``hsa_dense(q, k, h)`` with rows and columns permuted by :obj:`leaves`.

    The result is :attr:`~hsa_geo.Hierarchy.ordered` when :obj:`hierarchy`
    is and the chosen leaves are increasing (siblings then keep their
    order; a sibling without chosen leaves no longer counts). A graph id
    per node (:attr:`~hsa_geo.Hierarchy.batch`) is carried over; a graph
    with no chosen leaf disappears from the forest.

    Args:
        hierarchy (Hierarchy): A tree or forest over :math:`N` leaves.
        leaves (torch.Tensor or sequence of int): The :math:`K \geq 1`
            distinct leaf ids to keep, in their new order (e.g. PyG's
            :obj:`n_id` of a sampled batch).
        keep_chains (bool, optional): Keep clusters left with one child.
            (default: :obj:`False`)
        return_node_id (bool, optional): Also return, for every node of
            the result, its id in :obj:`hierarchy`. (default: :obj:`False`)

    Returns:
        Hierarchy (and the ``[K + M']`` node ids, with
        :obj:`return_node_id`).

    Raises:
        ValueError: naming the position and the leaf, for a leaf id that is
            not an integer in :math:`[0, N)` or that repeats; for no leaves.

    Complexity: :math:`O(K \cdot d + N + M)` for depth :math:`d` (a walk
    up from the chosen leaves, then array passes over the tree).

    Example::

        >>> import torch
        >>> from hsa_geo import Hierarchy
        >>> from hsa_geo.hierarchy import subhierarchy
        >>> # leaves 0,1 under cluster 4, leaves 2,3 under cluster 5, root 6
        >>> h = Hierarchy.from_parent(torch.tensor([4, 4, 5, 5, 6, 6, -1]), num_leaves=4)
        >>> subhierarchy(h, [3, 0, 1]).parent.tolist()  # cluster 5 kept one leaf: gone
        [4, 3, 3, 4, -1]
        >>> subhierarchy(h, [3, 0, 1], keep_chains=True).parent.tolist()
        [4, 3, 3, 5, 5, -1]
    """
    if not isinstance(hierarchy, Hierarchy):
        raise TypeError(f"subhierarchy() takes a Hierarchy, not a {type(hierarchy).__name__}")
    hierarchy.check_unchanged()
    device = hierarchy.parent.device
    leaves = check_leaf_ids(leaves, hierarchy.num_leaves).to(device)
    parent, node_id = restrict_parent(hierarchy.parent, hierarchy.num_leaves, leaves,
                                      keep_chains)
    batch = None if hierarchy.batch is None else hierarchy.batch[node_id]
    ordered = hierarchy.ordered and bool((leaves[1:] > leaves[:-1]).all())
    restricted = Hierarchy.from_parent(parent, leaves.numel(), batch=batch, ordered=ordered)
    return (restricted, node_id) if return_node_id else restricted


def restrict_parent(parent: Tensor, num_leaves: int, leaves: Tensor,
                    keep_chains: bool = False) -> Tuple[Tensor, Tensor]:
    r"""The parent pointers of :func:`subhierarchy`, from parent pointers
    (validated by the caller: :obj:`leaves` are distinct leaf ids, and the
    result goes through :meth:`Hierarchy.from_parent
    <hsa_geo.Hierarchy.from_parent>`, which catches a cycle among the
    kept nodes). Returns the new parent pointers and, for every new node,
    its id in :obj:`parent`."""
    num_nodes = parent.numel()
    keep = torch.zeros(num_nodes, dtype=torch.bool, device=parent.device)
    keep[leaves] = True
    frontier = leaves
    while frontier.numel() > 0:  # one step up per round, each node once
        up = parent[frontier]
        up = torch.unique(up[up >= 0])
        frontier = up[~keep[up]]
        keep[frontier] = True
    if int(keep[:num_leaves].sum()) != leaves.numel():  # unvalidated pointers only
        above = (keep[:num_leaves] & ~is_kept_leaf(leaves, num_leaves)).nonzero().view(-1)
        raise ValueError(f"Node {int(above[0])} is a leaf (ids below {num_leaves}) but has "
                         f"children; leaves cannot have children")
    clusters = keep[num_leaves:].nonzero().view(-1) + num_leaves
    node_id = torch.cat([leaves, clusters])
    new_id = torch.full((num_nodes + 1, ), -1, dtype=torch.long, device=parent.device)
    new_id[node_id] = torch.arange(node_id.numel(), device=parent.device)
    new_parent = new_id[parent[node_id]]  # a root's -1 reads the last slot, -1
    if keep_chains:
        return new_parent, node_id
    # collapse_chains keeps the surviving clusters in order: the removed
    # ones are the clusters with a single child
    num_kept = leaves.numel()
    num_children = torch.bincount(new_parent[new_parent >= 0], minlength=node_id.numel())
    survives = num_children != 1
    survives[:num_kept] = True
    collapsed = collapse_chains(new_parent.cpu().numpy(), num_kept)
    return torch.from_numpy(collapsed).to(parent.device), node_id[survives]


def is_kept_leaf(leaves: Tensor, num_leaves: int) -> Tensor:
    r"""``[num_leaves]`` mask of the leaves in :obj:`leaves`."""
    mask = torch.zeros(num_leaves, dtype=torch.bool, device=leaves.device)
    mask[leaves] = True
    return mask


def check_leaf_ids(leaves: LeafIds, num_leaves: int, position: str = 'position') -> Tensor:
    r""":obj:`leaves` as a one-dimensional ``int64`` tensor of distinct leaf
    ids in :math:`[0, N)`, or a :class:`ValueError` naming the first
    offending entry (its :obj:`position`: ``"position"``, ``"node"``)."""
    if not isinstance(leaves, Tensor):
        leaves = torch.as_tensor(np.asarray(leaves))
    if leaves.numel() == 0:
        raise ValueError("A hierarchy needs at least one leaf: no leaf ids given")
    if leaves.dtype == torch.bool or leaves.is_floating_point() or leaves.is_complex():
        raise ValueError(f"Leaf ids must be integers (got dtype {leaves.dtype})")
    if leaves.dim() != 1:
        raise ValueError(f"Leaf ids must be one-dimensional (got shape {tuple(leaves.shape)})")
    leaves = leaves.to(torch.long)
    outside = ((leaves < 0) | (leaves >= num_leaves)).nonzero().view(-1)
    if outside.numel() > 0:
        at = int(outside[0])
        raise ValueError(f"Leaf id {int(leaves[at])} at {position} {at} is not a leaf of the "
                         f"hierarchy (leaves are 0..{num_leaves - 1})")
    sorted_ids, order = torch.sort(leaves, stable=True)
    repeated = (sorted_ids[1:] == sorted_ids[:-1]).nonzero().view(-1)
    if repeated.numel() > 0:
        first, second = sorted(order[[int(repeated[0]), int(repeated[0]) + 1]].tolist())
        raise ValueError(f"Leaf id {int(leaves[first])} appears twice, at {position}s {first} "
                         f"and {second}: every leaf can be kept once")
    return leaves
