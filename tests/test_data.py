import pytest
import torch
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader

from hsa_geo import Hierarchy, NestedSignal, hierarchy_from_data
from hsa_geo.functional.engines import engine_cache
from random_trees import random_hierarchy


def test_nested_signal_round_trip_and_batching():
    hierarchies = [random_hierarchy(seed) for seed in range(6)]
    data = [NestedSignal.from_hierarchy(torch.randn(h.num_leaves, 3), h,
                                        edge_index=torch.tensor([[0], [0]]))
            for h in hierarchies]
    for d, h in zip(data, hierarchies):
        assert torch.equal(hierarchy_from_data(d).parent, h.parent)
    batch = next(iter(DataLoader(data, batch_size=6)))
    forest = hierarchy_from_data(batch)
    expected = Hierarchy.batch_hierarchies(hierarchies)
    assert torch.equal(forest.parent, expected.parent)
    assert torch.equal(forest.batch, expected.batch)
    # the ordinary edge_index is still shifted by leaves only
    assert batch.edge_index[0].tolist() == batch.ptr[:-1].tolist()


def test_errors():
    h = Hierarchy.flat(3)
    with pytest.raises(ValueError, match='x has 4 rows but the hierarchy has 3 leaves'):
        NestedSignal.from_hierarchy(torch.randn(4, 2), h)
    with pytest.raises(ValueError, match='data has no hierarchy'):
        hierarchy_from_data(Data(x=torch.randn(3, 2)))
    bad = NestedSignal(x=torch.randn(2, 1), hierarchy_edge_index=torch.tensor([[0, 1], [2, 9]]),
                       num_clusters=1)
    with pytest.raises(ValueError, match='outside'):
        hierarchy_from_data(bad)
    two_parents = NestedSignal(x=torch.randn(2, 1), num_clusters=2,
                               hierarchy_edge_index=torch.tensor([[0, 0, 1, 2], [2, 3, 2, 3]]))
    with pytest.raises(ValueError, match='Node 0 has more than one parent'):
        hierarchy_from_data(two_parents)


def test_hierarchy_loader_plans_the_forest_in_the_collate():
    from torch_geometric.datasets import KarateClub
    from torch_geometric.loader import DataLoader

    from hsa_geo.data import hierarchy_from_data
    from hsa_geo.functional.kernel import available as kernel_available
    from hsa_geo.functional.kernel import use_cpu_kernel
    from hsa_geo.loader import HierarchyLoader
    from hsa_geo.transforms import AddHierarchy
    graphs = [AddHierarchy('louvain', max_children=8, seed=seed)(KarateClub()[0])
              for seed in range(5)]
    planned = next(iter(HierarchyLoader(graphs, batch_size=5)))
    plain = next(iter(DataLoader(graphs, batch_size=5)))
    hierarchy = hierarchy_from_data(planned)
    assert hierarchy is planned.hierarchy  # no rebuild in the training step
    # what the CPU sweeps read is ready: the kernel's tables (or, with the
    # kernel off, the slot layout)
    if kernel_available(torch.empty(0)):
        assert hierarchy._family_tables is not None
    else:
        assert torch.device('cpu') in engine_cache(hierarchy).slot_layouts
    with use_cpu_kernel(False):
        planned = next(iter(HierarchyLoader(graphs, batch_size=5)))
    assert torch.device('cpu') in engine_cache(hierarchy_from_data(planned)).slot_layouts
    rebuilt = hierarchy_from_data(plain)
    assert torch.equal(hierarchy.parent, rebuilt.parent)
    assert torch.equal(hierarchy.batch, rebuilt.batch)


def test_loader_doctests():
    import doctest

    import hsa_geo.loader
    assert doctest.testmod(hsa_geo.loader, raise_on_error=True).attempted > 0


# ------------------------------------------- PyG transforms after AddHierarchy
def _graph_with_hierarchy(num_nodes, edge_index, hierarchy):
    from hsa_geo.transforms import AddHierarchy
    data = Data(x=torch.randn(num_nodes, 3), edge_index=edge_index, y=torch.tensor([1]))
    return AddHierarchy(lambda graph: hierarchy)(data)


def _cycle(num_nodes):
    source = torch.arange(num_nodes)
    return torch.stack([source, (source + 1) % num_nodes])


# hierarchy_edge_index as wide as the graph's edges (6 leaves under one root:
# 6 parent edges; a directed 6-cycle), and as wide as its nodes
SIZE_COINCIDENCES = {
    'as many parent edges as edges': (6, _cycle(6), Hierarchy.flat(6)),
    'as many parent edges as nodes': (
        5, torch.tensor([[0, 1, 2], [1, 2, 3]]), Hierarchy.flat(5)),
}


def _transforms():
    import torch_geometric.transforms as T
    return {
        'ToUndirected': T.ToUndirected(), 'AddSelfLoops': T.AddSelfLoops(),
        'NormalizeFeatures': T.NormalizeFeatures(),
        'RandomNodeSplit': T.RandomNodeSplit(num_val=1, num_test=1),
        'RandomLinkSplit': lambda d: T.RandomLinkSplit(num_val=0.2, num_test=0.2)(d)[0],
        'to_undirected': lambda d: d.update(
            {'edge_index': __import__('torch_geometric').utils.to_undirected(d.edge_index)}),
        'coalesce': lambda d: d.coalesce(),
        'Compose': T.Compose([T.ToUndirected(), T.AddSelfLoops()]),
    }


@pytest.mark.parametrize('case', list(SIZE_COINCIDENCES))
@pytest.mark.parametrize('transform', list(_transforms()))
def test_edge_transforms_after_add_hierarchy_keep_the_hierarchy(case, transform):
    # PyG tells node, edge and other attributes apart by their size; the
    # hierarchy must not be taken for edges (permuted, split, doubled) or
    # nodes, whatever its size
    num_nodes, edge_index, hierarchy = SIZE_COINCIDENCES[case]
    data = _graph_with_hierarchy(num_nodes, edge_index, hierarchy)
    assert not data.is_edge_attr('hierarchy_edge_index')
    assert not data.is_node_attr('hierarchy_edge_index')
    out = _transforms()[transform](data.clone())
    assert torch.equal(out.hierarchy_edge_index, data.hierarchy_edge_index)
    assert torch.equal(hierarchy_from_data(out).parent, hierarchy.parent)
    batch = next(iter(DataLoader([out, out], batch_size=2)))
    assert hierarchy_from_data(batch).num_trees == 2


@pytest.mark.parametrize('case', list(SIZE_COINCIDENCES))
def test_a_subgraph_of_a_nested_signal_gets_the_restricted_hierarchy(case):
    # the nodes carry their leaves (hierarchy_leaf), whatever the sizes
    from hsa_geo.hierarchy import subhierarchy
    num_nodes, edge_index, hierarchy = SIZE_COINCIDENCES[case]
    data = _graph_with_hierarchy(num_nodes, edge_index, hierarchy)
    part = data.subgraph(torch.tensor([2, 0, 1]))
    assert torch.equal(hierarchy_from_data(part).parent,
                       subhierarchy(hierarchy, [2, 0, 1]).parent)
    # stored without hierarchy_leaf, the change is refused by name
    del part.hierarchy_leaf
    with pytest.raises(ValueError, match=r"the nodes changed after the hierarchy was built.*"
                                         r"AddHierarchy"):
        hierarchy_from_data(part)


def test_nested_signals_round_trip_through_an_in_memory_dataset(tmp_path):
    # collate and separate take the hierarchy's NumPy-integer cat dimension
    from torch_geometric.data import Batch, InMemoryDataset

    graphs = [NestedSignal.from_hierarchy(torch.randn(h.num_leaves, 2), h, y=torch.tensor([i]))
              for i, h in enumerate(random_hierarchy(seed) for seed in range(5))]

    class Nested(InMemoryDataset):
        def __init__(self, root):
            super().__init__(root)
            self.load(self.processed_paths[0])

        @property
        def processed_file_names(self):
            return ['data.pt']

        def process(self):
            self.save(graphs, self.processed_paths[0])

    dataset = Nested(str(tmp_path))
    reloaded = Nested(str(tmp_path))  # from the processed file
    for data in (dataset, reloaded):
        for i, graph in enumerate(graphs):
            assert torch.equal(data[i].hierarchy_edge_index, graph.hierarchy_edge_index)
            assert torch.equal(hierarchy_from_data(data[i]).parent,
                               hierarchy_from_data(graph).parent)
    batch = Batch.from_data_list(graphs)
    assert torch.equal(batch.get_example(3).hierarchy_edge_index, graphs[3].hierarchy_edge_index)
    assert torch.equal(hierarchy_from_data(Batch.from_data_list(batch[[1, 4]])).parent,
                       Hierarchy.batch_hierarchies([hierarchy_from_data(graphs[1]),
                                                    hierarchy_from_data(graphs[4])]).parent)


def test_the_forest_of_the_last_batch_is_built_once_and_never_stale():
    graphs = [NestedSignal.from_hierarchy(torch.randn(h.num_leaves, 3), h)
              for h in (random_hierarchy(seed) for seed in range(4))]
    batch = next(iter(DataLoader(graphs, batch_size=4)))
    forest = hierarchy_from_data(batch)
    assert hierarchy_from_data(batch) is forest  # every layer shares one forest
    fewer = next(iter(DataLoader(graphs[:3], batch_size=3)))
    assert hierarchy_from_data(fewer).num_trees == 3
    again = hierarchy_from_data(batch)
    assert again is not forest and torch.equal(again.parent, forest.parent)
    batch.num_clusters[0] += 0  # an in-place edit of what the forest is read from
    assert hierarchy_from_data(batch) is not again
    with pytest.raises(ValueError, match='not a leaf'):  # a changed count is read, not cached
        batch.num_clusters = batch.num_clusters + 1
        hierarchy_from_data(batch)
