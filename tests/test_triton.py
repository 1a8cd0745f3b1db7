"""The Triton sweeps (hsa_geo/functional/triton_sweeps.py) in Triton's
interpreter: exact against the dense definition over random forests (mixed
depth and width, several trees, flat trees, isolated leaves), values and
gradients of q, k, v and the pair bias, both energies, causal, float32 and
half precision; equal to the tensor sweeps on summary rows and self
weights; every refusal. The last test runs the compiled programs on CUDA
(benchmarks/gpu_checks.sh).

Triton reads TRITON_INTERPRET when it decorates a program, and decorates its
standard library when it is first imported (torch_geometric imports it): so
tests/conftest.py sets the variable on machines without a GPU, before any
test module is collected. The interpreter runs one program at a time in
Python: the trees here are small."""
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip('triton')

import hsa_geo.functional.triton_sweeps as triton_sweeps  # noqa: E402
from hsa_geo import Hierarchy  # noqa: E402
from hsa_geo.functional import engine, hsa, hsa_dense  # noqa: E402
from hsa_geo.functional.attention import hsa_with_summaries  # noqa: E402
from hsa_geo.functional.engines import engine_cache  # noqa: E402
from hsa_geo.functional.terms import ScoreTerms  # noqa: E402
from hsa_geo.functional.triton_sweeps import (MAX_CHILDREN, build_triton_plan,  # noqa: E402
                                              triton_hsa)
from random_trees import random_forest, random_hierarchy  # noqa: E402

INTERPRETED = triton_sweeps.interpreting()


@pytest.fixture(autouse=True)
def where_the_programs_run(request):
    if request.node.get_closest_marker('cuda'):
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        if INTERPRETED:
            pytest.skip("Triton's programs are interpreted in this process (TRITON_INTERPRET=1)")
    elif not INTERPRETED:
        pytest.skip("needs Triton's interpreter: TRITON_INTERPRET=1 before triton is imported "
                    "(tests/conftest.py sets it where there is no CUDA device)")


def inputs(hierarchy, heads, dim, value_dim=None, dtype=torch.float32, seed=0, biased=False,
           device='cpu'):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(dim, ), (dim, ), (value_dim or dim, )]
    tensors = [1.5 * torch.randn(hierarchy.num_leaves, heads, *shape, generator=generator)
               for shape in shapes]
    if biased:
        tensors.append(torch.randn(hierarchy.num_sibling_pairs, heads, generator=generator))
    return [t.to(device, dtype).requires_grad_() for t in tensors]


def assert_matches_dense(hierarchy, q, k, v, bias=None, atol=1e-5, **terms):
    r"""engine('triton') output and gradients (q, k, v, bias) against the
    dense definition in float64."""
    with engine('triton'):
        out = hsa(q, k, v, hierarchy, pair_bias=bias, **terms)
    assert out.dtype == q.dtype
    leaves = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    bias64 = None if bias is None else bias.detach().double().cpu().requires_grad_()
    attention = hsa_dense(leaves[0], leaves[1], hierarchy.to('cpu'), pair_bias=bias64, **terms)
    expected = torch.einsum('hij,jhd->ihd', attention, leaves[2])
    torch.testing.assert_close(out.double().cpu(), expected, atol=atol, rtol=atol)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    wanted = [t for t in (q, k, v, bias) if t is not None]
    got = torch.autograd.grad(out, wanted, grad.to(out.device, out.dtype))
    want = torch.autograd.grad(expected, leaves + ([bias64] if bias is not None else []), grad)
    for a, b in zip(got, want):
        assert a.dtype == q.dtype
        torch.testing.assert_close(a.double().cpu(), b, atol=atol, rtol=atol)
    assert len(engine_cache(hierarchy).triton_plans) == 1  # it ran on the Triton sweeps


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), trees=st.integers(1, 3), max_depth=st.integers(1, 4),
       max_children=st.integers(1, 6), heads=st.integers(1, 2), dim=st.sampled_from([3, 8]),
       value_dim=st.sampled_from([None, 5]), energy=st.sampled_from(['dot', 'euclidean']),
       causal=st.booleans(), biased=st.booleans())
def test_triton_equals_the_dense_definition(seed, trees, max_depth, max_children, heads, dim,
                                            value_dim, energy, causal, biased):
    hierarchy = random_forest(seed % 10_000, trees, causal, max_depth=max_depth,
                              max_children=max_children, max_leaves=10)
    q, k, v, *bias = inputs(hierarchy, heads, dim, value_dim, seed=seed % 997, biased=biased)
    assert_matches_dense(hierarchy, q, k, v, *bias, energy=energy, causal=causal)


@pytest.mark.parametrize('num_leaves,heads', [(1, 1), (5, 2), (17, 1)])
def test_flat_tree_is_softmax_attention(num_leaves, heads):
    hierarchy = Hierarchy.flat(num_leaves)
    q, k, v = (t.detach() for t in inputs(hierarchy, heads, 4, seed=num_leaves))
    with engine('triton'):
        out = hsa(q, k, v, hierarchy, scale=0.3)
    expected = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                              v.transpose(0, 1), scale=0.3).transpose(0, 1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_isolated_leaves_attend_to_themselves():
    # two lone leaves (trees of their own), a chain root -> cluster -> leaf and a tree
    parts = [Hierarchy.flat(1), Hierarchy.from_parent(torch.tensor([1, 2, -1]), 1),
             Hierarchy.flat(1), random_hierarchy(3, max_leaves=8)]
    hierarchy = Hierarchy.batch_hierarchies(parts)
    q, k, v, bias = inputs(hierarchy, 2, 3, biased=True)
    assert_matches_dense(hierarchy, q, k, v, bias, energy='euclidean')
    with engine('triton'):
        out = hsa(q, k, v, hierarchy)
    lone = [0, 2]
    torch.testing.assert_close(out[lone], v[lone], atol=0, rtol=0)
    grad_q, grad_v = torch.autograd.grad(out.sum(), (q, v))
    assert torch.equal(grad_q[lone], torch.zeros_like(grad_q[lone]))
    assert torch.equal(grad_v[lone], torch.ones_like(grad_v[lone]))


@pytest.mark.parametrize('dtype,tolerance', [(torch.bfloat16, 5e-2), (torch.float16, 5e-3)])
def test_half_precision_is_computed_in_float32(dtype, tolerance):
    hierarchy = random_forest(5, 2, max_depth=3, max_children=4, max_leaves=10)
    q, k, v, bias = inputs(hierarchy, 2, 8, biased=True)
    halves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, bias)]
    # against the dense definition of the rounded inputs: only the output is rounded
    assert_matches_dense(hierarchy, *halves, atol=tolerance)
    out = triton_hsa(*halves[:3], halves[3].t(), hierarchy.family_tables(), 8 ** -0.5)
    assert out.dtype == dtype


@pytest.mark.parametrize('energy', ['dot', 'euclidean'])
def test_summary_rows_and_self_weights_equal_the_tensor_sweeps(energy):
    # every output differentiable: the distributed layer's summary rows and log a_ii
    hierarchy = random_forest(11, 2, causal=True, max_depth=4, max_children=4, max_leaves=10)
    q, k, v, bias = inputs(hierarchy, 2, 3, value_dim=4, biased=True)
    nodes = torch.arange(hierarchy.num_leaves, hierarchy.num_nodes).flip(0)
    results = []
    for name in ('tensor', 'triton'):
        terms = ScoreTerms.of(energy, bias, causal=True)
        with engine(name):
            outputs = hsa_with_summaries(q, k, v, hierarchy, 0.6, terms, nodes, self_weight=True)
        generator = torch.Generator().manual_seed(2)
        grads = [torch.randn(o.shape, generator=generator) for o in outputs]
        results.append(list(outputs) + list(torch.autograd.grad(outputs, (q, k, v, bias), grads)))
    assert results[0][1].size(-1) == 2 * 3 + 4 + 1 + (energy == 'euclidean')
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_torch_compile_runs_the_triton_sweeps_outside_the_graph():
    hierarchy = random_hierarchy(4, max_depth=3, max_children=4, max_leaves=8)
    q, k, v = (t.detach() for t in inputs(hierarchy, 1, 4))
    compiled = torch.compile(lambda q, k, v: hsa(q, k, v, hierarchy), backend='eager')
    with engine('triton'):
        out = compiled(q, k, v)
    expected = torch.einsum('hij,jhd->ihd', hsa_dense(q.double(), k.double(), hierarchy),
                            v.double())
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert len(engine_cache(hierarchy).triton_plans) == 1


# --- refusals: each names what is unsupported and the engine to use instead

def small_case(dtype=torch.float32):
    hierarchy = random_hierarchy(2, max_depth=3, max_children=3, max_leaves=6)
    return hierarchy, inputs(hierarchy, 1, 3, dtype=dtype)


def test_auto_never_picks_triton():
    hierarchy, (q, k, v) = small_case()
    hsa(q, k, v, hierarchy)
    with engine('tensor'):
        hsa(q, k, v, hierarchy)
    assert not engine_cache(hierarchy).triton_plans


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(triton_sweeps, 'interpreting', lambda: False)
    hierarchy, (q, k, v) = small_case()
    with engine('triton'), pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1.*"
                                                             r"engine\('kernel'\)"):
        hsa(q, k, v, hierarchy)


def test_other_devices_are_refused():
    hierarchy, (q, k, v) = small_case()
    meta = [t.detach().to('meta') for t in (q, k, v)]
    with pytest.raises(RuntimeError, match=r"CUDA tensors \(got meta\).*engine\('tensor'\)"):
        triton_hsa(*meta, None, hierarchy.family_tables(), 0.5)


def test_without_triton_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, 'triton', None)  # `import triton` raises ImportError
    hierarchy, (q, k, v) = small_case()
    with engine('triton'), pytest.raises(RuntimeError, match=r"pip install.*engine\('tensor'\)"):
        hsa(q, k, v, hierarchy)


def test_float64_is_refused():
    hierarchy, (q, k, v) = small_case(torch.float64)
    with engine('triton'), pytest.raises(TypeError, match=r"float32.*engine\('kernel'\)"):
        hsa(q, k, v, hierarchy)


def test_strict_causal_is_refused():
    hierarchy = random_forest(1, 1, causal=True, max_depth=3, max_children=3, max_leaves=6)
    q, k, v = inputs(hierarchy, 1, 3)
    with engine('triton'), pytest.raises(NotImplementedError, match=r"strict.*engine\('auto'\)"):
        hsa(q, k, v, hierarchy, causal='strict')
    with pytest.raises(NotImplementedError, match="strict"):
        triton_hsa(q, k, v, None, hierarchy.family_tables(), 0.5, causal='strict')


def test_double_backward_is_refused():
    hierarchy, (q, k, v) = small_case()
    with engine('triton'):
        out = hsa(q, k, v, hierarchy)
    with pytest.raises(RuntimeError, match="backend='scatter'"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


def test_wide_families_and_heads_are_refused():
    wide = Hierarchy.flat(MAX_CHILDREN + 1)
    q, k, v = inputs(wide, 1, 2)
    with engine('triton'), pytest.raises(NotImplementedError,
                                         match=rf"{MAX_CHILDREN} children.*engine\('tensor'\)"):
        hsa(q, k, v, wide)
    hierarchy = Hierarchy.flat(3)
    q, k, v = inputs(hierarchy, 1, 300)
    with engine('triton'), pytest.raises(NotImplementedError, match=r"engine\('tensor'\)"):
        hsa(q, k, v, hierarchy)


def test_plan_counts_the_leaves_below_every_node():
    hierarchy = random_forest(3, 3, max_depth=4, max_children=4, max_leaves=10)
    plan = build_triton_plan(hierarchy.family_tables(), hierarchy.num_leaves, 'cpu')
    assert torch.equal(plan.count, hierarchy.num_leaves_below.float())
    assert all(block >= 16 and block & (block - 1) == 0 for _, _, block in plan.levels)
    assert plan.widest == int(hierarchy.num_children.max())


# --- on a GPU (benchmarks/gpu_checks.sh): the compiled programs, not the interpreter

@pytest.mark.cuda
@pytest.mark.parametrize('energy,causal', [('dot', False), ('euclidean', True)])
def test_triton_on_cuda_equals_the_dense_definition(energy, causal):
    for seed in range(3):
        hierarchy = random_forest(seed, 3, causal, max_depth=4, max_children=6, max_leaves=12)
        on_gpu = hierarchy.to('cuda')
        q, k, v, bias = inputs(on_gpu, 2, 16, seed=seed, biased=True, device='cuda')
        assert_matches_dense(on_gpu, q, k, v, bias, energy=energy, causal=causal)
