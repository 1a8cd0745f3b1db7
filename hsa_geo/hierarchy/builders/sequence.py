r"""Hierarchies over token sequences: token → word → sentence → document
trees from segment ids or nested lengths, and fixed-size chunking."""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from hsa_geo.hierarchy.builders.limits import (DEFAULT_MAX_CHILDREN, check_positive_int,
                                               finalize)
from hsa_geo.hierarchy.builders.partitions import check_refinement, tree_from_levels
from hsa_geo.hierarchy.hierarchy import Hierarchy

SegmentIds = Union[Tensor, Sequence[Union[Tensor, Sequence[int]]]]


def from_segments(segment_ids: SegmentIds,
                  max_children: Optional[int] = DEFAULT_MAX_CHILDREN,
                  keep_chains: bool = False) -> Hierarchy:
    r"""Builds the tree of nested segments of a token sequence.

    :obj:`segment_ids[l][i]` is the id of the level-:math:`l` segment (e.g.
    word, then sentence) containing token :math:`i`. The tokens are the
    leaves, in order; every segment becomes a cluster over the segments of
    the level below it contains, and a root is put on top when the coarsest
    level has more than one segment. Ids may be any non-negative integers
    (not necessarily contiguous or sorted), but they identify a segment
    within the whole sequence: ids that restart inside every sentence must
    be made unique first. Segments need not be contiguous runs of tokens.
    Families larger than :obj:`max_children` are split into balanced runs
    of consecutive children; single-child clusters (a one-token word, a
    one-word sentence) are removed unless :obj:`keep_chains`.

    Args:
        segment_ids (list of torch.Tensor): Fine to coarse, one integer
            vector of length :math:`T` per level (or a ``[L, T]`` tensor).
        max_children (int, optional): Most children of one cluster, or
            :obj:`None` for no bound. (default: :obj:`32`)
        keep_chains (bool, optional): Keep single-child clusters.
            (default: :obj:`False`)

    Returns:
        Hierarchy: One tree over the :math:`T` tokens, marked
        :attr:`~hsa_geo.Hierarchy.ordered`: siblings are ordered by their
        first token, i.e. in sequence order (for a segment that is not a
        contiguous run, by where it starts).

    Raises:
        ValueError: for no levels, no tokens, vectors of different lengths,
            non-integer or negative ids, or a segment that lies in two
            segments of the next level (naming both).

    Complexity: :math:`O(L\, T \log T)` (a sort per level), vectorised.

    Example::

        >>> import torch
        >>> from hsa_geo.hierarchy import from_segments
        >>> # "the cat sat . it purred ." : 7 tokens, 5 words, 2 sentences
        >>> word = torch.tensor([0, 1, 1, 2, 3, 4, 4])
        >>> sentence = torch.tensor([0, 0, 0, 0, 1, 1, 1])
        >>> h = from_segments([word, sentence])
        >>> h.parent.tolist()
        [9, 7, 7, 9, 10, 8, 8, 9, 10, 11, 11, -1]
    """
    levels = _as_levels(segment_ids)
    labels, names = [], []
    for level, ids in enumerate(levels):
        values, label = np.unique(ids, return_inverse=True)
        labels.append(label.astype(np.int64).reshape(-1))
        names.append(values)
    check_refinement(labels, names, what='Segment')
    num_tokens = labels[0].size
    return finalize(tree_from_levels(labels, num_tokens), num_tokens, max_children,
                    keep_chains, ordered=True)


def _as_levels(segment_ids: SegmentIds) -> List[np.ndarray]:
    if isinstance(segment_ids, Tensor):
        if segment_ids.dim() == 1:
            raise ValueError("segment_ids must be a list of id vectors, one per level "
                             "(wrap a single vector in a list)")
        segment_ids = list(segment_ids)
    segment_ids = list(segment_ids)
    if not segment_ids:
        raise ValueError("segment_ids needs at least one level")
    levels = []
    for level, ids in enumerate(segment_ids):
        ids = torch.as_tensor(ids)
        if ids.numel() == 0:
            raise ValueError("The sequence has no tokens; a hierarchy needs at least one leaf")
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"Segment ids of level {level} must be integers "
                             f"(got dtype {ids.dtype})")
        if ids.dim() != 1:
            raise ValueError(f"Segment ids of level {level} must be a vector "
                             f"(got shape {tuple(ids.shape)})")
        ids = ids.detach().cpu().to(torch.int64).numpy()
        if levels and ids.size != levels[0].size:
            raise ValueError(f"Level {level} has {ids.size} segment ids but level 0 has "
                             f"{levels[0].size}; every level needs one id per token")
        if (ids < 0).any():
            token = int(np.flatnonzero(ids < 0)[0])
            raise ValueError(f"Token {token} has segment id {int(ids[token])} at level "
                             f"{level}; ids must be non-negative (give special tokens "
                             f"their own segments)")
        levels.append(ids)
    return levels


def from_nested_lengths(lengths: Sequence[Union[Tensor, Sequence[int]]],
                        max_children: Optional[int] = DEFAULT_MAX_CHILDREN,
                        keep_chains: bool = False) -> Hierarchy:
    r"""Builds the tree of consecutive nested segments given by their
    lengths, fine to coarse.

    :obj:`lengths[0][s]` is the number of tokens of segment :obj:`s` of the
    finest level (e.g. tokens per word); :obj:`lengths[l][s]` is the number
    of level-:math:`(l-1)` segments in segment :obj:`s` of level :math:`l`
    (words per sentence, sentences per document). Same tree as
    :func:`from_segments` with the corresponding ids.

    Args:
        lengths (list): One vector of positive lengths per level; level
            :math:`l` must sum to the number of segments of level
            :math:`l-1`.
        max_children (int, optional): Most children of one cluster, or
            :obj:`None` for no bound. (default: :obj:`32`)
        keep_chains (bool, optional): Keep single-child clusters.
            (default: :obj:`False`)

    Returns:
        Hierarchy: One tree over the :math:`T` = :obj:`sum(lengths[0])`
        tokens, :attr:`~hsa_geo.Hierarchy.ordered` (siblings in sequence
        order).

    Raises:
        ValueError: for no levels, a length that is not a positive integer,
            or lengths that do not add up to the level below.

    Complexity: :math:`O(L\, T \log T)`, vectorised.

    Example::

        >>> from hsa_geo.hierarchy import from_nested_lengths
        >>> # 2 sentences of 3 and 2 words; the words have 1, 2, 1, 2, 1 tokens
        >>> h = from_nested_lengths([[1, 2, 1, 2, 1], [3, 2]])
        >>> h.num_leaves, h.max_depth, h.num_children[h.num_leaves:].tolist()
        (7, 3, [2, 2, 3, 2, 2])
    """
    if isinstance(lengths, Tensor) or not isinstance(lengths, Sequence) or not lengths:
        raise ValueError("lengths must be a non-empty list of length vectors, fine to coarse")
    vectors = []
    for level, values in enumerate(lengths):
        values = torch.as_tensor(values)
        if values.numel() == 0:
            raise ValueError(f"Lengths of level {level} must be positive, but it is empty")
        if values.dtype == torch.bool or values.is_floating_point() or values.dim() != 1:
            raise ValueError(f"Lengths of level {level} must be a vector of integers "
                             f"(got {values.dtype}, shape {tuple(values.shape)})")
        values = values.to(torch.int64).cpu()
        if bool((values <= 0).any()):
            bad = int((values <= 0).nonzero()[0])
            raise ValueError(f"Lengths of level {level} must be positive, but segment {bad} "
                             f"has length {int(values[bad])}")
        if vectors and int(values.sum()) != vectors[-1].numel():
            raise ValueError(f"Lengths of level {level} sum to {int(values.sum())}, but level "
                             f"{level - 1} has {vectors[-1].numel()} segments")
        vectors.append(values)
    # Segment id of every token at each level: repeat segment ids by lengths
    # at the finest level, then look the parent segment up level by level.
    ids = torch.repeat_interleave(torch.arange(vectors[0].numel()), vectors[0])
    segment_ids = [ids]
    for values in vectors[1:]:
        owner = torch.repeat_interleave(torch.arange(values.numel()), values)
        segment_ids.append(owner[segment_ids[-1]])
    return from_segments(segment_ids, max_children=max_children, keep_chains=keep_chains)


def chunk_sequence(num_tokens: int, chunk_size: int,
                   max_children: Optional[int] = DEFAULT_MAX_CHILDREN,
                   keep_chains: bool = False) -> Hierarchy:
    r"""Builds a balanced tree over a plain sequence by fixed-size chunking,
    recursively: tokens form chunks of :obj:`chunk_size` consecutive tokens,
    chunks form groups of :obj:`chunk_size` consecutive chunks, and so on up
    to one root. The last chunk of a level may be shorter; a last chunk of
    one is not wrapped (unless :obj:`keep_chains`). When
    :obj:`chunk_size` exceeds :obj:`max_children`, each chunk is split
    further into balanced runs.

    Args:
        num_tokens (int): Sequence length :math:`T \geq 1`.
        chunk_size (int): Children per cluster, :math:`\geq 2`.
        max_children (int, optional): Most children of one cluster, or
            :obj:`None` for no bound. (default: :obj:`32`)
        keep_chains (bool, optional): Keep single-child clusters.
            (default: :obj:`False`)

    Returns:
        Hierarchy: One tree of depth :math:`\lceil \log_c T \rceil` over the
        :math:`T` tokens, in order, :attr:`~hsa_geo.Hierarchy.ordered`
        (sibling :math:`k` of a chunk is its :math:`k`-th token or sub-chunk).

    Complexity: :math:`O(T)` per level, :math:`O(T)` in all, vectorised.

    Example::

        >>> from hsa_geo.hierarchy import chunk_sequence
        >>> h = chunk_sequence(10, chunk_size=4)
        >>> h.parent.tolist()
        [10, 10, 10, 10, 11, 11, 11, 11, 12, 12, 13, 13, 13, -1]
    """
    num_tokens = check_positive_int(num_tokens, 'num_tokens')
    chunk_size = check_positive_int(chunk_size, 'chunk_size', 2)
    labels = [np.arange(num_tokens, dtype=np.int64) // chunk_size]
    while labels[-1][-1] > 0:
        labels.append(labels[-1] // chunk_size)
    return finalize(tree_from_levels(labels, num_tokens), num_tokens, max_children,
                    keep_chains, ordered=True)
