r"""The token hierarchy of a document: word pieces (leaves) → words →
sentences → document, built by :func:`hsa_geo.hierarchy.from_segments`."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from hsa_geo.hierarchy import DEFAULT_MAX_CHILDREN, Hierarchy, from_segments
from hsa_geo.text.tokenize import TokenizedDocument


def document_hierarchy(document: TokenizedDocument,
                       max_children: Optional[int] = DEFAULT_MAX_CHILDREN,
                       levels: str = 'word+sentence') -> Hierarchy:
    r"""Document → sentence → word → word-piece tree over the tokens of
    :obj:`document` (leaves in token order, one root).

    Args:
        document (TokenizedDocument): From :func:`~hsa_geo.text.tokenize_documents`.
        max_children (int, optional): Passed to
            :func:`~hsa_geo.hierarchy.from_segments`: a wider family is split
            into nested groups of at most this many children; :obj:`None`
            for no bound. (default: :obj:`32`)
        levels (str, optional): ``'word+sentence'`` (the full tree),
            ``'sentence'`` (tokens → sentences → document) or ``'word'``.
            (default: :obj:`'word+sentence'`)
    """
    segments = {'word+sentence': [document.word_ids, document.sentence_ids],
                'sentence': [document.sentence_ids],
                'word': [document.word_ids]}
    if levels not in segments:
        raise ValueError(f"'levels' must be one of {sorted(segments)} (got {levels!r})")
    return from_segments(segments[levels], max_children=max_children)


def sentence_groups(document: TokenizedDocument) -> Tensor:
    r"""Sentence id of every token: the groups of the block-local attention
    baseline (tokens attend only within their own sentence)."""
    return document.sentence_ids
