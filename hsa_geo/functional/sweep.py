r"""The exact HSA dynamic program on the slot layout
(:mod:`hsa_geo.hierarchy.layout`): a bottom-up and a top-down sweep over
padded family blocks, and the hand-derived backward pass (two more sweeps).
docs/derivation.rst derives every line; the names follow it:

* ``scores[h, f, b, c]`` = :math:`\bar s(B, C) + \log|C|` for siblings
  :math:`B \neq C`, :math:`-\phi(B)` on the diagonal, :math:`-\infty` for
  padding columns (and later siblings when causal);
* ``weight`` = :math:`\exp(\text{scores} - \log Z_B)`, row-stochastic over
  :math:`c`: the share of :math:`B`'s mass sent to the whole of :math:`C`
  (to itself on the diagonal, :math:`\mu(B)`);
* ``self_log`` = :math:`\log \mu(B)`, ``log_mass`` = :math:`\log P(B)`,
  the log of the product of :math:`\mu` from below the root down to
  :math:`B`.

A block's children are read from a *slot buffer* (one row per head and
slot, :class:`NodeColumns` wide) as the view ``[H, F, w, C]``; a leaf range
reads the inputs instead. Each sweep writes a level's parents with one
``index_copy_`` and reads them with one ``index_select``; everything else
is a view or a batched product.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from hsa_geo.hierarchy.layout import LayoutBlock, LayoutLevel, SlotLayout


class ScoreTerms(NamedTuple):
    r"""What is added to the dot-product scores :math:`\tau\, q_i^\top k_j`
    (docs/derivation.rst): a bias per sibling pair, the Euclidean energy's
    key term and the causal mask."""
    #: ``[H * P]`` bias per padded pair of the layout (block-major, then
    #: head-major), or None
    pair_bias: Optional[Tensor] = None
    #: Euclidean energy :math:`-\tfrac{\tau}{2}\Vert q_i - k_j\Vert^2`: the
    #: sweeps add the column term :math:`-\tfrac{\tau}{2}\,\overline{\Vert k
    #: \Vert^2}(C)` (the row term cancels from the attention)
    euclidean: bool = False
    #: a child attends only to itself and to earlier siblings
    causal: bool = False


class NodeColumns(NamedTuple):
    r"""Column ranges of a slot buffer row: the (mean) query, key, value,
    :math:`\phi` and, for the Euclidean energy, the (mean) :math:`\Vert k
    \Vert^2`."""
    dim: int
    value_dim: int
    euclidean: bool

    @property
    def width(self) -> int:
        return 2 * self.dim + self.value_dim + 1 + int(self.euclidean)

    def query(self, rows: Tensor) -> Tensor:
        return rows[..., :self.dim]

    def key(self, rows: Tensor) -> Tensor:
        return rows[..., self.dim:2 * self.dim]

    def value(self, rows: Tensor) -> Tensor:
        return rows[..., 2 * self.dim:2 * self.dim + self.value_dim]

    def phi(self, rows: Tensor) -> Tensor:
        return rows[..., 2 * self.dim + self.value_dim]

    def key_norm(self, rows: Tensor) -> Tensor:
        return rows[..., 2 * self.dim + self.value_dim + 1]


# ------------------------------------------------------------------ views
def flat_view(buffer: Tensor, start: int, heads: int, shape: Sequence[int]) -> Tensor:
    r"""``[H, *shape]`` view of a block-major, head-major flat buffer whose
    block starts at :obj:`start` (counted per head)."""
    size = 1
    for extent in shape:
        size *= extent
    return buffer[heads * start:heads * (start + size)].view(heads, *shape, *buffer.shape[1:])


def slot_rows(buffer: Tensor, block: LayoutBlock, heads: int) -> Tensor:
    r"""``[H, F, w, C]`` view of the children of :obj:`block` in a slot
    buffer ``[H * rows, C]``."""
    return flat_view(buffer, block.row_start, heads, (block.num_families, block.width))


def leaf_range_rows(leaf_tensors: Sequence[Tensor], block: LayoutBlock) -> Tensor:
    r"""``[H, F, w, C]`` rows of a leaf-range block, the per-leaf tensors
    (``[N, H, c]``, any layout) concatenated along the columns."""
    start, end = block.leaf_range
    parts = [t[start:end].transpose(0, 1) for t in leaf_tensors]
    rows = parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=-1)
    return rows.view(rows.size(0), block.num_families, block.width, -1)


def leaf_range_target(leaf_tensor: Tensor, block: LayoutBlock) -> Tensor:
    r"""``[H, F, w, ...]`` view of the rows of a leaf-range block in a
    per-leaf tensor ``[N, H, ...]`` (written in place)."""
    start, end = block.leaf_range
    rows = leaf_tensor[start:end].transpose(0, 1)
    return rows.reshape(rows.size(0), block.num_families, block.width, *rows.shape[2:])


def diagonal(pairs: Tensor) -> Tensor:
    r"""``[H, F, w]`` view of the :math:`B = C` entries of ``[H, F, w, w]``."""
    return pairs.diagonal(dim1=-2, dim2=-1)


def level_blocks(level: LayoutLevel):
    r"""``(offset, block)`` for the blocks of :obj:`level`, with the offset
    of the block's families in the level's family buffer."""
    offset = 0
    for block in level.blocks:
        yield offset, block
        offset += block.num_families


def later_siblings(width: int, device) -> Tensor:
    r"""``[w, w]`` mask of the pairs :math:`(b, c)` with :math:`c > b`."""
    return torch.ones(width, width, dtype=torch.bool, device=device).triu(1)


class Constants(NamedTuple):
    share: Tensor
    log_count: Tensor
    inverse_count: Tensor
    cluster: Tensor


def constants(block: LayoutBlock, dtype: torch.dtype) -> Constants:
    r"""The block's per-slot constants in :obj:`dtype` (cached on the block)."""
    cache = block.__dict__.setdefault('_constants', {})
    if dtype not in cache:
        cache[dtype] = Constants(block.share.to(dtype), block.log_count.to(dtype),
                                 block.inverse_count.to(dtype), block.cluster.to(dtype))
    return cache[dtype]


# ------------------------------------------------------------------ bottom-up
class ForwardState(NamedTuple):
    r"""What the sweeps keep for the top-down sweep and the backward pass."""
    nodes: Tensor  #: ``[H * rows, C]`` slot buffer: (mean) q, k, v, phi (, |k|^2)
    weights: Tensor  #: ``[H * P]`` family weights, padded pairs
    self_log: Tensor  #: ``[H * S]`` log mu of every slot
    leaf_phi: Tensor  #: ``[N, H]``
    leaf_key_norm: Optional[Tensor]  #: ``[N, H]`` (Euclidean energy)
    columns: NodeColumns


def leaf_terms(q: Tensor, k: Tensor, layout: SlotLayout, scale: float, terms: ScoreTerms):
    r""":math:`\phi` of every leaf, :math:`-s_{ii}` (``[N, H]``, the bias of
    the leaf's own pair included), and :math:`\Vert k_i \Vert^2` for the
    Euclidean energy."""
    self_score = (q * k).sum(-1).mul_(scale)
    key_norm = None
    if terms.euclidean:
        key_norm = (k * k).sum(-1)
        self_score.add_(key_norm, alpha=-0.5 * scale)
    if terms.pair_bias is not None:
        self_score.add_(layout.leaf_diagonal(terms.pair_bias, q.size(1)))
    return self_score.neg_(), key_norm


def leaf_columns(q: Tensor, k: Tensor, v: Tensor, leaf_phi: Tensor,
                 key_norm: Optional[Tensor]) -> List[Tensor]:
    r"""The per-leaf tensors ``[N, H, c]`` that fill a slot buffer row."""
    columns = [q, k, v, leaf_phi[..., None]]
    if key_norm is not None:
        columns.append(key_norm[..., None])
    return columns


def fill_leaves(buffer: Tensor, layout: SlotLayout, columns: List[Tensor]) -> None:
    r"""Writes the rows of the slotted leaves into a slot buffer."""
    leaves = layout.slotted_leaves
    if leaves.numel() == 0:
        return
    heads = columns[0].size(1)
    if leaves.numel() < layout.num_leaves:
        columns = [c[leaves] for c in columns]
    rows = torch.cat(columns, dim=-1) if len(columns) > 1 else columns[0]
    buffer.index_copy_(0, layout.cached_rows('leaves', heads).view(-1),
                       rows.reshape(-1, buffer.size(1)))


def read_leaves(buffer: Tensor, layout: SlotLayout, heads: int) -> Tensor:
    r"""``[L, H, C]`` rows of the slotted leaves in a slot buffer."""
    rows = layout.cached_rows('leaves', heads)
    return buffer.index_select(0, rows.view(-1)).view(rows.size(0), heads, -1)


def bottom_up(q: Tensor, k: Tensor, v: Tensor, layout: SlotLayout, scale: float,
              terms: ScoreTerms = ScoreTerms()) -> ForwardState:
    r"""Cluster means, :math:`\phi`, :math:`\log\mu` and the family weights
    of ``[N, H, D]`` inputs (any memory layout; no autograd). With the
    Euclidean energy, :math:`\phi` leaves out the row term
    :math:`\tfrac{\tau}{2}\overline{\Vert q\Vert^2}` (it does not change the
    attention; :func:`hsa_geo.functional.hsa_log_partition` adds it)."""
    heads = q.size(1)
    columns = NodeColumns(q.size(2), v.size(2), terms.euclidean)
    leaf_phi, key_norm = leaf_terms(q, k, layout, scale, terms)
    leaf_inputs = leaf_columns(q, k, v, leaf_phi, key_norm)
    nodes = q.new_zeros(heads * layout.num_rows, columns.width)
    fill_leaves(nodes, layout, leaf_inputs)
    weights = q.new_empty(heads * layout.num_pairs)
    self_log = q.new_empty(heads * layout.num_slots)
    for index, level in enumerate(layout.levels):
        parents = q.new_empty(heads * level.num_families, columns.width)
        for offset, block in level_blocks(level):
            rows = (leaf_range_rows(leaf_inputs, block) if block.leaf_range is not None
                    else slot_rows(nodes, block, heads))
            const = constants(block, q.dtype)
            family, width = block.num_families, block.width
            parent = flat_view(parents, offset, heads, (family, ))  # [H, F, C]
            # leaf-weighted means of every column (phi's is replaced below)
            torch.matmul(const.share[:, None, :], rows, out=parent.unsqueeze(2))
            scores = torch.matmul(columns.query(rows), columns.key(rows).transpose(-1, -2))
            scores.mul_(scale).add_(const.log_count[:, None, :])
            if terms.euclidean:
                scores.add_(columns.key_norm(rows)[:, :, None, :], alpha=-0.5 * scale)
            if terms.pair_bias is not None:
                scores.add_(flat_view(terms.pair_bias, block.pair_start, heads,
                                      (family, width, width)))
            if terms.causal and width > 1:
                scores.masked_fill_(later_siblings(width, scores.device), float('-inf'))
            child_phi = columns.phi(rows)
            diagonal(scores).copy_(child_phi).neg_()
            log_weight = torch.log_softmax(scores, dim=-1)
            torch.exp(log_weight, out=flat_view(weights, block.pair_start, heads,
                                                (family, width, width)))
            block_self_log = flat_view(self_log, block.slot_start, heads, (family, width))
            block_self_log.copy_(diagonal(log_weight))
            # phi(A) = -sum_b |B|/|A| log Z_B, and log Z_B = -phi(B) - log mu(B)
            columns.phi(parent).copy_(((child_phi + block_self_log) * const.share).sum(-1))
        nodes.index_copy_(0, layout.cached_rows(f'parents{index}', heads), parents)
    return ForwardState(nodes, weights, self_log, leaf_phi, key_norm, columns)


def block_values(block: LayoutBlock, state: ForwardState, v: Tensor) -> Tensor:
    r"""``[H, F, w, D_v]`` (mean) values of the children of :obj:`block`."""
    if block.leaf_range is not None:
        return leaf_range_rows([v], block)
    return state.columns.value(slot_rows(state.nodes, block, v.size(1)))


# ------------------------------------------------------------------- forward
class TopDown(NamedTuple):
    out: Tensor  #: ``[N, H, D_v]``
    leaf_log_mass: Tensor  #: ``[N, H]`` log a_ii
    family_log_mass: Tensor  #: ``[H * families]`` log P(A) of every family's parent
    down: Tensor  #: ``[H * rows, D_v + 1]`` slot buffer: message u, log P


def top_down(v: Tensor, layout: SlotLayout, state: ForwardState) -> TopDown:
    r"""Outputs and :math:`\log P` of every node, root first.

    For a child :math:`B` of family :math:`A`,
    :math:`y_B = u_A + P(A) \sum_c \mathrm{weight}_{Bc} \bar v_c`, where
    :math:`u_A` is what reaches :math:`A` from its ancestors' siblings and
    the diagonal term is a leaf's own share; a cluster child hands that
    share further down instead (:math:`u_B = y_B - P(A)\mu(B)\bar v_B`).
    """
    num_leaves, heads, value_dim = v.shape
    columns = state.columns
    down = v.new_zeros(heads * layout.num_rows, value_dim + 1)
    out = v.new_empty(num_leaves, heads, value_dim)
    leaf_log_mass = v.new_zeros(num_leaves, heads)
    family_log_mass = v.new_empty(heads * layout.num_families)
    for index in reversed(range(len(layout.levels))):
        level = layout.levels[index]
        parents = down.index_select(0, layout.cached_rows(f'parents{index}', heads))
        for offset, block in level_blocks(level):
            family, width = block.num_families, block.width
            parent = flat_view(parents, offset, heads, (family, ))
            parent_log_mass = flat_view(family_log_mass, block.family_start, heads, (family, ))
            parent_log_mass.copy_(parent[..., value_dim])
            scaled_weight = flat_view(state.weights, block.pair_start, heads,
                                      (family, width, width)) * parent_log_mass.exp()[..., None, None]
            value = block_values(block, state, v)
            child_out = torch.matmul(scaled_weight, value).add_(parent[:, :, None, :value_dim])
            child_log_mass = (flat_view(state.self_log, block.slot_start, heads, (family, width))
                              + parent_log_mass[..., None])
            if block.leaf_range is not None:
                leaf_range_target(out, block).copy_(child_out)
                leaf_range_target(leaf_log_mass, block).copy_(child_log_mass)
                continue
            own = diagonal(scaled_weight) * constants(block, v.dtype).cluster
            target = slot_rows(down, block, heads)
            target[..., :value_dim].copy_(child_out.addcmul_(own[..., None], value, value=-1.0))
            target[..., value_dim].copy_(child_log_mass)
    leaves = layout.slotted_leaves
    if leaves.numel() > 0:
        rows = read_leaves(down, layout, heads)
        if leaves.numel() == num_leaves:
            out, leaf_log_mass = rows[..., :value_dim], rows[..., value_dim].contiguous()
        else:
            out[leaves] = rows[..., :value_dim]
            leaf_log_mass[leaves] = rows[..., value_dim]
    isolated = layout.isolated_leaves
    if isolated.numel() > 0:
        out[isolated] = v[isolated]
    return TopDown(out, leaf_log_mass, family_log_mass, down)


# ------------------------------------------------------------------ backward
class GradColumns(NamedTuple):
    r"""Columns of the backward's top-down slot buffer: :math:`\delta`, the
    accumulated gradients of the (mean) query, key and value and, for the
    Euclidean energy, the key-norm coefficient :math:`\gamma`."""
    dim: int
    value_dim: int
    euclidean: bool

    @property
    def width(self) -> int:
        return 1 + 2 * self.dim + self.value_dim + int(self.euclidean)

    def split(self, rows: Tensor):
        d, dv = self.dim, self.value_dim
        gamma = rows[..., 1 + 2 * d + dv] if self.euclidean else None
        return (rows[..., 0], rows[..., 1:1 + d], rows[..., 1 + d:1 + 2 * d],
                rows[..., 1 + 2 * d:1 + 2 * d + dv], gamma)


def backward_sweeps(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, layout: SlotLayout,
                    scale: float, state: ForwardState, leaf_log_mass: Tensor,
                    family_log_mass: Tensor, terms: ScoreTerms = ScoreTerms(),
                    grad_pair_bias: bool = False):
    r"""Gradients of :math:`L = \sum_i g_i \cdot y_i` for q, k, v
    (``[N, H, D]``) and, with :obj:`grad_pair_bias`, for the padded pair
    bias (``[H * P]``) by a bottom-up and a top-down sweep
    (docs/derivation.rst, "Backward pass")."""
    num_leaves, heads, dim = q.shape
    value_dim = v.size(2)
    columns = state.columns
    grad_columns = GradColumns(dim, value_dim, terms.euclidean)
    # through[B] = dL/dlog P(B): everything below B, weighted by its mass
    leaf_through = leaf_log_mass.exp() * (grad_out * v).sum(-1)
    leaf_grads = [grad_out, leaf_through[..., None]]
    up = q.new_zeros(heads * layout.num_rows, value_dim + 1)  # summed g, through
    fill_leaves(up, layout, leaf_grads)

    def read(buffer, leaf_tensors, block):
        return (leaf_range_rows(leaf_tensors, block) if block.leaf_range is not None
                else slot_rows(buffer, block, heads))

    def couplings(block, grad, value):
        r""":math:`w_{bc}\,(g_b \cdot \bar v_c)` and the parent mass."""
        shape = (block.num_families, block.width, block.width)
        weight = flat_view(state.weights, block.pair_start, heads, shape)
        parent_mass = flat_view(family_log_mass, block.family_start, heads,
                                (block.num_families, )).exp()
        coupled = torch.matmul(grad, value.transpose(-1, -2)).mul_(weight)
        return weight, parent_mass, coupled

    for index, level in enumerate(layout.levels):
        parents = q.new_empty(heads * level.num_families, value_dim + 1)
        for offset, block in level_blocks(level):
            rows = read(up, leaf_grads, block)
            grad, through = rows[..., :value_dim], rows[..., value_dim]
            value = block_values(block, state, v)
            _, parent_mass, coupled = couplings(block, grad, value)
            off_diagonal = coupled.sum((-1, -2)) - diagonal(coupled).sum(-1)
            parent = flat_view(parents, offset, heads, (block.num_families, ))
            torch.sum(grad, 2, out=parent[..., :value_dim])
            parent[..., value_dim].copy_(parent_mass * off_diagonal + through.sum(-1))
        up.index_copy_(0, layout.cached_rows(f'parents{index}', heads), parents)

    # delta[B] = dL/dt_BB, the gradient of B's own (diagonal) score
    down = q.new_zeros(heads * layout.num_rows, grad_columns.width)
    grad_q, grad_k, grad_v = (torch.empty_like(t, memory_format=torch.contiguous_format)
                              for t in (q, k, v))
    leaf_gamma = q.new_zeros(num_leaves, heads) if terms.euclidean else None
    grad_bias = q.new_zeros(heads * layout.num_pairs) if grad_pair_bias else None
    leaf_inputs = leaf_columns(q, k, v, state.leaf_phi, state.leaf_key_norm)
    for index in reversed(range(len(layout.levels))):
        level = layout.levels[index]
        parents = down.index_select(0, layout.cached_rows(f'parents{index}', heads))
        for offset, block in level_blocks(level):
            family, width = block.num_families, block.width
            const = constants(block, q.dtype)
            parent_delta, acc_q, acc_k, acc_v, parent_gamma = grad_columns.split(
                flat_view(parents, offset, heads, (family, )))
            rows = read(up, leaf_grads, block)
            grad, through = rows[..., :value_dim], rows[..., value_dim]
            nodes = read(state.nodes, leaf_inputs, block)
            query, key, value = columns.query(nodes), columns.key(nodes), columns.value(nodes)
            weight, parent_mass, coupled = couplings(block, grad, value)
            parent_mass = parent_mass[..., None]
            row_sum = parent_mass * (coupled.sum(-1) - diagonal(coupled)) + through
            residual = row_sum - parent_delta[..., None] * const.share
            # score gradient, diagonal included: P w_bc (g_b . v_c) - w_bc residual_b
            grad_scores = coupled.mul_(parent_mass[..., None]).sub_(weight * residual[..., None])
            child_delta = through - diagonal(weight) * residual
            # A cluster child's diagonal is -phi, not a score of its own
            # leaves: it passes no gradient to q, k or the bias.
            not_cluster = 1.0 - const.cluster
            diagonal(grad_scores).mul_(not_cluster)
            if grad_bias is not None:
                flat_view(grad_bias, block.pair_start, heads, (family, width, width)).copy_(grad_scores)
            scaled_weight = weight * parent_mass[..., None]
            diagonal(scaled_weight).mul_(not_cluster)
            # A child's gradient is its ancestors' accumulated share plus its
            # own products, divided among its |B| leaves.
            inverse_count = const.inverse_count[..., None]
            new_q = torch.matmul(grad_scores, key).mul_(inverse_count * scale).add_(acc_q[:, :, None])
            new_k = (torch.matmul(grad_scores.transpose(-1, -2), query)
                     .mul_(inverse_count * scale).add_(acc_k[:, :, None]))
            new_v = (torch.matmul(scaled_weight.transpose(-1, -2), grad)
                     .mul_(inverse_count).add_(acc_v[:, :, None]))
            new_gamma = None
            if parent_gamma is not None:  # Euclidean key term
                new_gamma = grad_scores.sum(-2).mul_(const.inverse_count).add_(parent_gamma[..., None])
            if block.leaf_range is not None:
                for target, new in ((grad_q, new_q), (grad_k, new_k), (grad_v, new_v),
                                    (leaf_gamma, new_gamma)):
                    if new is not None:
                        leaf_range_target(target, block).copy_(new)
                continue
            target = slot_rows(down, block, heads)
            delta, q_rows, k_rows, v_rows, gamma = grad_columns.split(target)
            for part, new in ((delta, child_delta), (q_rows, new_q), (k_rows, new_k),
                              (v_rows, new_v), (gamma, new_gamma)):
                if new is not None:
                    part.copy_(new)
    leaves = layout.slotted_leaves
    if leaves.numel() > 0:
        _, q_rows, k_rows, v_rows, gamma = grad_columns.split(read_leaves(down, layout, heads))
        grad_q[leaves], grad_k[leaves], grad_v[leaves] = q_rows, k_rows, v_rows
        if gamma is not None:
            leaf_gamma[leaves] = gamma
    isolated = layout.isolated_leaves
    if isolated.numel() > 0:
        grad_q[isolated] = 0.0
        grad_k[isolated] = 0.0
        grad_v[isolated] = grad_out[isolated]
        if leaf_gamma is not None:
            leaf_gamma[isolated] = 0.0
    if leaf_gamma is not None:  # d s_ij / d k_j gains -scale k_j per unit of gamma
        grad_k.addcmul_(leaf_gamma[..., None], k, value=-scale)
    return grad_q, grad_k, grad_v, grad_bias


# ------------------------------------------------------------------ autograd
def forward_sweeps(q: Tensor, k: Tensor, v: Tensor, layout: SlotLayout, scale: float,
                   terms: ScoreTerms) -> Tuple[ForwardState, TopDown]:
    r"""Both forward sweeps (no autograd), run in the inputs' dtype even
    inside :func:`torch.autocast`."""
    with torch.autocast(q.device.type, enabled=False):
        state = bottom_up(q, k, v, layout, scale, terms)
        return state, top_down(v, layout, state)


class HSAFunction(torch.autograd.Function):
    r"""Fused HSA on ``[N, H, D]`` inputs (any memory layout) and an
    optional padded pair bias ``[H * P]``. Saves the slot buffer, the
    family weights and per-leaf state: nothing quadratic."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, pair_bias: Optional[Tensor],
                layout: SlotLayout, scale: float, euclidean: bool = False,
                causal: bool = False) -> Tensor:
        terms = ScoreTerms(pair_bias, euclidean, causal)
        state, result = forward_sweeps(q, k, v, layout, scale, terms)
        ctx.save_for_backward(q, k, v)
        ctx.state = state
        ctx.leaf_log_mass, ctx.family_log_mass = result.leaf_log_mass, result.family_log_mass
        ctx.layout, ctx.scale = layout, scale
        ctx.terms = ScoreTerms(None, euclidean, causal)
        return result.out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError("hsa(backend='fused') can be differentiated once; for "
                               "higher-order gradients (create_graph=True) use "
                               "backend='scatter'")
        q, k, v = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            grad_q, grad_k, grad_v, grad_bias = backward_sweeps(
                grad_out, q, k, v, ctx.layout, ctx.scale, ctx.state, ctx.leaf_log_mass,
                ctx.family_log_mass, ctx.terms,
                grad_pair_bias=ctx.needs_input_grad[3])
        return grad_q, grad_k, grad_v, grad_bias, None, None, None, None
