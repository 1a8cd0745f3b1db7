import time

import pytest
import torch
from torch_geometric.datasets import KarateClub
from torch_geometric.utils import stochastic_blockmodel_graph, to_undirected

from benchmarks.builders import planted_partition_graph, tree_quality
from hsa_geo.hierarchy import from_edge_index_metis
from hsa_geo.hierarchy.builders.metis import num_parts

from test_builders_helpers import assert_valid_tree, children_of, leaf_sets

pymetis = pytest.importorskip('pymetis')


def test_karate():
    data = KarateClub()[0]
    h = from_edge_index_metis(data.edge_index, data.num_nodes, max_children=6)
    assert_valid_tree(h, 34, max_children=6)
    again = from_edge_index_metis(data.edge_index, data.num_nodes, max_children=6)
    assert torch.equal(h.parent, again.parent)


def test_planted_blocks_are_recovered():
    torch.manual_seed(0)
    edge_index = stochastic_blockmodel_graph([40] * 8, torch.full((8, 8), 0.005)
                                             + 0.4 * torch.eye(8))
    perm = torch.randperm(320)
    edge_index = perm[edge_index]  # node ids carry no block information
    block = torch.empty(320, dtype=torch.long)
    block[perm] = torch.arange(320) // 40
    h = from_edge_index_metis(edge_index, 320, max_children=8)
    assert_valid_tree(h, 320, max_children=8)
    quality = tree_quality(h, edge_index, block)
    # 8 root children of 40 nodes: METIS finds the 8 blocks (a random tree keeps ~1/8)
    assert len(children_of(h)[int(h.roots[0])]) == 8
    assert quality['edges_within_depth_1_subtree'] > 0.9
    root = int(h.roots[0])
    tops = [leaf_sets(h)[c] for c in children_of(h)[root]]
    purity = sum(max(torch.bincount(block[list(s)]).tolist()) for s in tops) / 320
    assert purity > 0.9


def test_depth_is_as_shallow_as_max_children_allows():
    edge_index, _ = planted_partition_graph(num_nodes=5000, num_edges=30_000, num_blocks=10)
    h = from_edge_index_metis(edge_index, 5000, max_children=16)
    assert_valid_tree(h, 5000, max_children=16)
    s = h.summary()
    # ceil(log_16 5000) = 4 levels below the giant component's cluster, which
    # is a child of the root (isolated nodes are other children); one more
    # only where METIS overshoots
    assert s['max_depth'] <= 6 and s['mean_leaf_depth'] <= 5.1
    assert len(children_of(h)[int(h.roots[0])]) <= 16


def test_disconnected_and_isolated_nodes():
    edges = torch.tensor([[0, 1, 2, 3, 10, 11], [1, 2, 0, 4, 11, 12]])
    h = from_edge_index_metis(edges, num_nodes=20, max_children=4)
    assert_valid_tree(h, 20, max_children=4)
    sets = set(leaf_sets(h).values())
    for component in ({0, 1, 2}, {3, 4}, {10, 11, 12}):
        assert frozenset(component) in sets


def test_directed_repeated_and_self_loop_edges_are_the_same_graph():
    data = KarateClub()[0]
    one_way = data.edge_index[:, data.edge_index[0] < data.edge_index[1]]
    noisy = torch.cat([one_way, one_way[:, :20], torch.arange(34).repeat(2, 1)], dim=1)
    a = from_edge_index_metis(to_undirected(one_way), 34, max_children=5)
    b = from_edge_index_metis(noisy, 34, max_children=5)
    assert torch.equal(a.parent, b.parent)


def test_edgeless_and_tiny_graphs():
    h = from_edge_index_metis(torch.empty(2, 0, dtype=torch.long), num_nodes=100,
                              max_children=8)
    assert_valid_tree(h, 100, max_children=8)
    single = from_edge_index_metis(torch.empty(2, 0, dtype=torch.long), num_nodes=1)
    assert single.num_leaves == 1 and single.num_clusters == 0
    clique = torch.combinations(torch.arange(50)).t()
    assert_valid_tree(from_edge_index_metis(clique, max_children=7), 50, max_children=7)


@pytest.mark.parametrize('edge_index, num_nodes, match', [
    (torch.tensor([[0, 1], [1, 5]]), 3, r'Edge 1 refers to node 5, outside \[0, 2\]'),
    (torch.tensor([[0, -1], [1, 2]]), 3, 'node -1'),
    (torch.tensor([[0., 1.], [1., 2.]]), 3, 'integer'),
    (torch.tensor([0, 1, 2]), 3, r'shape \[2, E\]'),
    (torch.empty(2, 0, dtype=torch.long), None, 'give num_nodes'),
    (torch.empty(2, 0, dtype=torch.long), 0, 'num_nodes'),
])
def test_bad_input(edge_index, num_nodes, match):
    with pytest.raises(ValueError, match=match):
        from_edge_index_metis(edge_index, num_nodes)


def test_max_children_required():
    with pytest.raises(ValueError, match='max_children'):
        from_edge_index_metis(torch.tensor([[0], [1]]), 2, max_children=None)


def test_num_parts():
    assert num_parts(33, 32) == 2
    assert num_parts(1000, 32) == 33 - 1  # capped at max_children
    assert num_parts(640, 32) == 21  # ceil(1.03 * 640 / 32)
    assert num_parts(1025, 32) == 32
    assert num_parts(169_343, 32) == 32
    assert all(2 <= num_parts(n, m) <= m for n in range(3, 3000, 7) for m in (2, 3, 8, 32)
               if n > m)


@pytest.mark.slow
def test_arxiv_sized_graph_within_a_minute():
    edge_index, block = planted_partition_graph()  # 169,343 nodes, 1.2M edges
    start = time.perf_counter()
    h = from_edge_index_metis(edge_index, block.numel())
    assert time.perf_counter() - start < 60
    assert_valid_tree(h, block.numel(), max_children=32)


def test_metis_follows_edge_weights():
    # two paths 0..7 and 8..15 joined by rungs (i, i + 8): unweighted, the
    # cheapest cut crosses two path edges; with heavy path edges and light
    # rungs, it is the rungs
    from torch_geometric.data import Data
    from hsa_geo.transforms import AddHierarchy
    paths = [(i, i + 1) for i in range(7)] + [(i + 8, i + 9) for i in range(7)]
    rungs = [(i, i + 8) for i in range(8)]
    edge_index = torch.tensor(paths + rungs).t()
    weight = torch.tensor([100.0] * len(paths) + [1.0] * len(rungs))
    data = Data(edge_index=edge_index, edge_weight=weight, num_nodes=16)

    def halves(use_edge_weight):
        hierarchy = AddHierarchy('metis', max_children=9, use_edge_weight=use_edge_weight,
                                 seed=0).hierarchy(data)
        parent = hierarchy.parent[:16]
        return bool((parent[:8] == parent[0]).all() and (parent[8:] == parent[8]).all())

    assert halves(True)
    assert not halves(False)
    with pytest.raises(ValueError, match='positive and finite: edge 0'):
        from_edge_index_metis(edge_index, 16, max_children=8,
                              edge_weight=torch.cat([torch.zeros(1), weight[1:]]))
