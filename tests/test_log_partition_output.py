"""hsa(..., return_log_partition=True): phi of every node from the sweeps
that compute the output, differentiable through both engines (the fused
backward takes the gradient of phi as an input of its top-down sweep); and
hsa(..., return_log_self_weight=True): the leaves' log a_ii, likewise."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hsa_geo.functional import hsa, hsa_dense, hsa_log_partition
from hsa_geo.functional import engine
from random_trees import random_forest


#: random forests and score terms
CASES = dict(seed=st.integers(0, 2**31 - 1), trees=st.integers(1, 3), heads=st.integers(1, 2),
             energy=st.sampled_from(['dot', 'euclidean']), causal=st.booleans(),
             with_bias=st.booleans())


def random_case(seed, trees, heads, causal, with_bias):
    r"""A random forest, float64 q, k, v ``[N, heads, 3]`` and a pair bias
    (or None) that require grad, and the generator for more."""
    hierarchy = random_forest(seed % 10_000, trees=trees, causal=causal)
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(hierarchy.num_leaves, heads, 3, generator=generator,
                           dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = (torch.randn(hierarchy.num_sibling_pairs, heads, generator=generator,
                        dtype=torch.float64, requires_grad=True) if with_bias else None)
    return hierarchy, generator, q, k, v, bias


@settings(max_examples=40, deadline=None, derandomize=True)
@given(**CASES)
def test_phi_and_its_gradient_equal_the_log_partition(seed, trees, heads, energy, causal,
                                                     with_bias):
    hierarchy, generator, q, k, v, bias = random_case(seed, trees, heads, causal, with_bias)
    terms = dict(pair_bias=bias, energy=energy, causal=causal)
    inputs = [t for t in (q, k, v, bias) if t is not None]
    expected_phi = hsa_log_partition(q, k, hierarchy, **terms)
    expected_out = hsa(q, k, v, hierarchy, backend='scatter', **terms)
    phi_weight = torch.randn(expected_phi.shape, generator=generator, dtype=torch.float64)
    out_weight = torch.randn(expected_out.shape, generator=generator, dtype=torch.float64)
    expected_grads = torch.autograd.grad(
        (expected_phi * phi_weight).sum() + (expected_out * out_weight).sum(), inputs)
    for kernel in (True, False):
        for backend in ('fused', 'scatter'):
            with engine('auto' if kernel else 'tensor'):
                out, phi = hsa(q, k, v, hierarchy, backend=backend, return_log_partition=True,
                               **terms)
                grads = torch.autograd.grad(
                    (phi * phi_weight).sum() + (out * out_weight).sum(), inputs)
            torch.testing.assert_close(out, expected_out, rtol=0, atol=1e-10)
            torch.testing.assert_close(phi, expected_phi, rtol=0, atol=1e-10)
            for grad, expected in zip(grads, expected_grads):
                torch.testing.assert_close(grad, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize('kernel', [True, False])
def test_phi_alone_is_differentiable(kernel):
    # only phi is used: the fused backward gets no output gradient
    hierarchy = random_forest(1, trees=2)
    q = torch.randn(hierarchy.num_leaves, 2, 4, dtype=torch.float64, requires_grad=True)
    with engine('auto' if kernel else 'tensor'):
        _, phi = hsa(q, q, q, hierarchy, return_log_partition=True)
        grad, = torch.autograd.grad(phi.sum(), q)
    expected, = torch.autograd.grad(hsa_log_partition(q, q, hierarchy).sum(), q)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-10)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(**CASES)
def test_log_self_weight_and_its_gradient_equal_the_dense_diagonal(seed, trees, heads, energy,
                                                                   causal, with_bias):
    # log a_ii alone, and with phi: its gradient reaches q, k and the bias
    # on every engine (the fused ones take it into their top-down sweep)
    hierarchy, generator, q, k, v, bias = random_case(seed, trees, heads, causal, with_bias)
    terms = dict(pair_bias=bias, energy=energy, causal=causal)
    inputs = [t for t in (q, k, bias) if t is not None]
    dense = hsa_dense(q, k, hierarchy, **terms)  # [H, N, N]
    expected = dense.diagonal(dim1=-2, dim2=-1).t().log()
    weight = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    expected_grads = torch.autograd.grad((expected * weight).sum(), inputs)
    for kernel in (True, False):
        for backend in ('fused', 'scatter'):
            with engine('auto' if kernel else 'tensor'):
                out, phi, log_self = hsa(q, k, v, hierarchy, backend=backend,
                                         return_log_partition=True,
                                         return_log_self_weight=True, **terms)
                alone = hsa(q, k, v, hierarchy, backend=backend, return_log_self_weight=True,
                            **terms)[1]
                grads = torch.autograd.grad((log_self * weight).sum(), inputs)
                grads_alone = torch.autograd.grad((alone * weight).sum(), inputs)
            torch.testing.assert_close(log_self, expected, rtol=0, atol=1e-10)
            torch.testing.assert_close(alone, expected, rtol=0, atol=1e-10)
            for grad, grad_alone, reference in zip(grads, grads_alone, expected_grads):
                torch.testing.assert_close(grad, reference, rtol=0, atol=1e-9)
                torch.testing.assert_close(grad_alone, reference, rtol=0, atol=1e-9)


def test_log_self_weight_of_one_head_input():
    hierarchy = random_forest(2, trees=2)
    q = torch.randn(hierarchy.num_leaves, 4, dtype=torch.float64)
    out, log_self = hsa(q, q, q, hierarchy, return_log_self_weight=True)
    assert out.shape == q.shape and log_self.shape == (hierarchy.num_leaves, )
    expected = hsa_dense(q, q, hierarchy).diagonal().log()
    torch.testing.assert_close(log_self, expected, rtol=0, atol=1e-10)


def test_strict_causal_has_no_log_partition():
    hierarchy = random_forest(1, trees=1, causal=True)
    q = torch.randn(hierarchy.num_leaves, 4)
    with pytest.raises(ValueError, match="not block-constant"):
        hsa(q, q, q, hierarchy, causal='strict', return_log_partition=True)
    with pytest.raises(ValueError, match="not block-constant"):
        hsa(q, q, q, hierarchy, causal='strict', return_log_self_weight=True)
