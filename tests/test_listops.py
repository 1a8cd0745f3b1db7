r"""ListOps: the offline generator (LRA recipe), the parse-tree builder
:func:`from_brackets`, the comparison's models and its script on tiny
settings (checkpoint, resume, report)."""
import json
import os.path as osp
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hsa_geo.datasets import listops
from hsa_geo.datasets.listops import (CLOSE, MAX, MED, MIN, OPERATORS, SUM_MOD, ListOpsRecipe,
                                      evaluate, evaluate_lists, generate_listops, generate_splits)
from hsa_geo.functional import hsa, hsa_dense
from hsa_geo.hierarchy import Hierarchy, from_brackets

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'examples'))

SMALL = ListOpsRecipe(min_length=8, max_length=60, max_depth=5, max_args=5)


# ------------------------------------------------------------ generator
def test_evaluate_by_hand():
    # [MAX 2 9 [MIN 4 7 ] 0 ] = 9
    assert evaluate([MAX, 2, 9, MIN, 4, 7, CLOSE, 0, CLOSE]) == 9
    assert evaluate([MED, 1, 2, CLOSE]) == 1          # int(1.5)
    assert evaluate([MED, 3, 1, 8, CLOSE]) == 3
    assert evaluate([SUM_MOD, 9, 9, CLOSE]) == 8
    assert evaluate([MIN, 5, SUM_MOD, 7, 6, CLOSE, CLOSE]) == 3
    for bad in ([CLOSE], [MAX, 1], [1, MAX, 2, CLOSE], [MAX, 1, CLOSE, 2], [MAX, 99, CLOSE]):
        with pytest.raises(ValueError):
            evaluate(bad)


def test_evaluate_lists_by_hand():
    # [MIN 5 [SM 7 6 ] [MAX [MED 1 2 ] 0 ] ]: inner lists close first, the outer list last
    tokens = [MIN, 5, SUM_MOD, 7, 6, CLOSE, MAX, MED, 1, 2, CLOSE, 0, CLOSE, CLOSE]
    openers, values = evaluate_lists(tokens)
    assert openers.tolist() == [2, 7, 6, 0]
    assert values.tolist() == [3, 1, 1, 1]


def test_generator_follows_the_recipe():
    split = generate_listops(60, seed=3, recipe=SMALL)
    lengths = split.lengths
    assert len(split) == 60 and ((lengths > 8) & (lengths < 60)).all()
    assert [evaluate(split.example(i)) for i in range(60)] == split.label.tolist()
    assert (split.depth <= SMALL.max_depth).all() and (split.depth >= 2).all()
    assert len({tuple(split.example(i)) for i in range(60)}) == 60
    # every list has 2 .. max_args arguments: count them with a stack
    for i in range(60):
        stack = []
        for token in split.example(i):
            if token in OPERATORS:
                stack.append(0)
            elif token == CLOSE:
                assert 2 <= stack.pop() <= SMALL.max_args
                if stack:
                    stack[-1] += 1
            else:
                stack[-1] += 1
    assert split.to_string(0).startswith('[')


def test_generator_is_deterministic_and_splits_are_disjoint():
    first = generate_listops(20, seed=1, recipe=SMALL)
    again = generate_listops(20, seed=1, recipe=SMALL)
    other = generate_listops(20, seed=2, recipe=SMALL)
    assert np.array_equal(first.tokens, again.tokens) and np.array_equal(first.ptr, again.ptr)
    assert not np.array_equal(first.tokens[:50], other.tokens[:50])
    splits = generate_splits({'train': 40, 'test': 20}, {'train': SMALL, 'test': SMALL})
    seen = {tuple(splits['train'].example(i)) for i in range(40)}
    assert not seen & {tuple(splits['test'].example(i)) for i in range(20)}


def test_deep_recipe_keeps_only_deep_expressions():
    deep = ListOpsRecipe(min_length=8, max_length=200, max_depth=9, max_args=3, min_depth=7)
    split = generate_listops(10, seed=0, recipe=deep)
    assert (split.depth >= 7).all() and (split.depth <= 9).all()


def test_lra_defaults():
    recipe = ListOpsRecipe()
    assert (recipe.min_length, recipe.max_length, recipe.max_depth, recipe.max_args) == \
        (500, 2000, 10, 10)
    assert listops.LRA_SPLITS == {'train': 96_000, 'valid': 2_000, 'test': 2_000}
    assert listops.LIST_PROBABILITY == 0.25


@pytest.mark.parametrize('kwargs', [dict(min_length=10, max_length=11), dict(max_args=1),
                                    dict(max_depth=3, min_depth=4), dict(max_depth=-1),
                                    dict(max_args=2.5)])
def test_bad_recipes_are_refused(kwargs):
    with pytest.raises(ValueError, match='ListOpsRecipe'):
        ListOpsRecipe(**kwargs)


# ------------------------------------------------------------ from_brackets
def reference_parent(tokens):
    r"""The parse tree by an explicit stack: leaves are tokens, clusters
    are numbered by their opening token's position."""
    num_tokens = len(tokens)
    openers = [i for i, t in enumerate(tokens) if t in OPERATORS]
    cluster = {position: num_tokens + rank for rank, position in enumerate(openers)}
    parent = [None] * (num_tokens + len(openers))
    stack = []
    for i, token in enumerate(tokens):
        if token in OPERATORS:
            parent[cluster[i]] = stack[-1] if stack else -1
            stack.append(cluster[i])
            parent[i] = cluster[i]
        elif token == CLOSE:
            parent[i] = stack.pop()
        else:
            parent[i] = stack[-1]
    return parent


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4))
def test_from_brackets_matches_a_stack_parser(seed, count):
    split = generate_listops(count, seed=seed, recipe=SMALL)
    h = from_brackets(torch.from_numpy(split.tokens), OPERATORS, [CLOSE],
                      ptr=torch.from_numpy(split.ptr))
    separate = [from_brackets(split.example(i), OPERATORS, [CLOSE]) for i in range(count)]
    for i, tree in enumerate(separate):
        assert tree.parent.tolist() == reference_parent(split.example(i).tolist())
        assert tree.ordered and tree.num_trees == 1
    joined = Hierarchy.batch_hierarchies(separate)
    assert h.parent.tolist() == joined.parent.tolist()
    assert h.batch.tolist() == joined.batch.tolist()


def test_hsa_over_a_parse_tree_is_the_dense_definition():
    split = generate_listops(2, seed=5, recipe=SMALL)
    h = from_brackets(split.tokens, OPERATORS, [CLOSE], ptr=split.ptr)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(h.num_leaves, 2, 4, generator=generator, dtype=torch.float64)
               for _ in range(3))
    attention = hsa_dense(q, k, h)  # [H, N, N]
    torch.testing.assert_close(hsa(q, k, v, h), torch.einsum('hij,jhd->ihd', attention, v))


@pytest.mark.parametrize('tokens, ptr, message', [
    ([CLOSE, MAX, 1, CLOSE], None, 'position 0 closes no list'),
    ([MAX, 1, CLOSE, 2], None, 'position 3 stands outside'),
    ([MAX, 1, CLOSE, MIN, 2, CLOSE], None, 'top list closes at position 2'),
    ([MAX, MIN, 1, CLOSE], None, '1 list'),
    ([MAX, 1, CLOSE, MAX, 2], [0, 3, 5], 'sequence 1'),
    ([2, MAX, 1, CLOSE], [0, 1, 4], 'position 0 of sequence 0'),
    ([MAX, 1, CLOSE], [0, 3, 3], "'ptr'"),
    ([], None, 'non-empty'),
])
def test_from_brackets_names_what_is_malformed(tokens, ptr, message):
    with pytest.raises(ValueError, match=message):
        from_brackets(tokens, OPERATORS, [CLOSE], ptr=ptr)


def test_from_brackets_refuses_a_token_that_both_opens_and_closes():
    with pytest.raises(ValueError, match='both'):
        from_brackets([MAX, 1, CLOSE], [MAX], [MAX, CLOSE])


# ------------------------------------------------------------ models
def tiny_batch(count=3, seed=0):
    from listops_models import ListOpsBatch
    split = generate_listops(count, seed=seed, recipe=SMALL)
    return split, ListOpsBatch.collate(torch.from_numpy(split.tokens.astype(np.int64)),
                                       torch.from_numpy(split.ptr),
                                       torch.from_numpy(split.label))


def test_parent_tokens_is_the_token_tree():
    split, data = tiny_batch()
    for i in range(len(split)):
        tokens, start = split.example(i).tolist(), int(split.ptr[i])
        stack = []
        for j, token in enumerate(tokens):
            expected = stack[-1] + start if stack else -1
            if token in OPERATORS:
                assert int(data.parent_token[start + j]) == expected
                stack.append(j)
            elif token == CLOSE:
                stack.pop()
                assert int(data.parent_token[start + j]) == stack_top_after(stack, j, tokens,
                                                                             start)
            else:
                assert int(data.parent_token[start + j]) == expected


def stack_top_after(stack, j, tokens, start):
    r"""A closing token's parent is the opening token of the list it closes."""
    depth, k = 0, j
    while True:
        if tokens[k] == CLOSE:
            depth += 1
        elif tokens[k] in OPERATORS:
            depth -= 1
            if depth == 0:
                return k + start
        k -= 1


def test_tree_positions_sum_along_the_path():
    from listops_models import MAX_CHILDREN, TreePositions
    _, data = tiny_batch(count=2)
    module = TreePositions(8)
    h = data.hierarchy
    out = module(h)
    code = h.depth * (MAX_CHILDREN + 1) + h.sibling_index
    for leaf in range(0, h.num_leaves, 7):
        expected, node = torch.zeros(8), leaf
        while int(h.parent[node]) >= 0:
            expected += module.table.weight[code[node]]
            node = int(h.parent[node])
        torch.testing.assert_close(out[leaf], expected)


def test_models_run_and_match_parameters():
    from listops_models import MODELS, ListOpsModel, build_model, count_parameters, matched_width
    _, data = tiny_batch()
    for width, heads in ((64, 4), (32, 2)):  # the script's default, a small one
        target = count_parameters(ListOpsModel('hsa', width, heads))
        for name in MODELS:
            model = build_model(name, matched_width(name, width=width, heads=heads), heads)
            assert abs(count_parameters(model) - target) <= 0.1 * target, (name, width)
    for name in MODELS:
        model = build_model(name, matched_width(name, width=32, heads=2), 2)
        logits = model(data)
        assert logits.shape == (3, 10) and torch.isfinite(logits).all()
        logits.sum().backward()
    with pytest.raises(ValueError, match='unknown ListOps model'):
        ListOpsModel('lstm')


@pytest.mark.parametrize('folded', [False, True])
def test_family_schedule_composes_every_list_after_its_sub_lists(folded):
    from listops_models import left_folded
    split, data = tiny_batch(count=4, seed=3)
    h = left_folded(data.hierarchy) if folded else data.hierarchy
    schedule = data.folded_schedule if folded else data.schedule
    assert schedule.num_nodes == h.num_nodes
    done = torch.zeros(h.num_nodes, dtype=torch.bool)
    done[:h.num_leaves] = True
    for level in schedule.levels:
        member = level.children >= 0
        assert done[level.children[member]].all()      # sub-lists composed before
        assert not done[level.lists].any()
        for row, node in zip(level.children, level.lists.tolist()):
            children = row[row >= 0]
            assert (h.parent[children] == node).all()  # the whole family, in text order
            assert children.numel() == int(h.num_children[node])
            assert (h.first_leaf[children].diff() > 0).all()
        done[level.lists] = True
    assert done.all()
    assert data.tokens[h.first_leaf[h.roots]].tolist() == data.tokens[data.root].tolist()
    if folded:
        assert int(h.num_children[h.num_leaves:].max()) == 2
        assert torch.equal(h.roots, data.hierarchy.roots)


def test_left_folded_chains_each_family_left_to_right():
    from listops_models import left_folded
    # [MAX 2 [MIN 4 7 ] ]: leaves 0-6, lists 7 (MAX) and 8 (MIN)
    h = from_brackets(torch.tensor([MAX, 2, MIN, 4, 7, CLOSE, CLOSE]), OPERATORS, [CLOSE])
    folded = left_folded(h)
    leaves_of = {node: set() for node in range(folded.num_nodes)}
    for leaf in range(7):
        node = leaf
        while node >= 0:
            leaves_of[node].add(leaf)
            node = int(folded.parent[node])
    clusters = sorted(map(frozenset, (leaves_of[c] for c in range(7, folded.num_nodes))),
                      key=lambda leaves: (min(leaves), len(leaves)))
    assert clusters == [frozenset(s) for s in ({0, 1}, {0, 1, 2, 3, 4, 5},
                                               {0, 1, 2, 3, 4, 5, 6}, {2, 3}, {2, 3, 4},
                                               {2, 3, 4, 5})]
    assert folded.num_nodes == 7 + 2 + 2 + 2  # MAX: 4 members, MIN: 4 members
    # a family of one child stays; one of three gains a chain node
    single = Hierarchy.from_parent(torch.tensor([3, 4, 4, 4, -1]), 3, ordered=True)
    assert left_folded(single).parent.tolist() == [3, 5, 4, 5, -1, 4]


def test_bottom_up_model_reads_out_each_expression_alone():
    from listops_models import BOTTOM_UP_MODELS, build_model
    torch.manual_seed(0)
    split, data = tiny_batch(count=3, seed=5)
    for name in BOTTOM_UP_MODELS:
        model = build_model(name, 16, 2).eval()
        together = model(data)
        for i in range(len(split)):
            tokens = torch.from_numpy(split.example(i).astype(np.int64))
            alone = type(data).collate(tokens, torch.tensor([0, tokens.numel()]),
                                       torch.from_numpy(split.label[i:i + 1]))
            torch.testing.assert_close(model(alone)[0], together[i], atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize('name', ['hsa_values', 'tree_values'])
def test_values_models_pass_a_sub_list_up_as_its_predicted_digit(name):
    from listops_models import ListOpsBatch, build_model
    torch.manual_seed(0)
    model = build_model(name, 16, 2).eval()
    with torch.no_grad():
        model.head.weight.mul_(1e4)  # a sharp prediction: the sub-list is one digit

    def logits(tokens):
        tokens = torch.tensor(tokens)
        return model(ListOpsBatch.collate(tokens, torch.tensor([0, tokens.numel()]),
                                          torch.tensor([0])))[0]
    inner = [MIN, 4, 5, CLOSE]
    digit = int(logits(inner).argmax())
    nested, flat = logits([MAX, 3, *inner, 7, CLOSE]), logits([MAX, 3, digit, 7, CLOSE])
    torch.testing.assert_close(nested, flat, atol=1e-3, rtol=1e-4)


# ------------------------------------------------------------ the script
def tiny_args(tmp_path, checkpoints, steps):
    return ['--models', 'hsa,tree_gnn', '--steps', str(steps), '--valid-every', '2',
            '--batch-size', '4', '--width', '16', '--heads', '2', '--train-size', '24',
            '--valid-size', '8', '--test-size', '8', '--generalisation-test-size', '4',
            '--valid-subset', '8', '--data-dir', str(tmp_path / 'data'),
            '--checkpoint-dir', str(tmp_path / checkpoints), '--out',
            str(tmp_path / f'{checkpoints}.json'), '--resamples', '50']


@pytest.fixture
def tiny_recipes(monkeypatch):
    import listops as script
    small = {'train': SMALL, 'valid': SMALL,
             'test_long': ListOpsRecipe(min_length=60, max_length=120, max_depth=5, max_args=5),
             'test_deep': ListOpsRecipe(min_length=8, max_length=60, max_depth=7, max_args=5,
                                        min_depth=6)}
    monkeypatch.setattr(script, 'GENERALISATION_RECIPES', small)
    threads = torch.get_num_threads()
    yield script
    torch.set_num_threads(threads)


def test_listops_curriculum_resumes_to_the_uninterrupted_run(tmp_path, tiny_recipes):
    # steps 1-3 on flat lists, step 4 on the training split; resumed after
    # step 2, step 3 needs the flat lists' generator as it was
    script = tiny_recipes
    curriculum = ['--models', 'hsa_values', '--curriculum-steps', '3',
                  '--curriculum-batch-size', '4']
    script.main(tiny_args(tmp_path, 'straight', 4) + curriculum)
    script.main(tiny_args(tmp_path, 'resumed', 2) + curriculum)
    script.main(tiny_args(tmp_path, 'resumed', 4) + curriculum)
    (straight, ), (resumed, ) = (json.load(open(tmp_path / f'{name}.json'))['runs']
                                 for name in ('straight', 'resumed'))
    assert straight['curriculum_steps'] == 3 and resumed['steps'] == 4
    # the budget counts the expressions of the last step only (it once counted all four)
    budget = json.load(open(tmp_path / 'straight.json'))['budget']
    assert budget['examples_seen'] == [4] and budget['flat_lists_seen'] == [3 * 4]
    assert budget['curriculum_batch_size'] == [4]
    assert [c['train_loss'] for c in straight['curve']] == [c['train_loss']
                                                            for c in resumed['curve']]


def test_listops_mixes_flat_lists_after_the_curriculum(tmp_path, tiny_recipes, monkeypatch):
    # after 2 curriculum steps, 2 steps of 4 expressions + 3 flat lists at the second rate
    script = tiny_recipes
    seen = []
    original = script.make_batch

    def recording(*args):
        batch = original(*args)
        seen.append((batch.label.numel(), script.learning_rate(len(seen), parsed)))
        return batch
    options = tiny_args(tmp_path, 'mixed', 4) + [
        '--models', 'hsa_values', '--curriculum-steps', '2', '--curriculum-batch-size', '5',
        '--mixed-flat-lists', '3', '--lr-after-curriculum', '1e-4', '--warmup', '1',
        '--valid-every', '100']  # validated at the last step only: its batches come after
    parsed = script.parse_args(options)
    monkeypatch.setattr(script, 'make_batch', recording)
    script.main(options)
    assert seen[:4] == [(5, 1e-3), (5, 1e-3), (7, 1e-4), (7, 1e-4)]
    budget = json.load(open(tmp_path / 'mixed.json'))['budget']
    assert budget['flat_lists_seen'] == [2 * 5 + 2 * 3] and budget['examples_seen'] == [2 * 4]
    assert budget['mixed_flat_lists'] == [3] and budget['lr_after_curriculum'] == [1e-4]


def test_flat_lists_are_depth_one_expressions_with_their_values():
    split = listops.flat_lists(200, np.random.default_rng(0))
    assert set(split.tokens[split.ptr[:-1]].tolist()) == set(OPERATORS)
    assert ((split.lengths >= 4) & (split.lengths <= 12)).all()
    for i in range(len(split)):
        tokens = split.example(i)
        assert tokens[-1] == CLOSE and (tokens[1:-1] < 10).all()
        assert evaluate(tokens.tolist()) == split.label[i]


def test_listops_script_resumes_to_the_uninterrupted_run(tmp_path, tiny_recipes):
    script = tiny_recipes
    script.main(tiny_args(tmp_path, 'straight', 4))
    script.main(tiny_args(tmp_path, 'resumed', 2))
    script.main(tiny_args(tmp_path, 'resumed', 4))
    straight = json.load(open(tmp_path / 'straight.json'))
    resumed = json.load(open(tmp_path / 'resumed.json'))
    for a, b in zip(straight['runs'], resumed['runs']):
        assert a['model'] == b['model'] and b['steps'] == 4
        assert [c['train_loss'] for c in a['curve']] == [c['train_loss'] for c in b['curve']]
        def scores(run):
            return {split: (row['accuracy'], row['correct']) for split, row in run['test'].items()}
        assert scores(a) == scores(b) and set(scores(a)) == {'test', 'test_long', 'test_deep'}
    assert set(straight['summary']) == {'hsa', 'tree_gnn'}
    (comparison, ) = [c for c in straight['comparisons']
                      if c['second'] == 'tree_gnn' and c['split'] == 'test_deep']
    low, high = comparison['ci95']
    assert low <= comparison['difference'] <= high
    # the gathered report equals the one written while training
    script.main(tiny_args(tmp_path, 'straight', 4) + ['--report-only'])
    again = json.load(open(tmp_path / 'straight.json'))
    assert again['summary'] == straight['summary']
    # --references picks the models compared with every other one
    script.main(tiny_args(tmp_path, 'straight', 4) + ['--report-only', '--references',
                                                      'tree_gnn'])
    comparisons = json.load(open(tmp_path / 'straight.json'))['comparisons']
    assert {(c['first'], c['second']) for c in comparisons} == {('tree_gnn', 'hsa')}
    with pytest.raises(script.ExampleError, match="unknown model 'nope' in --references"):
        script.parse_args(tiny_args(tmp_path, 'straight', 4) + ['--references', 'nope'])


def test_paired_bootstrap():
    from common import paired_bootstrap
    rng = np.random.default_rng(0)
    first = rng.integers(2, size=(2, 300))
    same = paired_bootstrap(first, first, 100)
    assert same == {'difference': 0.0, 'ci95': [0.0, 0.0]}
    better = np.maximum(first, rng.integers(2, size=(2, 300)))
    result = paired_bootstrap(better, first, 200)
    assert result['difference'] == pytest.approx(float((better - first).mean()))
    assert 0 < result['ci95'][0] < result['difference'] < result['ci95'][1]
    with pytest.raises(ValueError, match='one shape'):
        paired_bootstrap(first, first[:, :10], 10)


def test_family_probe_trains_on_flat_lists(tmp_path):
    import listops_family_probe as probe
    batch = probe.flat_batch(SUM_MOD, 20, np.random.default_rng(0))
    for i in range(20):
        tokens = batch.tokens[batch.batch == i].tolist()
        assert tokens[0] == SUM_MOD and tokens[-1] == CLOSE and 2 <= len(tokens) - 2 <= 10
        assert int(batch.label[i]) == sum(tokens[1:-1]) % 10
    out = tmp_path / 'probe.json'
    threads = torch.get_num_threads()
    try:
        probe.main(['--steps', '4', '--test-every', '2', '--batch-size', '8', '--width', '16',
                    '--heads', '2', '--models', 'hsa_bottom_up,tree_fold', '--out', str(out)])
    finally:
        torch.set_num_threads(threads)
    result = json.load(open(out))
    assert set(result['runs']) == {'hsa_bottom_up', 'tree_fold'}
    assert [c['step'] for c in result['runs']['tree_fold']['curve']] == [2, 4]


def test_inner_lists_are_read_out_as_each_list_alone(tmp_path, tiny_recipes):
    # a bottom-up model composes a list from its own subtree only, so its
    # readout at an inner list equals its answer on that list's tokens alone
    import listops_inner_lists as inner
    from listops_models import ListOpsBatch, build_model
    torch.manual_seed(0)
    split = generate_listops(6, seed=4, recipe=SMALL)
    for name in ('hsa_values', 'tree_bottom_up', 'hsa_fold'):
        model = build_model(name, 16, 2).eval()
        with torch.no_grad():
            model.head.weight.mul_(50)  # predictions far from ties
        lists = inner.list_predictions(model, split, np.arange(6))
        tokens = np.concatenate([split.example(i) for i in range(6)])
        assert lists['opener'].size == int(np.isin(tokens, OPERATORS).sum())
        for opener, height, value, predicted in zip(*(lists[key] for key in (
                'opener', 'height', 'value', 'predicted'))):
            depth, close = 0, opener
            while True:  # the list's closing bracket
                depth += 1 if tokens[close] in OPERATORS else -1 if tokens[close] == CLOSE else 0
                if depth == 0:
                    break
                close += 1
            alone = torch.from_numpy(tokens[opener:close + 1].astype(np.int64))
            assert evaluate(alone.tolist()) == value
            data = ListOpsBatch.collate(alone, torch.tensor([0, alone.numel()]),
                                        torch.tensor([0]))
            assert height == data.hierarchy.max_depth - 1  # its tokens sit below the root
            assert int(model(data).argmax()) == predicted
    # the script reads finished checkpoints of examples/listops.py
    script = tiny_recipes
    script.main(tiny_args(tmp_path, 'run', 2) + ['--models', 'hsa_values'])
    out = tmp_path / 'inner.json'
    options = tiny_args(tmp_path, 'run', 2)[2:]
    del options[options.index('--out'):options.index('--out') + 2]  # the training report's
    inner.main(['--models', 'hsa_values', '--count', '5', '--out', str(out)] + options)
    result = json.load(open(out))['models']['hsa_values']
    counted = sum(result[name]['lists'] for name in ('MIN', 'MAX', 'MED', 'SM'))
    test = script.load_data(script.parse_args(tiny_args(tmp_path, 'run', 2)))['test']
    assert counted == int(np.isin(test.tokens[:test.ptr[5]], OPERATORS).sum())
    # a model that reads out no inner list, or one never trained: a clear message
    from common import ExampleError
    with pytest.raises(ExampleError, match="'softmax' is not a bottom-up model"):
        inner.main(['--models', 'softmax', '--out', str(out)] + options)
    with pytest.raises(ExampleError, match="no checkpoint of 'tree_values' seed 0"):
        inner.main(['--models', 'tree_values', '--out', str(out)] + options)
