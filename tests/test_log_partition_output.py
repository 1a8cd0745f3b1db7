"""hsa(..., return_log_partition=True): phi of every node from the sweeps
that compute the output, differentiable through both engines (the fused
backward takes the gradient of phi as an input of its top-down sweep)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hsa_geo.functional import hsa, hsa_log_partition
from hsa_geo.functional.kernel import use_cpu_kernel
from random_trees import random_forest


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), trees=st.integers(1, 3), heads=st.integers(1, 2),
       energy=st.sampled_from(['dot', 'euclidean']), causal=st.booleans(),
       with_bias=st.booleans())
def test_phi_and_its_gradient_equal_the_log_partition(seed, trees, heads, energy, causal,
                                                     with_bias):
    hierarchy = random_forest(seed % 10_000, trees=trees, causal=causal)
    generator = torch.Generator().manual_seed(seed)
    n = hierarchy.num_leaves
    q, k, v = (torch.randn(n, heads, 3, generator=generator, dtype=torch.float64,
                           requires_grad=True) for _ in range(3))
    bias = (torch.randn(hierarchy.num_sibling_pairs, heads, generator=generator,
                        dtype=torch.float64, requires_grad=True) if with_bias else None)
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
            with use_cpu_kernel(kernel):
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
    with use_cpu_kernel(kernel):
        _, phi = hsa(q, q, q, hierarchy, return_log_partition=True)
        grad, = torch.autograd.grad(phi.sum(), q)
    expected, = torch.autograd.grad(hsa_log_partition(q, q, hierarchy).sum(), q)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-10)


def test_strict_causal_has_no_log_partition():
    hierarchy = random_forest(1, trees=1, causal=True)
    q = torch.randn(hierarchy.num_leaves, 4)
    with pytest.raises(ValueError, match="not block-constant"):
        hsa(q, q, q, hierarchy, causal='strict', return_log_partition=True)
