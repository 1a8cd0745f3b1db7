"""torch.compile and torch.autocast with HSA."""
import pytest
import torch
from torch._dynamo.utils import counters

from hsa_geo import Hierarchy, HSAConv
from hsa_geo.functional import compiled, engine, hsa
from hsa_geo.functional.kernel import load as load_cpu_kernel
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
    with engine('auto' if cpu_kernel else 'tensor'):
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


ENGINES = [False, pytest.param(True, marks=pytest.mark.skipif(
    not load_cpu_kernel(), reason="the CPU kernel could not be built"))]


@pytest.mark.parametrize('energy', ['dot', 'euclidean'])
@pytest.mark.parametrize('cpu_kernel', [True, False])
def test_fullgraph_dynamic_compile_matches_eager(cpu_kernel, energy):
    # fullgraph=True: no graph break anywhere in two HSA layers (the kernel's
    # loader, the engine choice and the hierarchy stay out of the graph)
    with engine('auto' if cpu_kernel else 'tensor'):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = TwoLayers(energy)
        compiled_model = torch.compile(model, backend='aot_eager', dynamic=True, fullgraph=True)
        for hierarchy in batches():
            x = torch.randn(hierarchy.num_leaves, 8, requires_grad=True)
            out = compiled_model(x, hierarchy)
            grad, = torch.autograd.grad(out.square().sum(), x)
            expected = model(x, hierarchy)
            expected_grad, = torch.autograd.grad(expected.square().sum(), x)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)
        assert counters['stats']['unique_graphs'] == 1


@pytest.mark.parametrize('cpu_kernel', [True, False])
def test_compiled_pair_bias_gradient_matches_eager(cpu_kernel):
    hierarchy = batches()[1]
    torch.manual_seed(0)
    q, k, v = (torch.randn(hierarchy.num_leaves, 2, 4, requires_grad=True) for _ in range(3))
    bias = torch.randn(hierarchy.num_sibling_pairs, 2, requires_grad=True)
    with engine('auto' if cpu_kernel else 'tensor'):
        torch._dynamo.reset()
        attend = torch.compile(lambda *a: hsa(*a[:4], pair_bias=a[4]), backend='aot_eager',
                               fullgraph=True)
        out = attend(q, k, v, hierarchy, bias)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v, bias))
        expected = hsa(q, k, v, hierarchy, pair_bias=bias)
        expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v, bias))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compiled_hsa_checks_the_hierarchy_inside_the_operator():
    hierarchy = batches()[0]
    q = torch.randn(hierarchy.num_leaves + 1, 2, 4)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match='one row per leaf'):
        torch.compile(hsa, backend='aot_eager', fullgraph=True)(q, q, q, hierarchy)


@pytest.mark.parametrize('cpu_kernel', ENGINES)
def test_the_operator_rebuilds_a_hierarchy_it_no_longer_holds(cpu_kernel):
    hierarchy = batches()[0]
    q, k, v = (torch.randn(hierarchy.num_leaves, 2, 3, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    parent = hierarchy.parent.clone()  # held by no hierarchy
    assert Hierarchy.of_parent(parent) is None
    assert Hierarchy.of_parent(hierarchy.parent) is hierarchy
    out = compiled.fused_hsa(q, k, v, None, parent, 0.5, False, False, cpu_kernel)
    torch.testing.assert_close(out, hsa(q, k, v, hierarchy, scale=0.5), atol=1e-12, rtol=0)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected = torch.autograd.grad(hsa(q, k, v, hierarchy, scale=0.5).sum(), (q, k, v))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize('cpu_kernel', ENGINES)
@pytest.mark.parametrize('biased', [False, True])
def test_operator_registrations_pass_opcheck(cpu_kernel, biased):
    hierarchy = random_hierarchy(3)
    q, k, v = (torch.randn(hierarchy.num_leaves, 2, 3, requires_grad=True) for _ in range(3))
    bias = torch.randn(hierarchy.num_sibling_pairs, 2, requires_grad=True) if biased else None
    torch.library.opcheck(compiled.fused_hsa_with_state,
                          (q, k, v, bias, hierarchy.parent, 0.5, False, False, cpu_kernel),
                          test_utils=('test_schema', 'test_faketensor',
                                      'test_autograd_registration'))


@pytest.mark.parametrize('cpu_kernel', ENGINES)
@pytest.mark.parametrize('biased', [False, True])
def test_backward_operator_on_strided_inputs_passes_opcheck(cpu_kernel, biased):
    # HSAConv's q, k, v are views of one projection; the fake backward once
    # copied their strides where the real one returns contiguous gradients,
    # and inductor (torch.compile's default) refused the graph
    hierarchy = random_hierarchy(3)
    q, k, v = (torch.randn(2, hierarchy.num_leaves, 3).transpose(0, 1).requires_grad_()
               for _ in range(3))
    bias = torch.randn(hierarchy.num_sibling_pairs, 2) if biased else None
    _, *state = compiled.fused_hsa_with_state(q, k, v, bias, hierarchy.parent, 0.5, False,
                                              False, cpu_kernel)
    grad = torch.randn(hierarchy.num_leaves, 2, 3)
    torch.library.opcheck(compiled.fused_hsa_backward,
                          (grad, q, k, v, bias, hierarchy.parent, *state, 0.5, False, False,
                           cpu_kernel, biased),
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
