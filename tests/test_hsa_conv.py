import pytest
import torch
from torch_geometric.loader import DataLoader

from hsa_geo import Hierarchy, HSAConv, NestedSignal, hierarchy_from_data
from hsa_geo.functional import block_attention_to_dense, hsa_dense
from random_trees import random_hierarchy


@pytest.mark.parametrize('heads', [1, 3])
@pytest.mark.parametrize('concat', [True, False])
@pytest.mark.parametrize('root_weight', [True, False])
@pytest.mark.parametrize('bias', [True, False])
def test_hsa_conv_shapes_and_parameters(heads, concat, root_weight, bias):
    hierarchy = random_hierarchy(1)
    x = torch.randn(hierarchy.num_leaves, 8)
    conv = HSAConv(8, 4, heads=heads, concat=concat, root_weight=root_weight, bias=bias)
    assert repr(conv) == f'HSAConv(8, 4, heads={heads})'
    out = conv(x, hierarchy)
    assert out.shape == (hierarchy.num_leaves, 4 * heads if concat else 4)
    out.sum().backward()
    assert all(p.grad is not None for p in conv.parameters())
    conv.reset_parameters()


def test_hsa_conv_flat_tree_equals_multihead_softmax():
    torch.manual_seed(0)
    x = torch.randn(10, 6)
    conv = HSAConv(6, 5, heads=2, root_weight=False, bias=False)
    out = conv(x, Hierarchy.flat(10))
    q = conv.lin_query(x).view(10, 2, 5).transpose(0, 1)
    k = conv.lin_key(x).view(10, 2, 5).transpose(0, 1)
    v = conv.lin_value(x).view(10, 2, 5).transpose(0, 1)
    expected = torch.softmax(q @ k.transpose(1, 2) / 5 ** 0.5, -1) @ v
    torch.testing.assert_close(out, expected.transpose(0, 1).reshape(10, 10))


def test_attention_weights_rebuild_the_dense_matrix():
    hierarchy = random_hierarchy(4)
    x = torch.randn(hierarchy.num_leaves, 8, dtype=torch.float64)
    conv = HSAConv(8, 4, heads=2).double()
    out, attention = conv(x, hierarchy, return_attention_weights=True)
    assert attention.pair_weight.shape[1] == 2
    assert attention.subtree_mass.shape == (hierarchy.num_nodes, 2)
    q = conv.lin_query(x).view(-1, 2, 4)
    k = conv.lin_key(x).view(-1, 2, 4)
    dense = hsa_dense(q, k, hierarchy)
    torch.testing.assert_close(block_attention_to_dense(attention, hierarchy), dense.detach())
    v = conv.lin_value(x).view(-1, 2, 4)
    expected = torch.einsum('hij,jhd->ihd', dense, v).reshape(-1, 8) + conv.lin_skip(x)
    torch.testing.assert_close(out, expected)


def test_batched_loader_equals_graphs_alone_and_lazy_channels():
    graphs = [random_hierarchy(seed) for seed in range(4)]
    data = [NestedSignal.from_hierarchy(torch.randn(h.num_leaves, 7), h, y=torch.tensor([i]))
            for i, h in enumerate(graphs)]
    conv = HSAConv(-1, 3, heads=2)
    batch = next(iter(DataLoader(data, batch_size=4)))
    forest = hierarchy_from_data(batch)
    assert forest.num_trees == 4
    out = conv(batch.x, forest)
    alone = torch.cat([conv(d.x, hierarchy_from_data(d)) for d in data])
    torch.testing.assert_close(out, alone)


def test_dropout_only_in_training():
    hierarchy = random_hierarchy(2)
    x = torch.randn(hierarchy.num_leaves, 4)
    conv = HSAConv(4, 4, dropout=0.5)
    conv.eval()
    torch.testing.assert_close(conv(x, hierarchy), conv(x, hierarchy))
    conv.train()
    torch.manual_seed(0)
    assert not torch.allclose(conv(x, hierarchy), conv.eval()(x, hierarchy))


def test_bad_input_errors():
    conv = HSAConv(4, 4)
    with pytest.raises(ValueError, match=r'shape \[N, F\]'):
        conv(torch.randn(3, 2, 4), Hierarchy.flat(3))
    with pytest.raises(ValueError, match='4 rows but the hierarchy has 3 leaves'):
        conv(torch.randn(4, 4), Hierarchy.flat(3))


def test_bias_false_drops_every_bias_and_pairs_of_sizes_are_refused():
    conv = HSAConv(8, 4, heads=2, bias=False)
    assert all(lin.bias is None for lin in (conv.lin_query, conv.lin_key, conv.lin_value))
    assert conv.lin_skip.bias is None and conv.bias is None
    assert all(lin.bias is not None for lin in (HSAConv(8, 4).lin_query, HSAConv(8, 4).lin_key))
    with pytest.raises(ValueError, match='one .in_channels.'):
        HSAConv((8, 6), 4)
    for heads in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="'heads' must be a positive int"):
            HSAConv(8, 4, heads=heads)


def test_causal_takes_the_values_hsa_takes_and_repr_shows_them():
    with pytest.raises(ValueError, match="'causal' must be False, True or 'strict'"):
        HSAConv(8, 4, causal='yes')
    assert 'causal=True' in repr(HSAConv(8, 4, causal=True))
    assert "causal='strict'" in repr(HSAConv(8, 4, causal='strict'))


def test_input_width_that_differs_from_in_channels_is_named():
    conv = HSAConv(16, 8, heads=2)
    with pytest.raises(ValueError, match='built for 16 input channels, but x has 12'):
        conv(torch.randn(5, 12), Hierarchy.flat(5))
    lazy = HSAConv(-1, 8, heads=2)  # lazy: any width on first call
    assert lazy(torch.randn(5, 12), Hierarchy.flat(5)).shape == (5, 16)


def test_attention_explainer_needs_the_edges_and_can_skip_the_layer():
    from torch_geometric.explain import Explainer
    from torch_geometric.explain.algorithm import AttentionExplainer
    from torch_geometric.nn import GATConv

    hierarchy = Hierarchy.flat(6)

    class Hybrid(torch.nn.Module):
        def __init__(self, pass_edges):
            super().__init__()
            self.pass_edges = pass_edges
            self.local = GATConv(4, 4, heads=2, concat=False)
            self.hsa = HSAConv(4, 4, heads=2, concat=False)

        def forward(self, x, edge_index):
            h = self.local(x, edge_index).relu()
            return self.hsa(h, hierarchy, edge_index=edge_index if self.pass_edges else None)

    x = torch.randn(6, 4)
    edge_index = torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 5]])
    config = dict(explanation_type='model', edge_mask_type='object',
                  model_config=dict(mode='regression', task_level='node', return_type='raw'))
    model = Hybrid(pass_edges=False)
    explainer = Explainer(model, AttentionExplainer(), **config)
    # without the graph's edges HSA cannot report its attention: an error, not a silent gap
    with pytest.raises(RuntimeError,
                       match="AttentionExplainer.s hooks .* no graph edges.*explain = False"):
        explainer(x, edge_index)
    model(x, edge_index)  # the failed explanation left no hook that keeps failing
    model.hsa.explain = False
    explanation = explainer(x, edge_index)
    assert explanation.edge_mask.shape == (5, )
    assert not model.hsa._message_forward_hooks  # the explainer removed its hooks
    model(x, edge_index)  # and the layer runs as before

    model = Hybrid(pass_edges=True)
    explanation = Explainer(model, AttentionExplainer(), **config)(x, edge_index)
    assert explanation.edge_mask.shape == (5, ) and bool((explanation.edge_mask > 0).all())


@pytest.mark.parametrize('normalize_qk', [False, True])
@pytest.mark.parametrize('bias', [True, False])
def test_projections_agree_on_both_engines(normalize_qk, bias):
    # q, k, v come from one product, node-major for the CPU kernel and
    # heads-first for the tensor sweeps: the same layer either way
    from hsa_geo.functional.kernel import use_cpu_kernel
    torch.manual_seed(0)
    hierarchy = Hierarchy.batch_hierarchies([random_hierarchy(seed) for seed in range(3)])
    conv = HSAConv(-1, 4, heads=3, normalize_qk=normalize_qk, bias=bias)
    x = torch.randn(hierarchy.num_leaves, 6, requires_grad=True)
    results = []
    for kernel_on in (True, False):
        with use_cpu_kernel(kernel_on):
            out = conv(x, hierarchy)
            results.append((out, *torch.autograd.grad(out.square().sum(), [x, conv.lin_key.weight])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    query = conv.lin_query(x).view(-1, 3, 4)
    if normalize_qk:
        query = torch.nn.functional.layer_norm(query, (4, ))
    torch.testing.assert_close(conv._project_qkv(x)[0], query)
