import pytest
import torch

from hsa_geo import Hierarchy
from hsa_geo.functional import hsa_dense
from hsa_geo.nn.models import (AtomFeatureEncoder, HierarchyReadout, HSABlock, HSAEncoder,
                               HSAGraphModel, HSANodeModel, MultiModalEncoder, TokenEncoder,
                               flat_hierarchy, hierarchy_leaf_weights, resolve_local_conv,
                               subtree_means)


def two_trees():
    # graph 0: leaves 0..3, ((0,1),(2,3)); graph 1: leaves 0..2 flat
    h1 = Hierarchy.from_parent(torch.tensor([4, 4, 5, 5, 6, 6, -1]), 4)
    h2 = Hierarchy.from_parent(torch.tensor([3, 3, 3, -1]), 3)
    return h1, h2, Hierarchy.batch_hierarchies([h1, h2])


def path_edges(n, offset=0):
    src = torch.arange(offset, offset + n - 1)
    return torch.cat([torch.stack([src, src + 1]), torch.stack([src + 1, src])], 1)


@pytest.mark.parametrize('conv', [None, 'gin', 'gcn', 'sage'])
@pytest.mark.parametrize('heads', [1, 2])
@pytest.mark.parametrize('norm', ['batch_norm', 'layer_norm', None])
def test_block_shapes(conv, heads, norm):
    _, _, h = two_trees()
    block = HSABlock(8, resolve_local_conv(conv, 8, norm=norm), heads=heads, norm=norm)
    x = torch.randn(7, 8)
    edge_index = torch.cat([path_edges(4), path_edges(3, 4)], 1)
    out = block(x, h, edge_index)
    assert out.shape == (7, 8)
    out, attention = block(x, h, edge_index, return_attention_weights=True)
    assert out.shape == (7, 8)
    assert attention.subtree_mass.shape == (h.num_nodes, heads)
    assert repr(block).startswith('HSABlock(8, conv=')


def test_block_rejects_bad_configuration():
    with pytest.raises(ValueError, match='divide'):
        HSABlock(10, heads=3)
    with pytest.raises(ValueError, match='local conv, the global attention, or both'):
        HSABlock(8, conv=None, global_attention=False)
    with pytest.raises(ValueError, match='edge_index'):
        HSABlock(8, resolve_local_conv('gcn', 8))(torch.randn(7, 8), two_trees()[2])
    with pytest.raises(ValueError, match='Unknown local conv'):
        resolve_local_conv('nope', 8)


def test_block_without_local_conv_is_residual_hsa_plus_ffn():
    _, _, h = two_trees()
    block = HSABlock(8, None, heads=1, norm=None).eval()
    x = torch.randn(7, 8)
    attn = block.attn
    q, k, v = attn.lin_query(x), attn.lin_key(x), attn.lin_value(x)
    dense = hsa_dense(q, k, h)  # [N, N], attention never crosses graphs
    assert torch.all(dense[:4, 4:] == 0)
    hid = x + (dense @ v + attn.bias)
    expected = hid + block.mlp(hid)
    torch.testing.assert_close(block(x, h), expected, atol=1e-5, rtol=1e-5)


def test_encoder_returns_one_attention_per_layer():
    _, _, h = two_trees()
    enc = HSAEncoder(8, 3, conv='gin', heads=2)
    edge_index = torch.cat([path_edges(4), path_edges(3, 4)], 1)
    out, attentions = enc(torch.randn(7, 8), h, edge_index, return_attention_weights=True)
    assert out.shape == (7, 8) and len(attentions) == 3
    assert repr(enc) == 'HSAEncoder(8, num_layers=3)'
    with pytest.raises(ValueError, match='num_layers'):
        HSAEncoder(8, 0)


def test_leaf_weights_are_a_mean_of_means_at_zero_score():
    # leaves 0,1 under cluster 3; cluster 3 and leaf 2 under the root 4
    h = Hierarchy.from_parent(torch.tensor([3, 3, 4, 4, -1]), 3)
    w = hierarchy_leaf_weights(torch.zeros(5), h)
    torch.testing.assert_close(w, torch.tensor([0.25, 0.25, 0.5]))
    # scores split each family's mass by a softmax among siblings
    score = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0])
    w = hierarchy_leaf_weights(score, h)
    p = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    torch.testing.assert_close(w, torch.stack([p[0] / 2, p[0] / 2, p[1]]))


def test_leaf_weights_sum_to_one_per_tree():
    _, _, h = two_trees()
    w = hierarchy_leaf_weights(torch.randn(h.num_nodes, 3), h)
    sums = torch.zeros(2, 3).index_add_(0, h.leaf_batch, w)
    torch.testing.assert_close(sums, torch.ones(2, 3))


def test_subtree_means_against_brute_force():
    _, _, h = two_trees()
    x = torch.randn(7, 5)
    means = subtree_means(x, h)
    torch.testing.assert_close(means[:7], x)
    parent = h.parent.tolist()
    for node in range(7, h.num_nodes):
        below = [i for i in range(7) if _is_ancestor(node, i, parent)]
        torch.testing.assert_close(means[node], x[below].mean(0))


def _is_ancestor(a, i, parent):
    while i >= 0:
        if i == a:
            return True
        i = parent[i]
    return False


def test_flat_readout_is_softmax_attention_pooling():
    x = torch.randn(5, 8)
    batch = torch.tensor([0, 0, 0, 1, 1])
    readout = HierarchyReadout(8)
    torch.nn.init.normal_(readout.query)
    out = readout(x, flat_hierarchy(batch))
    score = (readout.lin_key(x) @ readout.query[0]) * 8 ** -0.5
    expected = []
    for g in range(2):
        mask = batch == g
        expected.append((torch.softmax(score[mask], 0)[:, None] * x[mask]).sum(0))
    torch.testing.assert_close(out, torch.stack(expected))


@pytest.mark.parametrize('heads', [1, 2])
def test_hierarchy_readout_against_brute_force(heads):
    # scores from the mean key below every node, a sibling softmax at every
    # family, leaf weight = product of the shares along the path
    from random_trees import random_hierarchy
    torch.manual_seed(heads)
    h = Hierarchy.batch_hierarchies([random_hierarchy(seed) for seed in (1, 2)])
    x = torch.randn(h.num_leaves, 6, dtype=torch.float64)
    readout = HierarchyReadout(6, heads=heads).double()
    torch.nn.init.normal_(readout.query)
    out, weight = readout(x, h, return_leaf_weights=True)
    dim = 6 // heads
    key_means = subtree_means(readout.lin_key(x), h).view(-1, heads, dim)
    score = (key_means * readout.query).sum(-1) * dim ** -0.5  # [N + M, H]
    parent = h.parent.tolist()
    children = {}
    for node, up in enumerate(parent):
        if up >= 0:
            children.setdefault(up, []).append(node)
    expected_weight = torch.ones(h.num_leaves, heads, dtype=torch.float64)
    for leaf in range(h.num_leaves):
        node = leaf
        while parent[node] >= 0:
            siblings = children[parent[node]]
            share = torch.softmax(score[siblings], 0)[siblings.index(node)]
            expected_weight[leaf] *= share
            node = parent[node]
    torch.testing.assert_close(weight, expected_weight)
    pooled = (x.view(-1, heads, dim) * expected_weight[..., None]).view(-1, 6)
    expected = torch.stack([pooled[h.leaf_batch == g].sum(0) for g in range(2)])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize('mode', ['mean', 'sum'])
def test_mean_and_sum_readouts(mode):
    _, _, h = two_trees()
    x = torch.randn(7, 4)
    out = HierarchyReadout(4, mode)(x, h)
    agg = torch.Tensor.mean if mode == 'mean' else torch.Tensor.sum
    torch.testing.assert_close(out, torch.stack([agg(x[:4], 0), agg(x[4:], 0)]))
    with pytest.raises(ValueError, match='Unknown readout'):
        HierarchyReadout(4, 'max')


def test_flat_hierarchy_requires_sorted_batch():
    with pytest.raises(ValueError, match='sorted'):
        flat_hierarchy(torch.tensor([1, 0]))


@pytest.mark.parametrize('readout', ['hierarchy', 'mean', 'sum'])
def test_graph_model_batches_like_single_graphs(readout):
    torch.manual_seed(0)
    h1, h2, h = two_trees()
    model = HSAGraphModel(6, 16, 2, num_layers=2, conv='gine', heads=2, readout=readout,
                          edge_encoder=torch.nn.Linear(3, 16)).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.readout.query) if model.readout.query is not None else None
    x = torch.randn(7, 6)
    e1, e2 = path_edges(4), path_edges(3)
    a1, a2 = torch.randn(e1.size(1), 3), torch.randn(e2.size(1), 3)
    both = model(x, torch.cat([e1, e2 + 4], 1), h, torch.cat([a1, a2]))
    one = model(x[:4], e1, h1, a1)
    two = model(x[4:], e2, h2, a2)
    assert both.shape == (2, 2)
    torch.testing.assert_close(both, torch.cat([one, two]), atol=1e-5, rtol=1e-4)


def test_graph_model_details_and_gradients_reach_every_parameter():
    _, _, h = two_trees()
    model = HSAGraphModel(6, 8, 1, num_layers=2, conv='gine', heads=2,
                          edge_encoder=torch.nn.Linear(3, 8))
    edge_index = torch.cat([path_edges(4), path_edges(3, 4)], 1)
    out, details = model(torch.randn(7, 6), edge_index, h, torch.randn(edge_index.size(1), 3),
                         return_details=True)
    assert out.shape == (2, 1)
    assert details['leaf_weights'].shape == (7, 1) and len(details['attention']) == 2
    out.sum().backward()
    # the readout query starts at 0, but it still gets a gradient
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert 'readout' in repr(model)


def test_node_model():
    _, _, h = two_trees()
    model = HSANodeModel(5, 8, 3, num_layers=2, conv='sage', heads=2)
    edge_index = torch.cat([path_edges(4), path_edges(3, 4)], 1)
    assert model(torch.randn(7, 5), edge_index, h).shape == (7, 3)
    model = HSANodeModel(5, 8, 3, conv=None)
    assert model(torch.randn(7, 5), None, h).shape == (7, 3)


def test_multimodal_encoder_routes_rows_by_modality():
    torch.manual_seed(0)
    atoms = AtomFeatureEncoder(8)
    tokens = TokenEncoder(20, 8, max_positions=4)
    enc = MultiModalEncoder({'graph': atoms, 'smiles': tokens}, 8, modality_embedding=False)
    x = torch.zeros(5, 9, dtype=torch.long)
    x[0, 0], x[1, 0] = 5, 6  # atoms (atomic number column)
    x[2:, 0] = torch.tensor([3, 4, 19])  # token ids
    x[2:, 1] = torch.tensor([0, 1, 7])  # positions (7 is clamped to 3)
    modality = torch.tensor([0, 0, 1, 1, 1])
    out = enc(x, modality)
    torch.testing.assert_close(out[:2], atoms(x[:2]))
    torch.testing.assert_close(out[2:], tokens(x[2:]))
    torch.testing.assert_close(out[4], tokens.token.weight[19] + tokens.position.weight[3])
    with_type = MultiModalEncoder({'graph': atoms, 'smiles': tokens}, 8)
    torch.testing.assert_close(with_type(x, modality) - out, with_type.modality(modality))
    with pytest.raises(ValueError, match='modality id out of range'):
        enc(x, torch.tensor([0, 0, 1, 1, 2]))
    with pytest.raises(ValueError, match='entries for 5 leaves'):
        enc(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match='token id out of range'):
        tokens(torch.tensor([[20, 0]]))
    assert repr(enc) == "MultiModalEncoder(['graph', 'smiles'], 8)"
