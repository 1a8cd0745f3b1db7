import math
import time

import pytest
import torch

from hsa_geo.hierarchy import chunk_sequence, from_nested_lengths, from_segments

from test_builders_helpers import assert_valid_tree, children_of, cluster_sets


def _segment_sets(levels):
    sets = set()
    for ids in levels:
        for value in torch.unique(ids).tolist():
            sets.add(frozenset((ids == value).nonzero().view(-1).tolist()))
    return sets


def _random_document(generator, num_sentences=6):
    words_per_sentence = torch.randint(1, 6, (num_sentences, ), generator=generator)
    tokens_per_word = torch.randint(1, 4, (int(words_per_sentence.sum()), ), generator=generator)
    return tokens_per_word, words_per_sentence


def test_segments_become_clusters():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        tokens_per_word, words_per_sentence = _random_document(generator)
        word = torch.repeat_interleave(torch.arange(tokens_per_word.numel()), tokens_per_word)
        sentence = torch.repeat_interleave(torch.arange(words_per_sentence.numel()),
                                           words_per_sentence)[word]
        h = from_segments([word, sentence], max_children=None)
        num_tokens = word.numel()
        assert_valid_tree(h, num_tokens)
        multi = {s for s in _segment_sets([word, sentence]) if len(s) > 1}
        assert cluster_sets(h) == multi | {frozenset(range(num_tokens))}
        lengths = from_nested_lengths([tokens_per_word, words_per_sentence], max_children=None)
        assert torch.equal(lengths.parent, h.parent)


def test_ids_need_not_be_contiguous_sorted_or_adjacent():
    word = torch.tensor([70, 70, 3, 3, 900, 5, 70])  # word 70 is not a contiguous run
    sentence = torch.tensor([8, 8, 8, 8, 1, 1, 8])
    h = from_segments([word, sentence], max_children=None)
    assert cluster_sets(h) == {frozenset({0, 1, 6}), frozenset({2, 3}), frozenset({4, 5}),
                               frozenset({0, 1, 2, 3, 6}), frozenset(range(7))}
    relabelled = from_segments([torch.tensor([2, 2, 0, 0, 3, 1, 2]),
                                torch.tensor([1, 1, 1, 1, 0, 0, 1])], max_children=None)
    assert torch.equal(h.parent, relabelled.parent)


def test_input_forms_agree():
    word = [0, 0, 1, 2, 2, 2]
    sentence = [0, 0, 0, 1, 1, 1]
    a = from_segments([torch.tensor(word), torch.tensor(sentence)])
    b = from_segments([word, sentence])
    c = from_segments(torch.tensor([word, sentence]))
    assert torch.equal(a.parent, b.parent) and torch.equal(a.parent, c.parent)


def test_keep_chains():
    word = torch.tensor([0, 1, 1])
    kept = from_segments([word], max_children=None, keep_chains=True)
    assert kept.num_clusters == 3  # both words and the root
    assert from_segments([word], max_children=None).num_clusters == 2


def test_long_sentence_is_split_in_order():
    sentence = torch.zeros(1000, dtype=torch.long)
    h = from_segments([sentence], max_children=16)
    assert_valid_tree(h, 1000, max_children=16)
    for node, children in children_of(h).items():
        if all(c < 1000 for c in children):
            assert children == list(range(children[0], children[-1] + 1))


@pytest.mark.parametrize('segment_ids, match', [
    ([], 'at least one level'),
    (torch.tensor([0, 1]), 'list of id vectors'),
    ([torch.tensor([], dtype=torch.long)], 'no tokens'),
    ([torch.tensor([0., 1.])], 'must be integers'),
    ([torch.tensor([True, False])], 'must be integers'),
    ([torch.tensor([[0, 1]])], 'must be a vector'),
    ([torch.tensor([0, 1]), torch.tensor([0, 0, 0])], 'Level 1 has 3 segment ids'),
    ([torch.tensor([0, -1])], 'Token 1 has segment id -1'),
    ([torch.tensor([4, 4, 9]), torch.tensor([7, 2, 2])],
     r'Segment 4 of level 0 \(leaves \{0, 1\}\) is split across segments \[2, 7\] of level 1'),
])
def test_bad_segments(segment_ids, match):
    with pytest.raises(ValueError, match=match):
        from_segments(segment_ids)


@pytest.mark.parametrize('lengths, match', [
    ([], 'non-empty list'),
    ([[2, 0, 1]], 'segment 1 has length 0'),
    ([[2, 1], [1]], 'sum to 1, but level 0 has 2'),
    ([[1.5, 2]], 'vector of integers'),
    ([[]], 'it is empty'),
])
def test_bad_lengths(lengths, match):
    with pytest.raises(ValueError, match=match):
        from_nested_lengths(lengths)


@pytest.mark.parametrize('num_tokens, chunk_size', [(64, 4), (10, 3), (1, 2), (2, 2), (33, 32),
                                                    (1000, 10)])
def test_chunk_sequence_shape(num_tokens, chunk_size):
    h = chunk_sequence(num_tokens, chunk_size, max_children=None)
    assert_valid_tree(h, num_tokens, max_children=chunk_size)
    depth = math.ceil(math.log(num_tokens, chunk_size) - 1e-9) if num_tokens > 1 else 0
    assert h.max_depth == depth
    # every cluster covers one run of consecutive tokens, aligned to chunk_size**level
    for s in cluster_sets(h):
        assert max(s) - min(s) + 1 == len(s)
        width = chunk_size ** math.ceil(math.log(len(s), chunk_size) - 1e-9)
        assert min(s) % width == 0 or len(s) == num_tokens


def test_chunk_sequence_complete_tree():
    h = chunk_sequence(4 ** 3, 4)
    assert set(h.num_children[h.num_leaves:].tolist()) == {4}
    assert h.num_clusters == 16 + 4 + 1


def test_chunk_size_above_max_children_is_split():
    h = chunk_sequence(100, 50, max_children=8)
    assert_valid_tree(h, 100, max_children=8)
    assert frozenset(range(50)) in cluster_sets(h)


def test_chunk_sequence_bad_arguments():
    with pytest.raises(ValueError, match='chunk_size'):
        chunk_sequence(10, 1)
    with pytest.raises(ValueError, match='num_tokens'):
        chunk_sequence(0, 4)


def test_long_sequences_are_vectorised():
    start = time.perf_counter()
    h = chunk_sequence(200_000, 16)
    word = torch.arange(200_000) // 3
    g = from_segments([word, word // 20])
    elapsed = time.perf_counter() - start
    assert h.num_leaves == g.num_leaves == 200_000
    assert elapsed < 20  # seconds, generous for a shared 2-core machine (about 1 s alone)
