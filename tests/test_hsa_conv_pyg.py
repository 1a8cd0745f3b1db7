"""HSAConv as a PyG layer: the message-passing engine, explainers, batches as
input, torch_geometric.nn.Sequential / to_hetero and GPSConv."""
import pathlib

import pytest
import torch
from torch_geometric.data import Batch
from torch_geometric.explain import Explainer
from torch_geometric.explain.algorithm import AttentionExplainer, GNNExplainer

import hsa_geo.nn.conv.hsa_conv as hsa_conv_module
import hsa_geo.data as data_module
from hsa_geo import Hierarchy, HSAConv, NestedSignal, hierarchy_from_data
from hsa_geo.functional import (attention_on_edges, block_attention_to_dense, hsa_block_weights,
                                hsa_dense, hsa_propagate)
from hsa_geo.functional.kernel import use_cpu_kernel
from hsa_geo.functional.scatter_sweep import scatter_aggregate
from hsa_geo.nn import HSAGPSConv
from dense_checks import assert_equals_dense
from random_trees import random_forest, random_sequence_hierarchy

TERMS = [dict(), dict(energy='euclidean'), dict(causal=True), dict(pair_bias=True)]


def hierarchy_for(seed, terms):
    # causal needs every subtree to hold consecutive leaves
    return random_sequence_hierarchy(seed) if terms.get('causal') else random_forest(seed, 2)


@pytest.mark.parametrize('seed', range(3))
@pytest.mark.parametrize('terms', TERMS)
def test_propagate_sweeps_equal_dense(seed, terms):
    torch.manual_seed(seed)
    hierarchy = hierarchy_for(seed, terms)
    terms = dict(terms)
    if terms.pop('pair_bias', False):
        terms['pair_bias'] = torch.randn(hierarchy.num_sibling_pairs, 2, dtype=torch.float64,
                                         requires_grad=True)
    q, k, v = (torch.randn(hierarchy.num_leaves, 2, 3, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    out = hsa_propagate(q, k, v, hierarchy, scatter_aggregate, **terms)
    assert_equals_dense(out, q, k, v, hierarchy, **terms)


@pytest.mark.parametrize('seed', range(2))
@pytest.mark.parametrize('terms', TERMS)
def test_both_engines_of_the_layer_agree_with_dense(seed, terms):
    torch.manual_seed(seed)
    hierarchy = hierarchy_for(seed, terms)
    pair_bias = None
    if terms.get('pair_bias'):
        pair_bias = torch.randn(hierarchy.num_sibling_pairs, 2, dtype=torch.float64)
    conv = HSAConv(5, 3, heads=2, energy=terms.get('energy', 'dot'),
                   causal=terms.get('causal', False)).double()
    x = torch.randn(hierarchy.num_leaves, 5, dtype=torch.float64, requires_grad=True)
    q, k, v = (lin(x).view(-1, 2, 3) for lin in (conv.lin_query, conv.lin_key, conv.lin_value))
    dense = hsa_dense(q, k, hierarchy, energy=conv.energy, causal=conv.causal,
                      pair_bias=pair_bias)
    expected = torch.einsum('hij,jhd->ihd', dense, v).reshape(-1, 6) + conv.lin_skip(x)
    results = []
    for engine, kernel in (('fused', True), ('fused', False), ('propagate', True)):
        conv.engine = engine
        with use_cpu_kernel(kernel):
            out = conv(x, hierarchy, pair_bias=pair_bias)
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
        results.append(torch.autograd.grad(out.sin().sum(), [x, *conv.parameters()]))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


def test_message_hooks_see_the_sweeps_over_the_hierarchy():
    torch.manual_seed(0)
    hierarchy = random_forest(0, 3)
    conv = HSAConv(4, 4, heads=2).double()
    x = torch.randn(hierarchy.num_leaves, 4, dtype=torch.float64)
    fused = conv(x, hierarchy)
    edges, messages = [], []
    handles = [conv.register_propagate_forward_pre_hook(
                   lambda module, inputs: edges.append(inputs[0])),
               conv.register_message_forward_hook(
                   lambda module, inputs, out: messages.append(out))]
    torch.testing.assert_close(conv(x, hierarchy), fused)
    assert len(messages) == len(edges) > 0
    passed = {tuple(edge) for edge_index in edges for edge in edge_index.t().tolist()}
    child = (hierarchy.parent >= 0).nonzero().view(-1).tolist()
    tree = {(c, int(hierarchy.parent[c])) for c in child}
    assert tree <= passed  # children -> parent on the way up
    assert {(p, c) for c, p in tree} <= passed  # parent -> children on the way down
    conv.engine = 'fused'  # asked for the fused sweeps: the hooks see nothing
    edges.clear()
    torch.testing.assert_close(conv(x, hierarchy), fused)
    assert not edges
    for handle in handles:
        handle.remove()


def test_attention_on_edges_is_the_dense_matrix_restricted_to_them():
    torch.manual_seed(1)
    hierarchy = random_forest(1, 2)
    n = hierarchy.num_leaves
    q, k = torch.randn(2, n, 3, 4, dtype=torch.float64)
    dense = hsa_dense(q, k, hierarchy)  # [H, N, N]
    edge_index = torch.cat([torch.randint(n, (2, 40)), torch.arange(n).repeat(2, 1)], dim=1)
    weight = attention_on_edges(hsa_block_weights(q, k, hierarchy), hierarchy, edge_index)
    torch.testing.assert_close(weight, dense[:, edge_index[1], edge_index[0]].t())
    single = attention_on_edges(hsa_block_weights(q[:, 0], k[:, 0], hierarchy), hierarchy,
                                edge_index)
    torch.testing.assert_close(single, dense[0, edge_index[1], edge_index[0]])
    with pytest.raises(ValueError, match=r'edge 2 \(0, %d\) .* not between leaves' % n):
        attention_on_edges(hsa_block_weights(q, k, hierarchy), hierarchy,
                           torch.tensor([[0, 1, 0], [1, 0, n]]))


def node_explainer(model):
    return Explainer(model, AttentionExplainer(), explanation_type='model',
                     edge_mask_type='object',
                     model_config=dict(mode='regression', task_level='node', return_type='raw'))


def test_attention_explainer_mask_equals_hsa_attention_on_the_edges():
    torch.manual_seed(2)
    hierarchy = random_forest(2, 2)
    n = hierarchy.num_leaves

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hsa = HSAConv(4, 3, heads=2)

        def forward(self, x, edge_index):
            return self.hsa(x, hierarchy, edge_index=edge_index)

    model = Model().double()
    x = torch.randn(n, 4, dtype=torch.float64)
    edge_index = torch.randint(n, (2, 30))
    mask = node_explainer(model)(x, edge_index).edge_mask
    q, k, _ = model.hsa._project_qkv(x)
    dense = block_attention_to_dense(hsa_block_weights(q, k, hierarchy), hierarchy)
    torch.testing.assert_close(mask, dense[:, edge_index[1], edge_index[0]].amax(0))
    assert not model.hsa._message_forward_hooks and model.hsa._alpha is None


def test_attention_explainer_finds_the_group_the_label_depends_on():
    # 12 nodes in two groups under one root; every node's label is the mean
    # signal of group A (nodes 0..5): trained HSA attends to A, and so must
    # the explanation on the complete graph's edges
    torch.manual_seed(0)
    parent = torch.tensor([12] * 6 + [13] * 6 + [14, 14, -1])
    hierarchy = Hierarchy.from_parent(parent, num_leaves=12)
    group = (torch.arange(12) >= 6).double()

    def sample(count):
        signal = torch.randn(count, 12, dtype=torch.float64)
        x = torch.stack([signal, group.expand(count, 12)], dim=-1)
        return x, signal[:, :6].mean(1, keepdim=True).expand(count, 12)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hsa = HSAConv(2, 8, heads=1, root_weight=False)
            self.out = torch.nn.Linear(8, 1)

        def forward(self, x, edge_index=None):
            return self.out(self.hsa(x, hierarchy, edge_index=edge_index)).squeeze(-1)

    model = Model().double()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        x, y = sample(16)
        loss = sum((model(graph) - target).square().mean() for graph, target in zip(x, y)) / 16
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    row, col = torch.meshgrid(torch.arange(12), torch.arange(12), indexing='ij')
    edge_index = torch.stack([col.flatten(), row.flatten()])
    edge_index = edge_index[:, edge_index[0] != edge_index[1]]
    x, _ = sample(1)
    mask = node_explainer(model)(x[0], edge_index).edge_mask
    from_a = edge_index[0] < 6
    assert float(mask[from_a].mean()) > 5 * float(mask[~from_a].mean())
    assert bool(from_a[mask.topk(60).indices].all())


def test_edge_mask_explainers_are_refused_by_name():
    hierarchy = Hierarchy.flat(5)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hsa = HSAConv(4, 4)

        def forward(self, x, edge_index):
            return self.hsa(x, hierarchy, edge_index=edge_index)

    model = Model()
    x, edge_index = torch.randn(5, 4), torch.tensor([[0, 1, 2], [1, 2, 3]])
    explainer = Explainer(model, GNNExplainer(epochs=2), explanation_type='model',
                          edge_mask_type='object',
                          model_config=dict(mode='regression', task_level='node',
                                            return_type='raw'))
    with pytest.raises(RuntimeError, match='edge mask .* cannot change its output'):
        explainer(x, edge_index)
    assert model(x, edge_index).shape == (5, 4)  # the mask was removed from the layer


def nested_batch(count=3, features=6):
    graphs = []
    for seed in range(count):
        hierarchy = random_forest(seed, 1)
        n = hierarchy.num_leaves
        graphs.append(NestedSignal.from_hierarchy(torch.randn(n, features), hierarchy,
                                                  edge_index=torch.randint(n, (2, 2 * n))))
    return Batch.from_data_list(graphs)


@pytest.fixture
def forest_builds(monkeypatch):
    r"""The batches whose forest the layers build, in order."""
    calls = []

    build = data_module.build_hierarchy

    def counted(data):
        calls.append(data)
        return build(data)

    monkeypatch.setattr(data_module, 'build_hierarchy', counted)
    monkeypatch.setattr(data_module, 'BATCH_FOREST', data_module.BatchForest())
    return calls


def test_the_layer_takes_the_batch_and_plans_its_forest_once(forest_builds):
    batch = nested_batch()
    conv = HSAConv(6, 4, heads=2)
    expected = conv(batch.x, hierarchy_from_data(batch))
    calls = forest_builds
    second = HSAConv(8, 4, heads=2)
    out = second(conv(batch.x, batch), batch)
    torch.testing.assert_close(conv(batch.x, batch), expected)
    assert out.shape == (batch.num_nodes, 8) and len(calls) == 1  # one forest for the batch
    other = nested_batch()
    conv(other.x, other)
    assert len(calls) == 2  # a new batch, a new forest
    other.hierarchy_edge_index[:, :1] = other.hierarchy_edge_index[:, :1].clone()  # edited
    conv(other.x, other)
    assert len(calls) == 3
    with pytest.raises(TypeError, match='HSA layers take a hsa_geo.Hierarchy.*got Tensor'):
        conv(batch.x, batch.hierarchy_edge_index)


def test_a_hierarchy_loader_batch_gives_its_planned_forest_once(forest_builds):
    from hsa_geo.loader import HierarchyLoader
    graphs = nested_batch().to_data_list()
    batch = next(iter(HierarchyLoader(graphs, batch_size=3)))
    calls = forest_builds
    conv = HSAConv(6, 2, heads=2)
    out = conv(batch.x, batch)
    torch.testing.assert_close(out, conv(batch.x, hierarchy_from_data(batch)))
    conv(batch.x, batch)
    assert len(calls) == 1


def test_torch_geometric_sequential_with_the_batch():
    from torch_geometric.nn import Sequential
    batch = nested_batch()
    model = Sequential('x, batch', [
        (HSAConv(6, 8, heads=2), 'x, batch -> x'),
        torch.nn.ReLU(),
        (HSAConv(16, 4), 'x, batch -> x'),
    ])
    out = model(batch.x, batch)
    forest = hierarchy_from_data(batch)
    expected = model[2](model[1](model[0](batch.x, forest)), forest)
    torch.testing.assert_close(out, expected)


def test_to_hetero_refuses_the_layer_by_name_and_hsa_runs_on_one_node_type():
    from torch_geometric.data import HeteroData
    from torch_geometric.nn import SAGEConv, to_hetero

    hierarchy = random_forest(0, 1)
    n = hierarchy.num_leaves
    data = HeteroData()
    data['paper'].x = torch.randn(n, 4)
    data['author'].x = torch.randn(5, 4)
    data['author', 'writes', 'paper'].edge_index = torch.stack(
        [torch.randint(5, (12, )), torch.randint(n, (12, ))])
    data['paper', 'rev_writes', 'author'].edge_index = \
        data['author', 'writes', 'paper'].edge_index.flip(0)

    class Local(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = SAGEConv((-1, -1), 8)

        def forward(self, x, edge_index):
            return self.conv(x, edge_index).relu()

    class WithHSA(Local):
        def __init__(self):
            super().__init__()
            self.hsa = HSAConv(8, 8)

        def forward(self, x, edge_index, hierarchy):
            return self.hsa(self.conv(x, edge_index).relu(), hierarchy)

    # to_hetero copies every MessagePassing layer per edge type, but a
    # hierarchy has no edge types: a clear error, not a silent wrong answer
    hetero = to_hetero(WithHSA(), data.metadata())
    with pytest.raises(ValueError, match='one node type.*to_hetero'):
        hetero(data.x_dict, data.edge_index_dict, {'paper': hierarchy})
    # the way that works: local layers by to_hetero, HSA on the papers
    local = to_hetero(Local(), data.metadata())
    hsa = HSAConv(8, 8)
    out = hsa(local(data.x_dict, data.edge_index_dict)['paper'], hierarchy)
    assert out.shape == (n, 8)


def test_hsa_conv_cannot_be_gpsconvs_attention_but_hsagpsconv_is_gpsconv_with_hsa():
    from torch_geometric.nn import GINConv, GPSConv

    def gin():
        return GINConv(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(),
                                           torch.nn.Linear(8, 8)))

    gps = GPSConv(8, gin(), heads=2)
    with pytest.raises(ValueError, match='GPSConv.attn cannot be an HSAConv.*HSAGPSConv'):
        gps.attn = HSAConv(8, 4, heads=2, root_weight=False)
    assert isinstance(gps.attn, torch.nn.MultiheadAttention)
    with pytest.raises(ValueError, match="attn_type='hsa'"):
        HSAGPSConv(8, gin(), attn_type='multihead')

    # on a flat tree over every graph HSA is softmax attention: with GPSConv's
    # weights, HSAGPSConv computes what GPSConv does
    torch.manual_seed(0)
    graphs = [NestedSignal.from_hierarchy(torch.randn(n, 8), Hierarchy.flat(n),
                                          edge_index=torch.randint(n, (2, 3 * n)))
              for n in (5, 7, 4)]
    batch = Batch.from_data_list(graphs)
    hsa_gps = HSAGPSConv(8, gin(), heads=2, norm='layer_norm')
    gps = GPSConv(8, gin(), heads=2, norm='layer_norm').eval()
    assert repr(hsa_gps).endswith('heads=2, attn_type=hsa)')
    state = {key: value for key, value in gps.state_dict().items() if not key.startswith('attn.')}
    weight_q, weight_k, weight_v = gps.attn.in_proj_weight.chunk(3)
    bias_q, bias_k, bias_v = gps.attn.in_proj_bias.chunk(3)
    state.update({'attn.lin_query.weight': weight_q, 'attn.lin_key.weight': weight_k,
                  'attn.lin_value.weight': weight_v, 'attn.lin_query.bias': bias_q,
                  'attn.lin_key.bias': bias_k, 'attn.lin_value.bias': bias_v,
                  'attn.bias': torch.zeros(8), 'attn_proj.weight': gps.attn.out_proj.weight,
                  'attn_proj.bias': gps.attn.out_proj.bias})
    hsa_gps.load_state_dict(state)
    hsa_gps.eval()
    expected = gps(batch.x, batch.edge_index, batch.batch)
    torch.testing.assert_close(hsa_gps(batch.x, batch.edge_index, batch), expected,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match='not the graph-id vector'):
        hsa_gps(batch.x, batch.edge_index, batch.batch)


def test_no_module_outside_functional_asks_which_engine_runs():
    root = pathlib.Path(hsa_conv_module.__file__).parents[1]  # hsa_geo/nn
    for path in root.rglob('*.py'):
        source = path.read_text()
        assert 'cpu_kernel' not in source and 'kernel.available' not in source, path


def test_two_samples_of_one_graph_get_their_own_forests():
    # A node sampler (NeighborLoader, ClusterLoader, subgraph) hands every
    # batch the same hierarchy_edge_index tensor, the whole graph's tree;
    # only the nodes' hierarchy_leaf says which leaves a batch holds. Two
    # batches of the same size must not share the forest of the first.
    hierarchy = random_forest(3, 1, max_leaves=60)
    n = hierarchy.num_leaves
    graph = NestedSignal.from_hierarchy(torch.randn(n, 6), hierarchy,
                                        edge_index=torch.randint(n, (2, 2 * n)))
    first = graph.subgraph(torch.arange(0, n // 2))
    second = graph.subgraph(torch.arange(n - n // 2, n))
    assert first.hierarchy_edge_index is second.hierarchy_edge_index
    assert first.num_nodes == second.num_nodes
    conv = HSAConv(6, 4, heads=2)
    conv(first.x, first)
    torch.testing.assert_close(conv(second.x, second),
                               conv(second.x, hierarchy_from_data(second)))
