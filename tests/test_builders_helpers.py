"""Independent checks of builder output, shared by the test_builders_* files.

They walk the parent pointers in plain Python, sharing no code with the
builders, and are themselves tested below on trees that break each rule.
"""
from typing import Dict, FrozenSet, Optional, Set

import pytest
import torch

from hsa_geo import Hierarchy


def leaf_sets(h: Hierarchy) -> Dict[int, FrozenSet[int]]:
    """Leaves below every node, by walking each leaf up to its root."""
    parent = h.parent.tolist()
    below: Dict[int, Set[int]] = {node: set() for node in range(len(parent))}
    for leaf in range(h.num_leaves):
        node, steps = leaf, 0
        while node >= 0:
            below[node].add(leaf)
            node = parent[node]
            steps += 1
            assert steps <= len(parent), 'cycle'
    return {node: frozenset(leaves) for node, leaves in below.items()}


def cluster_sets(h: Hierarchy) -> Set[FrozenSet[int]]:
    """The leaf sets of all clusters."""
    sets = leaf_sets(h)
    return {sets[node] for node in range(h.num_leaves, h.num_nodes)}


def children_of(h: Hierarchy) -> Dict[int, list]:
    children: Dict[int, list] = {}
    for node, up in enumerate(h.parent.tolist()):
        if up >= 0:
            children.setdefault(up, []).append(node)
    return children


def assert_valid_tree(h: Hierarchy, num_leaves: int, max_children: Optional[int] = None,
                      chains_allowed: bool = False) -> None:
    """One tree over exactly num_leaves leaves; every cluster has a leaf below;
    no family over max_children; no single-child cluster unless allowed."""
    assert isinstance(h, Hierarchy)
    assert h.num_leaves == num_leaves
    parent = h.parent.tolist()
    roots = [node for node, up in enumerate(parent) if up < 0]
    assert len(roots) == 1, f'{len(roots)} roots'
    sets = leaf_sets(h)
    assert sorted(sets[roots[0]]) == list(range(num_leaves))  # every leaf exactly once
    for node in range(num_leaves, len(parent)):
        assert len(sets[node]) >= 1, f'cluster {node} has no leaf'
    for node, children in children_of(h).items():
        assert node >= num_leaves, f'leaf {node} has children'
        if max_children is not None:
            assert len(children) <= max_children, f'cluster {node}: {len(children)} children'
        if not chains_allowed:
            assert len(children) >= 2, f'cluster {node} has a single child'


# ------------------------------------------------------ the checks themselves
def test_checks_accept_a_good_tree():
    h = Hierarchy.from_parent(torch.tensor([4, 4, 5, 5, 6, 6, -1]), num_leaves=4)
    assert_valid_tree(h, 4, max_children=2)
    assert cluster_sets(h) == {frozenset({0, 1}), frozenset({2, 3}), frozenset(range(4))}


def test_checks_reject_bad_trees():
    chain = Hierarchy.from_parent(torch.tensor([3, 3, 4, 4, 5, -1]), num_leaves=3)
    with pytest.raises(AssertionError, match='single child'):
        assert_valid_tree(chain, 3)
    assert_valid_tree(chain, 3, chains_allowed=True)
    wide = Hierarchy.flat(5)
    with pytest.raises(AssertionError, match='5 children'):
        assert_valid_tree(wide, 5, max_children=4)
    forest = Hierarchy.from_parent(torch.tensor([3, 3, -1, -1]), num_leaves=3)
    with pytest.raises(AssertionError, match='2 roots'):
        assert_valid_tree(forest, 3)
    with pytest.raises(AssertionError):
        assert_valid_tree(wide, 6)
