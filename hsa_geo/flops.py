r"""Attention FLOP counts for HSA, softmax and block-local attention.

The counts are those of the *algorithms*, one multiply-add = 2 FLOPs, per
head and per attention call; exponentials, maxima and divisions of the
normalisations are not counted (they are :math:`O(N^2)` for softmax and
:math:`O(\sum_A b_A^2)` for HSA, so counting them would not change the
comparison). The projections :math:`W_Q, W_K, W_V, W_O` are not attention and
are not counted either: they cost the same in every variant.

For :math:`N` leaves, key/query width :math:`D` and value width :math:`D_v`:

* **softmax** (every query against every key of its own tree):
  :math:`2N^2D` for :math:`QK^\top` plus :math:`2N^2D_v` for :math:`AV`,
  summed over the trees of a forest.
* **block-local** softmax inside groups of sizes :math:`n_g`:
  :math:`\sum_g 2n_g^2(D + D_v)`.
* **sliding window** of half-width :math:`w` over :math:`n` tokens:
  :math:`2(n(2w + 1) - w(w + 1))(D + D_v)`.
* **global tokens** (:math:`g` tokens that attend to and are attended by
  every token, as in Longformer or BigBird) on top of a local pattern:
  :math:`2g(2n - g)(D + D_v)` more.
* **HSA** (two sweeps over the tree, docs/derivation.rst):

  - bottom-up node means of :math:`q, k, v`: a weighted add per child edge,
    :math:`2(2D + D_v)` per edge;
  - sibling scores :math:`\bar s(B, C)`: :math:`2D` per ordered sibling
    pair, :math:`\sum_A b_A^2` pairs (diagonal included, it holds
    :math:`s_{ii}` at leaf families);
  - sibling value mix :math:`\sum_C w_{BC}\bar v_C`: :math:`2D_v` per pair;
  - top-down accumulation of the output from the parent: :math:`2D_v` per
    child edge.

  Total :math:`\sum_A 2b_A^2(D + D_v) + E\,(4D + 4D_v)` with
  :math:`E = N + M - \#\text{trees}` child edges.

A flat hierarchy (one root over :math:`N` leaves) thus costs
:math:`2N^2(D + D_v) + 4N(D + D_v)`: softmax plus a linear overhead.

Example::

    >>> from hsa_geo import Hierarchy
    >>> from hsa_geo.flops import hsa_flops, softmax_flops
    >>> softmax_flops(4, dim=8)
    512
    >>> hsa_flops(Hierarchy.flat(4), dim=8)
    768
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from hsa_geo.hierarchy.builders.kmeans import POWER_STEPS
from hsa_geo.hierarchy.hierarchy import Hierarchy

__all__ = ['softmax_flops', 'hsa_flops', 'block_local_flops', 'sliding_window_flops',
           'global_token_flops', 'kmeans_flops']


def softmax_flops(num_tokens: Union[int, Sequence[int]], dim: int,
                  value_dim: Optional[int] = None, heads: int = 1) -> int:
    r"""FLOPs of softmax attention over :obj:`num_tokens` tokens (an int, or
    the sizes of independent sequences): :math:`\sum 2n^2(D + D_v)\cdot H`.

    Args:
        num_tokens (int or list of int): Sequence length(s).
        dim (int): Query/key width :math:`D` per head.
        value_dim (int, optional): Value width :math:`D_v`.
            (default: :obj:`dim`)
        heads (int, optional): Number of heads :math:`H`. (default: :obj:`1`)
    """
    value_dim = _widths(dim, value_dim, heads)
    sizes = [num_tokens] if isinstance(num_tokens, int) else list(num_tokens)
    for size in sizes:
        _check_count(size, 'num_tokens', minimum=0)
    return int(sum(2 * n * n * (dim + value_dim) for n in sizes) * heads)


def _check_count(value, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"'{name}' must be an integer of at least {minimum} (got {value!r})")


def _widths(dim, value_dim, heads) -> int:
    r"""Checks the widths and the number of heads; returns the value width."""
    _check_count(dim, 'dim')
    _check_count(heads, 'heads')
    value_dim = dim if value_dim is None else value_dim
    _check_count(value_dim, 'value_dim')
    return value_dim


def block_local_flops(group: Union[Tensor, Sequence[int]], dim: int,
                      value_dim: Optional[int] = None, heads: int = 1) -> int:
    r"""FLOPs of softmax attention restricted to groups (tokens attend only
    within their own group): :math:`\sum_g 2n_g^2(D + D_v)\cdot H`.

    Args:
        group (torch.Tensor or list of int): Group id of every token.
        dim (int): Query/key width :math:`D` per head.
        value_dim (int, optional): Value width. (default: :obj:`dim`)
        heads (int, optional): Number of heads. (default: :obj:`1`)
    """
    group = torch.as_tensor(group, dtype=torch.long)
    if group.dim() != 1:
        raise ValueError(f"'group' must hold one group id per token (got shape "
                         f"{tuple(group.shape)})")
    sizes = torch.unique(group, return_counts=True)[1].tolist()
    return softmax_flops(sizes, dim, value_dim, heads)


def hsa_flops(hierarchy: Hierarchy, dim: int, value_dim: Optional[int] = None,
              heads: int = 1, per_edge: bool = True) -> int:
    r"""FLOPs of exact HSA over :obj:`hierarchy`:
    :math:`\big(\sum_A 2b_A^2(D + D_v) + 4E(D + D_v)\big)\cdot H`, with
    :math:`b_A` the number of children of cluster :math:`A` and :math:`E`
    the number of child-to-parent edges (see the module docstring).

    :class:`torch.utils.flop_counter.FlopCounterMode` sees less and more
    than this. It counts matrix products only, and the tensor sweeps take
    the scores as products but the value mixes of small families and most
    per-edge means elementwise (those of wide families are products; leave
    the per-edge terms out with :obj:`per_edge=False`). It counts what the tensor sweeps
    execute, and they pad families to a few bucket widths per level (and
    fold :math:`\log|C|` into the keys as one more column in some blocks),
    so on them it counts more pairs than the tree has. The CPU kernel is one
    opaque operator, of which it counts nothing. ``tests/test_flops.py``
    checks the formula against the counter: equal on a flat tree (one
    family, all products), bracketed by the score terms and the total on
    any tree.

    Args:
        hierarchy (Hierarchy): The tree or forest over the tokens.
        dim (int): Query/key width :math:`D` per head.
        value_dim (int, optional): Value width. (default: :obj:`dim`)
        heads (int, optional): Number of heads. (default: :obj:`1`)
        per_edge (bool, optional): Whether to include the per-edge terms
            :math:`4E(D + D_v)`. (default: :obj:`True`)
    """
    value_dim = _widths(dim, value_dim, heads)
    children = hierarchy.num_children[hierarchy.num_leaves:].to(torch.long)
    sibling_pairs = int((children * children).sum())
    edges = hierarchy.num_nodes - hierarchy.num_trees
    per_head = 2 * sibling_pairs * (dim + value_dim)
    if per_edge:
        per_head += 4 * edges * (dim + value_dim)
    return int(per_head * heads)


def sliding_window_flops(num_tokens: int, window: int, dim: int,
                         value_dim: Optional[int] = None, heads: int = 1) -> int:
    r"""FLOPs of softmax attention inside a sliding window (token :math:`i`
    attends to the tokens :math:`j` with :math:`|i - j| \le w`):
    :math:`2p(D + D_v)\cdot H` with :math:`p = n(2w + 1) - w(w + 1)` pairs
    (:math:`w` clipped to :math:`n - 1`).

    Args:
        num_tokens (int): Sequence length :math:`n`.
        window (int): Half-width :math:`w` (0: every token sees itself only).
        dim (int): Query/key width :math:`D` per head.
        value_dim (int, optional): Value width. (default: :obj:`dim`)
        heads (int, optional): Number of heads. (default: :obj:`1`)
    """
    _check_count(num_tokens, 'num_tokens', minimum=0)
    _check_count(window, 'window', minimum=0)
    value_dim = _widths(dim, value_dim, heads)
    window = min(int(window), max(int(num_tokens) - 1, 0))
    pairs = int(num_tokens) * (2 * window + 1) - window * (window + 1)
    return int(2 * pairs * (dim + value_dim) * heads)


def global_token_flops(num_tokens: int, num_global: int, dim: int,
                       value_dim: Optional[int] = None, heads: int = 1) -> int:
    r"""FLOPs that :math:`g` global tokens add to a local attention over
    :math:`n` tokens: their own rows attend to all :math:`n` keys, and the
    other :math:`n - g` rows attend to them, :math:`g(2n - g)` pairs:
    :math:`2g(2n - g)(D + D_v)\cdot H`.

    Args:
        num_tokens (int): Sequence length :math:`n` (global tokens included).
        num_global (int): Number of global tokens :math:`g \le n`.
        dim (int): Query/key width :math:`D` per head.
        value_dim (int, optional): Value width. (default: :obj:`dim`)
        heads (int, optional): Number of heads. (default: :obj:`1`)
    """
    _check_count(num_tokens, 'num_tokens', minimum=0)
    _check_count(num_global, 'num_global', minimum=0)
    if num_global > num_tokens:
        raise ValueError(f"'num_global' ({num_global}) exceeds 'num_tokens' ({num_tokens})")
    value_dim = _widths(dim, value_dim, heads)
    return int(2 * num_global * (2 * num_tokens - num_global) * (dim + value_dim) * heads)


def kmeans_flops(num_points: int, num_clusters: int, dim: int, iterations: int) -> int:
    r"""FLOPs of building a hierarchy by k-means
    (:func:`hsa_geo.hierarchy.from_kmeans`): :math:`n` points of :math:`f`
    features against :math:`k` centres, :math:`2nkf` per distance pass
    (:obj:`iterations` Lloyd steps and the final assignment) plus
    :math:`2nf` per centre update, and the initial power iteration
    (:math:`4nf` per step). Attention a hierarchy is built for must count
    it when the tree is built per call (e.g. from a layer's keys).

    Example::

        >>> from hsa_geo.flops import kmeans_flops
        >>> kmeans_flops(200, 50, 32, iterations=3)
        2700800
    """
    return int(2 * num_points * num_clusters * dim * (iterations + 1)
               + 2 * num_points * dim * iterations + 4 * num_points * dim * POWER_STEPS)
