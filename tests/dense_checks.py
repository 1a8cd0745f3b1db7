"""Exactness checks of the sweeps against the dense definition."""
import torch

from hsa_geo.functional import hsa_dense


def assert_equals_dense(out, q, k, v, hierarchy, **terms):
    r""":obj:`out` (HSA of q, k, v) and its gradients for q, k, v and the
    pair bias (if any) equal those of the dense definition in float64."""
    expected = torch.einsum('hij,jhd->ihd', hsa_dense(q, k, hierarchy, **terms), v)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
    bias = terms.get('pair_bias')
    inputs = [q, k, v] + ([bias] if bias is not None else [])
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)
