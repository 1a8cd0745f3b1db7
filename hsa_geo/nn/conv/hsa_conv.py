from typing import Optional, Tuple, Union, overload

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.nn.conv import MessagePassing
from torch_geometric.nn.dense.linear import Linear, is_uninitialized_parameter

from hsa_geo.distributed import HierarchyShard, distributed_hsa
from hsa_geo.functional import BlockAttention, hsa, hsa_block_weights
from hsa_geo.functional import kernel as cpu_kernel
from hsa_geo.functional.checks import ENERGIES, check_causal
from hsa_geo.hierarchy import Hierarchy
from hsa_geo.nn.positional import SiblingPositionBias


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

    HSA's attention is read with :obj:`return_attention_weights=True` (the
    weights of the sibling-pair blocks), not through edge messages: the
    layer passes none, so PyG's
    :class:`~torch_geometric.explain.algorithm.AttentionExplainer`, which
    collects attention from message hooks, is refused with an error that
    says so; set :obj:`explain = False` on the layer to explain the other
    layers' attention only.

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
        **kwargs (optional): Additional arguments of
            :class:`torch_geometric.nn.conv.MessagePassing`.

    Shapes:
        - **input:** leaf features :math:`(N, F_{in})`, a
          :class:`~hsa_geo.Hierarchy` over the :math:`N` leaves
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
        kwargs.setdefault('aggr', 'add')
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
        if isinstance(positional, str):
            positional = SiblingPositionBias(heads, kind=positional)
        self.positional = positional

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

    def _refuse_message_hooks(self) -> None:
        r"""Raises on message hooks (PyG's
        :class:`~torch_geometric.explain.algorithm.AttentionExplainer`
        registers them): HSA passes no per-edge messages, so they would
        never see its attention, and an explanation would silently leave
        it out. The hooks are removed before raising (they can never fire
        here), so the layer does not keep failing after the explainer
        stopped."""
        if self._message_forward_hooks and self.explain is not False:
            self._message_forward_hooks.clear()
            raise RuntimeError(
                "HSAConv attends over the hierarchy, not along edges: it passes no messages, "
                "so message hooks (PyG's AttentionExplainer registers them) would never see "
                "its attention. For HSA's attention use return_attention_weights=True (weights "
                "of the sibling-pair blocks) or hsa_geo.functional.hsa_dense (the dense "
                "matrix); to explain only the other layers' attention, set `explain = False` "
                "on the HSAConv layers (the hooks were removed from this layer)")

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
    def forward(self, x: Tensor, hierarchy: Hierarchy,
                return_attention_weights: None = None,
                pair_bias: Optional[Tensor] = None,
                modality: Optional[Tensor] = None) -> Tensor:
        pass

    @overload
    def forward(self, x: Tensor, hierarchy: Hierarchy,
                return_attention_weights: bool,
                pair_bias: Optional[Tensor] = None,
                modality: Optional[Tensor] = None) -> Tuple[Tensor, BlockAttention]:
        pass

    def forward(
        self,
        x: Tensor,
        hierarchy: Hierarchy,
        return_attention_weights: Optional[bool] = None,
        pair_bias: Optional[Tensor] = None,
        modality: Optional[Tensor] = None,
    ) -> Union[Tensor, Tuple[Tensor, BlockAttention]]:
        r"""Runs the forward pass of the module.

        Args:
            x (torch.Tensor): The leaf features :math:`(N, F_{in})`.
            hierarchy (Hierarchy or HierarchyShard): The tree (or forest,
                one per graph) over the :math:`N` leaves; build it once per
                batch, e.g. with :func:`hsa_geo.data.hierarchy_from_data`.
                Or this rank's :class:`~hsa_geo.distributed.HierarchyShard`
                of a hierarchy partitioned across ranks: :obj:`x` holds the
                shard's leaves and the layer computes exactly the rows of
                HSA over the whole hierarchy (every rank calls it;
                docs/distributed.rst).
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
        """
        if x.dim() != 2:
            raise ValueError(f"HSAConv expects leaf features of shape [N, F] "
                             f"(got {tuple(x.shape)})")
        if self.in_channels > 0 and x.size(1) != self.in_channels:
            raise ValueError(f"HSAConv was built for {self.in_channels} input channels, but x "
                             f"has {x.size(1)} (shape {tuple(x.shape)})")
        self._refuse_message_hooks()
        query, key, value = self._project_qkv(x)
        if isinstance(hierarchy, HierarchyShard):
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

        out = self._finish(hsa(query, key, value, hierarchy, **terms), x)
        if return_attention_weights:
            if pair_bias is not None:
                terms['pair_bias'] = pair_bias.detach()
            return out, hsa_block_weights(query.detach(), key.detach(), hierarchy, **terms)
        return out

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
        r"""Queries, keys and values ``[N, H, C]`` by one product with the
        three projections' weights side by side (one matrix product forward
        and two backward instead of three and six); queries and keys
        optionally layer-normalised per head. On the CPU kernel's path the
        product is node-major (the kernel reads ``[N, H, C]``); elsewhere
        heads-first, views of ``[H, N, C]`` tensors, the layout the tensor
        sweeps work in (no transpose copy on the way in or back)."""
        linears = (self.lin_query, self.lin_key, self.lin_value)
        for linear in linears:
            if is_uninitialized_parameter(linear.weight):
                linear(x[:1])  # lazy in_channels=-1: let PyG's hook size the weight
        heads, channels = self.heads, self.out_channels
        weight = torch.cat([linear.weight for linear in linears])
        bias = (None if self.lin_query.bias is None
                else torch.cat([linear.bias for linear in linears]))
        if cpu_kernel.available(x):
            out = F.linear(x, weight, bias).view(-1, 3 * heads, channels)
            query, key, value = out.split(heads, dim=1)
        else:
            out = torch.matmul(x, weight.view(3 * heads, channels, -1).transpose(1, 2))
            if bias is not None:
                out = out + bias.view(3 * heads, 1, channels)
            query, key, value = (t.transpose(0, 1) for t in out.split(heads))
        if self.normalize_qk:
            query = F.layer_norm(query, (channels, ))
            key = F.layer_norm(key, (channels, ))
        return query, key, value

    def __repr__(self) -> str:
        options = ''
        if self.energy != 'dot':
            options += f', energy={self.energy!r}'
        if self.causal:
            options += f', causal={self.causal!r}'
        return (f'{self.__class__.__name__}({self.in_channels}, '
                f'{self.out_channels}, heads={self.heads}{options})')
