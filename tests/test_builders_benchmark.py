import json

import pytest
import torch

from benchmarks.builders import main, planted_partition_graph, tree_quality
from hsa_geo import Hierarchy


def test_planted_partition_graph():
    edge_index, block = planted_partition_graph(num_nodes=3000, num_edges=20_000,
                                                num_blocks=5, inside=0.8, seed=1)
    assert block.numel() == 3000 and int(block.max()) == 4
    src, dst = edge_index
    assert edge_index.size(1) == 40_000  # both directions of 20,000 edges
    assert bool((src != dst).all())
    assert torch.unique(src * 3000 + dst).numel() == 40_000  # no repeats
    assert 0.75 < float((block[src] == block[dst]).float().mean()) < 0.9
    again, _ = planted_partition_graph(num_nodes=3000, num_edges=20_000, num_blocks=5,
                                       inside=0.8, seed=1)
    assert torch.equal(edge_index, again)


def test_tree_quality_on_known_trees():
    # leaves 0..3 in block 0, 4..7 in block 1; edges inside blocks only
    block = torch.tensor([0] * 4 + [1] * 4)
    edge_index = torch.tensor([[0, 1, 2, 4, 5, 6], [1, 2, 3, 5, 6, 7]])
    good = Hierarchy.from_parent(torch.tensor([8] * 4 + [9] * 4 + [10, 10, -1]), 8)
    q = tree_quality(good, edge_index, block)
    assert q['edges_within_leaf_family'] == 1.0 and q['leaf_family_block_purity'] == 1.0
    assert q['edges_within_depth_1_subtree'] == 1.0
    bad = Hierarchy.from_parent(torch.tensor([8, 9] * 4 + [10, 10, -1]), 8)
    q = tree_quality(bad, edge_index, block)
    assert q['edges_within_leaf_family'] == 0.0 and q['leaf_family_block_purity'] == 0.5


@pytest.mark.slow
def test_quick_benchmark_writes_json(tmp_path):
    pytest.importorskip('pymetis')
    out = tmp_path / 'builders.json'
    main(['--quick', '--skip-louvain', '--device', 'cpu', '--output', str(out)])
    result = json.loads(out.read_text())
    assert result['metis_vs_louvain']['metis']['max_children'] <= 32
    assert {row['max_children'] for row in result['max_children']['rows']} == {4, 16, 64}
