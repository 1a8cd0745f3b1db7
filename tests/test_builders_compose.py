import pytest
import torch

from hsa_geo import Hierarchy
from hsa_geo.functional import hsa, hsa_dense
from hsa_geo.hierarchy import Composed, chunk_sequence, compose, from_partitions

from test_builders_helpers import assert_valid_tree, children_of, cluster_sets, leaf_sets


def _parts():
    graph = from_partitions([[{0, 1, 2}, {3, 4}]], num_leaves=5)
    text = chunk_sequence(7, chunk_size=3)
    image = Hierarchy.flat(4)
    return {'graph': graph, 'text': text, 'image': image}


def test_unpacks_as_a_pair_and_keeps_names():
    parts = _parts()
    h, modality = compose(parts)
    result = compose(parts)
    assert isinstance(result, Composed) and isinstance(result, tuple) and len(result) == 2
    assert result.names == ('graph', 'text', 'image')
    assert modality.tolist() == [0] * 5 + [1] * 7 + [2] * 4
    assert modality.dtype == torch.long
    assert result.leaves('text') == slice(5, 12)
    assert [result.names[m] for m in modality[[0, 6, 15]].tolist()] == ['graph', 'text', 'image']
    with pytest.raises(KeyError, match='audio'):
        result.leaves('audio')
    assert 'graph' in repr(result)


def test_parts_become_subtrees_under_one_root():
    parts = _parts()
    h, modality = compose(parts)
    assert_valid_tree(h, 16)
    assert h.num_clusters == sum(p.num_clusters for p in parts.values()) + 1
    root = int(h.roots[0])
    assert h.parent[root] == -1 and root == h.num_nodes - 1
    tops = {leaf_sets(h)[c] for c in children_of(h)[root]}
    assert tops == {frozenset(range(0, 5)), frozenset(range(5, 12)), frozenset(range(12, 16))}
    # every cluster of every part survives, shifted by the part's leaf offset
    offset = 0
    for part in parts.values():
        shifted = {frozenset(leaf + offset for leaf in s) for s in cluster_sets(part)}
        assert shifted <= cluster_sets(h)
        offset += part.num_leaves


def test_forest_part_gets_its_own_cluster_and_single_part_is_unchanged():
    forest = Hierarchy.from_parent(torch.tensor([3, 3, -1, -1]), num_leaves=3)
    h, modality = compose({'a': forest, 'b': Hierarchy.flat(2)})
    assert_valid_tree(h, 5)
    assert frozenset({0, 1, 2}) in cluster_sets(h)
    alone = Hierarchy.flat(3)
    h, modality = compose({'only': alone})
    assert torch.equal(h.parent, alone.parent) and modality.tolist() == [0, 0, 0]
    h, _ = compose({'only': forest})
    assert_valid_tree(h, 3)


def test_single_leaf_parts():
    lone = Hierarchy.from_parent(torch.tensor([-1]), num_leaves=1)
    h, modality = compose({'x': lone, 'y': lone, 'z': Hierarchy.flat(2)})
    assert_valid_tree(h, 4)
    assert modality.tolist() == [0, 1, 2, 2]


def test_attention_stays_within_modalities_below_the_root():
    parts = _parts()
    h, _ = compose(parts)
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 16, 8, dtype=torch.float64).unbind(0)
    dense = hsa_dense(q, k, h)
    assert torch.allclose(hsa(q, k, v, h), dense @ v, atol=1e-10)
    # across modalities a leaf sees one constant weight per other modality
    assert torch.allclose(dense[0, 5:12], dense[0, 5].expand(7))


@pytest.mark.parametrize('parts, match', [({}, 'non-empty'), ([Hierarchy.flat(2)], 'mapping'),
                                          ({'a': torch.tensor([1, -1])}, "'a' is a Tensor")])
def test_bad_input(parts, match):
    with pytest.raises(ValueError, match=match):
        compose(parts)
