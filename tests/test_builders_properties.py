"""Property tests on random input: every leaf exactly once, every cluster
over at least one leaf, max_children respected, no chains, deterministic for
a seed."""
import networkx as nx
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsa_geo.hierarchy import compose, from_networkx, from_partitions, from_segments

from test_builders_helpers import assert_valid_tree, cluster_sets

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def random_graphs(draw):
    num_nodes = draw(st.integers(1, 30))
    node = st.integers(0, num_nodes - 1)
    edges = draw(st.lists(st.tuples(node, node), max_size=3 * num_nodes))
    kind = draw(st.sampled_from([nx.Graph, nx.DiGraph, nx.MultiGraph, nx.MultiDiGraph]))
    G = kind()
    labels = draw(st.sampled_from(['int', 'str', 'sparse']))
    name = {'int': lambda v: v, 'str': lambda v: f'n{v}', 'sparse': lambda v: 7 * v + 3}[labels]
    G.add_nodes_from(name(v) for v in range(num_nodes))  # isolated nodes included
    G.add_edges_from((name(u), name(v)) for u, v in edges)  # self-loops, repeats
    return G


@SETTINGS
@given(G=random_graphs(), method=st.sampled_from(['louvain', 'greedy_modularity',
                                                  'label_propagation', 'asyn_fluid']),
       max_children=st.integers(2, 6), seed=st.integers(0, 3))
def test_from_networkx_properties(G, method, max_children, seed):
    h = from_networkx(G, method=method, seed=seed, max_children=max_children)
    assert_valid_tree(h, G.number_of_nodes(), max_children=max_children)
    again = from_networkx(G, method=method, seed=seed, max_children=max_children)
    assert torch.equal(h.parent, again.parent)


@settings(max_examples=15, deadline=None)
@given(G=random_graphs(), max_children=st.integers(2, 5))
def test_girvan_newman_properties(G, max_children):
    h = from_networkx(G, method='girvan_newman', max_levels=2, max_children=max_children)
    assert_valid_tree(h, G.number_of_nodes(), max_children=max_children)


@st.composite
def nested_labels(draw):
    """Leaf labels of nested partitions, fine to coarse: each level merges
    random groups of the sets of the level below."""
    num_leaves = draw(st.integers(1, 40))
    label = draw(st.lists(st.integers(0, 9), min_size=num_leaves, max_size=num_leaves))
    levels = [torch.tensor(label)]
    for _ in range(draw(st.integers(0, 3))):
        merge = draw(st.lists(st.integers(0, 3), min_size=10, max_size=10))
        levels.append(torch.tensor(merge)[levels[-1] % 10] + 100 * len(levels))
    return num_leaves, levels


@SETTINGS
@given(data=nested_labels(), max_children=st.one_of(st.none(), st.integers(2, 6)),
       keep_chains=st.booleans())
def test_from_partitions_and_segments_properties(data, max_children, keep_chains):
    num_leaves, levels = data
    partitions = [[set((ids == v).nonzero().view(-1).tolist()) for v in torch.unique(ids)]
                  for ids in levels]
    h = from_partitions(partitions, num_leaves, max_children=max_children,
                        keep_chains=keep_chains)
    assert_valid_tree(h, num_leaves, max_children=max_children, chains_allowed=keep_chains)
    # no set is lost: each is still the leaf set of a cluster (or a single leaf)
    sets = cluster_sets(h)
    for partition in partitions:
        for s in partition:
            assert len(s) == 1 or frozenset(s) in sets
    g = from_segments(levels, max_children=max_children, keep_chains=keep_chains)
    assert torch.equal(g.parent, h.parent)


@SETTINGS
@given(data=st.lists(nested_labels(), min_size=1, max_size=4))
def test_compose_properties(data):
    parts = {f'm{i}': from_segments(levels) for i, (_, levels) in enumerate(data)}
    h, modality = compose(parts)
    total = sum(n for n, _ in data)
    assert_valid_tree(h, total, chains_allowed=False)
    assert torch.equal(modality, torch.repeat_interleave(
        torch.arange(len(data)), torch.tensor([n for n, _ in data])))
