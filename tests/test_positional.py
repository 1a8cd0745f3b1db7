"""SiblingPositionBias: the pair bias from sibling positions, its three
kinds, levels and modalities, its errors, and HSA with it against softmax
and the dense reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from hsa_geo import Hierarchy
from hsa_geo.functional import hsa, hsa_dense
from hsa_geo.functional.engines import engine_cache
from hsa_geo.hierarchy import chunk_sequence, compose, from_partitions, limit_children
from hsa_geo.nn import HSAConv, SiblingPositionBias
from random_trees import random_hierarchy, random_sequence_hierarchy

KINDS = ['learned', 'sinusoidal', 'rotary']


def pair_context(hierarchy, node_modality=None):
    r"""For every pair (B, C) of :meth:`sibling_pairs`: level (depth of the
    parent), positions and modalities, read off the hierarchy directly."""
    first, second = hierarchy.sibling_pairs()
    level = hierarchy.depth[hierarchy.parent[first]]
    position = hierarchy.sibling_index
    if node_modality is None:
        node_modality = torch.zeros(hierarchy.num_nodes, dtype=torch.long)
    return (first, second, level, position[first], position[second],
            node_modality[first], node_modality[second])


def direct_bias(module, hierarchy, node_modality=None, use_levels=False):
    r"""``[E, H]`` bias from the definition: gather eps of both siblings and
    take their inner product per head."""
    _, _, level, pos_b, pos_c, mod_b, mod_c = pair_context(hierarchy, node_modality)
    if not use_levels:
        level = torch.zeros_like(level)
    width = int(hierarchy.num_children.max())
    eps = module.embeddings(width)  # [L, K, P, H, d]
    eps_b, eps_c = eps[level, mod_b, pos_b], eps[level, mod_c, pos_c]
    return (eps_b * eps_c).sum(-1) / math.sqrt(module.dim)


def sequence_tree(seed=0, **kwargs):
    kwargs.setdefault('max_children', 6)
    kwargs.setdefault('max_leaves', 40)
    return random_sequence_hierarchy(seed, **kwargs)


# ---------------------------------------------------------------- the bias
@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_bias_has_one_row_per_sibling_pair_and_equals_the_definition(kind, seed):
    hierarchy = sequence_tree(seed)
    module = SiblingPositionBias(heads=3, max_children=6, dim=8, kind=kind).double()
    bias = module(hierarchy)
    assert bias.shape == (hierarchy.num_sibling_pairs, 3)
    assert bias.dtype == torch.float64
    torch.testing.assert_close(bias, direct_bias(module, hierarchy))


@pytest.mark.parametrize('kind', KINDS)
def test_bias_of_a_few_pairs_by_hand(kind):
    # root over clusters 7, 8 (leaves 0-2, 3-4) and leaf 5; leaf 6 under 8
    hierarchy = Hierarchy.from_parent(torch.tensor([7, 7, 7, 8, 8, 9, 8, 9, 9, -1]), 7,
                                      ordered=True)
    module = SiblingPositionBias(heads=2, max_children=4, dim=6, kind=kind).double()
    bias = module(hierarchy)
    eps = module.embeddings(4)[0, 0]  # [P, H, d]
    pairs = hierarchy.sibling_pairs().t().tolist()
    scale = 6 ** -0.5
    # (cluster 8, leaf 5): positions 1 and 2 among the root's children 7, 8, 5
    expected = (eps[1] * eps[2]).sum(-1) * scale
    torch.testing.assert_close(bias[pairs.index([8, 5])], expected)
    # (leaf 6, leaf 3): positions 2 and 0 in cluster 8 = {3, 4, 6}
    expected = (eps[2] * eps[0]).sum(-1) * scale
    torch.testing.assert_close(bias[pairs.index([6, 3])], expected)


def test_rotary_bias_depends_only_on_the_offset():
    hierarchy = chunk_sequence(64, chunk_size=8)
    module = SiblingPositionBias(heads=2, max_children=8, dim=8, kind='rotary').double()
    bias = module(hierarchy)
    _, _, _, pos_b, pos_c, _, _ = pair_context(hierarchy)
    offset = pos_c - pos_b
    for value in offset.unique().tolist():
        rows = bias[offset == value]
        torch.testing.assert_close(rows, rows[:1].expand_as(rows))
    # sum_f |u_hf|^2 cos(w_f d) / sqrt(d)
    power = (module.amplitude[0, 0] ** 2).sum(-1)  # [H, d/2]
    expected = torch.cos(offset[:, None].double() * module.frequency.double()) @ power.t()
    torch.testing.assert_close(bias, expected / math.sqrt(8))
    # symmetric in the offset and largest at offset 0
    assert torch.allclose(bias[offset == 3][0], bias[offset == -3][0])
    assert bool((bias[offset == 0][0] >= bias.abs().max(0).values - 1e-12).all())


def test_learned_and_sinusoidal_bias_are_absolute_not_relative():
    hierarchy = chunk_sequence(64, chunk_size=8)
    _, _, _, pos_b, pos_c, _, _ = pair_context(hierarchy)
    for kind in ('learned', 'sinusoidal'):
        bias = SiblingPositionBias(heads=1, max_children=8, kind=kind)(hierarchy)
        same_offset = (pos_c - pos_b) == 1
        assert bias[same_offset].std() > 1e-4


def test_sinusoidal_and_rotary_extrapolate_beyond_max_children():
    hierarchy = Hierarchy.flat(20)
    for kind in ('sinusoidal', 'rotary'):
        module = SiblingPositionBias(heads=2, max_children=8, dim=8, kind=kind).double()
        torch.testing.assert_close(module(hierarchy), direct_bias(module, hierarchy))


def test_levels_select_different_embeddings():
    hierarchy = chunk_sequence(64, chunk_size=4)  # families at depths 0, 1, 2
    module = SiblingPositionBias(heads=2, max_children=4, dim=8, num_levels=3).double()
    bias = module(hierarchy)
    torch.testing.assert_close(bias, direct_bias(module, hierarchy, use_levels=True))
    _, _, level, pos_b, pos_c, _, _ = pair_context(hierarchy)
    pick = (pos_b == 0) & (pos_c == 1)
    by_level = [bias[pick & (level == value)][0] for value in range(3)]
    assert not torch.allclose(by_level[0], by_level[1])
    assert not torch.allclose(by_level[1], by_level[2])
    # without num_levels, every level shares one embedding
    shared = SiblingPositionBias(heads=2, max_children=4, dim=8)(hierarchy)
    assert torch.allclose(shared[pick & (level == 1)][0], shared[pick & (level == 2)][0])


@pytest.mark.parametrize('kind', KINDS)
def test_modalities_select_different_embeddings_and_clusters_may_mix(kind):
    text = chunk_sequence(6, chunk_size=3)
    image = chunk_sequence(4, chunk_size=2)
    hierarchy, modality = compose({'text': text, 'image': image})
    assert hierarchy.ordered
    module = SiblingPositionBias(heads=2, max_children=3, dim=4, kind=kind,
                                 num_modalities=2).double()
    bias = module(hierarchy, modality)
    # leaves keep theirs, the parts' clusters take their leaves', the root
    # (over both parts) gets the mixed slot 2
    assert hierarchy.num_leaves == 10 and hierarchy.num_clusters == 7
    node_modality = torch.tensor([0] * 6 + [1] * 4 + [0] * 3 + [1] * 3 + [2])
    torch.testing.assert_close(bias, direct_bias(module, hierarchy, node_modality))
    # the same modality given per node gives the same bias
    torch.testing.assert_close(module(hierarchy, node_modality), bias)
    # and a different assignment changes it
    assert not torch.allclose(module(hierarchy, 1 - modality), bias)


def test_modality_code_is_cached_per_modality_tensor():
    hierarchy, modality = compose({'a': chunk_sequence(5, 5), 'b': chunk_sequence(3, 3)})
    module = SiblingPositionBias(heads=1, max_children=5, num_modalities=2)
    first = module(hierarchy, modality)
    modality[0] = 1  # in place: the cached rows must not be reused
    second = module(hierarchy, modality)
    assert not torch.equal(first, second)
    modality[0] = 0
    torch.testing.assert_close(module(hierarchy, modality.clone()), first)


def test_pair_rows_are_built_once_per_hierarchy():
    hierarchy = chunk_sequence(100, chunk_size=5)
    module = SiblingPositionBias(heads=2, max_children=5)
    module(hierarchy)
    codes = engine_cache(hierarchy).position_codes
    assert len(codes) == 1
    key, cached = next(iter(codes.items()))
    module(hierarchy)
    SiblingPositionBias(heads=4, max_children=5)(hierarchy)  # same layout: shared
    assert len(codes) == 1 and codes[key] is cached


def test_an_edited_tree_does_not_keep_its_old_position_codes():
    # the codes cached on the tree are refused once its parent pointers
    # change in place (they would be the old tree's pairs); a new tree over
    # the same pointers gets its own
    hierarchy = Hierarchy.from_parent(torch.tensor([4, 4, 4, 5, 6, 6, -1]), 4, ordered=True)
    module = SiblingPositionBias(heads=2, max_children=4, dim=4)
    assert module(hierarchy).shape == (9 + 1 + 4, 2)
    hierarchy.parent[2] = 5  # now 2 + 2 leaves: 4 + 4 + 4 pairs
    with pytest.raises(ValueError, match='modified in place'):
        module(hierarchy)
    rebuilt = Hierarchy.from_parent(hierarchy.parent.clone(), 4, ordered=True)
    torch.testing.assert_close(module(rebuilt), direct_bias(module, rebuilt))


def test_empty_forest_of_isolated_leaves():
    hierarchy = Hierarchy.from_parent(torch.tensor([-1, -1]), 2, ordered=True)
    bias = SiblingPositionBias(heads=3, max_children=4)(hierarchy)
    assert bias.shape == (0, 3)


def test_reset_parameters_and_repr():
    module = SiblingPositionBias(heads=4, max_children=8, num_levels=3, num_modalities=2)
    assert repr(module) == ("SiblingPositionBias(heads=4, max_children=8, dim=16, "
                            "kind='learned', num_levels=3, num_modalities=2)")
    assert repr(SiblingPositionBias(2, 8, dim=4, kind='rotary')) == (
        "SiblingPositionBias(heads=2, max_children=8, dim=4, kind='rotary')")
    before = module.embedding.detach().clone()
    module.reset_parameters()
    assert not torch.equal(before, module.embedding)
    # initial self bias |eps|^2 / sqrt(d) is small
    bias = SiblingPositionBias(heads=4, max_children=32)(Hierarchy.flat(32))
    diagonal = bias.detach().view(32, 32, 4).diagonal().mean()
    assert 0.03 < float(diagonal) < 0.3


# ----------------------------------------------------------------- errors
def test_unordered_hierarchy_is_refused_with_a_way_out():
    hierarchy = from_partitions([[{0, 1, 2}, {3, 4}]], num_leaves=5)
    assert not hierarchy.ordered
    with pytest.raises(ValueError, match='records no sibling order') as error:
        SiblingPositionBias(heads=1, max_children=4)(hierarchy)
    message = str(error.value)
    assert 'off' in message and 'ordered=True' in message and 'chunk_sequence' in message


def test_too_many_children_for_learned_positions_names_the_node():
    hierarchy = Hierarchy.flat(10)
    with pytest.raises(ValueError, match=r'Node 6 is child number 6 .* cluster 10, which has '
                                         r'10 children'):
        SiblingPositionBias(heads=1, max_children=6)(hierarchy)
    # bounding the families first makes it fit
    bounded = limit_children(hierarchy, max_children=5)
    assert bounded.ordered
    SiblingPositionBias(heads=1, max_children=6)(bounded)


def test_too_deep_for_num_levels_names_the_cluster():
    hierarchy = chunk_sequence(64, chunk_size=4)  # families at depths 0, 1, 2
    with pytest.raises(ValueError, match=r'at depth 2, so its family is level 2, but '
                                         r'num_levels=2'):
        SiblingPositionBias(heads=1, max_children=4, num_levels=2)(hierarchy)


def test_modality_errors():
    hierarchy, modality = compose({'a': chunk_sequence(5, 5), 'b': chunk_sequence(3, 3)})
    module = SiblingPositionBias(heads=1, max_children=5, num_modalities=2)
    with pytest.raises(ValueError, match='pass the modality'):
        module(hierarchy)
    with pytest.raises(ValueError, match=r'one id per leaf \[N=8\] or per node \[N\+M=11\] '
                                         r'\(got \(7,\)\)'):
        module(hierarchy, modality[:7])
    with pytest.raises(ValueError, match='integer vector'):
        module(hierarchy, modality.float())
    with pytest.raises(ValueError, match=r'Node 3 has modality 2, outside \[0, 1\]'):
        module(hierarchy, torch.tensor([0, 0, 0, 2, 0, 1, 1, 1]))
    with pytest.raises(ValueError, match='without num_modalities'):
        SiblingPositionBias(heads=1, max_children=5)(hierarchy, modality)


def test_constructor_errors():
    with pytest.raises(ValueError, match='Unknown kind'):
        SiblingPositionBias(heads=1, kind='alibi')
    with pytest.raises(ValueError, match="'dim' must be even"):
        SiblingPositionBias(heads=1, dim=5, kind='rotary')
    with pytest.raises(ValueError, match="'heads' must be an integer >= 1"):
        SiblingPositionBias(heads=0)
    with pytest.raises(ValueError, match='expects a Hierarchy'):
        SiblingPositionBias(heads=1)(torch.zeros(3))


# ------------------------------------------------------------ through HSA
@pytest.mark.parametrize('kind', KINDS)
def test_flat_tree_with_the_bias_is_softmax_with_it_added(kind):
    num_leaves, heads, dim = 12, 2, 4
    hierarchy = Hierarchy.flat(num_leaves)
    module = SiblingPositionBias(heads=heads, max_children=num_leaves, dim=8, kind=kind).double()
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(num_leaves, heads, dim, generator=generator, dtype=torch.float64)
               for _ in range(3))
    bias = module(hierarchy)
    # on a flat tree, pair (i, j) is row i * N + j and positions are leaf ids
    mask = bias.t().reshape(heads, num_leaves, num_leaves)
    position = torch.arange(num_leaves)
    eps = module.embeddings(num_leaves)[0, 0]  # [P, H, d]
    by_position = torch.einsum('phd,qhd->hpq', eps[position], eps[position]) / math.sqrt(8)
    torch.testing.assert_close(mask, by_position)
    expected = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                              v.transpose(0, 1), attn_mask=mask)
    out = hsa(q, k, v, hierarchy, pair_bias=bias)
    torch.testing.assert_close(out.transpose(0, 1), expected)


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('seed', [3, 4])
def test_gradients_reach_the_parameters_and_match_the_dense_reference(kind, seed):
    hierarchy = sequence_tree(seed, max_leaves=24)
    heads = 2
    module = SiblingPositionBias(heads=heads, max_children=6, dim=4, kind=kind,
                                 num_levels=hierarchy.max_depth).double()
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(hierarchy.num_leaves, heads, 3, generator=generator,
                           dtype=torch.float64) for _ in range(3))
    weight = next(module.parameters())

    out = hsa(q, k, v, hierarchy, pair_bias=module(hierarchy))
    (grad_sweep, ) = torch.autograd.grad((out ** 2).sum(), weight)
    attention = hsa_dense(q, k, hierarchy, pair_bias=module(hierarchy))  # [H, N, N]
    dense = torch.einsum('hij,jhd->ihd', attention, v)
    (grad_dense, ) = torch.autograd.grad((dense ** 2).sum(), weight)
    torch.testing.assert_close(out, dense)
    torch.testing.assert_close(grad_sweep, grad_dense)
    assert grad_sweep.abs().sum() > 0


def test_gradcheck_through_the_sweeps():
    hierarchy = sequence_tree(5, max_leaves=10, max_children=4)
    module = SiblingPositionBias(heads=1, max_children=4, dim=2, kind='rotary').double()
    q, k, v = (torch.randn(hierarchy.num_leaves, 1, 2, dtype=torch.float64) for _ in range(3))

    def run(amplitude):
        return hsa(q, k, v, hierarchy, pair_bias=torch.func.functional_call(
            module, {'amplitude': amplitude}, (hierarchy, )))

    amplitude = module.amplitude.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(run, (amplitude, ))


def test_hsa_conv_with_the_module_learns_positions():
    hierarchy = chunk_sequence(32, chunk_size=4)
    positional = SiblingPositionBias(heads=2, max_children=4)
    conv = HSAConv(8, 4, heads=2, positional=positional)
    conv(torch.randn(32, 8), hierarchy).sum().backward()
    assert positional.embedding.grad is not None and positional.embedding.grad.abs().sum() > 0


def test_random_unordered_tree_marked_ordered_works():
    # any tree works once its leaf order is declared meaningful
    hierarchy = random_hierarchy(7, max_children=5)
    hierarchy.ordered = True
    module = SiblingPositionBias(heads=2, max_children=5, dim=4).double()
    torch.testing.assert_close(module(hierarchy), direct_bias(module, hierarchy))
