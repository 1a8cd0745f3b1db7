from typing import Optional, Tuple, Union, overload

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.data.data import BaseData
from torch_geometric.explain.algorithm import AttentionExplainer
from torch_geometric.nn.conv import GPSConv, MessagePassing
from torch_geometric.nn.dense.linear import Linear, is_uninitialized_parameter

from hsa_geo.data import hierarchy_from_data
from hsa_geo.distributed import HierarchyShard, distributed_hsa
from hsa_geo.functional import (BlockAttention, attention_on_edges, hsa, hsa_block_weights,
                                hsa_propagate, project_qkv)
from hsa_geo.functional.checks import ENERGIES, check_causal
from hsa_geo.functional.scatter_sweep import weighted
from hsa_geo.hierarchy import Hierarchy
from hsa_geo.nn.positional import SiblingPositionBias

#: the values of :obj:`engine` (see :class:`HSAConv`)
ENGINES = ('auto', 'fused', 'propagate')


def resolve_hierarchy(hierarchy: Union[Hierarchy, HierarchyShard, BaseData]
                      ) -> Union[Hierarchy, HierarchyShard]:
    r"""What a layer attends over: a :class:`~hsa_geo.Hierarchy` or a
    :class:`~hsa_geo.distributed.HierarchyShard` as it is; for a
    :class:`~torch_geometric.data.Data` or
    :class:`~torch_geometric.data.Batch`, its forest, built once per batch
    (:func:`hsa_geo.data.hierarchy_from_data`). Anything else is refused
    by type."""
    if isinstance(hierarchy, BaseData):
        return hierarchy_from_data(hierarchy)
    if not isinstance(hierarchy, (Hierarchy, HierarchyShard)):
        raise TypeError(f"HSA layers take a hsa_geo.Hierarchy, a PyG Data/Batch that carries "
                        f"one (hierarchy_edge_index, num_clusters) or a HierarchyShard (got "
                        f"{type(hierarchy).__name__})")
    return hierarchy


def is_attention_explainer_hook(hook) -> bool:
    r"""Whether :obj:`hook` is the message hook that PyG's
    :class:`~torch_geometric.explain.algorithm.AttentionExplainer` registers
    (recognised by where it is defined)."""
    return getattr(hook, '__qualname__', '').startswith(AttentionExplainer.__name__ + '.')


def refuse_hsa_in_gps(module: torch.nn.Module, name: str,
                      submodule: Optional[torch.nn.Module]) -> None:
    r"""A module registration hook (on every module): refuses an
    :class:`HSAConv` set as the :obj:`attn` of PyG's
    :class:`~torch_geometric.nn.conv.GPSConv`, which only calls
    :class:`~torch.nn.MultiheadAttention` or a Performer there and would
    skip any other module, silently turning the global attention into the
    identity."""
    if name == 'attn' and isinstance(submodule, HSAConv) and isinstance(module, GPSConv):
        raise ValueError(
            f"GPSConv.{name} cannot be an HSAConv: GPSConv only calls MultiheadAttention or "
            f"PerformerAttention as its global attention and would skip HSA, leaving the "
            f"identity. Use hsa_geo.nn.HSAGPSConv, GPSConv's layer with HSA as its global "
            f"attention (same arguments, attn_type='hsa')")


class HSAConv(MessagePassing):
    r"""The Hierarchical Self-Attention operator from the `"Hierarchical
    Self-Attention: Generalizing Neural Attention Mechanics to Multi-Scale
    Problems" <https://arxiv.org/abs/2509.15448>`_ paper.

    Global attention over the leaves of a nested signal (a tree of clusters
    over the nodes): instead of softmax attention, every head uses the
    row-stochastic matrix :math:`A` closest to it in KL divergence among the
    matrices constant on each block of leaves under two sibling subtrees,

    .. math::
        \mathbf{x}^{\prime}_i = \mathbf{W}_1 \mathbf{x}_i +
        \big\Vert_{h=1}^{H} \sum_{j} a^{(h)}_{ij} \mathbf{W}^{(h)}_{v} \mathbf{x}_j,
        \qquad
        A^{(h)} = \operatorname*{arg\,min}_{A \in \mathcal{B}(\mathcal{T})}
        \sum_i \mathrm{KL}\big(A_i \,\Vert\, \mathrm{softmax}_j
        (\tfrac{1}{\sqrt{d}} \langle \mathbf{W}^{(h)}_q \mathbf{x}_i,
        \mathbf{W}^{(h)}_k \mathbf{x}_j \rangle)\big),

    where :math:`\mathcal{B}(\mathcal{T})` is the set of row-stochastic
    :math:`N \times N` matrices that take one value on every block
    :math:`\ell(B) \times \ell(C)` of leaves under two sibling subtrees
    :math:`B \neq C` of the tree :math:`\mathcal{T}` (the diagonal is
    free). It is computed exactly by a bottom-up and a top-down sweep over
    the tree in :math:`O((N + M)\, b\, H d)` (:math:`M` clusters, branching
    :math:`b`, :math:`H` heads of width :math:`d`) instead of
    :math:`O(N^2 H d)`. On a flat tree (one root over all leaves)
    it is multi-head softmax attention. Attention never crosses the trees of
    a forest, i.e. the graphs of a batch.

    The scores may carry the paper's full interaction energy: a positional
    term per sibling pair, :math:`\langle \varepsilon(B), \varepsilon(C)
    \rangle` for the positions of :math:`B` and :math:`C` within their
    family (:obj:`positional`, or any :obj:`pair_bias` passed to
    :meth:`forward`), and the Euclidean energy
    :math:`-\Vert \mathbf{q}_i - \mathbf{k}_j \Vert^2 / (2\sqrt d)`
    instead of the dot product; with :obj:`causal=True` leaf :math:`i` only
    attends to leaves :math:`j \le i` (docs/derivation.rst).

    Two engines compute the same values and gradients. The fused sweeps
    (a compiled kernel on the CPU) are the fast path. The message-passing
    path runs the sweeps with :meth:`propagate` over the hierarchy's edges
    (:func:`hsa_geo.functional.hsa_propagate`): on the way up every parent
    aggregates :math:`\phi` from its children, on the way down every node
    takes its attention mass and collected values from its parent and the
    values of its siblings, weighted by their block weights, so PyG's
    message and propagate hooks see what HSA computes. It runs when such
    hooks are registered, or always with :obj:`engine="propagate"`.

    PyG's :class:`~torch_geometric.explain.algorithm.AttentionExplainer`
    reads HSA's leaf-to-leaf attention :math:`a_{ij}` on the graph's edges
    :math:`j \to i` (the dense matrix restricted to them,
    :func:`hsa_geo.functional.attention_on_edges`): pass the graph's
    :obj:`edge_index` (or a batch that carries it) to :meth:`forward`.
    Edge-mask explainers (:class:`~torch_geometric.explain.algorithm.GNNExplainer`
    and the like) are refused with an error: HSA's output does not flow
    along the graph's edges, so a mask on them cannot change it; set
    :obj:`explain = False` on the layer to explain the other layers.

    Args:
        in_channels (int): Size of each input sample, or :obj:`-1` to derive
            it from the first input.
        out_channels (int): Size of each output sample per head.
        heads (int, optional): Number of attention heads. (default: :obj:`1`)
        concat (bool, optional): If set to :obj:`False`, the heads are
            averaged instead of concatenated. (default: :obj:`True`)
        dropout (float, optional): Dropout probability of the attention
            output of each head during training (HSA never materialises
            per-pair weights to drop). (default: :obj:`0.`)
        bias (bool, optional): If set to :obj:`False`, the layer will not
            learn an additive bias, neither in its output nor in the query,
            key and value projections (as
            :class:`~torch_geometric.nn.conv.TransformerConv`).
            (default: :obj:`True`)
        root_weight (bool, optional): If set to :obj:`False`, the layer will
            not add the transformed root node features
            :math:`\mathbf{W}_1 \mathbf{x}_i` to the output.
            (default: :obj:`True`)
        energy (str, optional): :obj:`"dot"` or :obj:`"euclidean"` (see
            :func:`hsa_geo.functional.hsa`). (default: :obj:`"dot"`)
        normalize_qk (bool, optional): If set to :obj:`True`, queries and
            keys are layer-normalised per head (no affine parameters, eps
            :math:`10^{-5}`), as in the paper's Proposition 3.1: every squared
            norm is then :math:`d\,\sigma^2 / (\sigma^2 + \epsilon)
            \approx d`, and both energies give the same attention up to a
            relative :math:`\epsilon / \sigma^2`. (default: :obj:`False`)
        causal (bool or str, optional): Causal HSA over the leaf order (every
            subtree must hold consecutive leaves): :obj:`True` or
            :obj:`"strict"`, as in :func:`hsa_geo.functional.hsa`.
            (default: :obj:`False`)
        positional (str or torch.nn.Module, optional): The positional term:
            :obj:`"learned"`, :obj:`"sinusoidal"` or :obj:`"rotary"` for a
            :class:`~hsa_geo.nn.SiblingPositionBias` of that kind, or any
            module mapping ``(hierarchy[, modality])`` to a pair bias
            ``[E, H]``. Needs an ordered hierarchy
            (:attr:`Hierarchy.ordered <hsa_geo.Hierarchy.ordered>`); off by
            default, as clusterings record no sibling order.
            (default: :obj:`None`)
        engine (str, optional): :obj:`"auto"` (the fused sweeps, or
            :meth:`propagate` while message hooks are registered, except
            for :obj:`causal="strict"`, which has no sweep to show),
            :obj:`"fused"` (the fused sweeps even under hooks, which then see
            no messages) or :obj:`"propagate"` (always :meth:`propagate`:
            plain autograd, :math:`O(\sum_A b_A^2\, H d)` memory, twice
            differentiable; not with :obj:`causal="strict"`).
            (default: :obj:`"auto"`)
        **kwargs (optional): Additional arguments of
            :class:`torch_geometric.nn.conv.MessagePassing` (the aggregation
            is the sum).

    Shapes:
        - **input:** leaf features :math:`(N, F_{in})`; a
          :class:`~hsa_geo.Hierarchy` over the :math:`N` leaves, or a
          :class:`~torch_geometric.data.Data`/:class:`~torch_geometric.data.Batch`
          carrying one (as :class:`~hsa_geo.transforms.AddHierarchy` leaves
          it); graph edges :math:`(2, |\mathcal{E}|)` *(optional)*
        - **output:** leaf features :math:`(N, H \cdot F_{out})` or
          :math:`(N, F_{out})` if :obj:`concat=False`; with
          :obj:`return_attention_weights=True` also a
          :class:`~hsa_geo.functional.BlockAttention` (block weights
          :math:`(E, H)` for :math:`E` ordered sibling pairs, subtree masses
          :math:`(N + M, H)`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        heads: int = 1,
        concat: bool = True,
        dropout: float = 0.,
        bias: bool = True,
        root_weight: bool = True,
        energy: str = 'dot',
        normalize_qk: bool = False,
        causal: Union[bool, str] = False,
        positional: Union[str, torch.nn.Module, None] = None,
        engine: str = 'auto',
        **kwargs,
    ):
        if isinstance(in_channels, (tuple, list)):
            raise ValueError(f"HSAConv attends among the leaves of one hierarchy, so it takes "
                             f"one 'in_channels' (an int, or -1 for lazy), not a pair "
                             f"{tuple(in_channels)} of source and target sizes")
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f"'heads' must be a positive int (got {heads!r})")
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"'out_channels' must be a positive int (got {out_channels!r})")
        if kwargs.setdefault('aggr', 'add') not in ('add', 'sum'):
            raise ValueError(f"HSAConv's sweeps sum their messages: 'aggr' must be 'add' "
                             f"(got {kwargs['aggr']!r})")
        if engine not in ENGINES:
            raise ValueError(f"Unknown engine {engine!r}; choose one of {list(ENGINES)}")
        if engine == 'propagate' and causal == 'strict':
            raise ValueError("engine='propagate' runs the sweeps over the tree, but "
                             "causal='strict' projects every row on its own: use the fused "
                             "engine for it")
        super().__init__(node_dim=0, **kwargs)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.heads = heads
        self.concat = concat
        if not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"'dropout' must be a probability in [0, 1] (got {dropout})")
        self.dropout = dropout
        self.root_weight = root_weight
        if energy not in ENERGIES:
            raise ValueError(f"Unknown energy {energy!r}; choose one of {list(ENERGIES)}")
        self.energy = energy
        self.normalize_qk = normalize_qk
        check_causal(causal)
        self.causal = causal
        self.engine = engine
        if isinstance(positional, str):
            positional = SiblingPositionBias(heads, kind=positional)
        self.positional = positional
        #: the attention on the graph's edges while an explainer's message
        #: hooks run (PyG's AttentionExplainer reads it), None otherwise
        self._alpha: Optional[Tensor] = None

        # as in TransformerConv, bias=False also drops the projections' biases
        self.lin_query = Linear(in_channels, heads * out_channels, bias=bias)
        self.lin_key = Linear(in_channels, heads * out_channels, bias=bias)
        self.lin_value = Linear(in_channels, heads * out_channels, bias=bias)
        width = heads * out_channels if concat else out_channels
        if root_weight:
            self.lin_skip = Linear(in_channels, width, bias=bias)
        else:
            self.lin_skip = None
        if bias and not root_weight:
            self.bias = torch.nn.Parameter(torch.empty(width))
        else:
            self.register_parameter('bias', None)
        self.reset_parameters()

    def reset_parameters(self):
        super().reset_parameters()
        self.lin_query.reset_parameters()
        self.lin_key.reset_parameters()
        self.lin_value.reset_parameters()
        if self.lin_skip is not None:
            self.lin_skip.reset_parameters()
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)
        if self.positional is not None and hasattr(self.positional, 'reset_parameters'):
            self.positional.reset_parameters()

    @overload
    def forward(self, x: Tensor, hierarchy: Union[Hierarchy, BaseData],
                return_attention_weights: None = None,
                pair_bias: Optional[Tensor] = None,
                modality: Optional[Tensor] = None,
                edge_index: Optional[Tensor] = None) -> Tensor:
        pass

    @overload
    def forward(self, x: Tensor, hierarchy: Union[Hierarchy, BaseData],
                return_attention_weights: bool,
                pair_bias: Optional[Tensor] = None,
                modality: Optional[Tensor] = None,
                edge_index: Optional[Tensor] = None) -> Tuple[Tensor, BlockAttention]:
        pass

    def forward(
        self,
        x: Tensor,
        hierarchy: Union[Hierarchy, HierarchyShard, BaseData],
        return_attention_weights: Optional[bool] = None,
        pair_bias: Optional[Tensor] = None,
        modality: Optional[Tensor] = None,
        edge_index: Optional[Tensor] = None,
    ) -> Union[Tensor, Tuple[Tensor, BlockAttention]]:
        r"""Runs the forward pass of the module.

        Args:
            x (torch.Tensor): The leaf features :math:`(N, F_{in})`.
            hierarchy (Hierarchy or Data or HierarchyShard): The tree (or
                forest, one per graph) over the :math:`N` leaves, or the
                :class:`~torch_geometric.data.Data` or
                :class:`~torch_geometric.data.Batch` that carries it (its
                :obj:`hierarchy_edge_index` and :obj:`num_clusters`, see
                :class:`~hsa_geo.data.NestedSignal`): the forest is then
                built once per batch and shared by every layer
                (:func:`hsa_geo.data.hierarchy_from_data`). Or this rank's
                :class:`~hsa_geo.distributed.HierarchyShard` of a hierarchy
                partitioned across ranks: :obj:`x` holds the shard's leaves
                and the layer computes exactly the rows of HSA over the
                whole hierarchy (every rank calls it; docs/distributed.rst).
            return_attention_weights (bool, optional): If set to
                :obj:`True`, also returns the block-level attention.
                (default: :obj:`None`)
            pair_bias (torch.Tensor, optional): Score bias per ordered
                sibling pair and head, ``[E, H]`` or ``[E]``, in the order
                of :meth:`hierarchy.sibling_pairs()
                <hsa_geo.Hierarchy.sibling_pairs>`; added to the
                :obj:`positional` term if both are present.
                (default: :obj:`None`)
            modality (torch.Tensor, optional): Modality id of every leaf
                (or node), passed to :obj:`positional` when it has
                per-modality embeddings. (default: :obj:`None`)
            edge_index (torch.Tensor, optional): The graph's edges
                :math:`(2, |\mathcal{E}|)`, only read by explainers: on
                them :class:`~torch_geometric.explain.algorithm.AttentionExplainer`
                reports :math:`a_{ij}`. Taken from :obj:`hierarchy` when it
                is a batch with :obj:`edge_index`. (default: :obj:`None`)
        """
        if isinstance(x, (tuple, list)):
            raise ValueError(
                "HSAConv attends among the leaves of one node type, but got a pair of source "
                "and target features, as torch_geometric.nn.to_hetero passes to a layer it "
                "copies for every edge type. A hierarchy has no edge types: apply HSAConv "
                "outside to_hetero, to the node type the hierarchy covers, e.g. "
                "conv(x_dict['paper'], hierarchy_of_papers)")
        if x.dim() != 2:
            raise ValueError(f"HSAConv expects leaf features of shape [N, F] "
                             f"(got {tuple(x.shape)})")
        if self.in_channels > 0 and x.size(1) != self.in_channels:
            raise ValueError(f"HSAConv was built for {self.in_channels} input channels, but x "
                             f"has {x.size(1)} (shape {tuple(x.shape)})")
        self._refuse_edge_masks()
        if isinstance(hierarchy, BaseData) and edge_index is None and 'edge_index' in hierarchy:
            edge_index = hierarchy.edge_index
        hierarchy = resolve_hierarchy(hierarchy)
        query, key, value = self._project_qkv(x)
        if isinstance(hierarchy, HierarchyShard):
            if self.explain is not False and any(
                    map(is_attention_explainer_hook, self._message_forward_hooks.values())):
                raise RuntimeError("AttentionExplainer cannot read HSA's attention over a "
                                   "HierarchyShard (the block weights are split across "
                                   "ranks): set `explain = False` on the layer")
            if return_attention_weights:
                raise ValueError("return_attention_weights is not available over a "
                                 "HierarchyShard: the block weights of the top tree live on "
                                 "every rank, those of the parts on their owners")
            out = self._attend_shard(query, key, value, hierarchy, pair_bias, modality)
            return self._finish(out, x)
        if self.positional is not None:
            position_bias = (self.positional(hierarchy) if modality is None
                             else self.positional(hierarchy, modality))
            pair_bias = position_bias if pair_bias is None else pair_bias + position_bias
        terms = dict(pair_bias=pair_bias, energy=self.energy, causal=self.causal)

        hooked = self._has_message_hooks()
        if self.engine == 'propagate' or (self.engine == 'auto' and hooked
                                          and self.causal != 'strict'):
            out = hsa_propagate(query, key, value, hierarchy, self._aggregate, **terms)
        else:
            out = hsa(query, key, value, hierarchy, **terms)
        out = self._finish(out, x)
        explaining = bool(self._message_forward_hooks) and self.explain is not False
        if not (return_attention_weights or explaining):
            return out
        if pair_bias is not None:
            terms['pair_bias'] = pair_bias.detach()
        attention = hsa_block_weights(query.detach(), key.detach(), hierarchy, **terms)
        if explaining:
            self._report_edge_attention(attention, hierarchy, edge_index, value.detach())
        return (out, attention) if return_attention_weights else out

    def message(self, x_j: Tensor, weight: Optional[Tensor]) -> Tensor:
        return weighted(x_j, weight)

    def _aggregate(self, x: Tensor, edge_index: Tensor, weight: Optional[Tensor],
                   dim_size: int) -> Tensor:
        r"""The sweeps' sum along edges, as :meth:`propagate`."""
        return self.propagate(edge_index, x=x, weight=weight, size=(dim_size, dim_size))

    def _has_message_hooks(self) -> bool:
        return any((self._propagate_forward_pre_hooks, self._propagate_forward_hooks,
                    self._message_forward_pre_hooks, self._message_forward_hooks,
                    self._aggregate_forward_pre_hooks, self._aggregate_forward_hooks))

    def _refuse_edge_masks(self) -> None:
        r"""Raises while an edge-mask explainer has set a mask on the layer
        (:obj:`explain = True`): HSA's output does not flow along the
        graph's edges, so the mask could never change it and the
        explanation would silently leave HSA out. The mask is removed from
        this layer before raising, so the layer does not keep failing after
        the explainer stopped."""
        if self.explain:
            self.explain = None
            self._edge_mask = self._loop_mask = None
            raise RuntimeError(
                "HSAConv attends over the hierarchy, not along the graph's edges, so an edge "
                "mask (GNNExplainer, PGExplainer, ...) cannot change its output. Explain HSA "
                "with AttentionExplainer (it reads HSA's attention on the edges) or "
                "return_attention_weights=True; to explain only the other layers with an "
                "edge mask, set `explain = False` on the HSAConv layers (the mask was removed "
                "from this layer)")

    def _report_edge_attention(self, attention: BlockAttention, hierarchy: Hierarchy,
                               edge_index: Optional[Tensor], value: Tensor) -> None:
        r"""For explainers' message hooks: one :meth:`propagate` along the
        graph's edges whose messages are :math:`a_{ij} \mathbf{v}_j`, the
        share of HSA's output that flows along each edge, with
        :math:`a_{ij}` as :obj:`_alpha` (where PyG's AttentionExplainer
        reads attention). The output is HSA's, whatever this returns.
        Without edges, other hooks are left alone, but AttentionExplainer's
        raise: the explanation would silently leave HSA out."""
        if edge_index is None:
            explainer_hooks = [key for key, hook in self._message_forward_hooks.items()
                               if is_attention_explainer_hook(hook)]
            if not explainer_hooks:
                return  # hooks of someone else's: they saw the sweeps
            for key in explainer_hooks:  # an explainer that fails leaves its hooks behind
                del self._message_forward_hooks[key]
            raise RuntimeError(
                "AttentionExplainer's hooks are registered on HSAConv, but it got no graph "
                "edges to report its attention on: pass edge_index=... to the layer (or a batch "
                "that carries edge_index), or set `explain = False` on it to leave it out of "
                "explanations (the hooks were removed from this layer)")
        self._alpha = attention_on_edges(attention, hierarchy, edge_index)
        try:
            with torch.no_grad():
                self.propagate(edge_index, x=value, weight=self._alpha,
                               size=(value.size(0), value.size(0)))
        finally:
            self._alpha = None

    def _finish(self, out: Tensor, x: Tensor) -> Tensor:
        r"""Dropout, heads concatenated or averaged, skip and bias."""
        out = F.dropout(out, p=self.dropout, training=self.training)
        out = out.reshape(-1, self.heads * self.out_channels) if self.concat else out.mean(dim=1)
        if self.lin_skip is not None:
            out = out + self.lin_skip(x)
        if self.bias is not None:
            out = out + self.bias
        return out

    def _attend_shard(self, query: Tensor, key: Tensor, value: Tensor, shard: HierarchyShard,
                      pair_bias, modality: Optional[Tensor]) -> Tensor:
        r"""Exact HSA over a hierarchy partitioned across ranks
        (:func:`hsa_geo.distributed.distributed_hsa`): :obj:`pair_bias` is
        None or a pair ``(local, top)`` of biases of the shard's two
        hierarchies; the positional term is evaluated on both."""
        if pair_bias is not None and not (isinstance(pair_bias, (tuple, list))
                                          and len(pair_bias) == 2):
            raise ValueError("over a HierarchyShard, 'pair_bias' is a pair (local, top): the "
                             "rows shard.pair_index and shard.top.pair_index of a global bias")
        local_bias, top_bias = pair_bias if pair_bias is not None else (None, None)
        if self.positional is not None:
            if modality is not None or getattr(self.positional, 'num_levels', None) is not None:
                raise ValueError("over a HierarchyShard the positional term may depend on "
                                 "sibling positions only (no num_levels, no modality): the "
                                 "shard's trees do not keep the global depths")
            top_position = self.positional(shard.top.hierarchy)
            top_bias = top_position if top_bias is None else top_bias + top_position
            if shard.local is not None:
                local_position = self.positional(shard.local)
                local_bias = local_position if local_bias is None else local_bias + local_position
        return distributed_hsa(query, key, value, shard, pair_bias=local_bias,
                               top_pair_bias=top_bias, energy=self.energy, causal=self.causal)

    def _project_qkv(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        r"""Queries, keys and values ``[N, H, C]``
        (:func:`hsa_geo.functional.project_qkv`), queries and keys
        optionally layer-normalised per head."""
        linears = (self.lin_query, self.lin_key, self.lin_value)
        for linear in linears:
            if is_uninitialized_parameter(linear.weight):
                linear(x[:1])  # lazy in_channels=-1: let PyG's hook size the weight
        weight = torch.cat([linear.weight for linear in linears])
        bias = (None if self.lin_query.bias is None
                else torch.cat([linear.bias for linear in linears]))
        return project_qkv(x, weight, bias, self.heads, self.normalize_qk)

    def __repr__(self) -> str:
        options = ''
        if self.energy != 'dot':
            options += f', energy={self.energy!r}'
        if self.causal:
            options += f', causal={self.causal!r}'
        if self.engine != 'auto':
            options += f', engine={self.engine!r}'
        return (f'{self.__class__.__name__}({self.in_channels}, '
                f'{self.out_channels}, heads={self.heads}{options})')


torch.nn.modules.module.register_module_module_registration_hook(refuse_hsa_in_gps)
