"""The CPU kernel of the fused sweeps (hsa_geo/csrc/hsa_sweeps.cpp): exact
against the dense definition and equal to the tensor sweeps, over forests of
mixed depth and branching, every score term, float32 and float64, head
widths the kernel specialises and others, and several threads."""
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hsa_geo.functional.kernel as kernel
from hsa_geo import native
from hsa_geo import Hierarchy
from hsa_geo.functional import engine, hsa, hsa_dense
from hsa_geo.hierarchy.plan import build_family_tables
from dense_checks import assert_equals_dense
from random_trees import random_forest, random_hierarchy

pytestmark = pytest.mark.skipif(not kernel.load(), reason="the CPU kernel could not be built")


def run(q, k, v, hierarchy, cpu_kernel, **terms):
    with engine('auto' if cpu_kernel else 'tensor'):
        return hsa(q, k, v, hierarchy, **terms)


def assert_kernel_equals_dense(hierarchy, seed, dim, value_dim, energy, causal, biased,
                               spread=1.0):
    r"""Random float64 q, k, v (2 heads; :obj:`spread` their scale) and
    optionally a pair bias: the kernel's output and gradients equal the
    dense definition's."""
    generator = torch.Generator().manual_seed(seed % 997)
    shapes = [(dim, ), (dim, ), (value_dim or dim, )]
    q, k, v = (spread * torch.randn(hierarchy.num_leaves, 2, *shape, generator=generator,
                                    dtype=torch.float64).requires_grad_() for shape in shapes)
    terms = dict(energy=energy, causal=causal)
    if biased:
        terms['pair_bias'] = torch.randn(hierarchy.num_sibling_pairs, 2, generator=generator,
                                         dtype=torch.float64, requires_grad=True)
    out = run(q, k, v, hierarchy, True, **terms)
    assert_equals_dense(out, q, k, v, hierarchy, **terms)


@settings(max_examples=120, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), trees=st.integers(1, 4), max_depth=st.integers(1, 6),
       max_children=st.integers(1, 9), dim=st.sampled_from([3, 8, 16]),
       value_dim=st.sampled_from([None, 5]), energy=st.sampled_from(['dot', 'euclidean']),
       causal=st.booleans(), biased=st.booleans())
def test_kernel_equals_the_dense_definition(seed, trees, max_depth, max_children, dim, value_dim,
                                            energy, causal, biased):
    hierarchy = random_forest(seed % 10_000, trees, causal, max_depth=max_depth,
                              max_children=max_children, max_leaves=16)
    assert_kernel_equals_dense(hierarchy, seed, dim, value_dim, energy, causal, biased,
                               spread=1.5)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), max_children=st.integers(8, 24),
       dim=st.sampled_from([3, 16]), value_dim=st.sampled_from([None, 5]),
       energy=st.sampled_from(['dot', 'euclidean']), causal=st.booleans(),
       biased=st.booleans())
def test_wide_families_equal_the_dense_definition(seed, max_children, dim, value_dim, energy,
                                                  causal, biased):
    # families of up to 24 children (documents' sentences and paragraphs),
    # wider than the test above draws
    hierarchy = wide_forest(seed % 10_000, max_children, causal)
    assert_kernel_equals_dense(hierarchy, seed, dim, value_dim, energy, causal, biased)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), trees=st.integers(1, 4), max_depth=st.integers(1, 5),
       max_children=st.integers(1, 20), dim=st.sampled_from([8, 16, 32]),
       energy=st.sampled_from(['dot', 'euclidean']), causal=st.booleans(),
       biased=st.booleans(), spread=st.sampled_from([1.0, 3.0]))
def test_float32_kernel_is_within_rounding_of_the_dense_definition(
        seed, trees, max_depth, max_children, dim, energy, causal, biased, spread):
    # the float32 kernel's own code: rows of 8-32 features as vectors (64 in
    # the test below) and a polynomial exp; spread 3 gives scores far apart (weights that
    # underflow to 0), causal gives -inf. Within a float32 tolerance of the
    # float64 dense definition: 1e-5 of the largest output and gradient,
    # no worse than the float32 tensor sweeps by more than a factor 2.
    hierarchy = random_forest(seed % 10_000, trees, causal, max_depth=max_depth,
                              max_children=max_children, max_leaves=40, leaf_probability=0.5)
    generator = torch.Generator().manual_seed(seed % 997)
    inputs64 = [spread * torch.randn(hierarchy.num_leaves, 2, dim, generator=generator,
                                     dtype=torch.float64) for _ in range(3)]
    if biased:
        inputs64.append(torch.randn(hierarchy.num_sibling_pairs, 2, generator=generator,
                                    dtype=torch.float64))
    upstream = torch.randn(hierarchy.num_leaves, 2, dim, generator=generator,
                           dtype=torch.float64)

    def outputs(function, dtype):
        q, k, v, *bias = (t.to(dtype).requires_grad_() for t in inputs64)
        terms = dict(energy=energy, causal=causal, pair_bias=bias[0] if bias else None)
        out = function(q, k, v, **terms)
        grads = torch.autograd.grad(out, [q, k, v, *bias], upstream.to(dtype))
        return [t.detach().double() for t in (out, *grads)]

    def dense(q, k, v, **terms):
        return torch.einsum('hij,jhd->ihd', hsa_dense(q, k, hierarchy, **terms), v)

    want = outputs(dense, torch.float64)
    got = outputs(lambda *a, **t: run(*a, hierarchy, True, **t), torch.float32)
    other = outputs(lambda *a, **t: run(*a, hierarchy, False, **t), torch.float32)
    for name, w, g, o in zip(['out', 'q', 'k', 'v', 'bias'], want, got, other):
        assert torch.isfinite(g).all(), name
        error = float((g - w).abs().max())
        assert error <= max(1e-5 * float(w.abs().max()), 2 * float((o - w).abs().max())), \
            (name, error)


def wide_forest(seed: int, max_children: int, causal: bool = False) -> Hierarchy:
    r"""Two shallow random trees of up to 40 leaves whose clusters have up to
    :obj:`max_children` children."""
    return random_forest(seed, 2, causal, max_depth=3, max_children=max_children,
                         max_leaves=40, leaf_probability=0.6)


def test_wide_families_occur_in_the_wide_family_test():
    # with 12 children allowed, every forest drawn has a family of 8 or more
    widths = []
    for seed in range(12):
        parent = wide_forest(seed, 12).parent
        widths.append(int(torch.bincount(parent[parent >= 0]).max()))
    assert min(widths) >= 8, widths


@pytest.mark.parametrize('dim', [4, 16, 64])
@pytest.mark.parametrize('energy', ['dot', 'euclidean'])
def test_kernel_in_float32_is_as_accurate_as_the_tensor_sweeps(dim, energy):
    hierarchy = Hierarchy.batch_hierarchies([random_hierarchy(seed, max_leaves=60)
                                             for seed in range(6)])
    generator = torch.Generator().manual_seed(dim)
    inputs64 = [torch.randn(hierarchy.num_leaves, 4, dim, generator=generator,
                            dtype=torch.float64) for _ in range(3)]
    inputs64.append(torch.randn(hierarchy.num_sibling_pairs, 4, generator=generator,
                                dtype=torch.float64))

    def outputs(cpu_kernel, dtype):
        q, k, v, bias = (t.to(dtype).requires_grad_() for t in inputs64)
        out = run(q, k, v, hierarchy, cpu_kernel, energy=energy, pair_bias=bias)
        return [out, *torch.autograd.grad(out.square().sum(), (q, k, v, bias))]

    reference = outputs(True, torch.float64)
    kernel32, sweeps32 = outputs(True, torch.float32), outputs(False, torch.float32)
    for want, got, other in zip(reference, kernel32, sweeps32):
        error = float((got.detach().double() - want).abs().max())
        assert error <= max(1e-5 * float(want.abs().max()),
                            2 * float((other.detach().double() - want).abs().max())), error


def test_buffers_above_the_huge_page_threshold_give_the_same_result():
    # outputs, weights and the backward's buffers of at least 4 MiB are
    # advised onto transparent huge pages before their first write; here
    # every one of them crosses that size (out and the gradients 4.5 MiB,
    # the pair weights and bias gradient 4.5 MiB) and must equal the tensor
    # sweeps
    hierarchy = Hierarchy.batch_hierarchies([random_hierarchy(seed, max_leaves=300)
                                             for seed in range(150)])
    heads = max(4, -(-(9 << 19) // (hierarchy.num_sibling_pairs * 8)))
    generator = torch.Generator().manual_seed(0)
    dim = max(8, -(-(9 << 19) // (hierarchy.num_leaves * heads * 8)))
    inputs = [torch.randn(hierarchy.num_leaves, heads, dim, generator=generator,
                          dtype=torch.float64) for _ in range(3)]
    inputs.append(torch.randn(hierarchy.num_sibling_pairs, heads, generator=generator,
                              dtype=torch.float64))
    for tensor in inputs:
        assert tensor.numel() * tensor.element_size() >= 4 << 20

    def outputs(cpu_kernel):
        q, k, v, bias = (t.clone().requires_grad_() for t in inputs)
        out = run(q, k, v, hierarchy, cpu_kernel, energy='euclidean', pair_bias=bias)
        return [out, *torch.autograd.grad(out.square().sum(), (q, k, v, bias))]

    for got, want in zip(outputs(True), outputs(False)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_threads_give_the_same_result():
    # families of one level run in parallel; each writes only its own rows
    hierarchy = Hierarchy.batch_hierarchies([random_hierarchy(seed) for seed in range(40)])
    q, k, v = (torch.randn(hierarchy.num_leaves, 2, 8, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            out = run(q, k, v, hierarchy, True)
            results.append([out, *torch.autograd.grad(out.sum(), (q, k, v))])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_family_tables_follow_the_sibling_pair_order():
    hierarchy = random_forest(5, 3, max_depth=5, max_children=6, max_leaves=20)
    tables = build_family_tables(hierarchy.parent, hierarchy.depth, hierarchy.first_leaf)
    pairs = []
    for family in range(tables.family_node.numel()):
        children = tables.children[tables.child_ptr[family]:tables.child_ptr[family + 1]]
        assert bool((hierarchy.parent[children] == tables.family_node[family]).all())
        assert int(tables.pair_ptr[family + 1] - tables.pair_ptr[family]) == children.numel() ** 2
        pairs.append(torch.stack([children.repeat_interleave(children.numel()),
                                  children.repeat(children.numel())]))
    assert torch.equal(torch.cat(pairs, dim=1), hierarchy.sibling_pairs())
    # levels: parents' depths never increase from one level to the next
    depths = hierarchy.depth[tables.family_node]
    for level in range(tables.level_ptr.numel() - 1):
        part = depths[tables.level_ptr[level]:tables.level_ptr[level + 1]]
        assert bool((part == part[0]).all())
        if level > 0:
            assert int(part[0]) < int(depths[tables.level_ptr[level] - 1])


def test_isolated_leaves_and_single_child_chains():
    # a lone leaf (its own tree), a chain root -> cluster -> cluster -> leaf,
    # and a normal tree, in one forest
    parts = [Hierarchy.flat(1), Hierarchy.from_parent(torch.tensor([1, 2, 3, -1]), 1),
             random_hierarchy(3)]
    hierarchy = Hierarchy.batch_hierarchies(parts)
    q, k, v = (torch.randn(hierarchy.num_leaves, 2, 3, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    out = run(q, k, v, hierarchy, True)
    expected = run(q, k, v, hierarchy, False)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(out[:2], v[:2], atol=1e-12, rtol=0)  # they attend to themselves
    got = torch.autograd.grad(out.sum(), (q, k, v))
    want = torch.autograd.grad(expected.sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.skipif(not native.ENABLED_BY_ENVIRONMENT,
                    reason="HSA_GEO_CPU_KERNEL=0: nothing tries to build the compiled code")
def test_without_a_compiler_hsa_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(native, '_LOADED', None)
    monkeypatch.setattr(native, 'SOURCES', ['/nonexistent/hsa_sweeps.cpp'])
    with pytest.warns(RuntimeWarning, match="could not be built"):
        hierarchy = random_hierarchy(1)  # the tree analysis is compiled code too
        q, k, v = (torch.randn(hierarchy.num_leaves, 2, 3, dtype=torch.float64)
                   for _ in range(3))
        out = hsa(q, k, v, hierarchy)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # warned once
        hsa(q, k, v, random_hierarchy(1))
    monkeypatch.setattr(native, '_LOADED', True)
    torch.testing.assert_close(out, hsa(q, k, v, hierarchy), atol=1e-12, rtol=0)


def test_double_backward_is_refused_with_a_pointer_to_the_scatter_backend():
    hierarchy = random_hierarchy(2)
    q, k, v = (torch.randn(hierarchy.num_leaves, 2, 3, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    out = run(q, k, v, hierarchy, True)
    with pytest.raises(RuntimeError, match="backend='scatter'"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


def test_engine_context_picks_the_engine_and_restores_it():
    from hsa_geo.functional import ENGINES, engine, kernel_runs
    from hsa_geo.functional.engines import current_engine
    assert current_engine() == 'auto' and kernel_runs('cpu')
    with engine('tensor'):
        assert not kernel_runs('cpu')
        with engine('kernel'):
            assert kernel_runs('cpu')
        assert current_engine() == 'tensor'
    assert current_engine() == 'auto'
    with pytest.raises(ValueError, match='Unknown HSA engine'):
        with engine('gpu'):
            pass
    assert set(ENGINES) == {'auto', 'kernel', 'tensor', 'triton'}


def test_engine_context_is_per_thread():
    import threading
    from hsa_geo.functional import engine, kernel_runs
    seen = []
    with engine('tensor'):
        thread = threading.Thread(target=lambda: seen.append(kernel_runs('cpu')))
        thread.start()
        thread.join()
    assert seen == [True]  # another thread keeps the default


def test_use_cpu_kernel_is_a_deprecated_alias():
    from hsa_geo.functional import kernel_runs
    with pytest.warns(DeprecationWarning, match='engine'):
        with kernel.use_cpu_kernel(False):
            assert not kernel_runs('cpu')
