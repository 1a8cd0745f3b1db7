r"""Multi-modal composition: one tree over several modalities' trees."""
from __future__ import annotations

from typing import Hashable, Mapping, NamedTuple, Tuple

import torch
from torch import Tensor

from hsa_geo.hierarchy.hierarchy import Hierarchy


class _ComposedFields(NamedTuple):
    hierarchy: Hierarchy
    modality: Tensor


class Composed(_ComposedFields):
    r"""The result of :func:`compose`: a pair that unpacks as
    ``hierarchy, modality = compose(parts)``, plus the modality names.

    Attributes:
        hierarchy (Hierarchy): The composed tree.
        modality (torch.Tensor): ``[N]`` modality id of every leaf (the
            position of its part in the mapping).
        names (tuple): The modality names, so :obj:`names[modality[i]]`
            names the modality of leaf :obj:`i`.
    """
    names: Tuple[Hashable, ...]

    def __new__(cls, hierarchy: Hierarchy, modality: Tensor, names=()):
        self = super().__new__(cls, hierarchy, modality)
        self.names = tuple(names)
        return self

    def leaves(self, name: Hashable) -> slice:
        r"""The contiguous range of leaves (rows of :obj:`x`) of modality
        :obj:`name`."""
        if name not in self.names:
            raise KeyError(f"No modality {name!r}; modalities are {list(self.names)}")
        index = self.names.index(name)
        counts = torch.bincount(self.modality, minlength=len(self.names)).tolist()
        start = sum(counts[:index])
        return slice(start, start + counts[index])

    def __repr__(self) -> str:
        return f'Composed(hierarchy={self.hierarchy!r}, names={self.names!r})'


def compose(parts: Mapping[Hashable, Hierarchy]) -> Composed:
    r"""Puts per-modality hierarchies under one new root.

    The leaves are those of the parts, modality after modality in the
    mapping's order (so leaf features are ``torch.cat`` of the parts'
    features in that order); then come the parts' clusters in the same
    order, and the new root last. Each part becomes one subtree: a part that
    is a forest (several roots) first gets a cluster of its own over its
    trees. With a single single-tree part, its tree is returned unchanged
    (a root over one subtree would be a single-child chain).

    Args:
        parts (Mapping[str, Hierarchy]): Modality name to hierarchy, e.g.
            ``{"graph": h_graph, "text": h_text}``.

    Returns:
        Composed: ``(hierarchy, modality)``, which unpacks as a pair, with
        :obj:`modality` ``[N]`` the index of every leaf's part, and the part
        names in :obj:`names`. The hierarchy is
        :attr:`~hsa_geo.Hierarchy.ordered` when every part is (the parts'
        subtrees then sit under the root in the mapping's order).

    Raises:
        ValueError: for an empty mapping or a value that is not a
            :class:`~hsa_geo.Hierarchy`.

    Complexity: :math:`O(N + M)`, vectorised.

    Example::

        >>> from hsa_geo.hierarchy import chunk_sequence, compose, from_partitions
        >>> graph = from_partitions([[{0, 1, 2}, {3, 4}]], num_leaves=5)
        >>> text = chunk_sequence(4, chunk_size=2)
        >>> h, modality = compose({'graph': graph, 'text': text})
        >>> h.num_leaves, h.num_trees, modality.tolist()
        (9, 1, [0, 0, 0, 0, 0, 1, 1, 1, 1])
        >>> compose({'graph': graph, 'text': text}).leaves('text')
        slice(5, 9, None)
    """
    if not isinstance(parts, Mapping) or len(parts) == 0:
        raise ValueError("compose() needs a non-empty mapping from modality name to Hierarchy")
    names = list(parts.keys())
    hierarchies = list(parts.values())
    for name, part in zip(names, hierarchies):
        if not isinstance(part, Hierarchy):
            raise ValueError(f"Modality {name!r} is a {type(part).__name__}, not a Hierarchy")
    num_leaves = sum(h.num_leaves for h in hierarchies)
    num_part_clusters = sum(h.num_clusters for h in hierarchies)
    forests = [h.num_trees > 1 for h in hierarchies]
    num_nodes = num_leaves + num_part_clusters + sum(forests)
    num_nodes += int(len(hierarchies) > 1)

    parent = torch.full((num_nodes, ), -1, dtype=torch.long)
    modality = torch.empty(num_leaves, dtype=torch.long)
    root = num_nodes - 1
    leaf_offset, cluster_offset = 0, num_leaves
    extra = num_leaves + num_part_clusters  # id of the next modality cluster
    for index, part in enumerate(hierarchies):
        part_parent = part.parent.cpu().to(torch.long)
        new_id = part.new_node_ids(leaf_offset, cluster_offset).cpu()
        has_parent = part_parent >= 0
        parent[new_id[has_parent]] = new_id[part_parent[has_parent]]
        modality[leaf_offset:leaf_offset + part.num_leaves] = index
        roots = new_id[~has_parent]
        if forests[index]:
            parent[roots] = extra
            roots = torch.tensor([extra])
            extra += 1
        if len(hierarchies) > 1:
            parent[roots] = root
        leaf_offset += part.num_leaves
        cluster_offset += part.num_clusters
    ordered = all(part.ordered for part in hierarchies)
    return Composed(Hierarchy.from_parent(parent, num_leaves, ordered=ordered), modality, names)
