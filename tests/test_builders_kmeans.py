import pytest
import torch

from hsa_geo import Hierarchy
from hsa_geo.flops import kmeans_flops
from hsa_geo.hierarchy import from_kmeans
from hsa_geo.hierarchy.builders.kmeans import from_cluster_labels, kmeans_labels


def blobs(sizes, spread=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(sizes), 8, generator=generator) * 5
    points = [centre + spread * torch.randn(size, 8, generator=generator)
              for centre, size in zip(centres, sizes)]
    truth = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    order = torch.randperm(sum(sizes), generator=generator)  # blobs interleaved
    return torch.cat(points)[order], truth[order]


@pytest.mark.parametrize('seed', range(4))
def test_kmeans_finds_well_separated_blobs(seed):
    x, truth = blobs([4, 4, 4, 4, 4], seed=seed)
    hierarchy = from_kmeans(x, cluster_size=4, iterations=10)
    parent = hierarchy.parent[:x.size(0)]
    # every blob is exactly one cluster: leaves share a parent iff same blob
    same_parent = parent[:, None] == parent[None, :]
    assert torch.equal(same_parent, truth[:, None] == truth[None, :])
    assert hierarchy.max_depth == 2 and hierarchy.num_clusters == 6


def test_kmeans_is_deterministic_and_counts_its_flops():
    x, _ = blobs([7, 3, 9, 5], spread=1.0)
    first, second = from_kmeans(x, 3), from_kmeans(x.clone(), 3)
    assert torch.equal(first.parent, second.parent)
    assert kmeans_labels(x, 8, 0).max() < 8
    assert kmeans_flops(24, 8, 8, 3) == 2 * 24 * 8 * 8 * 4 + 2 * 24 * 8 * 3 + 4 * 24 * 8 * 4


def test_small_inputs_give_the_flat_tree():
    assert torch.equal(from_kmeans(torch.randn(4, 3), cluster_size=4).parent,
                       Hierarchy.flat(4).parent)
    assert torch.equal(from_kmeans(torch.randn(1, 3)).parent, Hierarchy.flat(1).parent)


def test_cluster_labels_make_a_root_over_clusters_and_single_leaves():
    hierarchy = from_cluster_labels(torch.tensor([2, 9, 2, 5, 9, 2]))
    # clusters {0, 2, 5} and {1, 4} (by first leaf); leaf 3 alone under the root
    assert hierarchy.parent.tolist() == [6, 7, 6, 8, 7, 6, 8, 8, -1]
    assert torch.equal(from_cluster_labels(torch.zeros(5, dtype=torch.long)).parent,
                       Hierarchy.flat(5).parent)
    assert torch.equal(from_cluster_labels(torch.arange(5)).parent, Hierarchy.flat(5).parent)


def test_kmeans_errors_name_the_input():
    with pytest.raises(ValueError, match=r'\[n, f\]'):
        from_kmeans(torch.randn(5))
    with pytest.raises(ValueError, match=r'\[n, f\]'):
        from_kmeans(torch.randn(0, 3))
    x = torch.randn(6, 2)
    x[4, 1] = float('nan')
    with pytest.raises(ValueError, match='Row 4 of features is not finite'):
        from_kmeans(x)
    with pytest.raises(ValueError, match="'cluster_size' must be at least 1"):
        from_kmeans(torch.randn(6, 2), cluster_size=0)
    with pytest.raises(ValueError, match='labels'):
        from_cluster_labels(torch.zeros(0, dtype=torch.long))
