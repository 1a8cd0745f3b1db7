r"""ListOps with the Long Range Arena recipe, generated offline.

An example is a nested expression such as ``[MAX 2 9 [MIN 4 7 ] 0 ]`` whose
label is its value (``9``). The recipe follows LRA's ``listops.py`` (Tay et
al., 2021, after Nangia & Bowman, 2018): a node at depth :math:`< D` is a
list with probability :math:`0.25` (operator ``MIN``, ``MAX``, ``MED`` or
``SM`` -- sum modulo 10 -- over 2 to :obj:`max_args` arguments, each drawn
the same way one level deeper) and a digit otherwise; a node at depth
:math:`D` is a digit. The root is at depth 1, and an expression is kept
when its length (digits plus two tokens per list: the operator and the
closing bracket) lies strictly between :obj:`min_length` and
:obj:`max_length`; duplicates are dropped. ``MED`` is the integer part of
the median (``int(numpy.median(...))``).

Tokens are the operators ``[MIN``, ``[MAX``, ``[MED``, ``[SM`` (each opens a
list), the digits and ``]``, as the models of the LRA literature read them
once the parentheses of LRA's files are stripped.

The generator stops drawing a tree as soon as it is longer than
:obj:`max_length` (LRA draws it whole and then rejects it): the kept
expressions have the same distribution, and drawing costs time proportional
to what is kept.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

#: token ids: the digits are their own ids
DIGITS = tuple(range(10))
MIN, MAX, MED, SUM_MOD, CLOSE = 10, 11, 12, 13, 14
OPERATORS = (MIN, MAX, MED, SUM_MOD)
VOCAB = tuple(str(d) for d in DIGITS) + ('[MIN', '[MAX', '[MED', '[SM', ']')
VOCAB_SIZE = len(VOCAB)
#: every operator's name without its bracket (``SM`` for ``[SM``)
OPERATOR_NAMES = {token: VOCAB[token].lstrip('[') for token in OPERATORS}
#: probability that a node above the maximum depth is a list (LRA's VALUE_P:
#: a node is a digit when a uniform draw exceeds it)
LIST_PROBABILITY = 0.25

#: LRA's ListOps: 96,000 / 2,000 / 2,000 expressions of 500 - 2,000 tokens
LRA_SPLITS = {'train': 96_000, 'valid': 2_000, 'test': 2_000}


@dataclass(frozen=True)
class ListOpsRecipe:
    r"""What one split draws: the LRA recipe by default.

    Args:
        min_length (int): Kept expressions are longer than this.
            (default: :obj:`500`)
        max_length (int): Kept expressions are shorter than this.
            (default: :obj:`2000`)
        max_depth (int): Depth :math:`D` at which every node is a digit
            (the root is at depth 1). (default: :obj:`10`)
        max_args (int): Most arguments of a list. (default: :obj:`10`)
        min_depth (int): Kept expressions have a digit at depth at least
            this (for the deep test split). (default: :obj:`1`)
    """
    min_length: int = 500
    max_length: int = 2000
    max_depth: int = 10
    max_args: int = 10
    min_depth: int = 1

    def __post_init__(self):
        for name in ('min_length', 'max_length', 'max_depth', 'max_args', 'min_depth'):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ListOpsRecipe: '{name}' must be a non-negative int "
                                 f"(got {value!r})")
        if self.max_length <= self.min_length + 1:
            raise ValueError(f"ListOpsRecipe: no length lies strictly between min_length="
                             f"{self.min_length} and max_length={self.max_length}")
        if self.max_args < 2:
            raise ValueError(f"ListOpsRecipe: a list has at least 2 arguments, so 'max_args' "
                             f"must be >= 2 (got {self.max_args})")
        if self.min_depth > self.max_depth:
            raise ValueError(f"ListOpsRecipe: min_depth={self.min_depth} exceeds "
                             f"max_depth={self.max_depth}")


#: the length-generalisation splits: train on at most 1,000 tokens, test on
#: 2,000 - 4,000 tokens and, separately, on depth 12 - 15 at training lengths
GENERALISATION_RECIPES = {
    'train': ListOpsRecipe(min_length=500, max_length=1000),
    'valid': ListOpsRecipe(min_length=500, max_length=1000),
    'test_long': ListOpsRecipe(min_length=2000, max_length=4000),
    'test_deep': ListOpsRecipe(min_length=500, max_length=1000, max_depth=15, min_depth=12),
}


class _TooLong(Exception):
    pass


def _draw(rng: random.Random, recipe: ListOpsRecipe, tokens: List[int], depth: int,
          deepest: List[int]) -> int:
    r"""Appends one node's tokens and returns its value."""
    if depth >= recipe.max_depth or rng.random() > LIST_PROBABILITY:
        value = rng.choice(DIGITS)
        tokens.append(value)
        deepest[0] = max(deepest[0], depth)
        if len(tokens) >= recipe.max_length:
            raise _TooLong
        return value
    num_args = rng.randint(2, recipe.max_args)
    operator = rng.choice(OPERATORS)
    tokens.append(operator)
    values = [_draw(rng, recipe, tokens, depth + 1, deepest) for _ in range(num_args)]
    tokens.append(CLOSE)
    if len(tokens) >= recipe.max_length:
        raise _TooLong
    return evaluate_operator(operator, values)


def evaluate_operator(operator: int, values: Sequence[int]) -> int:
    r"""The value of one list: ``MIN``, ``MAX``, ``MED`` (integer part of
    the median) or ``SM`` (sum modulo 10) of its arguments' values."""
    if operator == MIN:
        return min(values)
    if operator == MAX:
        return max(values)
    if operator == MED:
        return int(np.median(values))
    if operator == SUM_MOD:
        return sum(values) % 10
    raise ValueError(f"unknown ListOps operator id {operator}")


def evaluate_lists(tokens: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    r"""The value of every list of an expression given as token ids (a
    reference evaluator, independent of the generator's own bookkeeping):
    the positions of the lists' opening tokens and their values, in the
    order the lists close (so the outer list comes last)."""
    stack: List[Tuple[int, int, List[int]]] = []   # (opener, operator, argument values)
    openers: List[int] = []
    values: List[int] = []
    for position, token in enumerate(tokens):
        token = int(token)
        if token in OPERATORS:
            stack.append((position, token, []))
        elif token == CLOSE:
            if not stack:
                raise ValueError(f"']' at position {position} closes no list")
            opener, operator, arguments = stack.pop()
            openers.append(opener)
            values.append(evaluate_operator(operator, arguments))
            if stack:
                stack[-1][2].append(values[-1])
        elif 0 <= token <= 9:
            if not stack:
                raise ValueError(f"digit at position {position} stands outside every list")
            stack[-1][2].append(token)
        else:
            raise ValueError(f"token id {token} at position {position} is not a ListOps token")
    if stack:
        raise ValueError(f"{len(stack)} list(s) are never closed")
    if not values:
        raise ValueError("the expression holds no list")
    return np.asarray(openers, dtype=np.int64), np.asarray(values, dtype=np.int64)


def evaluate(tokens: Sequence[int]) -> int:
    r"""The value of an expression given as token ids (that of its outer
    list, see :func:`evaluate_lists`)."""
    return int(evaluate_lists(tokens)[1][-1])


@dataclass
class ListOpsSplit:
    r"""One split: the token ids of all expressions concatenated
    (:obj:`tokens`, uint8), where each starts (:obj:`ptr`, length
    :math:`n + 1`), its value (:obj:`label`) and depth (:obj:`depth`, that
    of its deepest digit, the root being at depth 1)."""
    tokens: np.ndarray
    ptr: np.ndarray
    label: np.ndarray
    depth: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    def example(self, index: int) -> np.ndarray:
        return self.tokens[self.ptr[index]:self.ptr[index + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.ptr)

    def to_string(self, index: int) -> str:
        return ' '.join(VOCAB[t] for t in self.example(index))


def generate_listops(num_examples: int, seed: int, recipe: ListOpsRecipe = ListOpsRecipe(),
                     exclude: Optional[set] = None) -> ListOpsSplit:
    r"""Draws :obj:`num_examples` distinct expressions with :obj:`recipe`.

    Deterministic in :obj:`seed`. Expressions in :obj:`exclude` (a set of
    token tuples, e.g. the training split's) are skipped, and the kept ones
    are added to it, so splits drawn with one shared set never overlap.

    Example::

        >>> split = generate_listops(3, seed=0, recipe=ListOpsRecipe(10, 40, max_depth=4))
        >>> len(split), bool(((split.lengths > 10) & (split.lengths < 40)).all())
        (3, True)
        >>> [evaluate(split.example(i)) for i in range(3)] == split.label.tolist()
        True
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 0:
        raise ValueError(f"'num_examples' must be a non-negative int (got {num_examples!r})")
    rng = random.Random(seed)
    seen = set() if exclude is None else exclude
    kept: List[List[int]] = []
    labels, depths = [], []
    while len(kept) < num_examples:
        tokens: List[int] = []
        deepest = [0]
        try:
            value = _draw(rng, recipe, tokens, 1, deepest)
        except _TooLong:
            continue
        if len(tokens) <= recipe.min_length or deepest[0] < recipe.min_depth:
            continue
        key = tuple(tokens)
        if key in seen:
            continue
        seen.add(key)
        kept.append(tokens)
        labels.append(value)
        depths.append(deepest[0])
    ptr = np.zeros(len(kept) + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([len(t) for t in kept])
    flat = np.fromiter((t for tokens in kept for t in tokens), dtype=np.uint8, count=int(ptr[-1]))
    return ListOpsSplit(flat, ptr, np.asarray(labels, dtype=np.int64),
                        np.asarray(depths, dtype=np.int64))


def flat_lists(count: int, generator: np.random.Generator,
               operators: Sequence[int] = OPERATORS) -> ListOpsSplit:
    r""":obj:`count` depth-1 expressions ``[OP d1 ... dk ]``: an operator
    drawn uniformly from :obj:`operators`, :math:`k` uniform in 2-10 and
    uniform digits (what a bottom-up model composes at every list, seen
    alone).

    Example::

        >>> split = flat_lists(4, np.random.default_rng(0), operators=[SUM_MOD])
        >>> [evaluate(split.example(i)) for i in range(4)] == split.label.tolist()
        True
    """
    arguments = [generator.integers(0, 10, generator.integers(2, 11)).tolist()
                 for _ in range(count)]
    drawn = (np.full(count, operators[0]) if len(operators) == 1
             else generator.choice(np.asarray(operators), count))
    expressions = [[int(operator), *digits, CLOSE] for operator, digits in zip(drawn, arguments)]
    ptr = np.zeros(count + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([len(e) for e in expressions])
    tokens = np.fromiter((t for e in expressions for t in e), dtype=np.uint8,
                         count=int(ptr[-1]))
    labels = np.asarray([evaluate(e) for e in expressions], dtype=np.int64)
    return ListOpsSplit(tokens, ptr, labels, np.ones(count, dtype=np.int64) * 2)


def generate_splits(sizes: Dict[str, int], recipes: Dict[str, ListOpsRecipe],
                    seed: int = 0) -> Dict[str, ListOpsSplit]:
    r"""Disjoint splits, split :obj:`name` drawn with :obj:`recipes[name]`
    and seed :obj:`seed` + its index in :obj:`sizes`."""
    seen: set = set()
    return {name: generate_listops(size, seed + index, recipes[name], exclude=seen)
            for index, (name, size) in enumerate(sizes.items())}
