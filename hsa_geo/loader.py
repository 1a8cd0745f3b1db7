r"""A PyG :class:`~torch_geometric.loader.DataLoader` that plans the forest
of every batch where the data is loaded.

Every training step meets a new batch of nested signals, and HSA needs the
batch's forest and what its sweeps read: the family tables of the CPU
kernel (:mod:`hsa_geo.functional.kernel`) or, on a GPU, the slot layout
(:mod:`hsa_geo.functional.layout`).
Built inside the model's forward, they cost the training step a few
milliseconds per batch (``python -m benchmarks.batches``, column
``plan``). :class:`HierarchyLoader` builds them in its collate function
instead, i.e. in the loader's worker processes when ``num_workers > 0``,
and hands the batch over with the planned forest attached;
:func:`~hsa_geo.data.hierarchy_from_data` then returns it at no cost.

Batches of *nodes* of one large graph come from PyG's own loaders
(:class:`~torch_geometric.loader.NeighborLoader`,
:class:`~torch_geometric.loader.ClusterLoader`) unchanged: their nodes
carry their leaves, and :func:`~hsa_geo.data.hierarchy_from_data` restricts
the graph's tree to them (:doc:`/sampling`).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

import torch
from torch_geometric.data import Dataset
from torch_geometric.loader import DataLoader

from hsa_geo.data import PLANNED_KEY, build_hierarchy
from hsa_geo.functional import prepare as prepare_fused


class PlanningCollater:
    r"""Wraps a collate function: collates, then attaches the batch's
    planned forest (hierarchy, family tables or sweep layout) as
    :obj:`batch.hierarchy`."""

    def __init__(self, collate_fn, device: Optional[Union[str, torch.device]] = None):
        self.collate_fn = collate_fn
        self.device = torch.device('cpu') if device is None else torch.device(device)

    def __call__(self, data_list: List[Any]):
        batch = self.collate_fn(data_list)
        hierarchy = build_hierarchy(batch)
        prepare_fused(hierarchy, self.device)
        setattr(batch, PLANNED_KEY, hierarchy)
        return batch


class HierarchyLoader(DataLoader):
    r"""A :class:`torch_geometric.loader.DataLoader` of
    :class:`~hsa_geo.data.NestedSignal` that builds each batch's forest and
    sweep plan in its collate function, so that with ``num_workers > 0``
    the training loop does not pay for them.

    Args:
        dataset (Dataset or list): Nested signals (e.g. a dataset with
            :class:`~hsa_geo.transforms.AddHierarchy` as ``pre_transform``).
        batch_size (int, optional): (default: :obj:`1`)
        shuffle (bool, optional): (default: :obj:`False`)
        layout_device (str or torch.device, optional): The device the model
            runs on: what HSA's sweeps read there is built (on the CPU, in
            the loader) and moved there when first used. (default: :obj:`"cpu"`)
        **kwargs (optional): Further :class:`torch_geometric.loader.DataLoader`
            arguments (``num_workers``, ``follow_batch``, ...).

    Example::

        >>> import torch
        >>> from torch_geometric.datasets import KarateClub
        >>> from hsa_geo.transforms import AddHierarchy
        >>> from hsa_geo.data import hierarchy_from_data
        >>> graphs = [AddHierarchy('louvain', max_children=8)(KarateClub()[0])] * 4
        >>> batch = next(iter(HierarchyLoader(graphs, batch_size=4)))
        >>> hierarchy = hierarchy_from_data(batch)   # planned in the loader
        >>> hierarchy.num_trees, hierarchy.num_leaves
        (4, 136)
    """

    def __init__(self, dataset: Union[Dataset, Sequence[Any]], batch_size: int = 1,
                 shuffle: bool = False, layout_device: Union[str, torch.device, None] = None,
                 **kwargs: Any):
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle, **kwargs)
        self.collate_fn = PlanningCollater(self.collate_fn, layout_device)
