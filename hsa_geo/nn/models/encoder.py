r"""GPS-style encoder blocks with a global :class:`~hsa_geo.nn.HSAConv`."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch.nn.functional as F
from torch import Tensor
from torch.nn import Dropout, Linear, Module, ModuleList, Sequential
from torch_geometric.data.data import BaseData
from torch_geometric.nn.inits import reset
from torch_geometric.nn.models import MLP
from torch_geometric.nn.resolver import activation_resolver, normalization_resolver

from hsa_geo.functional import BlockAttention
from hsa_geo.hierarchy import Hierarchy
from hsa_geo.nn.conv import HSAConv, resolve_hierarchy

ConvFactory = Callable[[int], Module]


def resolve_local_conv(conv: Union[str, ConvFactory, None], channels: int,
                       edge_dim: Optional[int] = None,
                       norm: Optional[str] = 'batch_norm') -> Optional[Module]:
    r"""A local message-passing layer of width :obj:`channels`.

    Args:
        conv (str or callable or None): :obj:`None` (no local layer), one of
            :obj:`"gin"`, :obj:`"gine"` (GIN with edge features of width
            :obj:`edge_dim`, default :obj:`channels`), :obj:`"gcn"`,
            :obj:`"sage"`, :obj:`"gat"`, or a callable ``channels -> Module``
            (any PyG conv taking ``(x, edge_index, ...)``).
        channels (int): Input and output width.
        edge_dim (int, optional): Edge feature width for :obj:`"gine"`.
        norm (str, optional): Norm inside the GIN MLP: :obj:`"batch_norm"`,
            otherwise a per-node layer norm (or none for :obj:`None`), which
            keeps the layer independent of how graphs are batched.
    """
    if conv is None:
        return None
    if callable(conv) and not isinstance(conv, str):
        return conv(channels)
    from torch_geometric.nn import GATConv, GCNConv, GINConv, GINEConv, SAGEConv
    name = conv.lower()
    if name in ('gin', 'gine'):
        # PyG's MLP: linear, norm (batch norm, or layer norm per node), ReLU, linear
        layer_norm = norm not in (None, 'batch_norm')
        mlp = MLP([channels] * 3, act='relu', norm='layer_norm' if layer_norm else norm,
                  norm_kwargs={'mode': 'node'} if layer_norm else None)
        if name == 'gin':
            return GINConv(mlp, train_eps=True)
        return GINEConv(mlp, train_eps=True, edge_dim=edge_dim or channels)
    if name == 'gcn':
        return GCNConv(channels, channels)
    if name == 'sage':
        return SAGEConv(channels, channels)
    if name == 'gat':
        return GATConv(channels, channels, heads=1)
    raise ValueError(f"Unknown local conv {conv!r}; expected None, 'gin', 'gine', 'gcn', "
                     f"'sage', 'gat' or a callable channels -> Module")


def _takes(module: Optional[Module], argument: str) -> bool:
    if module is None:
        return False
    return argument in inspect.signature(module.forward).parameters


class HSABlock(Module):
    r"""One GPS-style layer (`Rampášek et al., 2022
    <https://arxiv.org/abs/2205.12454>`_) whose global attention is the exact
    Hierarchical Self-Attention :class:`~hsa_geo.nn.HSAConv`:

    .. math::
        \mathbf{h}_L &= \mathrm{Norm}\big(\mathbf{x} +
            \mathrm{Dropout}(\mathrm{MPNN}(\mathbf{x}, \mathcal{E}))\big) \\
        \mathbf{h}_G &= \mathrm{Norm}\big(\mathbf{x} +
            \mathrm{Dropout}(\mathrm{HSA}(\mathbf{x}, \mathcal{T}))\big) \\
        \mathbf{x}^{\prime} &= \mathrm{Norm}\big(\mathbf{h} +
            \mathrm{FFN}(\mathbf{h})\big), \qquad
            \mathbf{h} = \mathbf{h}_L + \mathbf{h}_G,

    with the local term left out when :obj:`conv` is :obj:`None` (a pure
    hierarchical transformer layer) and the global term left out when
    :obj:`global_attention=False` (a plain residual MPNN layer).
    :class:`HSAGPSConv` is the same layer with an output projection after
    HSA and :class:`~torch_geometric.nn.conv.GPSConv`'s arguments.

    Args:
        channels (int): Width of the leaf features.
        conv (torch.nn.Module, optional): The local message passing layer,
            any PyG conv mapping :obj:`channels` to :obj:`channels`.
            (default: :obj:`None`)
        heads (int, optional): Attention heads; must divide :obj:`channels`.
            (default: :obj:`1`)
        dropout (float, optional): Dropout after the local layer, the
            attention and inside the FFN. (default: :obj:`0.`)
        attn_dropout (float, optional): Dropout of each head's attention
            output inside :class:`HSAConv`. (default: :obj:`0.`)
        act (str, optional): FFN activation. (default: :obj:`"relu"`)
        norm (str, optional): Normalisation (:obj:`"batch_norm"`,
            :obj:`"layer_norm"`, :obj:`"graph_norm"`, ... or :obj:`None`).
            (default: :obj:`"batch_norm"`)
        ffn_ratio (int, optional): FFN hidden width over :obj:`channels`.
            (default: :obj:`2`)
        global_attention (bool, optional): Whether to include the HSA term.
            (default: :obj:`True`)
        act_kwargs (Dict[str, Any], optional): Arguments of the activation.
            (default: :obj:`None`)
        norm_kwargs (Dict[str, Any], optional): Arguments of the norms.
            (default: :obj:`None`)
        attn_kwargs (Dict[str, Any], optional): Further arguments of
            :class:`~hsa_geo.nn.HSAConv`, e.g.
            ``{'energy': 'euclidean', 'causal': True, 'normalize_qk': True}``
            or a :obj:`positional` module (a module given here is shared by
            every layer built from the same arguments). (default: :obj:`None`)
    """

    def __init__(self, channels: int, conv: Optional[Module] = None, heads: int = 1,
                 dropout: float = 0., attn_dropout: float = 0., act: str = 'relu',
                 norm: Optional[str] = 'batch_norm', ffn_ratio: int = 2,
                 global_attention: bool = True, act_kwargs: Optional[Dict[str, Any]] = None,
                 norm_kwargs: Optional[Dict[str, Any]] = None,
                 attn_kwargs: Optional[Dict[str, Any]] = None):
        super().__init__()
        if channels % heads != 0:
            raise ValueError(f"heads ({heads}) must divide channels ({channels})")
        if conv is None and not global_attention:
            raise ValueError("HSABlock needs a local conv, the global attention, or both")
        self.channels = channels
        self.heads = heads
        self.dropout = dropout
        self.conv = conv
        self.attn = (HSAConv(channels, channels // heads, heads=heads, concat=True,
                             dropout=attn_dropout, root_weight=False, **(attn_kwargs or {}))
                     if global_attention else None)
        self.mlp = Sequential(
            Linear(channels, ffn_ratio * channels),
            activation_resolver(act, **(act_kwargs or {})),
            Dropout(dropout),
            Linear(ffn_ratio * channels, channels),
            Dropout(dropout),
        )
        norm_kwargs = norm_kwargs or {}
        self.norm1 = normalization_resolver(norm, channels, **norm_kwargs) if conv is not None else None
        self.norm2 = normalization_resolver(norm, channels, **norm_kwargs) if global_attention else None
        self.norm3 = normalization_resolver(norm, channels, **norm_kwargs)
        self.norm_with_batch = _takes(self.norm3, 'batch')
        self.conv_takes_edge_attr = _takes(conv, 'edge_attr')
        #: projection of the attention output (:class:`HSAGPSConv` has one, as
        #: :class:`~torch.nn.MultiheadAttention`'s :obj:`out_proj`)
        self.attn_proj: Optional[Module] = None

    def reset_parameters(self):
        if self.conv is not None:
            self.conv.reset_parameters()
        if self.attn is not None:
            self.attn.reset_parameters()
        if self.attn_proj is not None:
            self.attn_proj.reset_parameters()
        reset(self.mlp)
        for norm in (self.norm1, self.norm2, self.norm3):
            if norm is not None:
                norm.reset_parameters()

    def _norm(self, norm: Optional[Module], x: Tensor, batch: Optional[Tensor]) -> Tensor:
        if norm is None:
            return x
        return norm(x, batch=batch) if self.norm_with_batch else norm(x)

    def forward(self, x: Tensor, hierarchy: Union[Hierarchy, BaseData],
                edge_index: Optional[Tensor] = None, edge_attr: Optional[Tensor] = None,
                batch: Optional[Tensor] = None, return_attention_weights: Optional[bool] = None,
                **conv_kwargs) -> Union[Tensor, Tuple[Tensor, Optional[BlockAttention]]]:
        r"""Runs the block.

        Args:
            x (torch.Tensor): Leaf features :math:`(N, C)`.
            hierarchy (Hierarchy or Data): Tree or forest over the
                :math:`N` leaves, or the batch that carries it (see
                :meth:`HSAConv.forward <hsa_geo.nn.HSAConv.forward>`).
            edge_index (torch.Tensor, optional): Graph edges for the local
                layer (required when :obj:`conv` is set).
            edge_attr (torch.Tensor, optional): Edge features, passed to the
                local layer when its :meth:`forward` takes them.
            batch (torch.Tensor, optional): Graph id of every leaf for graph
                norms; defaults to :obj:`hierarchy.leaf_batch`.
            return_attention_weights (bool, optional): Also return the
                block-level HSA attention (:obj:`None` without the global term).
        """
        hierarchy = resolve_hierarchy(hierarchy)
        if batch is None:
            batch = hierarchy.leaf_batch
        hs: List[Tensor] = []
        if self.conv is not None:
            if edge_index is None:
                raise ValueError("HSABlock with a local conv needs 'edge_index'")
            if edge_attr is not None and self.conv_takes_edge_attr:
                conv_kwargs['edge_attr'] = edge_attr
            h = self.conv(x, edge_index, **conv_kwargs)
            h = F.dropout(h, p=self.dropout, training=self.training)
            hs.append(self._norm(self.norm1, h + x, batch))
        attention = None
        if self.attn is not None:
            if return_attention_weights:
                h, attention = self.attn(x, hierarchy, return_attention_weights=True,
                                         edge_index=edge_index)
            else:
                h = self.attn(x, hierarchy, edge_index=edge_index)
            if self.attn_proj is not None:
                h = self.attn_proj(h)
            h = F.dropout(h, p=self.dropout, training=self.training)
            hs.append(self._norm(self.norm2, h + x, batch))
        out = hs[0] if len(hs) == 1 else hs[0] + hs[1]
        out = self._norm(self.norm3, out + self.mlp(out), batch)
        if return_attention_weights:
            return out, attention
        return out

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}({self.channels}, conv={self.conv}, '
                f'heads={self.heads})')


class HSAGPSConv(HSABlock):
    r"""PyG's :class:`~torch_geometric.nn.conv.GPSConv` with the exact
    Hierarchical Self-Attention as its global attention: the same
    arguments, order of operations and parameters, with
    :class:`~hsa_geo.nn.HSAConv` (:obj:`heads` heads of width
    :obj:`channels // heads`, no skip) and an output projection in place of
    :class:`~torch.nn.MultiheadAttention` (its :obj:`out_proj`). On a flat
    hierarchy (one root cluster over every graph) it computes what
    :class:`~torch_geometric.nn.conv.GPSConv` with
    :obj:`attn_type="multihead"` computes:

    .. math::
        \mathbf{h}_L &= \mathrm{Norm}\big(\mathbf{x} +
            \mathrm{Dropout}(\mathrm{MPNN}(\mathbf{x}, \mathcal{E}))\big) \\
        \mathbf{h}_G &= \mathrm{Norm}\big(\mathbf{x} +
            \mathrm{Dropout}(\mathbf{W}_O\, \mathrm{HSA}(\mathbf{x}, \mathcal{T})
            + \mathbf{b}_O)\big) \\
        \mathbf{x}^{\prime} &= \mathrm{Norm}\big(\mathbf{h} +
            \mathrm{FFN}(\mathbf{h})\big), \qquad
            \mathbf{h} = \mathbf{h}_L + \mathbf{h}_G.

    An :class:`~hsa_geo.nn.HSAConv` cannot be plugged into
    :class:`~torch_geometric.nn.conv.GPSConv` itself (GPSConv would skip it
    and leave the identity): setting one as its :obj:`attn` raises.

    Args:
        channels (int): Size of each input sample.
        conv (MessagePassing, optional): The local message passing layer.
        heads (int, optional): Number of attention heads; must divide
            :obj:`channels`. (default: :obj:`1`)
        dropout (float, optional): Dropout probability of intermediate
            embeddings. (default: :obj:`0.`)
        act (str or Callable, optional): The FFN activation.
            (default: :obj:`"relu"`)
        act_kwargs (Dict[str, Any], optional): Arguments of the activation.
            (default: :obj:`None`)
        norm (str or Callable, optional): The normalization.
            (default: :obj:`"batch_norm"`)
        norm_kwargs (Dict[str, Any], optional): Arguments of the norms.
            (default: :obj:`None`)
        attn_type (str, optional): Global attention type; only
            :obj:`"hsa"`. (default: :obj:`"hsa"`)
        attn_kwargs (Dict[str, Any], optional): Arguments of
            :class:`~hsa_geo.nn.HSAConv` (:obj:`energy`, :obj:`causal`,
            :obj:`positional`, ...); :obj:`dropout` there is the dropout of
            each head's attention output. (default: :obj:`None`)
    """

    def __init__(self, channels: int, conv: Optional[Module], heads: int = 1,
                 dropout: float = 0.0, act: str = 'relu',
                 act_kwargs: Optional[Dict[str, Any]] = None,
                 norm: Optional[str] = 'batch_norm',
                 norm_kwargs: Optional[Dict[str, Any]] = None, attn_type: str = 'hsa',
                 attn_kwargs: Optional[Dict[str, Any]] = None):
        if attn_type != 'hsa':
            raise ValueError(f"HSAGPSConv's global attention is HSA (attn_type='hsa'); for "
                             f"{attn_type!r} use torch_geometric.nn.GPSConv")
        attn_kwargs = dict(attn_kwargs or {})
        attn_dropout = attn_kwargs.pop('dropout', 0.)
        super().__init__(channels, conv, heads=heads, dropout=dropout, attn_dropout=attn_dropout,
                         act=act, norm=norm, act_kwargs=act_kwargs, norm_kwargs=norm_kwargs,
                         attn_kwargs=attn_kwargs)
        self.attn_type = attn_type
        self.attn_proj = Linear(channels, channels)

    def forward(self, x: Tensor, edge_index: Tensor, batch: Union[BaseData, Hierarchy],
                **kwargs) -> Tensor:
        r"""Runs the layer.

        Args:
            x (torch.Tensor): Node features :math:`(N, C)`.
            edge_index (torch.Tensor): The graph's edges, for the local
                layer (and explainers).
            batch (Data or Hierarchy): The batch that carries the hierarchy
                (:class:`~torch_geometric.data.Data` or
                :class:`~torch_geometric.data.Batch`), or the
                :class:`~hsa_geo.Hierarchy`: HSA needs the tree, not only
                the graph id of every node that
                :class:`~torch_geometric.nn.conv.GPSConv` takes here.
            **kwargs (optional): Further arguments of the local layer.
        """
        if isinstance(batch, Tensor):
            raise TypeError("HSAGPSConv attends over a hierarchy: pass the batch that carries "
                            "it (conv(x, edge_index, batch) with the PyG Batch) or the "
                            "Hierarchy, not the graph-id vector GPSConv takes")
        return super().forward(x, batch, edge_index, **kwargs)

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}({self.channels}, conv={self.conv}, '
                f'heads={self.heads}, attn_type={self.attn_type})')


class HSAEncoder(Module):
    r"""A stack of :class:`HSABlock` layers sharing one hierarchy per batch.

    Args:
        channels (int): Width of the leaf features.
        num_layers (int): Number of blocks.
        conv (str or callable, optional): Local layer of every block, see
            :func:`resolve_local_conv`. (default: :obj:`None`)
        heads (int, optional): Attention heads. (default: :obj:`1`)
        dropout (float, optional): Block dropout. (default: :obj:`0.`)
        attn_dropout (float, optional): Attention dropout. (default: :obj:`0.`)
        norm (str, optional): Normalisation. (default: :obj:`"batch_norm"`)
        edge_dim (int, optional): Edge feature width for :obj:`"gine"`.
        global_attention (bool, optional): Whether blocks include HSA.
            (default: :obj:`True`)
        **block_kwargs (optional): Further :class:`HSABlock` arguments.
    """

    def __init__(self, channels: int, num_layers: int, conv: Union[str, ConvFactory, None] = None,
                 heads: int = 1, dropout: float = 0., attn_dropout: float = 0.,
                 norm: Optional[str] = 'batch_norm', edge_dim: Optional[int] = None,
                 global_attention: bool = True, **block_kwargs):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1 (got {num_layers})")
        self.channels = channels
        self.num_layers = num_layers
        self.layers = ModuleList([
            HSABlock(channels, resolve_local_conv(conv, channels, edge_dim, norm), heads=heads,
                     dropout=dropout, attn_dropout=attn_dropout, norm=norm,
                     global_attention=global_attention, **block_kwargs)
            for _ in range(num_layers)
        ])

    def reset_parameters(self):
        for layer in self.layers:
            layer.reset_parameters()

    def forward(self, x: Tensor, hierarchy: Union[Hierarchy, BaseData],
                edge_index: Optional[Tensor] = None, edge_attr: Optional[Tensor] = None,
                batch: Optional[Tensor] = None, return_attention_weights: Optional[bool] = None
                ) -> Union[Tensor, Tuple[Tensor, List[Optional[BlockAttention]]]]:
        r"""Leaf features after all blocks; with
        :obj:`return_attention_weights=True` also one
        :class:`~hsa_geo.functional.BlockAttention` per block.
        :obj:`hierarchy` is the forest or the batch that carries it."""
        hierarchy = resolve_hierarchy(hierarchy)
        attentions: List[Optional[BlockAttention]] = []
        for layer in self.layers:
            if return_attention_weights:
                x, attention = layer(x, hierarchy, edge_index, edge_attr, batch, True)
                attentions.append(attention)
            else:
                x = layer(x, hierarchy, edge_index, edge_attr, batch)
        return (x, attentions) if return_attention_weights else x

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}({self.channels}, num_layers={self.num_layers})'
