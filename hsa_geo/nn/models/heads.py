r"""End-to-end models: input encoder, :class:`HSAEncoder`, task head."""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.nn import Dropout, Linear, Module
from torch_geometric.data.data import BaseData
from torch_geometric.nn.models import MLP

from hsa_geo.hierarchy import Hierarchy
from hsa_geo.nn.conv import resolve_hierarchy
from hsa_geo.nn.models.encoder import ConvFactory, HSAEncoder
from hsa_geo.nn.models.readout import HierarchyReadout


def flat_hierarchy(batch: Tensor, num_graphs: Optional[int] = None) -> Hierarchy:
    r"""One root per graph directly over its leaves (sorted :obj:`batch`).
    HSA over it is exact per-graph softmax attention, so swapping it in for
    the real hierarchy gives a flat-attention baseline with the same model."""
    batch = batch.view(-1).long()
    if batch.numel() and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError("flat_hierarchy needs leaves sorted by graph")
    num_graphs = int(batch.max()) + 1 if num_graphs is None else num_graphs
    num_leaves = batch.numel()
    parent = torch.cat([num_leaves + batch.cpu(), torch.full((num_graphs, ), -1, dtype=torch.long)])
    node_batch = torch.cat([batch.cpu(), torch.arange(num_graphs)])
    return Hierarchy.from_parent(parent, num_leaves, batch=node_batch).to(batch.device)


def _input_encoder(encoder: Union[int, Module], hidden: int) -> Module:
    return Linear(encoder, hidden) if isinstance(encoder, int) else encoder


def _mlp_head(hidden: int, out_channels: int, dropout: float, layers: int = 2) -> Module:
    r"""PyG's :class:`~torch_geometric.nn.models.MLP`: ``layers - 1`` blocks
    of linear, ReLU and dropout, then a plain linear layer."""
    return MLP([hidden] * layers + [out_channels], act='relu', norm=None, dropout=dropout)


class HSAGraphModel(Module):
    r"""Graph-level predictor: input encoder, :class:`HSAEncoder` (local
    conv + global HSA per layer), :class:`HierarchyReadout` at the root of
    each graph's hierarchy, and an MLP head.

    Args:
        in_channels (int or torch.nn.Module): Input width (a linear input
            layer), or a module mapping :obj:`x` to :obj:`hidden_channels`
            (e.g. :class:`ogb.graphproppred.mol_encoder.AtomEncoder`).
        hidden_channels (int): Width of every layer.
        out_channels (int): Outputs per graph (e.g. tasks).
        num_layers (int, optional): Encoder blocks. (default: :obj:`3`)
        conv (str or callable, optional): Local layer, see
            :func:`~hsa_geo.nn.models.resolve_local_conv`.
            (default: :obj:`"gine"`)
        heads (int, optional): Attention heads. (default: :obj:`4`)
        dropout (float, optional): Dropout. (default: :obj:`0.1`)
        attn_dropout (float, optional): Attention dropout. (default: :obj:`0.`)
        norm (str, optional): Normalisation. (default: :obj:`"batch_norm"`)
        readout (str, optional): :obj:`"hierarchy"`, :obj:`"mean"` or
            :obj:`"sum"`. (default: :obj:`"hierarchy"`)
        edge_encoder (torch.nn.Module, optional): Maps :obj:`edge_attr` to
            :obj:`hidden_channels` (e.g. ``BondEncoder``). (default: :obj:`None`)
        global_attention (bool, optional): Whether blocks include HSA.
            (default: :obj:`True`)
    """

    def __init__(self, in_channels: Union[int, Module], hidden_channels: int,
                 out_channels: int, num_layers: int = 3,
                 conv: Union[str, ConvFactory, None] = 'gine', heads: int = 4,
                 dropout: float = 0.1, attn_dropout: float = 0.,
                 norm: Optional[str] = 'batch_norm', readout: str = 'hierarchy',
                 edge_encoder: Optional[Module] = None, global_attention: bool = True):
        super().__init__()
        self.hidden_channels = hidden_channels
        self.out_channels = out_channels
        self.encoder_in = _input_encoder(in_channels, hidden_channels)
        self.edge_encoder = edge_encoder
        self.encoder = HSAEncoder(hidden_channels, num_layers, conv, heads=heads,
                                  dropout=dropout, attn_dropout=attn_dropout, norm=norm,
                                  edge_dim=hidden_channels, global_attention=global_attention)
        self.readout = HierarchyReadout(hidden_channels, readout)
        self.head = _mlp_head(hidden_channels, out_channels, dropout)

    def reset_parameters(self):
        for module in (self.encoder_in, self.edge_encoder):
            if module is not None and hasattr(module, 'reset_parameters'):
                module.reset_parameters()
        self.encoder.reset_parameters()
        self.readout.reset_parameters()
        for module in self.head:
            if hasattr(module, 'reset_parameters'):
                module.reset_parameters()

    def forward(self, x: Tensor, edge_index: Optional[Tensor],
                hierarchy: Union[Hierarchy, BaseData], edge_attr: Optional[Tensor] = None,
                num_graphs: Optional[int] = None,
                return_details: bool = False, modality: Optional[Tensor] = None
                ) -> Union[Tensor, Tuple[Tensor, Dict]]:
        r"""Returns ``[B, out_channels]``. With :obj:`return_details=True`
        also a dict holding the leaf features (``'x'``), every block's
        attention (``'attention'``) and the readout's leaf weights
        (``'leaf_weights'``, hierarchy readout only). :obj:`modality` (the
        modality id of every leaf) is passed to a
        :class:`~hsa_geo.nn.models.MultiModalEncoder` input encoder.
        :obj:`hierarchy` is the forest or the batch that carries it."""
        hierarchy = resolve_hierarchy(hierarchy)
        h = self.encoder_in(x) if modality is None else self.encoder_in(x, modality)
        if edge_attr is not None and self.edge_encoder is not None:
            edge_attr = self.edge_encoder(edge_attr)
        if num_graphs is None:
            num_graphs = hierarchy.num_trees
        if not return_details:
            h = self.encoder(h, hierarchy, edge_index, edge_attr)
            return self.head(self.readout(h, hierarchy, num_graphs=num_graphs))
        h, attention = self.encoder(h, hierarchy, edge_index, edge_attr,
                                    return_attention_weights=True)
        details: Dict = {'x': h, 'attention': attention}
        if self.readout.mode == 'hierarchy':
            pooled, details['leaf_weights'] = self.readout(
                h, hierarchy, num_graphs=num_graphs, return_leaf_weights=True)
        else:
            pooled = self.readout(h, hierarchy, num_graphs=num_graphs)
        return self.head(pooled), details

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}({self.hidden_channels}, {self.out_channels}, '
                f'num_layers={self.encoder.num_layers}, readout={self.readout.mode!r})')


class HSANodeModel(Module):
    r"""Node-level predictor: input encoder, :class:`HSAEncoder`, and a
    linear head per leaf (node).

    Args:
        in_channels (int or torch.nn.Module): Input width or input module.
        hidden_channels (int): Width of every layer.
        out_channels (int): Outputs per node (e.g. classes).
        num_layers (int, optional): Encoder blocks. (default: :obj:`2`)
        conv (str or callable, optional): Local layer. (default: :obj:`"sage"`)
        heads (int, optional): Attention heads. (default: :obj:`4`)
        dropout (float, optional): Dropout. (default: :obj:`0.1`)
        attn_dropout (float, optional): Attention dropout. (default: :obj:`0.`)
        norm (str, optional): Normalisation. (default: :obj:`"batch_norm"`)
        global_attention (bool, optional): Whether blocks include HSA.
            (default: :obj:`True`)
    """

    def __init__(self, in_channels: Union[int, Module], hidden_channels: int,
                 out_channels: int, num_layers: int = 2,
                 conv: Union[str, ConvFactory, None] = 'sage', heads: int = 4,
                 dropout: float = 0.1, attn_dropout: float = 0.,
                 norm: Optional[str] = 'batch_norm', global_attention: bool = True):
        super().__init__()
        self.hidden_channels = hidden_channels
        self.out_channels = out_channels
        self.encoder_in = _input_encoder(in_channels, hidden_channels)
        self.input_dropout = Dropout(dropout)
        self.encoder = HSAEncoder(hidden_channels, num_layers, conv, heads=heads,
                                  dropout=dropout, attn_dropout=attn_dropout, norm=norm,
                                  global_attention=global_attention)
        self.head = Linear(hidden_channels, out_channels)

    def reset_parameters(self):
        if hasattr(self.encoder_in, 'reset_parameters'):
            self.encoder_in.reset_parameters()
        self.encoder.reset_parameters()
        self.head.reset_parameters()

    def forward(self, x: Tensor, edge_index: Optional[Tensor],
                hierarchy: Union[Hierarchy, BaseData], edge_attr: Optional[Tensor] = None
                ) -> Tensor:
        r"""Returns ``[N, out_channels]``; :obj:`hierarchy` is the forest or
        the batch that carries it."""
        h = self.input_dropout(self.encoder_in(x))
        h = self.encoder(h, hierarchy, edge_index, edge_attr)
        return self.head(h)

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}({self.hidden_channels}, {self.out_channels}, '
                f'num_layers={self.encoder.num_layers})')
