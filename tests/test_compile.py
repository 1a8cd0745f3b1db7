"""torch.compile and torch.autocast with HSA."""
import pytest
import torch
from torch._dynamo.utils import counters

from hsa_geo import Hierarchy, HSAConv
from hsa_geo.functional import compiled, hsa
from hsa_geo.functional.attention import _padded_bias
from hsa_geo.functional.kernel import load as load_cpu_kernel
from hsa_geo.functional.kernel import use_cpu_kernel
from random_trees import random_hierarchy


class TwoLayers(torch.nn.Module):
    def __init__(self, energy='dot'):
        super().__init__()
        self.first = HSAConv(8, 4, heads=2, energy=energy)
        self.second = HSAConv(8, 4, heads=2, energy=energy)

    def forward(self, x, hierarchy):
        return self.second(self.first(x, hierarchy).relu(), hierarchy)


def batches():
    r"""Three forests of different sizes and shapes."""
    return [Hierarchy.batch_hierarchies([random_hierarchy(seed + j, max_depth=depth)
                                         for j in range(trees)])
            for seed, trees, depth in ((1, 3, 8), (20, 5, 3), (40, 2, 6))]


@pytest.mark.parametrize('energy,backend,cpu_kernel', [
    ('dot', 'aot_eager', True), ('euclidean', 'aot_eager', True), ('dot', 'inductor', True),
    ('dot', 'inductor', False)])  # False: the tensor sweeps, the GPU engine
def test_compiled_model_does_not_recompile_across_batches(energy, backend, cpu_kernel):
    with use_cpu_kernel(cpu_kernel):
        compile_three_batches(energy, backend)


def compile_three_batches(energy, backend, device='cpu', tolerance=1e-5):
    r"""A compiled two-layer HSA model equals the eager one, values and
    gradients, on three batches of different sizes and shapes on
    :obj:`device`, and compiles one graph for all three."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = TwoLayers(energy).to(device)
    compiled_model = torch.compile(model, backend=backend, dynamic=True)
    graphs = []
    for hierarchy in batches():
        hierarchy = hierarchy.to(device)
        x = torch.randn(hierarchy.num_leaves, 8, device=device, requires_grad=True)
        out = compiled_model(x, hierarchy)
        grad, = torch.autograd.grad(out.square().sum(), x)
        graphs.append(counters['stats']['unique_graphs'])
        expected = model(x, hierarchy)
        expected_grad, = torch.autograd.grad(expected.square().sum(), x)
        torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(grad, expected_grad, atol=tolerance, rtol=tolerance)
    assert graphs[0] > 0
    assert graphs[1] == graphs[0] == graphs[2], graphs


def test_automatic_dynamic_shapes_recompile_once():
    torch._dynamo.reset()
    counters.clear()
    model = torch.compile(TwoLayers(), backend='aot_eager')
    graphs = []
    for hierarchy in batches():
        model(torch.randn(hierarchy.num_leaves, 8), hierarchy).sum()
        graphs.append(counters['stats']['unique_graphs'])
    assert graphs[2] == graphs[1]  # sizes became dynamic after the first change


@pytest.mark.parametrize('cpu_kernel', [False, pytest.param(True, marks=pytest.mark.skipif(
    not load_cpu_kernel(), reason="the CPU kernel could not be built"))])
def test_the_operator_rebuilds_a_hierarchy_it_no_longer_holds(cpu_kernel):
    hierarchy = batches()[0]
    q, k, v = (torch.randn(hierarchy.num_leaves, 2, 3, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    key = compiled.hierarchy_key(hierarchy)
    compiled._REGISTRY.clear()
    out = compiled.fused_hsa(q, k, v, None, key, 0.5, False, False, cpu_kernel)
    torch.testing.assert_close(out, hsa(q, k, v, hierarchy, scale=0.5), atol=1e-12, rtol=0)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected = torch.autograd.grad(hsa(q, k, v, hierarchy, scale=0.5).sum(), (q, k, v))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize('cpu_kernel', [False, pytest.param(True, marks=pytest.mark.skipif(
    not load_cpu_kernel(), reason="the CPU kernel could not be built"))])
def test_operator_registrations_pass_opcheck(cpu_kernel):
    hierarchy = random_hierarchy(3)
    q, k, v = (torch.randn(hierarchy.num_leaves, 2, 3, requires_grad=True) for _ in range(3))
    key = compiled.hierarchy_key(hierarchy)
    torch.library.opcheck(compiled.fused_hsa, (q, k, v, None, key, 0.5, False, False, cpu_kernel),
                          test_utils=('test_schema', 'test_faketensor',
                                      'test_autograd_registration'))


@pytest.mark.parametrize('cpu_kernel', [False, pytest.param(True, marks=pytest.mark.skipif(
    not load_cpu_kernel(), reason="the CPU kernel could not be built"))])
@pytest.mark.parametrize('biased', [False, True])
def test_backward_operator_on_strided_inputs_passes_opcheck(cpu_kernel, biased):
    # HSAConv's q, k, v are views of one projection; the fake backward once
    # copied their strides where the real one returns contiguous gradients,
    # and inductor (torch.compile's default) refused the graph
    hierarchy = random_hierarchy(3)
    q, k, v = (torch.randn(2, hierarchy.num_leaves, 3).transpose(0, 1).requires_grad_()
               for _ in range(3))
    bias = None
    if biased:
        pair_bias = torch.randn(hierarchy.num_sibling_pairs, 2)
        bias = (pair_bias.t().contiguous() if cpu_kernel
                else _padded_bias(pair_bias, hierarchy, q).detach())
    key = compiled.hierarchy_key(hierarchy)
    grad = torch.randn(hierarchy.num_leaves, 2, 3)
    torch.library.opcheck(compiled.fused_hsa_backward,
                          (grad, q, k, v, bias, key, 0.5, False, False, cpu_kernel, biased),
                          test_utils=('test_schema', 'test_faketensor'))


@pytest.mark.parametrize('backend', ['fused', 'scatter'])
@pytest.mark.parametrize('terms', [{}, {'energy': 'euclidean'}, {'biased': True}])
def test_autocast_bfloat16_forward_backward(backend, terms):
    torch.manual_seed(0)
    hierarchy = Hierarchy.batch_hierarchies([random_hierarchy(seed) for seed in range(4)])
    conv = HSAConv(16, 8, heads=4, energy=terms.get('energy', 'dot'))
    x = torch.randn(hierarchy.num_leaves, 16, requires_grad=True)
    bias = None
    if terms.get('biased'):
        bias = 0.5 * torch.randn(hierarchy.num_sibling_pairs, 4)

    def run():
        query = conv.lin_query(x).view(-1, 4, 8)
        key = conv.lin_key(x).view(-1, 4, 8)
        value = conv.lin_value(x).view(-1, 4, 8)
        return hsa(query, key, value, hierarchy, backend=backend, pair_bias=bias,
                   energy=conv.energy)

    reference = run()
    reference_grad, = torch.autograd.grad(reference.sum(), x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = run()
    assert out.dtype == torch.bfloat16  # the projections' dtype, computed in float32
    grad, = torch.autograd.grad(out.float().sum(), x)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    # bfloat16 keeps 8 bits: inputs and output rounded, relative error ~2^-8
    scale = reference.detach().abs().max()
    assert float((out.float() - reference).abs().max()) < 0.05 * scale
    assert float((grad - reference_grad).abs().max()) < 0.05 * reference_grad.abs().max()
