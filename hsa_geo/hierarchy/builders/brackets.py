r"""Hierarchies parsed from bracketed sequences: every bracketed list is a
cluster over its tokens (the opening token, the items, nested lists and the
closing token), so the tree is the sequence's own parse tree."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from hsa_geo.hierarchy.hierarchy import Hierarchy

TokenIds = Union[Tensor, np.ndarray, Sequence[int]]


def from_brackets(tokens: TokenIds, opening: Sequence[int], closing: Sequence[int],
                  ptr: Optional[TokenIds] = None) -> Hierarchy:
    r"""Parses bracketed token sequences into their parse trees.

    A token whose id is in :obj:`opening` (e.g. ListOps' ``[MAX``) opens a
    list that the next unmatched token of :obj:`closing` (``]``) closes.
    Each list becomes a cluster whose children are, in order, its opening
    token, the tokens and lists directly inside it, and its closing token.
    No information beyond the sequence is used.

    Args:
        tokens (torch.Tensor or numpy.ndarray or list): Token ids
            :math:`(T)`, several sequences concatenated when :obj:`ptr` is
            given.
        opening (list of int): Ids of the tokens that open a list.
        closing (list of int): Ids of the tokens that close one.
        ptr (torch.Tensor or numpy.ndarray or list, optional): Start of
            every sequence and the end of the last, :math:`(B + 1)`. Each
            sequence must be exactly one list. (default: :obj:`None`, one
            sequence)

    Returns:
        Hierarchy: One tree per sequence over the :math:`T` tokens, in order
        and :attr:`~hsa_geo.Hierarchy.ordered`; clusters numbered by the
        position of their opening token; with :obj:`ptr`, a forest whose
        :obj:`batch` names every node's sequence.

    Raises:
        ValueError: naming the position (and sequence) of a closing token
            that closes nothing, a token outside every list, a second list
            at the top of one sequence, or a list never closed.

    Complexity: :math:`O(T \log T)`, vectorised.

    Example::

        >>> from hsa_geo.hierarchy import from_brackets
        >>> # "[MAX 2 [MIN 4 7 ] ]" with [MAX = 11, [MIN = 10, ] = 14
        >>> h = from_brackets([11, 2, 10, 4, 7, 14, 14], opening=[10, 11], closing=[14])
        >>> h.parent.tolist()
        [7, 7, 8, 8, 8, 8, 7, -1, 7]
    """
    tokens = np.asarray(tokens.cpu() if isinstance(tokens, Tensor) else tokens, dtype=np.int64)
    if tokens.ndim != 1 or tokens.size == 0:
        raise ValueError(f"from_brackets() takes a non-empty 1-D sequence of token ids "
                         f"(got shape {tokens.shape})")
    num_tokens = tokens.size
    batched = ptr is not None
    if ptr is None:
        ptr = np.array([0, num_tokens], dtype=np.int64)
    else:
        ptr = np.asarray(ptr.cpu() if isinstance(ptr, Tensor) else ptr, dtype=np.int64)
        if (ptr.ndim != 1 or ptr.size < 2 or ptr[0] != 0 or ptr[-1] != num_tokens
                or bool((np.diff(ptr) < 1).any())):
            raise ValueError(f"'ptr' must rise strictly from 0 to the number of tokens "
                             f"{num_tokens} (got {ptr[:6].tolist()}...)")
    sequence = np.repeat(np.arange(ptr.size - 1), np.diff(ptr))
    is_open = np.isin(tokens, np.asarray(list(opening), dtype=np.int64))
    is_close = np.isin(tokens, np.asarray(list(closing), dtype=np.int64))
    if bool((is_open & is_close).any()):
        raise ValueError("a token id is both in 'opening' and in 'closing'")

    # level of every token: the lists open around it (its own, for brackets)
    opened = np.cumsum(is_open)
    closed_before = np.cumsum(is_close) - is_close
    level = opened - closed_before
    level_after = level - is_close
    # every sequence starts where the previous one is closed (level 0)
    base = np.concatenate([[0], level_after[ptr[1:-1] - 1]])[sequence]
    level, level_after = level - base, level_after - base
    _check_brackets(level, level_after, is_open, ptr, sequence)

    # the list of a token is the last list opened at its level before it
    openers = np.flatnonzero(is_open)
    key = level * (num_tokens + 1) + np.arange(num_tokens)
    opener_key = key[openers]
    order = np.argsort(opener_key, kind='stable')
    found = np.searchsorted(opener_key[order], key, side='right') - 1
    token_list = order[found]
    # a list's parent is the list around its opening token
    opener_level = level[openers]
    around = np.searchsorted(opener_key[order], opener_key - (num_tokens + 1), side='right') - 1
    list_parent = np.where(opener_level > 1, order[np.maximum(around, 0)], -1)

    parent = np.concatenate([token_list + num_tokens,
                             np.where(list_parent >= 0, list_parent + num_tokens, -1)])
    batch = None
    if batched:
        batch = torch.from_numpy(np.concatenate([sequence, sequence[openers]]))
    return Hierarchy.from_parent(torch.from_numpy(parent), num_tokens, batch=batch,
                                 ordered=True)


def _check_brackets(level: np.ndarray, level_after: np.ndarray, is_open: np.ndarray,
                    ptr: np.ndarray, sequence: np.ndarray) -> None:
    r"""Raises on the first malformed position, naming it and its sequence."""

    def where(position: int) -> str:
        index = int(sequence[position])
        local = position - int(ptr[index])
        return (f"position {local} of sequence {index}" if ptr.size > 2
                else f"position {local}")

    bad = np.flatnonzero(level_after < 0)
    if bad.size:
        raise ValueError(f"from_brackets(): the closing token at {where(int(bad[0]))} closes "
                         f"no list")
    bad = np.flatnonzero(level < 1)
    if bad.size:
        raise ValueError(f"from_brackets(): the token at {where(int(bad[0]))} stands outside "
                         f"every list; each sequence must be one bracketed list")
    ends = ptr[1:] - 1
    early = np.flatnonzero((level_after == 0) & (np.arange(level.size) != ends[sequence]))
    if early.size:
        raise ValueError(f"from_brackets(): the top list closes at {where(int(early[0]))} "
                         f"before its sequence ends; each sequence must be one bracketed list "
                         f"(wrap several in one)")
    unclosed = np.flatnonzero(level_after[ends] != 0)
    if unclosed.size:
        position = int(ends[unclosed[0]])
        raise ValueError(f"from_brackets(): {int(level_after[position])} list(s) are still "
                         f"open at the end ({where(position)})")
    if not bool(is_open[ptr[:-1]].all()):
        first = int(ptr[:-1][~is_open[ptr[:-1]]][0])
        raise ValueError(f"from_brackets(): the token at {where(first)} stands outside every "
                         f"list; each sequence must be one bracketed list")
