"""hsa_geo.compiler: inductor options for training on the CPU."""
import pytest
import torch
import torch.nn.functional as F
from functorch.compile import aot_function, min_cut_rematerialization_partition

from torch._inductor.decomposition import select_decomp_table

from hsa_geo import HSAConv
from hsa_geo.compiler import RecomputeBooleanMasks, cpu_training_options
from random_trees import random_hierarchy


def partitioned(function, partition, *inputs, decomposed=True):
    r"""Runs :obj:`function` through AOTAutograd with :obj:`partition`
    and inductor's decompositions (or none, :obj:`decomposed` false, so
    that dropout stays one operator whose mask is an output): the dtypes of the tensors its
    forward graph saves for the backward graph, the random operators of
    the backward graph, the output and the inputs' gradients."""
    saved, drawn_in_backward = [], []

    def forward_compiler(graph_module, _):
        outputs = next(n for n in graph_module.graph.nodes if n.op == 'output').args[0]
        saved.extend(o.meta['val'].dtype for o in outputs[1:]
                     if isinstance(o.meta.get('val'), torch.Tensor))
        return graph_module

    def backward_compiler(graph_module, _):
        drawn_in_backward.extend(n for n in graph_module.graph.nodes if n.op == 'call_function'
                                 and torch.Tag.nondeterministic_seeded
                                 in getattr(n.target, 'tags', ()))
        return graph_module

    compiled = aot_function(function, fw_compiler=forward_compiler,
                            bw_compiler=backward_compiler, partition_fn=partition,
                            decompositions=select_decomp_table() if decomposed else {})
    torch.manual_seed(0)
    out = compiled(*inputs)
    gradients = torch.autograd.grad(out.square().sum(), inputs)
    return saved, drawn_in_backward, out, gradients


def two_relus(x):
    return (x.relu() * 2 - 1).relu()


def test_relu_masks_are_recomputed_not_saved():
    x = torch.randn(40, 8, requires_grad=True)
    default, _, out, grad = partitioned(two_relus, min_cut_rematerialization_partition, x)
    assert torch.bool in default  # what the default partitioner saves
    ours, _, our_out, our_grad = partitioned(two_relus, RecomputeBooleanMasks(), x)
    assert torch.bool not in ours
    expected = two_relus(x)
    torch.testing.assert_close(our_out, expected)
    torch.testing.assert_close(our_grad, torch.autograd.grad(expected.square().sum(), x))
    torch.testing.assert_close(our_grad, grad)


@pytest.mark.parametrize('decomposed', [True, False])
def test_dropout_is_never_drawn_again_and_gradients_match_the_default_partition(decomposed):
    # decomposed: dropout is a draw and a comparison; not: native_dropout,
    # whose boolean mask is the draw's own output and must stay saved
    def dropout_relu(x):
        return F.dropout(x.relu() + 0.5, p=0.5, training=True).relu()

    x = torch.randn(64, 8, requires_grad=True)
    _, drawn_in_backward, out, grad = partitioned(dropout_relu, RecomputeBooleanMasks(), x,
                                                  decomposed=decomposed)
    assert drawn_in_backward == []  # the mask is computed from the forward's draw
    # the same draw (same seed, same decompositions) split the default way
    _, _, expected, expected_grad = partitioned(dropout_relu,
                                                min_cut_rematerialization_partition, x,
                                                decomposed=decomposed)
    assert (out == 0).any() and (out > 0).any()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, expected_grad)


class ConvBlock(torch.nn.Module):
    r"""What the demo model does around HSA: a ReLU MLP, batch norm, HSA."""

    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                       torch.nn.Linear(16, 8))
        self.norm = torch.nn.BatchNorm1d(8)
        self.attention = HSAConv(8, 4, heads=2)

    def forward(self, x, hierarchy):
        h = self.norm(self.mlp(x)).relu()
        return h + self.attention(h, hierarchy)


@pytest.mark.slow
def test_model_compiled_with_cpu_training_options_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ConvBlock()
    compiled = torch.compile(model, dynamic=True, fullgraph=True,
                             options=cpu_training_options())
    for seed in (1, 3):
        hierarchy = random_hierarchy(seed, max_depth=5)
        x = torch.randn(hierarchy.num_leaves, 8, requires_grad=True)
        out = compiled(x, hierarchy)
        grads = torch.autograd.grad(out.square().sum(), [x, *model.parameters()])
        expected = model(x, hierarchy)
        expected_grads = torch.autograd.grad(expected.square().sum(), [x, *model.parameters()])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        # float32 sums in another order: the bias before batch norm has a
        # zero gradient, computed as a difference of terms ~100
        scale = max(float(g.abs().max()) for g in expected_grads)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, atol=1e-5 * scale, rtol=1e-4)


def test_compiled_dropout_with_cpu_training_options_draws_eager_masks():
    def dropout_relu(x):
        return F.dropout(x.relu() + 0.5, p=0.5, training=True).relu()

    torch._dynamo.reset()
    x = torch.randn(64, 8, requires_grad=True)
    compiled = torch.compile(dropout_relu, options=cpu_training_options())
    torch.manual_seed(0)
    out = compiled(x)
    grad, = torch.autograd.grad(out.square().sum(), x)
    torch.manual_seed(0)
    expected = dropout_relu(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, torch.autograd.grad(expected.square().sum(), x)[0])
