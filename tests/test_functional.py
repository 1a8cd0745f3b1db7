import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hsa_geo import Hierarchy
from hsa_geo.functional import (block_attention_to_dense, hsa, hsa_block_weights, hsa_dense,
                                hsa_log_partition)
from random_trees import balanced_parent, random_hierarchy, random_parent


def qkv(num_leaves, heads=2, dim=3, dtype=torch.float64, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(num_leaves, heads, dim, generator=generator, dtype=dtype)
            for _ in range(3)]


def dense_output(attention, v):
    return torch.einsum('hij,jhd->ihd', attention, v)


@pytest.mark.parametrize('num_leaves', [1, 2, 7, 33])
@pytest.mark.parametrize('heads,dim', [(1, 4), (3, 5)])
def test_flat_tree_is_softmax_attention(num_leaves, heads, dim):
    q, k, v = qkv(num_leaves, heads, dim, seed=num_leaves)
    out = hsa(q, k, v, Hierarchy.flat(num_leaves))
    expected = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                              v.transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_flat_tree_custom_scale_and_single_head():
    q, k, v = (t[:, 0] for t in qkv(9, seed=1))
    out = hsa(q, k, v, Hierarchy.flat(9), scale=0.3)
    expected = torch.softmax(0.3 * q @ k.t(), -1) @ v
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    assert out.shape == (9, 3)


@settings(max_examples=500, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), shuffle=st.booleans(),
       max_depth=st.integers(1, 8), max_children=st.integers(1, 10))
def test_sweeps_equal_dense_definition(seed, shuffle, max_depth, max_children):
    hierarchy = random_hierarchy(seed, max_depth=max_depth, max_children=max_children,
                                 max_leaves=30, shuffle_leaves=shuffle)
    q, k, v = qkv(hierarchy.num_leaves, seed=seed % 1000, scale=1.5)
    attention = hsa_dense(q, k, hierarchy)
    torch.testing.assert_close(hsa(q, k, v, hierarchy), dense_output(attention, v),
                               atol=1e-10, rtol=0)


@pytest.mark.parametrize('seed', range(20))
def test_dense_rows_sum_to_one_and_block_weights_rebuild_it(seed):
    hierarchy = random_hierarchy(seed)
    q, k, _ = qkv(hierarchy.num_leaves, seed=seed)
    attention = hsa_dense(q, k, hierarchy)
    torch.testing.assert_close(attention.sum(-1), torch.ones_like(attention[..., 0]))
    assert bool((attention > 0).all())
    rebuilt = block_attention_to_dense(hsa_block_weights(q, k, hierarchy), hierarchy)
    torch.testing.assert_close(rebuilt, attention, atol=1e-12, rtol=0)


@pytest.mark.parametrize('seed', range(10))
def test_log_partition_gradient_is_attention_times_keys(seed):
    hierarchy = random_hierarchy(seed)
    num_leaves = hierarchy.num_leaves
    q, k, _ = qkv(num_leaves, seed=seed)
    q.requires_grad_()
    phi = hsa_log_partition(q, k, hierarchy)
    root = hierarchy.roots
    (grad, ) = torch.autograd.grad(num_leaves * phi[root].sum(), q)
    expected = q.size(-1) ** -0.5 * torch.einsum('hij,jhd->ihd', hsa_dense(q.detach(), k, hierarchy), k)
    torch.testing.assert_close(-grad, expected, atol=1e-12, rtol=0)


def kl_to_softmax(attention, scores):
    log_softmax = torch.log_softmax(scores, -1)
    return float((attention * (attention.log() - log_softmax)).sum())


@pytest.mark.parametrize('parent,num_leaves', [
    ([5, 5, 6, 6, 6, 7, 7, -1], 5),
    ([4, 4, 5, 5, 6, 6, -1], 4),
    ([6, 6, 7, 7, 7, 7, 8, 8, -1], 6),
    ([7, 7, 8, 8, 8, 9, 9, 9, 10, 10, -1], 7),
])
def test_attention_minimises_kl_among_block_constant_matrices(parent, num_leaves):
    scipy_optimize = pytest.importorskip('scipy.optimize')
    import numpy as np
    hierarchy = Hierarchy.from_parent(torch.tensor(parent), num_leaves)
    q, k, _ = (t[:, 0] for t in qkv(num_leaves, heads=1, dim=2, seed=3, scale=1.3))
    scale = 2 ** -0.5
    scores = scale * q @ k.t()
    target = hsa_dense(q, k, hierarchy)

    # Free variables: one value per ordered sibling block (B != C) and one per
    # diagonal entry; every entry of A is one of them.
    pairs = hsa_block_weights(q, k, hierarchy).pair_index.t().tolist()
    blocks = [(b, c) for b, c in pairs if b != c]
    leaves_below = [[leaf for leaf in range(num_leaves) if node in hierarchy_path(hierarchy, leaf)]
                    for node in range(hierarchy.num_nodes)]
    entry_variable = np.full((num_leaves, num_leaves), -1)
    for index, (b, c) in enumerate(blocks):
        for i in leaves_below[b]:
            for j in leaves_below[c]:
                entry_variable[i, j] = index
    for i in range(num_leaves):
        entry_variable[i, i] = len(blocks) + i
    assert (entry_variable >= 0).all()
    log_p = torch.log_softmax(scores, -1).numpy()

    def expand(x):
        return x[entry_variable]

    def objective(x):
        a = expand(x)
        return float((a * (np.log(a) - log_p)).sum())

    constraints = [{'type': 'eq', 'fun': lambda x, i=i: expand(x)[i].sum() - 1.0}
                   for i in range(num_leaves)]
    start = np.full(len(blocks) + num_leaves, 1.0 / num_leaves)
    result = scipy_optimize.minimize(objective, start, method='SLSQP', constraints=constraints,
                                     bounds=[(1e-9, 1.0)] * start.size,
                                     options={'ftol': 1e-14, 'maxiter': 1000})
    assert result.success, result.message
    optimum = torch.from_numpy(expand(result.x))
    torch.testing.assert_close(target, optimum, atol=2e-5, rtol=0)
    # and nothing block-constant does better than HSA
    assert kl_to_softmax(target, scores) <= result.fun + 1e-9
    # while softmax itself is not block-constant here
    assert kl_to_softmax(target, scores) > 1e-6


def hierarchy_path(hierarchy, leaf):
    path, parent = [leaf], hierarchy.parent.tolist()
    while parent[path[-1]] >= 0:
        path.append(parent[path[-1]])
    return path


@pytest.mark.parametrize('seed', [0, 1, 2, 5])
def test_gradcheck(seed):
    # small inputs: gradcheck differentiates numerically entry by entry
    hierarchy = random_hierarchy(seed, max_leaves=8, max_children=4, max_depth=4)
    q, k, v = (t.requires_grad_() for t in qkv(hierarchy.num_leaves, heads=2, dim=2, seed=seed))
    assert torch.autograd.gradcheck(lambda a, b, c: hsa(a, b, c, hierarchy), (q, k, v))


def test_gradients_match_autograd_through_dense():
    hierarchy = random_hierarchy(11, max_leaves=25)
    q, k, v = (t.requires_grad_() for t in qkv(hierarchy.num_leaves, seed=4))
    grad_out = torch.randn(hierarchy.num_leaves, 2, 3, dtype=torch.float64)
    fused = torch.autograd.grad(hsa(q, k, v, hierarchy), (q, k, v), grad_out)
    reference = torch.autograd.grad(dense_output(hsa_dense(q, k, hierarchy), v), (q, k, v),
                                    grad_out)
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_value_width_may_differ():
    hierarchy = random_hierarchy(3)
    q, k, _ = qkv(hierarchy.num_leaves, dim=3, seed=2)
    v = torch.randn(hierarchy.num_leaves, 2, 7, dtype=torch.float64)
    torch.testing.assert_close(hsa(q, k, v, hierarchy), dense_output(hsa_dense(q, k, hierarchy), v))


def test_batch_of_graphs_equals_each_graph_alone():
    hierarchies = [random_hierarchy(seed) for seed in range(5)] + [Hierarchy.flat(1)]
    forest = Hierarchy.batch_hierarchies(hierarchies)
    q, k, v = qkv(forest.num_leaves, seed=9)
    out = hsa(q, k, v, forest)
    start = 0
    for hierarchy in hierarchies:
        end = start + hierarchy.num_leaves
        torch.testing.assert_close(out[start:end], hsa(q[start:end], k[start:end], v[start:end],
                                                       hierarchy), atol=1e-12, rtol=0)
        start = end
    # and no attention crosses graphs
    attention = hsa_dense(q, k, forest)
    graph = forest.leaf_batch
    assert float(attention[:, graph[:, None] != graph[None, :]].abs().max()) == 0.0


@pytest.mark.parametrize('seed', range(5))
def test_permuting_leaf_ids_permutes_output(seed):
    parent, num_leaves = random_parent(seed)
    permutation = torch.randperm(num_leaves, generator=torch.Generator().manual_seed(seed))
    # leaf i becomes leaf permutation[i]
    new_parent = parent.clone()
    new_parent[permutation] = parent[:num_leaves]
    permuted = Hierarchy.from_parent(new_parent, num_leaves)
    q, k, v = qkv(num_leaves, seed=seed)
    inverse_q, inverse_k, inverse_v = (torch.empty_like(t) for t in (q, k, v))
    for original, moved in ((q, inverse_q), (k, inverse_k), (v, inverse_v)):
        moved[permutation] = original
    out = hsa(q, k, v, Hierarchy.from_parent(parent, num_leaves))
    permuted_out = hsa(inverse_q, inverse_k, inverse_v, permuted)
    torch.testing.assert_close(permuted_out[permutation], out, atol=1e-12, rtol=0)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_huge_scores_stay_finite(dtype):
    hierarchy = Hierarchy.from_parent(balanced_parent(64, 4), 64)
    q, k, v = qkv(64, dim=4, dtype=dtype, seed=5)
    q, k = 100.0 * q / q.norm(dim=-1, keepdim=True), 100.0 * k / k.norm(dim=-1, keepdim=True)
    # |q.k| up to 1e4 with scale 1: scores of magnitude up to 1e4
    q.requires_grad_()
    out = hsa(q, k, v, hierarchy, scale=1.0)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    attention = hsa_dense(q.detach(), k, hierarchy, scale=1.0)
    assert torch.isfinite(attention).all()
    torch.testing.assert_close(attention.sum(-1), torch.ones_like(attention[..., 0]))


@pytest.mark.parametrize('dtype,tolerance', [(torch.float32, 1e-5), (torch.bfloat16, 5e-2),
                                             (torch.float16, 5e-3)])
def test_reduced_precision_within_documented_tolerance(dtype, tolerance):
    hierarchy = random_hierarchy(7, max_leaves=40)
    q, k, v = qkv(hierarchy.num_leaves, dim=8, seed=6)
    reference = hsa(q, k, v, hierarchy)
    out = hsa(q.to(dtype), k.to(dtype), v.to(dtype), hierarchy)
    assert out.dtype == dtype
    assert float((out.double() - reference).abs().max()) < tolerance


def test_chunked_blocks_and_leaf_range_views_give_the_same_result():
    from hsa_geo.functional.sweep import HSAFunction
    from hsa_geo.functional.layout import build_slot_layout
    num_leaves = 512
    hierarchy = Hierarchy.from_parent(balanced_parent(num_leaves, 8), num_leaves)
    from hsa_geo.functional.engines import slot_layout
    whole = slot_layout(hierarchy)
    chunked = build_slot_layout(hierarchy.parent, num_leaves, hierarchy.depth,
                                hierarchy.num_leaves_below, hierarchy.first_leaf,
                                pairs_per_block=3 * 64)
    assert all(block.leaf_range is not None for block in whole.levels[0].blocks)
    assert whole.slotted_leaves.numel() == 0  # the inputs are read in place
    assert len(chunked.blocks) > 2 * len(whole.blocks)
    q, k, v = (t.requires_grad_() for t in qkv(num_leaves, seed=8))
    outputs = []
    for layout in (whole, chunked):
        out = HSAFunction.apply(q, k, v, None, layout, 0.5)
        outputs.append([out] + list(torch.autograd.grad(out.sum(), (q, k, v))))
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    small = Hierarchy.from_parent(balanced_parent(64, 8), 64)
    q, k, v = (t.detach()[:64] for t in (q, k, v))
    torch.testing.assert_close(hsa(q, k, v, small), dense_output(hsa_dense(q, k, small), v),
                               atol=1e-12, rtol=0)


def test_input_errors_name_the_problem():
    hierarchy = Hierarchy.flat(4)
    q = torch.randn(4, 2, 3)
    with pytest.raises(ValueError, match='5 rows but the hierarchy has 4 leaves'):
        hsa(torch.randn(5, 2, 3), torch.randn(5, 2, 3), torch.randn(5, 2, 3), hierarchy)
    with pytest.raises(ValueError, match='k has shape'):
        hsa(q, torch.randn(4, 3, 3), q, hierarchy)
    with pytest.raises(ValueError, match='floating-point'):
        hsa(q, q, torch.ones(4, 2, 3, dtype=torch.long), hierarchy)
    with pytest.raises(ValueError, match=r'\[N, H, D\] or \[N, D\]'):
        hsa(torch.randn(4), torch.randn(4), torch.randn(4), hierarchy)
    with pytest.raises(TypeError, match='hsa_geo.Hierarchy'):
        hsa(q, q, q, torch.tensor([4, 4, 4, 4, -1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('dtype,tolerance', [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_cuda_matches_cpu(dtype, tolerance):
    hierarchy = random_hierarchy(4, max_leaves=60)
    tensors = qkv(hierarchy.num_leaves, dtype=dtype, seed=1)
    grad_out = torch.randn_like(tensors[0])
    results = []
    for device in ('cpu', 'cuda'):
        q, k, v = (t.to(device).requires_grad_() for t in tensors)
        out = hsa(q, k, v, hierarchy)
        grads = torch.autograd.grad(out, (q, k, v), grad_out.to(device))
        results.append([out.cpu()] + [g.cpu() for g in grads])
    for cpu, cuda in zip(*results):
        torch.testing.assert_close(cuda, cpu, atol=tolerance, rtol=0)
    forest = Hierarchy.batch_hierarchies([hierarchy, Hierarchy.flat(3)]).to('cuda')
    q = torch.randn(forest.num_leaves, 2, 3, device='cuda', dtype=dtype)
    assert hsa(q, q, q, forest).device.type == 'cuda'


def test_dense_reference_checks_its_inputs_like_hsa():
    from hsa_geo.functional import hsa_dense
    hierarchy = Hierarchy.from_parent(torch.tensor([4, 4, 5, 5, 6, 6, -1]), 4)
    q = torch.randn(4, 2, 3)
    with pytest.raises(ValueError, match="'causal' must be False, True or 'strict'"):
        hsa_dense(q, q, hierarchy, causal='yes')
    extra = torch.zeros(hierarchy.num_sibling_pairs + 3, 2)
    with pytest.raises(ValueError, match='ordered sibling pairs'):
        hsa_dense(q, q, hierarchy, pair_bias=extra)
    with pytest.raises(TypeError, match='q must be a torch.Tensor'):
        hsa_dense(q.numpy(), q, hierarchy)
    with pytest.raises(TypeError, match='q must be a torch.Tensor'):
        hsa(q.numpy(), q, q, hierarchy)
    # no sibling pairs: an empty bias is the right shape
    single = Hierarchy.from_parent(torch.tensor([-1]), 1)  # a lone leaf: E = 0
    x = torch.randn(1, 2, 3)
    torch.testing.assert_close(hsa_dense(x, x, single, pair_bias=torch.zeros(0, 2)),
                               torch.ones(2, 1, 1))


def test_dense_reference_handles_deep_chains():
    from hsa_geo.functional import hsa_dense
    depth = 1500  # past Python's recursion limit
    parent = torch.tensor([2, 2] + list(range(3, 2 + depth)) + [-1])
    hierarchy = Hierarchy.from_parent(parent, 2)
    q, k, v = (torch.randn(2, 1, 3, dtype=torch.float64) for _ in range(3))
    dense = hsa_dense(q, k, hierarchy)
    torch.testing.assert_close(torch.einsum('hij,jhd->ihd', dense, v), hsa(q, k, v, hierarchy))


@pytest.mark.parametrize('backend', ['fused', 'scatter'])
def test_a_family_too_wide_for_memory_is_refused_at_once(backend):
    # a flat tree over 200,000 leaves: 4e10 sibling pairs, ~160 GB per head
    hierarchy = Hierarchy.flat(200_000)
    q = torch.randn(200_000, 1, 4)
    with pytest.raises(MemoryError, match=r'node 200000 alone has 200000 children.*limit_children'):
        hsa(q, q, q, hierarchy, backend=backend)


@pytest.mark.parametrize('backend', ['fused', 'scatter'])
@pytest.mark.parametrize('causal', [False, True, 'strict'])
def test_meta_tensors_propagate_shapes(backend, causal):
    # a model built on the meta device (no memory) runs its forward and
    # backward for the shapes: every backend and output, no sweep run
    from hsa_geo import HSAConv
    hierarchy = Hierarchy.from_parent(torch.tensor([4, 4, 5, 5, 6, 6, -1]), 4)
    q, k, v = (torch.randn(4, 2, 3, device='meta', requires_grad=True) for _ in range(3))
    bias = torch.zeros(hierarchy.num_sibling_pairs, 2, device='meta', requires_grad=True)
    out = hsa(q, k, v, hierarchy, backend=backend, causal=causal, pair_bias=bias)
    assert out.shape == (4, 2, 3) and out.is_meta
    out.sum().backward()
    assert all(t.grad.shape == t.shape and t.grad.is_meta for t in (q, k, v, bias))
    assert hsa(q[:, 0], k[:, 0], v[:, 0], hierarchy, backend=backend,
               causal=causal).shape == (4, 3)
    if causal != 'strict':
        _, phi, log_self = hsa(q, k, v, hierarchy, backend=backend, causal=causal,
                               energy='euclidean', return_log_partition=True,
                               return_log_self_weight=True)
        assert phi.shape == (7, 2) and log_self.shape == (4, 2) and phi.is_meta
        assert hsa_log_partition(q, k, hierarchy, causal=causal).shape == (7, 2)
        weights = hsa_block_weights(q[:, 0], k[:, 0], hierarchy, causal=causal)
        assert weights.pair_weight.shape == (12, ) and weights.subtree_mass.shape == (7, )
    with torch.device('meta'):
        conv = HSAConv(3, 2, heads=2, causal=causal)
    assert conv(torch.randn(4, 3, device='meta'), hierarchy).shape == (4, 4)
