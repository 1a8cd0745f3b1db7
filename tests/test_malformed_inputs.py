"""A corpus of malformed inputs across the public entry points: each must
raise a clear exception of the stated type whose message names the problem
(never a silent result, a NaN, or a crash deep inside torch or PyG)."""
import math

import networkx as nx
import numpy as np
import pytest
import torch
from torch_geometric.data import Data

from hsa_geo import Hierarchy, HSAConv, NestedSignal, hierarchy_from_data
from hsa_geo.flops import block_local_flops, hsa_flops, softmax_flops
from hsa_geo.functional import (block_attention_to_dense, hsa, hsa_block_weights, hsa_dense,
                                hsa_log_partition)
from hsa_geo.functional.attention import hsa_with_summaries
from hsa_geo.functional.terms import ScoreTerms
from hsa_geo.hierarchy import (chunk_sequence, compose, from_edge_index_metis, from_features,
                               from_linkage, from_nested_lengths, from_networkx, from_partitions,
                               from_segments, grid_quadtree, limit_children)
from hsa_geo.loader import HierarchyLoader
from hsa_geo.transforms import AddHierarchy

TREE = Hierarchy.from_parent(torch.tensor([3, 3, 4, 4, -1]), num_leaves=3)  # 3 leaves, 2 clusters
FOREST = Hierarchy.from_parent(torch.tensor([3, 3, -1, -1]), num_leaves=3)  # roots 2 and 3


def qkv(n=3, heads=2, dim=4, **kwargs):
    return [torch.randn(n, heads, dim, **kwargs) for _ in range(3)]


def attention(function, *args, **kwargs):
    q, k, v = qkv()
    if function is hsa:
        return lambda: hsa(q, k, v, *args, **kwargs)
    return lambda: function(q, k, *args, **kwargs)


def summaries(nodes):
    q, k, v = qkv(dtype=torch.float64)
    return lambda: hsa_with_summaries(q, k, v, TREE, 0.5, ScoreTerms(), nodes)


def conv_forward(x, hierarchy=TREE, **kwargs):
    conv = HSAConv(4, 2, heads=2, **kwargs)
    return lambda: conv(x, hierarchy)


# (id, call, exception type, regex the message must match)
CASES = [
    # ------------------------------------------------ Hierarchy.from_parent
    ('parent list', lambda: Hierarchy.from_parent([1, -1], 1), ValueError,
     'must be a torch.Tensor'),
    ('parent float', lambda: Hierarchy.from_parent(torch.tensor([1., -1.]), 1), ValueError,
     'integer node ids'),
    ('parent bool', lambda: Hierarchy.from_parent(torch.tensor([True, False]), 1), ValueError,
     'integer node ids'),
    ('parent 2-d', lambda: Hierarchy.from_parent(torch.tensor([[1, -1]]), 1), ValueError,
     'one-dimensional'),
    ('parent too short', lambda: Hierarchy.from_parent(torch.tensor([-1]), 2), ValueError,
     'one entry per node'),
    ('parent out of range', lambda: Hierarchy.from_parent(torch.tensor([5, -1]), 1), ValueError,
     'Node 0 has parent 5, out of range'),
    ('parent below -1', lambda: Hierarchy.from_parent(torch.tensor([-2, -1]), 1), ValueError,
     'out of range'),
    ('own parent', lambda: Hierarchy.from_parent(torch.tensor([1, 1]), 1), ValueError,
     'Node 1 is its own parent'),
    ('leaf parent', lambda: Hierarchy.from_parent(torch.tensor([1, 2, -1]), 2), ValueError,
     'Node 0 has parent 1, which is a leaf'),
    ('childless cluster', lambda: Hierarchy.from_parent(torch.tensor([2, 2, -1, -1]), 2),
     ValueError, 'Cluster node 3 has no children'),
    ('cycle', lambda: Hierarchy.from_parent(torch.tensor([2, 3, 3, 2]), 2), ValueError,
     'cycle through nodes'),
    ('zero leaves', lambda: Hierarchy.from_parent(torch.tensor([-1]), 0), ValueError,
     'at least one leaf'),
    ('fractional leaves', lambda: Hierarchy.from_parent(torch.tensor([-1]), 1.5), ValueError,
     "'num_leaves' must be an integer"),
    ('float tensor leaves', lambda: Hierarchy.from_parent(torch.tensor([-1]), torch.tensor(2.9)),
     ValueError, "'num_leaves' must be an integer"),
    ('batch across graphs', lambda: Hierarchy.from_parent(
        torch.tensor([2, 2, -1]), 2, batch=torch.tensor([0, 1, 0])), ValueError,
     'Node 1 \\(graph 1\\) has parent 2 in another graph'),
    ('batch two roots', lambda: Hierarchy.from_parent(
        torch.tensor([-1, -1]), 2, batch=torch.tensor([0, 0])), ValueError,
     'Graph 0 has 2 roots'),
    ('batch wrong length', lambda: Hierarchy.from_parent(
        torch.tensor([1, -1]), 1, batch=torch.tensor([0])), ValueError, "'batch' has 1 entries"),
    ('parent on meta', lambda: Hierarchy.from_parent(torch.tensor([2, 2, -1], device='meta'), 2),
     ValueError, "'parent' is on the meta device"),
    ('batch negative id', lambda: Hierarchy.from_parent(
        torch.tensor([1, -1]), 1, batch=torch.tensor([0, -1])), ValueError, 'negative graph id'),
    ('flat negative', lambda: Hierarchy.flat(-1), ValueError, 'at least one leaf'),
    ('flat float', lambda: Hierarchy.flat(2.5), ValueError, 'must be an integer'),
    ('batch nothing', lambda: Hierarchy.batch_hierarchies([]), ValueError, 'at least one'),
    ('batch a tensor', lambda: Hierarchy.batch_hierarchies([torch.tensor([1, -1])]), TypeError,
     'takes Hierarchy objects, but input 0 is a Tensor'),
    ('batch a forest', lambda: Hierarchy.batch_hierarchies(
        [TREE, Hierarchy.from_parent(torch.tensor([-1, -1]), 2)]), ValueError,
     'input 1 is a forest of 2 trees'),
    # ----------------------------------------------------------- attention
    ('hsa numpy q', lambda: hsa(np.zeros((3, 2, 4)), *qkv()[1:], TREE), TypeError, 'q'),
    ('hsa wrong leaf count', lambda: hsa(*qkv(n=4), TREE), ValueError, '3 leaves'),
    ('hsa k shape', lambda: hsa(qkv()[0], torch.randn(3, 2, 5), qkv()[2], TREE), ValueError,
     'k'),
    ('hsa 4-d', lambda: hsa(*[torch.randn(3, 2, 4, 1)] * 3, TREE), ValueError, 'q'),
    ('hsa integer q', lambda: hsa(*[torch.ones(3, 2, 4, dtype=torch.long)] * 3, TREE),
     (TypeError, ValueError), 'floating'),
    ('hsa no features', lambda: hsa(torch.randn(3, 2, 0), torch.randn(3, 2, 0),
                                    torch.randn(3, 2, 4), TREE), ValueError,
     'at least one feature per head'),
    ('hsa no heads', lambda: hsa(*[torch.randn(3, 0, 4)] * 3, TREE), ValueError, 'no heads'),
    ('hsa backend', attention(hsa, TREE, backend='dense'), ValueError, 'backend'),
    ('hsa energy', attention(hsa, TREE, energy='cosine'), ValueError, 'energy'),
    ('hsa causal string', attention(hsa, TREE, causal='yes'), ValueError,
     "'causal' must be False, True or 'strict'"),
    ('hsa scale nan', attention(hsa, TREE, scale=math.nan), ValueError, 'scale'),
    ('hsa bias rows', attention(hsa, TREE, pair_bias=torch.randn(3, 2)), ValueError,
     'pair_bias'),
    ('hsa bias heads', attention(hsa, TREE, pair_bias=torch.randn(TREE.num_sibling_pairs, 3)),
     ValueError, 'pair_bias'),
    ('hsa bias nan', attention(hsa, TREE, pair_bias=torch.full((TREE.num_sibling_pairs, 2),
                                                                math.nan)),
     ValueError, 'pair_bias'),
    ('hsa scale tensor', attention(hsa, TREE, scale=torch.ones(2)), ValueError, 'one number'),
    ('hsa scale with grad', attention(hsa, TREE, scale=torch.tensor(0.5, requires_grad=True)),
     ValueError, 'requires grad'),
    ('hsa not a hierarchy', lambda: hsa(*qkv(), TREE.parent), TypeError, 'Hierarchy'),
    ('hsa causal unordered', lambda: hsa(*qkv(n=4), Hierarchy.from_parent(
        torch.tensor([5, 4, 4, 5, 6, 6, -1]), 4), causal=True), ValueError,
     'Causal HSA needs every subtree to hold consecutive leaves'),
    ('hsa_dense causal string', attention(hsa_dense, TREE, causal='yes'), ValueError,
     "'causal' must be"),
    ('hsa_dense bias rows', attention(hsa_dense, TREE, pair_bias=torch.randn(2, 2)), ValueError,
     'pair_bias'),
    ('hsa_block_weights strict', attention(hsa_block_weights, TREE, causal='strict'),
     ValueError, "causal='strict'"),
    ('hsa_log_partition strict', attention(hsa_log_partition, TREE, causal='strict'),
     ValueError, "causal='strict'"),
    ('block weights of another tree', lambda: block_attention_to_dense(
        hsa_block_weights(*qkv()[:2], TREE), Hierarchy.flat(3)), ValueError,
     'is not that of this hierarchy'),
    ('summaries node -1', summaries(torch.tensor([3, -1])), ValueError,
     "'nodes'\\[1\\] = -1 is not a node of the hierarchy"),
    ('summaries leaf node', summaries(torch.tensor([0])), ValueError,
     "'nodes'\\[0\\] = 0 is a leaf of the hierarchy: .*\\(ids 3 to 4\\)"),
    ('summaries node past the end', summaries(torch.tensor([5])), ValueError,
     "'nodes'\\[0\\] = 5 is not a node"),
    ('summaries repeated node', summaries(torch.tensor([4, 3, 4])), ValueError,
     "'nodes'\\[2\\] = 4 repeats 'nodes'\\[0\\]"),
    ('summaries float nodes', summaries(torch.tensor([3.0])), ValueError,
     "'nodes' must be an integer tensor"),
    ('summaries 2-d nodes', summaries(torch.tensor([[3]])), ValueError, 'one-dimensional'),
    # -------------------------------------------------------------- HSAConv
    ('conv zero heads', lambda: HSAConv(4, 2, heads=0), ValueError, 'heads'),
    ('conv zero out', lambda: HSAConv(4, 0), ValueError, 'out_channels'),
    ('conv tuple in', lambda: HSAConv((4, 4), 2), ValueError, 'in_channels'),
    ('conv causal string', lambda: HSAConv(4, 2, causal='yes'), ValueError, 'causal'),
    ('conv energy', lambda: HSAConv(4, 2, energy='cosine'), ValueError, 'energy'),
    ('conv dropout', lambda: HSAConv(4, 2, dropout=1.5), ValueError, 'dropout'),
    ('conv x width', conv_forward(torch.randn(3, 5)), ValueError,
     'built for 4 input channels, but x has 5'),
    ('conv x 3-d', conv_forward(torch.randn(3, 4, 1)), ValueError, 'shape \\[N, F\\]'),
    ('conv x rows', conv_forward(torch.randn(5, 4)), ValueError, '3 leaves'),
    # --------------------------------------------------- data and transforms
    ('signal rows', lambda: NestedSignal.from_hierarchy(torch.randn(4, 2), TREE), ValueError,
     'x has 4 rows but the hierarchy has 3 leaves'),
    ('signal of a forest', lambda: NestedSignal.from_hierarchy(torch.randn(3, 2), FOREST),
     ValueError, 'one tree per graph, but the hierarchy is a forest of 2 trees \\(roots \\[2, 3\\]\\)'),
    ('stored forest', lambda: hierarchy_from_data(NestedSignal(
        x=torch.randn(3, 2), hierarchy_edge_index=FOREST.edge_index, num_clusters=1)),
     ValueError, '1 more root.s. than graphs \\(a forest stored as one graph'),
    ('no hierarchy', lambda: hierarchy_from_data(Data(x=torch.randn(3, 2))), ValueError,
     'data has no hierarchy'),
    ('hierarchy ids outside', lambda: hierarchy_from_data(NestedSignal(
        x=torch.randn(2, 1), hierarchy_edge_index=torch.tensor([[0, 1], [2, 9]]),
        num_clusters=1)), ValueError, 'outside'),
    ('two parents', lambda: hierarchy_from_data(NestedSignal(
        x=torch.randn(2, 1), num_clusters=2,
        hierarchy_edge_index=torch.tensor([[0, 0, 1, 2], [2, 3, 2, 3]]))), ValueError,
     'Node 0 has more than one parent'),
    ('node repeated', lambda: hierarchy_from_data(NestedSignal.from_hierarchy(
        torch.randn(3, 2), TREE).subgraph(torch.tensor([0, 1, 1]))), ValueError,
     'Leaf id 1 appears twice, at nodes 1 and 2'),
    ('add hierarchy method', lambda: AddHierarchy('kmeans'), ValueError, "Unknown method"),
    ('add hierarchy hetero', lambda: AddHierarchy()(__import__(
        'torch_geometric').data.HeteroData()), ValueError, 'HeteroData'),
    ('add hierarchy callable None', lambda: AddHierarchy(lambda data: None)(
        Data(x=torch.randn(3, 2), edge_index=torch.tensor([[0], [1]]))), ValueError,
     'must return a Hierarchy over the graph.s 3 nodes \\(got None\\)'),
    ('edge weight missing', lambda: AddHierarchy('louvain', use_edge_weight=True)(
        Data(x=torch.randn(3, 2), edge_index=torch.tensor([[0], [1]]))), ValueError,
     'use_edge_weight=True needs'),
    ('loader non-signal', lambda: next(iter(HierarchyLoader(
        [Data(x=torch.randn(3, 2))], batch_size=1))), ValueError, 'hierarchy'),
    # ------------------------------------------------------------- builders
    ('networkx method', lambda: from_networkx(nx.karate_club_graph(), method='kmeans'),
     ValueError, 'Unknown community method'),
    ('networkx hopeless girvan', lambda: from_networkx(nx.complete_graph(120),
                                                       method='girvan_newman'),
     ValueError, 'girvan_newman would take very long'),
    ('networkx empty', lambda: from_networkx(nx.Graph()), ValueError, 'node'),
    ('networkx community None', lambda: from_networkx(nx.karate_club_graph(),
                                                      method=lambda graph, seed: None),
     ValueError, 'community method <lambda> returned NoneType for a component of 34 nodes'),
    ('networkx community number', lambda: from_networkx(nx.path_graph(3),
                                                        method=lambda graph, seed: 2),
     ValueError, 'returned int .* must return a list of partitions'),
    ('metis negative weight', lambda: from_edge_index_metis(
        torch.tensor([[0, 1], [1, 2]]), 3, edge_weight=torch.tensor([1.0, -1.0])), ValueError,
     'edge'),
    ('partitions out of range', lambda: from_partitions([[[0, 5]]], 3), ValueError, '5'),
    ('segments 2-d', lambda: from_segments(torch.zeros(2, 2, 2, dtype=torch.long)), ValueError,
     'Segment ids of level 0 must be a vector'),
    ('nested lengths mismatch', lambda: from_nested_lengths([[2, 2], [3]]), ValueError,
     'sum'),
    ('chunk zero', lambda: chunk_sequence(10, 0), ValueError, 'chunk_size'),
    ('chunk no tokens', lambda: chunk_sequence(0, 4), ValueError, 'num_tokens'),
    ('linkage nan height', lambda: from_linkage(np.array([[0, 1, math.nan, 2]])), ValueError,
     'finite'),
    ('linkage shape', lambda: from_linkage(np.zeros((2, 3))), ValueError, 'linkage'),
    ('features nan', lambda: from_features(np.array([[0.0], [math.nan], [1.0]])), ValueError,
     'finite'),
    ('grid zero', lambda: grid_quadtree(0, 4), ValueError, 'height'),
    ('limit children one', lambda: limit_children(TREE, 1), ValueError, 'max_children'),
    ('compose empty', lambda: compose({}), ValueError, 'non-empty mapping'),
    ('compose non-hierarchy', lambda: compose({'a': torch.tensor([1, -1])}), ValueError,
     "Modality 'a' is a Tensor, not a Hierarchy"),
    # ---------------------------------------------------------------- flops
    ('softmax flops negative', lambda: softmax_flops(-3, 4), ValueError, 'num_tokens'),
    ('hsa flops dim', lambda: hsa_flops(TREE, 0), ValueError, "'dim' must be an integer"),
    ('hsa flops heads', lambda: hsa_flops(TREE, 4, heads=0), ValueError, "'heads'"),
    ('block flops 2-d', lambda: block_local_flops(torch.zeros(2, 2, dtype=torch.long), 4),
     ValueError, 'group'),
]


def test_the_corpus_is_large_and_its_ids_unique():
    ids = [case[0] for case in CASES]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)


@pytest.mark.parametrize('call,error,message', [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_malformed_input_raises_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()
