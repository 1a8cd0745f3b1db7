r"""CLUSTER and PATTERN: node classification on stochastic block models, the
recipes of the GNN benchmarking suite (Dwivedi et al., "Benchmarking Graph
Neural Networks", JMLR 2023), generated offline.

**CLUSTER** (semi-supervised clustering): 6 communities of 5 to 34 nodes
(uniform), an edge inside a community with probability :math:`p = 0.55`,
across communities with :math:`q = 0.25`. In every community one node,
chosen at random, carries the community's label as its feature
(:math:`1 \ldots 6`); every other node carries :math:`0`. Target: the
community (6 classes).

**PATTERN** (subgraph detection): 5 communities of 5 to 34 nodes with
:math:`p = 0.5`, :math:`q = 0.35` and node features drawn uniformly from
:math:`\{0, 1, 2\}`; one of 100 patterns (20 nodes each, an edge inside with
probability 0.5, features from :math:`\{0, 1, 2\}`, drawn once per data set)
is joined to the graph, each pattern node to each graph node with
probability 0.5. Target: whether a node belongs to the pattern (2 classes).

Node order is shuffled in both. Split sizes follow the suite: CLUSTER
10,000 / 1,000 / 1,000 graphs, PATTERN 10,000 / 2,000 / 2,000. Their metric
is the weighted accuracy :func:`weighted_accuracy` (the mean of the
per-class accuracies, in percent).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Data

__all__ = ['SBMRecipe', 'CLUSTER', 'PATTERN', 'RECIPES', 'generate_sbm', 'generate_sbm_splits',
           'weighted_accuracy']


@dataclass(frozen=True)
class SBMRecipe:
    r"""One of the suite's stochastic-block-model recipes.

    Args:
        name (str): ``'CLUSTER'`` or ``'PATTERN'``.
        num_communities (int): Communities per graph.
        size_min (int): Smallest community (inclusive).
        size_max (int): Largest community (exclusive, as the suite draws it).
        p (float): Edge probability inside a community.
        q (float): Edge probability across communities.
        vocab_size (int): PATTERN's node feature values.
        pattern_size (int): PATTERN's pattern nodes.
        pattern_p (float): Edge probability inside the pattern.
        pattern_q (float): Edge probability between pattern and graph.
        num_patterns (int): Patterns drawn per data set.
        splits (dict): Graphs per split.
    """
    name: str
    num_communities: int
    size_min: int
    size_max: int
    p: float
    q: float
    vocab_size: int = 3
    pattern_size: int = 20
    pattern_p: float = 0.5
    pattern_q: float = 0.5
    num_patterns: int = 100
    splits: Tuple[Tuple[str, int], ...] = (('train', 10_000), ('valid', 1_000), ('test', 1_000))

    @property
    def num_classes(self) -> int:
        return self.num_communities if self.name == 'CLUSTER' else 2


CLUSTER = SBMRecipe('CLUSTER', num_communities=6, size_min=5, size_max=35, p=0.55, q=0.25)
PATTERN = SBMRecipe('PATTERN', num_communities=5, size_min=5, size_max=35, p=0.5, q=0.35,
                    splits=(('train', 10_000), ('valid', 2_000), ('test', 2_000)))
RECIPES = {'CLUSTER': CLUSTER, 'PATTERN': PATTERN}


def _random_graph(rng: np.random.Generator, group: np.ndarray, p: float, q: float) -> np.ndarray:
    r"""Symmetric boolean adjacency: an edge with probability :obj:`p`
    inside a group and :obj:`q` across."""
    n = group.size
    probability = np.where(group[:, None] == group[None, :], p, q)
    upper = np.triu(rng.random((n, n)) < probability, k=1)
    return upper | upper.T


def _community_sizes(rng: np.random.Generator, recipe: SBMRecipe) -> np.ndarray:
    sizes = rng.integers(recipe.size_min, recipe.size_max, size=recipe.num_communities)
    return np.repeat(np.arange(recipe.num_communities), sizes)


def _to_data(adjacency: np.ndarray, x: np.ndarray, y: np.ndarray,
             rng: np.random.Generator) -> Data:
    order = rng.permutation(y.size)
    adjacency = adjacency[order][:, order]
    edge_index = torch.from_numpy(np.stack(np.nonzero(adjacency)).astype(np.int64))
    return Data(x=torch.from_numpy(x[order].astype(np.int64)), edge_index=edge_index,
                y=torch.from_numpy(y[order].astype(np.int64)), num_nodes=int(y.size))


def _cluster_graph(rng: np.random.Generator, recipe: SBMRecipe) -> Data:
    community = _community_sizes(rng, recipe)
    adjacency = _random_graph(rng, community, recipe.p, recipe.q)
    x = np.zeros(community.size, dtype=np.int64)
    for label in range(recipe.num_communities):
        members = np.flatnonzero(community == label)
        x[rng.choice(members)] = label + 1
    return _to_data(adjacency, x, community, rng)


def _pattern_graph(rng: np.random.Generator, recipe: SBMRecipe,
                   patterns: List[Tuple[np.ndarray, np.ndarray]]) -> Data:
    community = _community_sizes(rng, recipe)
    graph = _random_graph(rng, community, recipe.p, recipe.q)
    features = rng.integers(recipe.vocab_size, size=community.size)
    pattern, pattern_features = patterns[int(rng.integers(len(patterns)))]
    link = rng.random((recipe.pattern_size, community.size)) < recipe.pattern_q
    adjacency = np.block([[graph, link.T], [link, pattern]])
    x = np.concatenate([features, pattern_features])
    y = np.concatenate([np.zeros(community.size, dtype=np.int64),
                        np.ones(recipe.pattern_size, dtype=np.int64)])
    return _to_data(adjacency, x, y, rng)


def generate_sbm(recipe: SBMRecipe, num_graphs: int, seed: int,
                 patterns_seed: Optional[int] = None) -> List[Data]:
    r"""Draws :obj:`num_graphs` graphs of :obj:`recipe` (:data:`CLUSTER` or
    :data:`PATTERN`), deterministically in :obj:`seed`.

    Every graph is a :class:`~torch_geometric.data.Data` with integer node
    features :obj:`x` ``[n]`` (a label id for CLUSTER, a value id for
    PATTERN), both directions of every edge in :obj:`edge_index` and the
    node classes :obj:`y` ``[n]``. PATTERN's bank of patterns is drawn from
    :obj:`patterns_seed` (default: :obj:`seed`): pass one value for every
    split of a data set, so that its splits share their patterns.

    Example::

        >>> graphs = generate_sbm(CLUSTER, 2, seed=0)
        >>> [int(g.x.gt(0).sum()) for g in graphs]  # one labelled node per community
        [6, 6]
        >>> bool((graphs[0].y.bincount() >= 5).all())
        True
    """
    if isinstance(num_graphs, bool) or not isinstance(num_graphs, int) or num_graphs < 0:
        raise ValueError(f"'num_graphs' must be a non-negative int (got {num_graphs!r})")
    if recipe.name not in RECIPES:
        raise ValueError(f"unknown SBM recipe {recipe.name!r}; choose one of {list(RECIPES)}")
    rng = np.random.default_rng(seed)
    if recipe.name == 'CLUSTER':
        return [_cluster_graph(rng, recipe) for _ in range(num_graphs)]
    pattern_rng = np.random.default_rng(seed if patterns_seed is None else patterns_seed)
    patterns = []
    for _ in range(recipe.num_patterns):
        inside = np.zeros(recipe.pattern_size, dtype=np.int64)
        patterns.append((_random_graph(pattern_rng, inside, recipe.pattern_p, recipe.pattern_p),
                         pattern_rng.integers(recipe.vocab_size, size=recipe.pattern_size)))
    return [_pattern_graph(rng, recipe, patterns) for _ in range(num_graphs)]


def generate_sbm_splits(recipe: SBMRecipe, seed: int = 0,
                        sizes: Optional[Dict[str, int]] = None) -> Dict[str, List[Data]]:
    r"""The suite's splits of :obj:`recipe` (or :obj:`sizes`), split number
    :math:`i` drawn with seed :obj:`seed` :math:`+ i`, all sharing one bank of
    patterns."""
    sizes = dict(recipe.splits) if sizes is None else sizes
    return {name: generate_sbm(recipe, size, seed + index, patterns_seed=seed)
            for index, (name, size) in enumerate(sizes.items())}


def weighted_accuracy(prediction: Tensor, target: Tensor, num_classes: int) -> float:
    r"""The suite's metric, in percent: the accuracy within every class,
    averaged over the :obj:`num_classes` classes (a class absent from
    :obj:`target` counts as 0, as in the suite).

    Example::

        >>> round(weighted_accuracy(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]), 2), 2)
        83.33
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target "
                         f"{tuple(target.shape)} differ in shape")
    correct = torch.zeros(num_classes, dtype=torch.float64)
    correct.index_add_(0, target, (prediction == target).double())
    count = torch.bincount(target, minlength=num_classes).double()
    per_class = torch.where(count > 0, correct / count.clamp(min=1), torch.zeros_like(count))
    return float(100.0 * per_class.sum() / num_classes)
