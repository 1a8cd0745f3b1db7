"""HSA on a CUDA device (skipped without one; CI has none): the tensor sweeps
on the GPU slot layout and the scatter backend against the dense definition
computed on the CPU, float32 against the CPU, autocast in float16 and
bfloat16, torch.compile without recompiling, and a loader's planned forest
moved to the device."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hsa_geo import Hierarchy, HSAConv
from hsa_geo.functional import hsa, hsa_dense
from random_trees import random_forest, random_hierarchy
from test_compile import compile_three_batches

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]


def on_cuda(*tensors):
    return [t.detach().cuda().requires_grad_(t.requires_grad) for t in tensors]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), trees=st.integers(1, 4), max_depth=st.integers(1, 6),
       max_children=st.integers(1, 9), value_dim=st.sampled_from([None, 5]),
       energy=st.sampled_from(['dot', 'euclidean']), causal=st.booleans(),
       biased=st.booleans(), backend=st.sampled_from(['fused', 'scatter']))
def test_cuda_equals_the_dense_definition(seed, trees, max_depth, max_children, value_dim,
                                          energy, causal, biased, backend):
    hierarchy = random_forest(seed % 10_000, trees, causal, max_depth=max_depth,
                       max_children=max_children, max_leaves=16)
    generator = torch.Generator().manual_seed(seed % 997)
    shapes = [(3, ), (3, ), (value_dim or 3, )]
    inputs = [1.5 * torch.randn(hierarchy.num_leaves, 2, *shape, generator=generator,
                                dtype=torch.float64).requires_grad_() for shape in shapes]
    terms = dict(energy=energy, causal=causal)
    if biased:
        inputs.append(torch.randn(hierarchy.num_sibling_pairs, 2, generator=generator,
                                  dtype=torch.float64, requires_grad=True))
    q, k, v = inputs[:3]
    expected = torch.einsum('hij,jhd->ihd', hsa_dense(q, k, hierarchy, energy=energy,
                                                      causal=causal,
                                                      pair_bias=inputs[3] if biased else None), v)
    device_inputs = on_cuda(*inputs)
    bias = device_inputs[3] if biased else None
    out = hsa(*device_inputs[:3], hierarchy.to('cuda'), backend=backend, pair_bias=bias, **terms)
    assert out.device.type == 'cuda'
    torch.testing.assert_close(out.cpu(), expected, atol=1e-10, rtol=0)
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(out, device_inputs, grad.cuda())
    want = torch.autograd.grad(expected, inputs, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, atol=1e-9, rtol=0)


@pytest.mark.parametrize('causal', [False, True, 'strict'])
def test_float32_on_a_large_batch_matches_the_cpu(causal):
    hierarchy = random_forest(5, 64, causal=bool(causal), max_depth=5, max_children=12, max_leaves=60)
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(hierarchy.num_leaves, 4, 16, generator=generator, requires_grad=True)
               for _ in range(3))
    expected = hsa(q, k, v, hierarchy, causal=causal)
    grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    device_inputs = on_cuda(q, k, v)
    out = hsa(*device_inputs, hierarchy.to('cuda'), causal=causal)
    device_grads = torch.autograd.grad(out.square().sum(), device_inputs)
    torch.testing.assert_close(out.cpu(), expected, atol=2e-5, rtol=1e-4)
    for a, b in zip(device_grads, grads):
        torch.testing.assert_close(a.cpu(), b, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('backend', ['fused', 'scatter'])
@pytest.mark.parametrize('energy', ['dot', 'euclidean'])
def test_autocast_forward_backward(dtype, backend, energy):
    torch.manual_seed(0)
    hierarchy = Hierarchy.batch_hierarchies([random_hierarchy(seed)
                                             for seed in range(8)]).to('cuda')
    conv = HSAConv(16, 8, heads=4, energy=energy).cuda()
    x = torch.randn(hierarchy.num_leaves, 16, device='cuda', requires_grad=True)

    def run():
        return conv(x, hierarchy) if backend == 'fused' else hsa(
            conv.lin_query(x).view(-1, 4, 8), conv.lin_key(x).view(-1, 4, 8),
            conv.lin_value(x).view(-1, 4, 8), hierarchy, backend='scatter', energy=energy)

    reference = run()
    reference_grad, = torch.autograd.grad(reference.sum(), x)
    with torch.autocast('cuda', dtype=dtype):
        out = run()
    grad, = torch.autograd.grad(out.float().sum(), x)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    tolerance = 0.05 if dtype == torch.bfloat16 else 0.01
    assert float((out.float() - reference).abs().max()) < tolerance * reference.abs().max()
    assert float((grad - reference_grad).abs().max()) < tolerance * reference_grad.abs().max()


@pytest.mark.parametrize('backend', ['aot_eager', 'inductor'])
def test_compiled_model_does_not_recompile_across_batches(backend):
    compile_three_batches('dot', backend, device='cuda', tolerance=1e-4)


def test_a_loader_planned_forest_runs_on_the_device():
    from torch_geometric.datasets import KarateClub

    from hsa_geo.data import hierarchy_from_data
    from hsa_geo.loader import HierarchyLoader
    from hsa_geo.transforms import AddHierarchy
    graphs = [AddHierarchy('louvain', max_children=8)(KarateClub()[0])] * 4
    batch = next(iter(HierarchyLoader(graphs, batch_size=4, layout_device='cuda'))).to('cuda')
    hierarchy = hierarchy_from_data(batch)
    assert hierarchy.parent.device.type == 'cuda'
    conv = HSAConv(batch.num_node_features, 8, heads=2).cuda()
    out = conv(batch.x, hierarchy)
    out.sum().backward()
    expected = conv.cpu()(batch.x.cpu(), hierarchy_from_data(batch.cpu()))
    torch.testing.assert_close(out.detach().cpu(), expected.detach(), atol=1e-5, rtol=1e-4)
