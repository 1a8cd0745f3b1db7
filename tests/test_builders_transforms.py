import gzip
import os

import numpy as np
import pytest
import torch
from torch_geometric.data import Data, HeteroData, InMemoryDataset
from torch_geometric.datasets import KarateClub
from torch_geometric.loader import DataLoader
from torch_geometric.utils import from_smiles

from hsa_geo.data import NestedSignal, hierarchy_from_data
from hsa_geo.hierarchy import Hierarchy, from_networkx
from hsa_geo.transforms import AddHierarchy

from test_builders_helpers import assert_valid_tree

SMILES = ['CCO', 'c1ccccc1O', 'CC(=O)Nc1ccc(O)cc1', 'C', 'CC(C)Cc1ccc(cc1)C(C)C(=O)O',
          'O=C(O)c1ccccc1OC(C)=O', 'CN1C=NC2=C1C(=O)N(C(=O)N2C)C', '[Na+].[Cl-]']


def _hierarchy(data):
    return hierarchy_from_data(data)


def test_keeps_every_attribute_and_adds_the_hierarchy():
    data = KarateClub()[0]
    data.edge_weight = torch.rand(data.edge_index.size(1))
    out = AddHierarchy(max_children=8)(data.clone())
    assert isinstance(out, NestedSignal)
    for key in data.keys():
        assert torch.equal(out[key], data[key]), key
    h = _hierarchy(out)
    assert_valid_tree(h, 34, max_children=8)
    import networkx as nx
    G = nx.Graph()
    G.add_nodes_from(range(34))
    G.add_edges_from(data.edge_index.t().tolist())
    assert torch.equal(h.parent, from_networkx(G, max_children=8).parent)


@pytest.mark.parametrize('method', ['louvain', 'greedy_modularity', 'label_propagation',
                                    'asyn_fluid', 'metis'])
def test_methods(method):
    if method == 'metis':
        pytest.importorskip('pymetis')
    out = AddHierarchy(method, max_children=6, seed=2)(KarateClub()[0])
    assert_valid_tree(_hierarchy(out), 34, max_children=6)


def test_molecules_batch_into_a_forest():
    pytest.importorskip('rdkit')
    transform = AddHierarchy(max_children=4)
    graphs = [transform(from_smiles(s)) for s in SMILES]
    for graph, smiles in zip(graphs, SMILES):
        assert_valid_tree(_hierarchy(graph), graph.num_nodes, max_children=4)
        assert graph.smiles == smiles
    batch = next(iter(DataLoader(graphs, batch_size=len(graphs))))
    forest = hierarchy_from_data(batch)
    assert forest.num_trees == len(graphs)
    assert forest.num_leaves == sum(g.num_nodes for g in graphs)
    assert torch.equal(forest.leaf_batch, batch.batch)


def test_graph_without_x_or_edges():
    out = AddHierarchy(max_children=4)(Data(num_nodes=10))
    assert out.num_nodes == 10
    assert_valid_tree(_hierarchy(out), 10, max_children=4)
    no_edges = torch.empty(2, 0, dtype=torch.long)
    single = AddHierarchy()(Data(x=torch.ones(1, 3), edge_index=no_edges))
    assert single.num_clusters == 0 and single.num_nodes == 1


def test_reapplying_replaces_the_hierarchy():
    once = AddHierarchy(max_children=4)(KarateClub()[0])
    twice = AddHierarchy(max_children=16)(once)
    assert twice.num_clusters != once.num_clusters
    assert_valid_tree(_hierarchy(twice), 34, max_children=16)


def test_edge_weights():
    data = KarateClub()[0]
    data.edge_weight = torch.ones(data.edge_index.size(1))
    weighted = AddHierarchy(use_edge_weight=True)(data)
    plain = AddHierarchy()(KarateClub()[0])
    # unit weights on both directions of every edge: the same graph up to scale
    assert torch.equal(weighted.hierarchy_edge_index, plain.hierarchy_edge_index)
    with pytest.raises(ValueError, match='edge_weight'):
        AddHierarchy(use_edge_weight=True)(KarateClub()[0])


def test_callable_and_errors():
    out = AddHierarchy(lambda data: Hierarchy.flat(data.num_nodes))(KarateClub()[0])
    assert out.num_clusters == 1
    with pytest.raises(ValueError, match='34 nodes'):
        AddHierarchy(lambda data: Hierarchy.flat(3))(KarateClub()[0])
    with pytest.raises(ValueError, match='Unknown method'):
        AddHierarchy('kmeans')
    with pytest.raises(ValueError, match='no nodes'):
        AddHierarchy()(Data(x=torch.empty(0, 3)))
    with pytest.raises(ValueError, match='HeteroData'):
        AddHierarchy()(HeteroData())


def test_repr():
    assert repr(AddHierarchy('metis', max_children=16, seed=3)) == \
        "AddHierarchy(method='metis', max_children=16, seed=3)"
    assert repr(AddHierarchy(resolution=2.0)) == \
        "AddHierarchy(method='louvain', max_children=32, seed=0, resolution=2.0)"


class _Molecules(InMemoryDataset):
    def __init__(self, root, **kwargs):
        super().__init__(root, **kwargs)
        self.load(self.processed_paths[0], data_cls=NestedSignal)

    @property
    def processed_file_names(self):
        return ['data.pt']

    def process(self):
        data_list = [from_smiles(s) for s in SMILES]
        data_list = [self.pre_transform(d) for d in data_list]
        self.save(data_list, self.processed_paths[0])


def test_pre_transform_of_a_pyg_dataset(tmp_path):
    pytest.importorskip('rdkit')
    dataset = _Molecules(str(tmp_path), pre_transform=AddHierarchy(max_children=4))
    assert len(dataset) == len(SMILES)
    assert isinstance(dataset[2], NestedSignal)
    assert_valid_tree(_hierarchy(dataset[2]), dataset[2].num_nodes, max_children=4)
    reloaded = _Molecules(str(tmp_path), pre_transform=AddHierarchy(max_children=4))
    assert torch.equal(reloaded[4].hierarchy_edge_index, dataset[4].hierarchy_edge_index)
    batch = next(iter(DataLoader(dataset, batch_size=4, shuffle=False)))
    assert hierarchy_from_data(batch).num_trees == 4


def _write_ogb_molhiv(root, smiles):
    """A tiny ogbg-molhiv-format folder (OGB's raw CSV layout) from SMILES."""
    from ogb.utils import smiles2graph

    folder = os.path.join(root, 'ogbg_molhiv')
    os.makedirs(os.path.join(folder, 'raw'))
    os.makedirs(os.path.join(folder, 'split', 'scaffold'))
    with open(os.path.join(folder, 'RELEASE_v1.txt'), 'w') as f:
        f.write('test\n')
    edges, node_feat, edge_feat, num_nodes, num_edges = [], [], [], [], []
    for s in smiles:
        graph = smiles2graph(s)
        one_way = graph['edge_index'][0] < graph['edge_index'][1]
        edges.append(graph['edge_index'][:, one_way].T)
        edge_feat.append(graph['edge_feat'][one_way])
        node_feat.append(graph['node_feat'])
        num_nodes.append(graph['num_nodes'])
        num_edges.append(int(one_way.sum()))

    def write(path, rows):
        with gzip.open(os.path.join(folder, path), 'wt') as f:
            np.savetxt(f, np.asarray(rows).reshape(len(rows), -1), fmt='%d', delimiter=',')

    write('raw/edge.csv.gz', np.concatenate(edges))
    write('raw/node-feat.csv.gz', np.concatenate(node_feat))
    write('raw/edge-feat.csv.gz', np.concatenate(edge_feat))
    write('raw/num-node-list.csv.gz', num_nodes)
    write('raw/num-edge-list.csv.gz', num_edges)
    write('raw/graph-label.csv.gz', [i % 2 for i in range(len(smiles))])
    n = len(smiles)
    for name, idx in (('train', range(n - 2)), ('valid', [n - 2]), ('test', [n - 1])):
        write(f'split/scaffold/{name}.csv.gz', list(idx))


def test_pre_transform_of_an_ogb_dataset(tmp_path):
    pytest.importorskip('ogb')
    pytest.importorskip('rdkit')
    from ogb.graphproppred import PygGraphPropPredDataset
    from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
    from torch_geometric.data.storage import GlobalStorage

    # OGB loads its processed file with a bare torch.load (weights_only under torch >= 2.6)
    torch.serialization.add_safe_globals([DataEdgeAttr, DataTensorAttr, GlobalStorage,
                                          NestedSignal])
    smiles = [s for s in SMILES if '.' not in s]
    _write_ogb_molhiv(str(tmp_path), smiles)
    dataset = PygGraphPropPredDataset('ogbg-molhiv', root=str(tmp_path),
                                      pre_transform=AddHierarchy(max_children=4))
    assert len(dataset) == len(smiles)
    graph = dataset[4]
    assert 'hierarchy_edge_index' in graph and graph.x.size(1) == 9
    batch = next(iter(DataLoader(dataset, batch_size=len(smiles))))
    forest = hierarchy_from_data(batch)
    assert forest.num_trees == len(smiles) and forest.summary()['max_children'] <= 4
