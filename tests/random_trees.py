"""Random hierarchies for property tests of the core."""
import random
from typing import List, Tuple

import torch

from hsa_geo import Hierarchy


def random_parent(seed: int, max_depth: int = 8, max_children: int = 10,
                  max_leaves: int = 40, leaf_probability: float = 0.35,
                  shuffle_leaves: bool = True) -> Tuple[torch.Tensor, int]:
    r"""Parent pointers of a random tree: mixed leaf depths, single-child
    chains and single-leaf trees all occur. Leaves get ids ``0..N-1`` in a
    random (or depth-first) order, clusters the ids after them."""
    rng = random.Random(seed)
    # Grow the tree as (node, parent) with temporary ids; kind[node] is
    # 'leaf' or 'cluster'.
    parent_of: List[int] = [-1]
    is_leaf: List[bool] = [False]
    frontier = [(0, 0)]
    leaves = 0
    while frontier:
        node, depth = frontier.pop(0)
        for _ in range(rng.randint(1, max_children)):
            child = len(parent_of)
            parent_of.append(node)
            make_leaf = (depth + 1 >= max_depth or leaves >= max_leaves
                         or rng.random() < leaf_probability + 0.05 * depth)
            is_leaf.append(make_leaf)
            if make_leaf:
                leaves += 1
            else:
                frontier.append((child, depth + 1))
            if leaves >= max_leaves:
                break
    # Clusters left without children get one leaf, so every cluster has one.
    has_child = set(parent_of)
    for node in range(len(parent_of)):
        if not is_leaf[node] and node not in has_child:
            parent_of.append(node)
            is_leaf.append(True)
    leaf_nodes = [node for node in range(len(parent_of)) if is_leaf[node]]
    cluster_nodes = [node for node in range(len(parent_of)) if not is_leaf[node]]
    if shuffle_leaves:
        rng.shuffle(leaf_nodes)
    rng.shuffle(cluster_nodes)
    new_id = {node: i for i, node in enumerate(leaf_nodes + cluster_nodes)}
    parent = [0] * len(parent_of)
    for node, up in enumerate(parent_of):
        parent[new_id[node]] = new_id[up] if up >= 0 else -1
    return torch.tensor(parent), len(leaf_nodes)


def random_hierarchy(seed: int, **kwargs) -> Hierarchy:
    parent, num_leaves = random_parent(seed, **kwargs)
    return Hierarchy.from_parent(parent, num_leaves)


def balanced_parent(num_leaves: int, branching: int) -> torch.Tensor:
    r"""Consecutive leaves share parents, level after level."""
    parents, level_start, level_size, next_id = [], 0, num_leaves, num_leaves
    while level_size > 1:
        groups = (level_size + branching - 1) // branching
        parents.append(torch.arange(level_size) // branching + next_id)
        level_start, level_size, next_id = next_id, groups, next_id + groups
    parents.append(torch.tensor([-1]))
    return torch.cat(parents)


def number_leaves_depth_first(parent: torch.Tensor, num_leaves: int) -> torch.Tensor:
    r"""The same tree with leaves renumbered in depth-first order (children
    visited in node-id order), so every subtree holds consecutive leaf ids:
    what causal HSA needs."""
    parent_list = parent.tolist()
    children = {}
    for node, up in enumerate(parent_list):
        children.setdefault(up, []).append(node)
    order, stack = [], list(reversed(children.get(-1, [])))
    while stack:
        node = stack.pop()
        if node < num_leaves:
            order.append(node)
        stack.extend(reversed(children.get(node, [])))
    new_id = list(range(len(parent_list)))
    for position, leaf in enumerate(order):
        new_id[leaf] = position
    renumbered = [0] * len(parent_list)
    for node, up in enumerate(parent_list):
        renumbered[new_id[node]] = up if up < 0 else new_id[up]
    return torch.tensor(renumbered)


def random_sequence_hierarchy(seed: int, **kwargs) -> Hierarchy:
    r"""A random tree whose subtrees are intervals of the leaf order."""
    parent, num_leaves = random_parent(seed, **kwargs)
    return Hierarchy.from_parent(number_leaves_depth_first(parent, num_leaves), num_leaves,
                                 ordered=True)


def random_forest(seed: int, trees: int, causal: bool = False, **kwargs) -> Hierarchy:
    r""":obj:`trees` random trees batched into a forest; with :obj:`causal`
    their leaves are numbered depth-first (every subtree a run of ids)."""
    parts = []
    for tree in range(trees):
        parent, num_leaves = random_parent(seed * 7 + tree, shuffle_leaves=not causal, **kwargs)
        if causal:
            parent = number_leaves_depth_first(parent, num_leaves)
        parts.append(Hierarchy.from_parent(parent, num_leaves))
    return Hierarchy.batch_hierarchies(parts)
