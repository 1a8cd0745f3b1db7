import networkx as nx
import numpy as np
import pytest
import torch

from hsa_geo import Hierarchy
from hsa_geo.hierarchy import chunk_sequence, from_networkx
from hsa_geo.plot import leaf_order, plot_hierarchy

from test_builders_helpers import cluster_sets


def test_leaf_order_keeps_subtrees_contiguous():
    G = nx.les_miserables_graph()
    h = from_networkx(G, max_children=6)
    order = leaf_order(h)
    assert sorted(order) == list(range(h.num_leaves))
    position = {leaf: i for i, leaf in enumerate(order)}
    for s in cluster_sets(h):
        places = sorted(position[leaf] for leaf in s)
        assert places[-1] - places[0] + 1 == len(places)


@pytest.mark.parametrize('suffix', ['png', 'svg'])
def test_saves_tree_and_attention(tmp_path, suffix):
    G = nx.karate_club_graph()
    h = from_networkx(G, max_children=8)
    q = torch.randn(34, 2, 8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / f'karate.{suffix}'
    figure = plot_hierarchy(h, path, q=q, k=q, head=1, labels=list(G.nodes), title='karate')
    assert path.exists() and path.stat().st_size > 1000
    tree_ax, matrix_ax = figure.axes[:2]
    assert matrix_ax.get_title() == 'HSA attention (head 1)'
    shown = matrix_ax.get_images()[0].get_array()
    assert shown.shape == (34, 34)
    assert np.allclose(np.asarray(shown).sum(1), 1.0)  # rows of an attention matrix
    assert len(matrix_ax.patches) == h.num_clusters  # one square per cluster


def test_structure_only_and_forests(tmp_path):
    h = Hierarchy.batch_hierarchies([chunk_sequence(6, 2), Hierarchy.flat(4)])
    figure = plot_hierarchy(h, tmp_path / 'forest.png')
    image = np.asarray(figure.axes[1].get_images()[0].get_array(), dtype=float)
    assert np.isnan(image[0, 9])  # different trees: no common ancestor
    assert image[0, 1] == 2.0  # leaves 0, 1 share a depth-2 cluster (in leaf order)


def test_bad_input():
    with pytest.raises(ValueError, match='max_leaves'):
        plot_hierarchy(Hierarchy.flat(20), max_leaves=10)
    with pytest.raises(ValueError, match='both q and k'):
        plot_hierarchy(Hierarchy.flat(3), q=torch.randn(3, 2))
    with pytest.raises(ValueError, match='Hierarchy'):
        plot_hierarchy(torch.tensor([1, -1]))
