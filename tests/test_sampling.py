"""Node-level mini-batching: a hierarchy restricted to a subset of its leaves
(subhierarchy), and nested signals whose nodes PyG selects or reorders after
the hierarchy was attached (subgraph, NeighborLoader, ClusterData)."""
import doctest
import random
from typing import Dict, FrozenSet, List

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch_geometric.data import Batch, Data
from torch_geometric.loader import DataLoader

from hsa_geo import Hierarchy, HSAConv, NestedSignal, hierarchy_from_data
from hsa_geo.functional import hsa, hsa_dense
from hsa_geo.hierarchy import subhierarchy
from random_trees import random_parent
from sampling_stand_in import first_neighbors


# ------------------------------------------------------------ the tree facts
def _paths(parent: List[int], leaf: int) -> List[int]:
    path = [leaf]
    while parent[path[-1]] >= 0:
        path.append(parent[path[-1]])
    return path


def _leaf_sets_on_paths(hierarchy: Hierarchy, relabel=None) -> Dict[int, List[FrozenSet[int]]]:
    r"""For every leaf, the leaf sets of the nodes on its path to the root
    (through :obj:`relabel`, a map of leaf ids, dropping unmapped leaves),
    with repeats (single-child chains) removed."""
    parent = hierarchy.parent.tolist()
    below: Dict[int, set] = {}
    for leaf in range(hierarchy.num_leaves):
        for node in _paths(parent, leaf):
            below.setdefault(node, set()).add(leaf)
    out = {}
    for leaf in range(hierarchy.num_leaves):
        if relabel is not None and leaf not in relabel:
            continue
        sets = []
        for node in _paths(parent, leaf):
            leaves = frozenset(relabel[i] for i in below[node] if relabel is None or i in relabel) \
                if relabel is not None else frozenset(below[node])
            if not sets or sets[-1] != leaves:
                sets.append(leaves)
        out[leaf if relabel is None else relabel[leaf]] = sets
    return out


def _random_case(seed: int):
    parent, num_leaves = random_parent(seed, max_leaves=24, max_depth=6, max_children=5)
    hierarchy = Hierarchy.from_parent(parent, num_leaves)
    rng = random.Random(seed)
    size = rng.randint(1, num_leaves)
    leaves = rng.sample(range(num_leaves), size)  # a random subset in a random order
    return hierarchy, leaves


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10 ** 6), keep_chains=st.booleans())
def test_subhierarchy_keeps_the_full_trees_nesting_among_the_kept_leaves(seed, keep_chains):
    # A tree is its nested family of leaf sets: every kept leaf sees, on its
    # way to the root, the full tree's leaf sets cut down to the kept leaves
    hierarchy, leaves = _random_case(seed)
    restricted, node_id = subhierarchy(hierarchy, leaves, keep_chains=keep_chains,
                                       return_node_id=True)
    assert restricted.num_leaves == len(leaves)
    assert node_id[:len(leaves)].tolist() == leaves
    relabel = {leaf: i for i, leaf in enumerate(leaves)}
    assert _leaf_sets_on_paths(restricted) == _leaf_sets_on_paths(hierarchy, relabel)
    # depths and leaf counts are those of the new tree
    rebuilt = Hierarchy.from_parent(restricted.parent.clone(), restricted.num_leaves)
    assert torch.equal(restricted.depth, rebuilt.depth)
    assert torch.equal(restricted.num_leaves_below, rebuilt.num_leaves_below)
    # kept clusters are the ancestors of kept leaves, nothing else
    full_parent = hierarchy.parent.tolist()
    ancestors = {node for leaf in leaves for node in _paths(full_parent, leaf)}
    assert set(node_id.tolist()) <= ancestors
    if keep_chains:
        assert set(node_id.tolist()) == ancestors
    else:
        children = restricted.num_children[restricted.num_leaves:]
        assert bool((children != 1).all())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10 ** 6))
def test_hsa_over_a_subhierarchy(seed):
    hierarchy, leaves = _random_case(seed)
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(hierarchy.num_leaves, 2, 4, generator=generator, dtype=torch.float64)
               for _ in range(3))
    index = torch.tensor(leaves)
    with_chains = subhierarchy(hierarchy, leaves, keep_chains=True)
    restricted = subhierarchy(hierarchy, leaves)
    dense = hsa_dense(q[index], k[index], restricted)
    # single-child clusters change nothing
    torch.testing.assert_close(hsa_dense(q[index], k[index], with_chains), dense)
    # the engines agree with the definition on the restricted tree
    out = hsa(q[index], k[index], v[index], restricted)
    torch.testing.assert_close(out, torch.einsum('hij,jhd->ihd', dense, v[index]))
    # every leaf kept, in another order: the full attention, permuted
    order = torch.randperm(hierarchy.num_leaves, generator=generator)
    full = hsa_dense(q, k, hierarchy)
    permuted = hsa_dense(q[order], k[order], subhierarchy(hierarchy, order))
    torch.testing.assert_close(permuted, full[:, order][:, :, order])


def test_subhierarchy_carries_the_graph_ids_and_the_order():
    trees = [Hierarchy.from_parent(torch.tensor([4, 4, 5, 5, 6, 6, -1]), 4),
             Hierarchy.flat(3)]
    forest = Hierarchy.batch_hierarchies(trees)  # leaves 0..3 graph 0, 4..6 graph 1
    part = subhierarchy(forest, [0, 2, 3, 5])
    assert part.num_trees == 2
    assert part.leaf_batch.tolist() == [0, 0, 0, 1]
    assert part.ordered is False  # the flat tree is ordered, the first one is not
    ordered = Hierarchy.from_parent(torch.tensor([4, 4, 5, 5, 6, 6, -1]), 4, ordered=True)
    assert subhierarchy(ordered, [0, 2, 3]).ordered
    assert not subhierarchy(ordered, [2, 0, 3]).ordered


@pytest.mark.parametrize('leaves, message', [
    ([0, 5], 'Leaf id 5 at position 1 is not a leaf'),
    ([1, 0, 1], 'Leaf id 1 appears twice, at positions 0 and 2'),
    ([], 'at least one leaf'),
    ([[0, 1]], 'one-dimensional'),
    (torch.tensor([0.0]), 'integers'),
    ([-1], 'Leaf id -1 at position 0'),
])
def test_subhierarchy_refuses_bad_leaf_ids_by_position(leaves, message):
    with pytest.raises(ValueError, match=message):
        subhierarchy(Hierarchy.flat(4), leaves)


def test_subgraph_module_doctests():
    import hsa_geo.hierarchy.subgraph as module
    assert doctest.testmod(module, raise_on_error=True).attempted > 0


# ------------------------------------------------- nested signals, reordered
def _nested_signal(seed: int = 0, num_nodes: int = 30) -> NestedSignal:
    from hsa_geo.transforms import AddHierarchy
    generator = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, num_nodes, (2, 4 * num_nodes), generator=generator)
    edge_index = torch.cat([edge_index, edge_index.flip(0)], dim=1)
    data = Data(x=torch.randn(num_nodes, 8, generator=generator), edge_index=edge_index,
                y=torch.arange(num_nodes) % 3)
    return AddHierarchy('louvain', max_children=4, seed=seed)(data)


def test_a_permutation_of_the_nodes_is_followed():
    # Before hierarchy_leaf, a same-size reorder of a nested signal's nodes
    # (here by PyG's subgraph) kept the old tree: the layer silently attended
    # with node i in leaf i's place. Uses only what existed before.
    data = _nested_signal()
    perm = torch.randperm(data.num_nodes, generator=torch.Generator().manual_seed(1))
    permuted = data.subgraph(perm)
    torch.manual_seed(0)
    conv = HSAConv(8, 8, heads=2).eval()
    expected = conv(data.x, hierarchy_from_data(data))[perm]
    out = conv(permuted.x, hierarchy_from_data(permuted))
    torch.testing.assert_close(out, expected)


def test_a_subgraph_gets_the_restricted_hierarchy():
    data = _nested_signal()
    index = torch.tensor([7, 3, 22, 0, 15, 9])
    part = data.subgraph(index)
    assert part.hierarchy_leaf.tolist() == index.tolist()
    expected = subhierarchy(hierarchy_from_data(data), index)
    got = hierarchy_from_data(part)
    assert torch.equal(got.parent, expected.parent)
    # a subgraph of a subgraph: still the leaves of the first tree
    again = part.subgraph(torch.tensor([4, 1, 2]))
    assert torch.equal(hierarchy_from_data(again).parent,
                       subhierarchy(hierarchy_from_data(data), index[[4, 1, 2]]).parent)
    # a boolean mask keeps the order of the nodes
    mask = torch.zeros(data.num_nodes, dtype=torch.bool)
    mask[index] = True
    assert torch.equal(hierarchy_from_data(data.subgraph(mask)).parent,
                       subhierarchy(hierarchy_from_data(data), index.sort().values).parent)


def test_batches_of_subgraphs_and_a_stale_planned_forest():
    from hsa_geo.loader import HierarchyLoader
    graphs = [_nested_signal(seed) for seed in range(3)]
    parts = [graphs[0].subgraph(torch.tensor([5, 1, 2])), graphs[1],
             graphs[2].subgraph(torch.tensor([9, 8, 7, 6, 0]))]
    batch = next(iter(DataLoader(parts, batch_size=3)))
    expected = Hierarchy.batch_hierarchies([hierarchy_from_data(part) for part in parts])
    forest = hierarchy_from_data(batch)
    assert torch.equal(forest.parent, expected.parent)
    assert torch.equal(forest.batch, expected.batch)
    # the loader plans the restricted forest; a reorder after it is followed
    planned = next(iter(HierarchyLoader(parts, batch_size=3)))
    assert torch.equal(hierarchy_from_data(planned).parent, expected.parent)
    whole = next(iter(HierarchyLoader(graphs[:1], batch_size=1)))
    perm = torch.arange(whole.num_nodes).flip(0)
    reordered = whole.subgraph(perm)  # keeps the planned forest, now stale
    assert torch.equal(hierarchy_from_data(reordered).parent,
                       subhierarchy(hierarchy_from_data(graphs[0]), perm).parent)


def test_selected_nodes_that_cannot_be_followed_are_refused_by_name():
    data = _nested_signal()
    with pytest.raises(ValueError, match='Leaf id 3 appears twice, at nodes 1 and 2'):
        hierarchy_from_data(data.subgraph(torch.tensor([0, 3, 3])))
    bad = data.clone()
    bad.hierarchy_leaf = bad.hierarchy_leaf.clone()
    bad.hierarchy_leaf[4] = 99
    with pytest.raises(ValueError, match='Leaf id 99 at node 4 is not a leaf'):
        hierarchy_from_data(bad)
    grown = data.clone()
    grown.x = torch.cat([grown.x, torch.zeros(1, 8)])  # a node without a leaf
    with pytest.raises(ValueError, match=r'hierarchy_leaf has shape \(30,\), but the data has '
                                         r'31 nodes'):
        hierarchy_from_data(grown)
    batch = Batch.from_data_list([data, data])
    with pytest.raises(ValueError, match='nodes were selected from a batch of graphs'):
        hierarchy_from_data(batch.subgraph(torch.tensor([0, 1, 40])))
    disjoint = data.subgraph(torch.tensor([0, 1, 0]))  # as NeighborLoader(disjoint=True)
    disjoint.batch = torch.tensor([0, 1, 1])
    with pytest.raises(ValueError, match=r'disjoint NeighborLoader batch'):
        hierarchy_from_data(disjoint)
    # without hierarchy_leaf (stored by hand), a changed node count is refused
    legacy = NestedSignal(x=data.x, hierarchy_edge_index=data.hierarchy_edge_index,
                          num_clusters=data.num_clusters)
    with pytest.raises(ValueError, match="no 'hierarchy_leaf' to follow them"):
        hierarchy_from_data(legacy.subgraph(torch.tensor([0, 1, 2])))


# ------------------------------------------------ PyG's node-level loaders
def _sampler_backend() -> str:
    import torch_geometric.typing as pyg_typing
    if pyg_typing.WITH_PYG_LIB or pyg_typing.WITH_TORCH_SPARSE:
        return ''
    return ("NeighborLoader needs a sampler backend: pyg-lib (not on PyPI) or torch-sparse "
            "(pip install --no-build-isolation torch-sparse; make sampler)")


@pytest.mark.parametrize('sampler', ['compiled', 'stand-in'])
def test_neighbor_loader_batches_get_the_restricted_hierarchy(sampler, monkeypatch):
    # PyG's NeighborLoader as it is; without a sampler backend, only its
    # compiled sampling op is replaced (the batch is assembled by PyG)
    from torch_geometric.loader import NeighborLoader
    from torch_geometric.sampler import NeighborSampler
    if sampler == 'compiled' and _sampler_backend():
        pytest.skip(_sampler_backend())
    if sampler == 'stand-in':
        monkeypatch.setattr(NeighborSampler, '_sample', first_neighbors)
    data = _nested_signal(num_nodes=60)
    full = hierarchy_from_data(data)
    loader = NeighborLoader(data, num_neighbors=[3, 2], batch_size=5, shuffle=True)
    torch.manual_seed(0)
    conv = HSAConv(8, 8, heads=2).eval()
    for step, batch in enumerate(loader):
        assert torch.equal(batch.hierarchy_leaf, batch.n_id)
        restricted = subhierarchy(full, batch.n_id)
        hierarchy = hierarchy_from_data(batch)
        assert torch.equal(hierarchy.parent, restricted.parent)
        out = conv(batch.x, hierarchy)
        torch.testing.assert_close(out, conv(data.x[batch.n_id], restricted))
        if step == 3:
            break


def _cluster_data(data, num_parts, partition=None):
    r"""PyG's ClusterData; with :obj:`partition`, METIS is replaced by it (so
    the permutation and the loader run without a METIS backend)."""
    from torch_geometric.loader import ClusterData
    if partition is None:
        return ClusterData(data, num_parts=num_parts, log=False)

    class GivenPartition(ClusterData):
        def _metis(self, edge_index, num_nodes):
            return partition

    return GivenPartition(data, num_parts=num_parts, log=False)


def test_cluster_data_permutes_the_leaves_with_the_nodes():
    # ClusterData reorders every node attribute by partition: before
    # hierarchy_leaf the tree stayed put and HSAConv was silently wrong
    from torch_geometric.loader import ClusterLoader
    data = _nested_signal(num_nodes=40)
    full = hierarchy_from_data(data)
    partition = torch.randint(0, 4, (data.num_nodes, ), generator=torch.Generator().manual_seed(0))
    cluster_data = _cluster_data(data, 4, partition)
    torch.manual_seed(0)
    conv = HSAConv(8, 8, heads=2).eval()
    node_perm = cluster_data.partition.node_perm
    whole = cluster_data.data  # all nodes, permuted
    torch.testing.assert_close(conv(whole.x, hierarchy_from_data(whole)),
                               conv(data.x, full)[node_perm])
    for batch in ClusterLoader(cluster_data, batch_size=2, shuffle=True):
        restricted = subhierarchy(full, batch.hierarchy_leaf)
        assert torch.equal(hierarchy_from_data(batch).parent, restricted.parent)
        torch.testing.assert_close(conv(batch.x, hierarchy_from_data(batch)),
                                   conv(data.x[batch.hierarchy_leaf], restricted))


def _metis_backend() -> str:
    try:
        import torch_sparse  # noqa: F401
    except ImportError:
        return ("ClusterData's METIS needs pyg-lib or torch-sparse built with WITH_METIS=1 "
                "against a 64-bit METIS")
    try:
        torch.ops.torch_sparse.partition(torch.tensor([0, 1, 2]), torch.tensor([1, 0]), None, 2,
                                         False)
    except RuntimeError as error:
        return f"torch-sparse was built without METIS ({error})"
    return ''


@pytest.mark.skipif(bool(_metis_backend()), reason=_metis_backend())
def test_cluster_loader_with_metis():
    from torch_geometric.loader import ClusterLoader
    data = _nested_signal(num_nodes=60)
    full = hierarchy_from_data(data)
    for batch in ClusterLoader(_cluster_data(data, 6), batch_size=2):
        assert torch.equal(hierarchy_from_data(batch).parent,
                           subhierarchy(full, batch.hierarchy_leaf).parent)


def test_the_neighbor_loader_example_names_the_missing_backend(monkeypatch):
    import os.path as osp
    import sys

    import torch_geometric.typing as pyg_typing
    sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'examples'))
    import arxiv_neighbor_loader
    import common
    monkeypatch.setattr(pyg_typing, 'WITH_PYG_LIB', False)
    monkeypatch.setattr(pyg_typing, 'WITH_TORCH_SPARSE', False)
    with pytest.raises(common.ExampleError, match='NeighborLoader needs a sampler backend.*'
                                                  'torch-sparse'):
        arxiv_neighbor_loader.main(['--root', 'no/such/folder'])


def test_a_selection_in_order_keeps_an_ordered_hierarchy_ordered():
    from hsa_geo.hierarchy import chunk_sequence
    sequence = NestedSignal.from_hierarchy(torch.randn(20, 2), chunk_sequence(20, 4))
    assert hierarchy_from_data(sequence.subgraph(torch.tensor([1, 5, 6, 19]))).ordered
    assert not hierarchy_from_data(sequence.subgraph(torch.tensor([5, 1, 6, 19]))).ordered
