import pytest
import torch
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader

from hsa_geo import Hierarchy, NestedSignal, hierarchy_from_data
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
        assert torch.device('cpu') in hierarchy._layouts
    with use_cpu_kernel(False):
        planned = next(iter(HierarchyLoader(graphs, batch_size=5)))
    assert torch.device('cpu') in hierarchy_from_data(planned)._layouts
    rebuilt = hierarchy_from_data(plain)
    assert torch.equal(hierarchy.parent, rebuilt.parent)
    assert torch.equal(hierarchy.batch, rebuilt.batch)


def test_loader_doctests():
    import doctest

    import hsa_geo.loader
    assert doctest.testmod(hsa_geo.loader, raise_on_error=True).attempted > 0
