import pytest
import torch
import torch_geometric.typing

from hsa_geo import Hierarchy
from hsa_geo.functional import hsa
from random_trees import random_hierarchy

SCATTER_MODES = [False] + ([True] if torch_geometric.typing.WITH_TORCH_SCATTER else [])


def random_inputs(hierarchy, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(hierarchy.num_leaves, 2, 3, generator=generator, dtype=torch.float64,
                        requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize('with_torch_scatter', SCATTER_MODES)
@pytest.mark.parametrize('seed', range(15))
def test_scatter_backend_equals_fused(seed, with_torch_scatter, monkeypatch):
    # torch_geometric.utils.scatter sends 'max' to torch_scatter when it is
    # installed and to torch.scatter_reduce otherwise: both must agree.
    monkeypatch.setattr(torch_geometric.typing, 'WITH_TORCH_SCATTER', with_torch_scatter)
    hierarchy = Hierarchy.batch_hierarchies([random_hierarchy(seed), random_hierarchy(seed + 100),
                                             Hierarchy.flat(1)])
    q, k, v = random_inputs(hierarchy, seed)
    grad_out = torch.randn(hierarchy.num_leaves, 2, 3, dtype=torch.float64)
    results = []
    for backend in ('fused', 'scatter'):
        out = hsa(q, k, v, hierarchy, backend=backend)
        results.append([out] + list(torch.autograd.grad(out, (q, k, v), grad_out)))
    for fused, scattered in zip(*results):
        torch.testing.assert_close(scattered, fused, atol=1e-10, rtol=0)


def test_scatter_backend_supports_double_backward():
    hierarchy = random_hierarchy(3, max_leaves=8, max_children=3)
    q, k, v = random_inputs(hierarchy, 0)
    assert torch.autograd.gradgradcheck(
        lambda a, b, c: hsa(a, b, c, hierarchy, backend='scatter'), (q, k, v))


def test_fused_backend_refuses_double_backward_clearly():
    hierarchy = random_hierarchy(3, max_leaves=8)
    q, k, v = random_inputs(hierarchy, 0)
    with pytest.raises(RuntimeError, match="use backend='scatter'"):
        torch.autograd.grad(hsa(q, k, v, hierarchy).sum(), q, create_graph=True)


def test_unknown_backend():
    hierarchy = Hierarchy.flat(3)
    q = torch.randn(3, 2)
    with pytest.raises(ValueError, match="Unknown backend 'dense'"):
        hsa(q, q, q, hierarchy, backend='dense')


def test_fused_backward_same_with_and_without_retained_graph():
    # Without retain_graph the backward frees the forward state block by
    # block; with it, the state must survive for a second pass.
    hierarchy = Hierarchy.batch_hierarchies([random_hierarchy(5), random_hierarchy(6)])
    q, k, v = random_inputs(hierarchy, 1)
    out = hsa(q, k, v, hierarchy)
    kept = torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
    again = torch.autograd.grad(out.sum(), (q, k, v))
    fresh = torch.autograd.grad(hsa(q, k, v, hierarchy).sum(), (q, k, v))
    for a, b, c in zip(kept, again, fresh):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, c, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match='second time|freed'):
        torch.autograd.grad(out.sum(), (q, k, v))
