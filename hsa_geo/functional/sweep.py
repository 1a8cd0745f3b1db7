r"""The exact HSA dynamic program on the slot layout
(:mod:`hsa_geo.functional.layout`): a bottom-up and a top-down sweep over
padded family blocks, and the hand-derived backward pass (two more sweeps).
docs/derivation.rst derives every line; the names follow it:

* ``scores[h, b, c, f]`` = :math:`\bar s(B, C) + \log|C|` for siblings
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

import contextlib
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from hsa_geo.functional.terms import ScoreTerms
from hsa_geo.functional.layout import LayoutBlock, LayoutLevel, SlotLayout


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

    def split(self, rows: Tensor) -> 'Children':
        r"""Views of every feature of ``rows[..., C]``."""
        return Children(self.query(rows), self.key(rows), self.value(rows), self.phi(rows),
                        self.key_norm(rows) if self.euclidean else None, rows)


class Children(NamedTuple):
    r"""The children of a block, ``[H, F, w, .]`` views of a slot buffer or,
    for a leaf range, of the inputs (no copy)."""
    query: Tensor
    key: Tensor
    value: Tensor
    phi: Tensor  #: ``[H, F, w]``
    key_norm: Optional[Tensor]  #: ``[H, F, w]`` (Euclidean energy)
    rows: Optional[Tensor]  #: the whole slot-buffer view ``[H, F, w, C]``; None for a leaf range


class LeafInputs(NamedTuple):
    r"""Per-leaf tensors ``[N, H, .]`` (any memory layout) and ``[N, H]``."""
    query: Tensor
    key: Tensor
    value: Tensor
    phi: Tensor
    key_norm: Optional[Tensor]


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


def leaf_range_view(leaf_tensor: Tensor, block: LayoutBlock) -> Tensor:
    r"""``[H, F, w, ...]`` view of the rows of a leaf-range block in a
    per-leaf tensor ``[N, H, ...]`` (strided; no copy): read from, or
    written in place."""
    start, end = block.leaf_range
    return leaf_tensor[start:end].transpose(0, 1).unflatten(1, (block.num_families, block.width))


def block_children(block: LayoutBlock, nodes: Tensor, leaves: LeafInputs,
                   columns: 'NodeColumns', heads: int) -> Children:
    r"""The children of :obj:`block`: views of the slot buffer, or of the
    inputs for a leaf range."""
    if block.leaf_range is None:
        return columns.split(slot_rows(nodes, block, heads))
    views = [None if t is None else leaf_range_view(t, block) for t in leaves]
    return Children(*views, None)


#: Products contracting at most this many siblings are multiply-adds
#: (:func:`batched_matmul`).
SMALL_CONTRACTION = 4


def _batch_mergeable(tensor: Tensor) -> bool:
    rows, columns = tensor.stride(-2), tensor.stride(-1)
    matrices = (columns == 1 and rows >= tensor.size(-1)) or (rows == 1 and columns >= tensor.size(-2))
    return matrices and (tensor.size(0) == 1 or tensor.stride(0) == tensor.size(1) * tensor.stride(1))


def _per_head_matrices(tensor: Tensor) -> bool:
    head = tensor[0]
    return head.is_contiguous() or head.transpose(-1, -2).is_contiguous()


def batched_matmul(left: Tensor, right: Tensor) -> Tensor:
    r"""``left @ right`` for ``[H, F, x, y] @ [H, F, y, z]``. Slot-buffer
    views (head and family axes mergeable) go to one batched product; views
    of heads-first inputs, contiguous per head, to one product per head
    (read in place); anything else (rows-first or expanded inputs) is first
    copied, one block at a time."""
    if left.size(-1) <= SMALL_CONTRACTION and left.size(-2) * right.size(-1) > left.size(-1):
        # a contraction over 2-4 siblings: a few broadcast multiply-adds beat
        # the batched product's small-matrix kernel by 3-5x
        out = torch.mul(left[..., 0, None], right[..., 0, None, :])
        for index in range(1, left.size(-1)):
            out.addcmul_(left[..., index, None], right[..., index, None, :])
        return out
    operands = []
    for operand in (left, right):
        if not (_batch_mergeable(operand) or _per_head_matrices(operand)):
            operand = operand.contiguous()
        operands.append(operand)
    left, right = operands
    if _batch_mergeable(left) and _batch_mergeable(right):
        return torch.matmul(left, right)
    out = left.new_empty(left.shape[:-1] + right.shape[-1:])
    for head in range(left.size(0)):
        torch.matmul(left[head], right[head], out=out[head])
    return out


def level_blocks(level: LayoutLevel):
    r"""``(offset, block)`` for the blocks of :obj:`level`, with the offset
    of the block's families in the level's family buffer."""
    offset = 0
    for block in level.blocks:
        yield offset, block
        offset += block.num_families


# Per-pair tensors are kept families-innermost, ``[H, b, c, F]``, and
# per-child scalars ``[H, w, F]``: every element-wise operation and every
# reduction over siblings then runs over contiguous vectors of F (on tiny
# families, a softmax over an innermost axis of 2 costs ten times more).
# Products take the rows' layout ``[H, F, w, .]`` and convert with one
# pair-sized transpose.
def pair_view(buffer: Tensor, block: LayoutBlock) -> Tensor:
    r"""``[H, w, w, F]`` view of a per-pair buffer ``[H, P]``."""
    start = block.pair_start
    return buffer[:, start:start + block.num_pairs].unflatten(
        1, (block.width, block.width, block.num_families))


def slot_view(buffer: Tensor, block: LayoutBlock) -> Tensor:
    r"""``[H, w, F]`` view of a per-slot buffer ``[H, S]``."""
    start = block.slot_start
    return buffer[:, start:start + block.num_slots].unflatten(1, (block.width, block.num_families))


def family_view(buffer: Tensor, block: LayoutBlock) -> Tensor:
    r"""``[H, F]`` view of a per-family buffer ``[H, families]``."""
    return buffer[:, block.family_start:block.family_start + block.num_families]


def diagonal(pairs: Tensor) -> Tensor:
    r"""``[H, F, w]`` view of the :math:`B = C` entries of ``[H, w, w, F]``."""
    return pairs.diagonal(dim1=1, dim2=2)


def to_pairs(products: Tensor) -> Tensor:
    r"""``[H, b, c, F]`` (contiguous) from products ``[H, F, b, c]``."""
    return products.permute(0, 2, 3, 1).contiguous()


def to_products(pairs: Tensor) -> Tensor:
    r"""``[H, F, b, c]`` operand of a batched product from ``[H, b, c, F]``."""
    return pairs.permute(0, 3, 1, 2).contiguous()


def by_child(scalars: Tensor) -> Tensor:
    r"""``[H, w, F]`` view of per-child scalars in the rows' layout ``[H, F, w]``."""
    return scalars.transpose(1, 2)


class Constants(NamedTuple):
    share: Tensor  #: ``[w, F]`` :math:`|B| / |A|`
    share_rows: Tensor  #: ``[F, w, 1]`` the same, for the rows' layout
    log_count: Tensor  #: ``[1, w, F]`` :math:`\log|C|` per column, :math:`-\infty` at padding
    later: Optional[Tensor]  #: ``[w, w, 1]`` later siblings (causal), else None
    inverse_count: Tensor  #: ``[F, w, 1]`` :math:`1 / |B|` for the rows' layout
    cluster: Tensor  #: ``[F, w, 1]`` 1 at cluster children
    not_cluster: Tensor  #: ``[F, w]`` 0 at cluster children


# a saved Hierarchy carries its layouts, whose blocks cache these: loading it
# under torch.load's weights_only default needs the class allow-listed
torch.serialization.add_safe_globals([Constants])


def constants(block: LayoutBlock, dtype: torch.dtype, causal: bool = False) -> Constants:
    r"""The block's per-slot constants in :obj:`dtype` (cached on the block)."""
    cache = block.constants
    key = (dtype, causal)
    if key not in cache:
        width = block.width
        count = block.count.to(dtype)
        log_count = count.log().t().contiguous()[None]  # -inf at padding
        later = None
        if causal and width > 1:  # c > b: a later sibling
            later = torch.ones(width, width, dtype=torch.bool,
                               device=log_count.device).triu(1)[..., None]
        share = block.share.to(dtype)
        cluster = block.cluster.to(dtype)
        inverse_count = torch.where(count > 0, 1.0 / count.clamp(min=1.0), 0.0)
        cache[key] = Constants(share.t().contiguous(), share[..., None], log_count, later,
                               inverse_count[..., None], cluster[..., None], 1.0 - cluster)
    return cache[key]


#: The backward pass keeps the couplings of all pairs from its bottom-up
#: sweep for its top-down sweep (one product per block fewer) when there are
#: at most this many (times heads); above, it recomputes them (memory).
KEEP_COUPLINGS = 1 << 22

#: Blocks at most this wide weigh the children's rows by multiplying and
#: summing; wider ones by a batched product (whose per-matrix cost is
#: larger than the arithmetic of a tiny family).
SMALL_WIDTH = 8


def write_family_means(parent: Children, children: Children, const: Constants) -> None:
    r"""The parents' leaf-weighted means of every feature of the children
    (phi's is a placeholder, replaced by the sweep)."""
    if children.rows is not None:
        rows = children.rows
        if rows.size(2) <= SMALL_WIDTH:
            torch.sum(rows * const.share_rows, dim=2, out=parent.rows)
        else:
            parent.rows.copy_(torch.matmul(const.share_rows.transpose(-1, -2), rows).squeeze(2))
        return
    # a leaf range: every child is one leaf, the shares are equal
    for target, source in zip(parent[:5], children[:5]):
        if source is not None and target is not parent.phi:
            torch.mean(source, dim=2, out=target)


# ------------------------------------------------------------------ bottom-up
class ForwardState(NamedTuple):
    r"""What the sweeps keep for the top-down sweep and the backward pass."""
    nodes: Tensor  #: ``[H * rows, C]`` slot buffer: (mean) q, k, v, phi and the mean squared key norm
    weights: List[Tensor]  #: ``[H, w, w, F]`` family weights of every block (layout order)
    self_log: Tensor  #: ``[H, S]`` log mu of every slot
    leaf_phi: Tensor  #: ``[N, H]``
    leaf_key_norm: Optional[Tensor]  #: ``[N, H]`` (Euclidean energy)
    columns: NodeColumns


#: Rows per step of :func:`rowwise_dot` (bounds its temporary).
DOT_ROWS = 1 << 15


def rowwise_dot(left: Tensor, right: Tensor) -> Tensor:
    r"""``[N, H]`` dot products of the rows of two ``[N, H, D]`` tensors,
    :data:`DOT_ROWS` rows at a time (no ``[N, H, D]`` temporary)."""
    out = left.new_empty(left.shape[:-1])
    for start in range(0, left.size(0), DOT_ROWS):
        rows = slice(start, start + DOT_ROWS)
        torch.sum(left[rows] * right[rows], dim=-1, out=out[rows])
    return out


def _scattered(values: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    r"""``[num_rows, ..., 1]`` with :obj:`values` at :obj:`rows` (a view when
    they are all rows)."""
    if rows.numel() == num_rows:  # all rows, in order
        return values[..., None]
    out = values.new_zeros((num_rows, ) + values.shape[1:] + (1, ))
    out[rows] = values[..., None]
    return out


def leaf_terms(q: Tensor, k: Tensor, layout: SlotLayout, scale: float, terms: ScoreTerms):
    r""":math:`\phi` of every leaf, :math:`-s_{ii}` (``[N, H]``, the bias of
    the leaf's own pair included), and :math:`\Vert k_i \Vert^2` for the
    Euclidean energy."""
    self_score = rowwise_dot(q, k).mul_(scale)
    key_norm = None
    if terms.euclidean:
        key_norm = rowwise_dot(k, k)
        self_score.add_(key_norm, alpha=-0.5 * scale)
    if terms.pair_bias is not None:
        self_score.add_(layout.leaf_diagonal(terms.pair_bias))
    return self_score.neg_(), key_norm


def leaf_columns(q: Tensor, k: Tensor, v: Tensor, leaf_phi: Tensor,
                 key_norm: Optional[Tensor]) -> List[Tensor]:
    r"""The per-leaf tensors ``[N, H, c]`` that fill a slot buffer row."""
    columns = [q, k, v, leaf_phi[..., None]]
    if key_norm is not None:
        columns.append(key_norm[..., None])
    return columns


def leaf_slot_buffer(layout: SlotLayout, columns: List[Tensor], width: int) -> Tensor:
    r"""A slot buffer ``[H * rows, width]`` holding the rows of the slotted
    leaves (per-leaf tensors ``[N, H, c]`` side by side) and zeros in every
    other row, padding included: one concatenation and one gather."""
    first = columns[0]
    heads, num_leaves = first.size(1), layout.num_leaves
    if layout.slotted_leaves.numel() == 0:
        return first.new_zeros(heads * layout.num_rows, width)
    rows = first.new_empty(num_leaves + 1, heads, width)
    torch.cat(columns, dim=-1, out=rows[:num_leaves])
    rows[num_leaves] = 0.0
    return rows.view(-1, width).index_select(0, layout.source_rows(heads))


def slot_buffer(like: Tensor, layout: SlotLayout, heads: int, width: int) -> Tensor:
    r"""An uninitialised slot buffer ``[H * rows, width]`` with its root
    rows set to 0: the only rows a top-down sweep reads before it writes
    them."""
    buffer = like.new_empty(heads * layout.num_rows, width)
    buffer[heads * layout.root_row:] = 0.0
    return buffer


def read_leaves(buffer: Tensor, layout: SlotLayout, heads: int) -> Tensor:
    r"""``[L, H, C]`` rows of the slotted leaves in a slot buffer."""
    rows = layout.leaf_rows(heads)
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
    leaves = LeafInputs(q, k, v, leaf_phi, key_norm)
    nodes = leaf_slot_buffer(layout, leaf_columns(*leaves), columns.width)
    weights: List[Tensor] = []
    self_log = q.new_empty(heads, layout.num_slots)
    for index, level in enumerate(layout.levels):
        parents = q.new_empty(heads * level.num_families, columns.width)
        for offset, block in level_blocks(level):
            children = block_children(block, nodes, leaves, columns, heads)
            const = constants(block, q.dtype, terms.causal)
            parent = columns.split(flat_view(parents, offset, heads, (block.num_families, )))
            write_family_means(parent, children, const)
            scores = to_pairs(batched_matmul(children.query, children.key.transpose(-1, -2)))
            scores.mul_(scale).add_(const.log_count)
            if const.later is not None:
                scores.masked_fill_(const.later, float('-inf'))
            if terms.euclidean:
                scores.add_(by_child(children.key_norm)[:, None], alpha=-0.5 * scale)
            if terms.pair_bias is not None:
                scores.add_(pair_view(terms.pair_bias, block))
            diagonal(scores).copy_(children.phi).neg_()
            log_weight = torch.log_softmax(scores, dim=2)
            weights.append(log_weight.exp())
            block_self_log = slot_view(self_log, block)
            block_self_log.copy_(by_child(diagonal(log_weight)))
            # phi(A) = -sum_b |B|/|A| log Z_B, and log Z_B = -phi(B) - log mu(B)
            torch.sum((by_child(children.phi) + block_self_log).mul_(const.share), dim=1,
                      out=parent.phi)
        nodes.index_copy_(0, layout.parent_rows(index, heads), parents)
    return ForwardState(nodes, weights, self_log, leaf_phi, key_norm, columns)


def block_values(block: LayoutBlock, state: ForwardState, v: Tensor) -> Tensor:
    r"""``[H, F, w, D_v]`` (mean) values of the children of :obj:`block`."""
    if block.leaf_range is not None:
        return leaf_range_view(v, block)
    return state.columns.value(slot_rows(state.nodes, block, v.size(1)))


# ------------------------------------------------------------------- forward
class TopDown(NamedTuple):
    out: Tensor  #: ``[N, H, D_v]``
    leaf_log_mass: Tensor  #: ``[N, H]`` log a_ii
    family_log_mass: Tensor  #: ``[H, families]`` log P(A) of every family's parent
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
    down = slot_buffer(v, layout, heads, value_dim + 1)
    out = v.new_empty(num_leaves, heads, value_dim)
    leaf_log_mass = v.new_zeros(num_leaves, heads)
    family_log_mass = v.new_empty(heads, layout.num_families)
    for index in reversed(range(len(layout.levels))):
        level = layout.levels[index]
        parents = down.index_select(0, layout.parent_rows(index, heads))
        for offset, block in level_blocks(level):
            parent = flat_view(parents, offset, heads, (block.num_families, ))  # [H, F, D_v + 1]
            parent_log_mass = family_view(family_log_mass, block)
            parent_log_mass.copy_(parent[..., value_dim])
            parent_mass = parent_log_mass.exp()[..., None, None]  # [H, F, 1, 1]
            weight = state.weights[block.index]
            value = block_values(block, state, v)
            child_out = batched_matmul(to_products(weight), value)
            child_out = torch.addcmul(parent[:, :, None, :value_dim], child_out, parent_mass)
            child_log_mass = (slot_view(state.self_log, block).transpose(1, 2)
                              + parent_log_mass[..., None])  # [H, F, w]
            if block.leaf_range is not None:
                leaf_range_view(out, block).copy_(child_out)
                leaf_range_view(leaf_log_mass, block).copy_(child_log_mass)
                continue
            cluster = constants(block, v.dtype).cluster
            own = (diagonal(weight)[..., None] * parent_mass).mul_(cluster)  # [H, F, w, 1]
            target = slot_rows(down, block, heads)
            torch.addcmul(child_out, own, value, value=-1.0, out=target[..., :value_dim])
            target[..., value_dim].copy_(child_log_mass)
    leaves = layout.slotted_leaves
    if leaves.numel() > 0:
        rows = read_leaves(down, layout, heads)
        if leaves.numel() == num_leaves:
            out, leaf_log_mass = rows[..., :value_dim], rows[..., value_dim]
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
                    grad_pair_bias: bool = False, release: bool = False,
                    summary_nodes: Optional[Tensor] = None,
                    summary_grad: Optional[Tensor] = None,
                    summary_count: Optional[Tensor] = None,
                    leaf_log_mass_grad: Optional[Tensor] = None):
    r"""Gradients of :math:`L = \sum_i g_i \cdot y_i` for q, k, v
    (``[N, H, D]``) and, with :obj:`grad_pair_bias`, for the padded pair
    bias (``[H, P]``) by a bottom-up and a top-down sweep
    (docs/derivation.rst, "Backward pass"). With :obj:`release`, the caller
    hands :obj:`state` over, and the slot buffers are dropped once only
    leaf ranges remain, which lowers the peak while the gradients fill.
    :obj:`summary_grad` ``[S, H, C]`` adds upstream gradients of the rows
    of the clusters :obj:`summary_nodes`, with :obj:`summary_count` leaves
    below them (:func:`summary_rows`): a mean's
    enters the gradient its :math:`|B|` leaves share, :math:`\phi`'s enters
    :math:`\delta_B = \partial L / \partial(-\phi(B))` directly.
    :obj:`leaf_log_mass_grad` ``[N, H]`` adds upstream gradients of the
    leaves' :math:`\log P(i) = \log a_{ii}`: they join :math:`\partial L /
    \partial \log P(i)`."""
    num_leaves, heads, dim = q.shape
    value_dim = v.size(2)
    columns, weights = state.columns, list(state.weights)
    grad_columns = GradColumns(dim, value_dim, terms.euclidean)
    # through[B] = dL/dlog P(B): everything below B, weighted by its mass
    slotted = layout.slotted_leaves
    leaf_through = None
    if slotted.numel() > 0:
        leaf_through = rowwise_dot(grad_out[slotted], v[slotted]).mul_(leaf_log_mass[slotted].exp())
        if leaf_log_mass_grad is not None:
            leaf_through.add_(leaf_log_mass_grad[slotted])
        leaf_through = _scattered(leaf_through, slotted, layout.num_leaves)
    # summed upstream gradients and through
    up = leaf_slot_buffer(layout, [grad_out, leaf_through], value_dim + 1)
    # w_bc (g_b . v_c) of every pair: kept from the way up for the way down
    # when small, recomputed on the way down otherwise (memory at large N)
    keep_couplings = heads * layout.num_pairs <= KEEP_COUPLINGS
    coupled_pairs = q.new_empty(heads, layout.num_pairs) if keep_couplings else None

    def grads_of(block):
        r"""Summed upstream gradients ``[H, F, w, D_v]`` and ``through``
        ``[H, F, w]`` of the children of :obj:`block`."""
        if block.leaf_range is not None:  # through of a leaf: P(i) (g_i . v_i)
            grad = leaf_range_view(grad_out, block)
            through = (grad * leaf_range_view(v, block)).sum(-1)
            through.mul_(leaf_range_view(leaf_log_mass, block).exp())
            if leaf_log_mass_grad is not None:
                through.add_(leaf_range_view(leaf_log_mass_grad, block))
            return grad, through
        rows = slot_rows(up, block, heads)
        return rows[..., :value_dim], rows[..., value_dim]

    def couplings(block, grad, value):
        coupled = to_pairs(batched_matmul(grad, value.transpose(-1, -2)))
        return coupled.mul_(weights[block.index])

    for index, level in enumerate(layout.levels):
        parents = q.new_empty(heads * level.num_families, value_dim + 1)
        for offset, block in level_blocks(level):
            grad, through = grads_of(block)
            coupled = couplings(block, grad, block_values(block, state, v))
            if keep_couplings:
                pair_view(coupled_pairs, block).copy_(coupled)
            parent_mass = family_view(family_log_mass, block).exp()
            off_diagonal = coupled.sum((1, 2)) - diagonal(coupled).sum(-1)
            parent = flat_view(parents, offset, heads, (block.num_families, ))
            torch.sum(grad, 2, out=parent[..., :value_dim])
            torch.addcmul(through.sum(-1), parent_mass, off_diagonal, out=parent[..., value_dim])
        up.index_copy_(0, layout.parent_rows(index, heads), parents)

    # delta[B] = dL/dt_BB, the gradient of B's own (diagonal) score
    down = slot_buffer(q, layout, heads, grad_columns.width)
    push = None  # the summaries' gradients in the columns of `down`, added as they are written
    if summary_grad is not None:
        push = _summary_push(summary_grad.to(q.dtype), summary_nodes, summary_count, layout,
                             scale, grad_columns)
        down[heads * layout.root_row:] = push[heads * layout.root_row:]
    grad_q, grad_k, grad_v = (torch.empty_like(t, memory_format=torch.contiguous_format)
                              for t in (q, k, v))
    leaf_gamma = q.new_zeros(num_leaves, heads) if terms.euclidean else None
    grad_bias = q.new_zeros(heads, layout.num_pairs) if grad_pair_bias else None
    leaves = LeafInputs(q, k, v, None, None)  # phi and |k|^2 are not needed on the way down
    nodes = state.nodes
    if release:
        del state  # the caller's reference is gone: buffers can be dropped below

    def step_down(block: LayoutBlock, parent: Tensor) -> None:
        r"""One block of the top-down sweep: the children's :math:`\delta`
        and accumulated gradients (the leaves' gradients for a leaf range)
        from the parents' ``[H, F, width]``. Its views die with it, so a
        released buffer is freed."""
        const = constants(block, q.dtype)
        parent_delta, acc_q, acc_k, acc_v, parent_gamma = grad_columns.split(parent[:, :, None])
        grad, through = grads_of(block)
        through = by_child(through)
        children = block_children(block, nodes, leaves, columns, heads)
        query, key, value = children.query, children.key, children.value
        weight = weights[block.index]
        coupled = (pair_view(coupled_pairs, block) if keep_couplings
                   else couplings(block, grad, value))
        parent_mass = family_view(family_log_mass, block).exp()[:, None]  # [H, 1, F]
        row_sum = (coupled.sum(2) - by_child(diagonal(coupled))).mul_(parent_mass).add_(through)
        residual = row_sum.sub_(by_child(parent_delta) * const.share)  # [H, w, F]
        # score gradient, diagonal included: P w_bc (g_b . v_c) - w_bc residual_b
        grad_scores = coupled.mul_(parent_mass[:, None]).sub_(weight * residual[:, :, None])
        child_delta = through - by_child(diagonal(weight)) * residual
        # On the diagonal, a leaf child's score gradient is its delta:
        # through_i is P(A) c_ii plus the upstream gradient of log a_ii. A
        # cluster child's diagonal is -phi, not a score of its own leaves:
        # it passes no gradient to q, k or the bias.
        torch.mul(child_delta.transpose(1, 2), const.not_cluster, out=diagonal(grad_scores))
        if grad_bias is not None:
            pair_view(grad_bias, block).copy_(grad_scores)
        scaled_weight = weight * parent_mass[:, None]
        diagonal(scaled_weight).mul_(const.not_cluster)
        # A child's gradient is its ancestors' accumulated share plus its own
        # products, divided among its |B| leaves.
        grad_scores_rows = to_products(grad_scores)
        inverse_count = const.inverse_count
        new = [torch.addcmul(acc_q, batched_matmul(grad_scores_rows, key), inverse_count,
                             value=scale),
               torch.addcmul(acc_k, batched_matmul(grad_scores_rows.transpose(-1, -2), query),
                             inverse_count, value=scale),
               torch.addcmul(acc_v, batched_matmul(to_products(scaled_weight).transpose(-1, -2),
                                                   grad), inverse_count)]
        if parent_gamma is not None:  # Euclidean key term
            new.append(torch.addcmul(parent_gamma, grad_scores.sum(1).transpose(1, 2),
                                     inverse_count[..., 0]))
        if block.leaf_range is not None:
            for target, values in zip((grad_q, grad_k, grad_v, leaf_gamma), new):
                leaf_range_view(target, block).copy_(values)
            return
        delta, *targets = grad_columns.split(slot_rows(down, block, heads))
        delta.copy_(child_delta.transpose(1, 2))
        for target, values in zip(targets, new):
            target.copy_(values)
        if push is not None:
            slot_rows(down, block, heads).add_(slot_rows(push, block, heads))

    for index in reversed(range(len(layout.levels))):
        level = layout.levels[index]
        parents = down.index_select(0, layout.parent_rows(index, heads))
        if (release and layout.slotted_leaves.numel() == 0
                and all(block.leaf_range is not None for block in level.blocks)):
            # the rest reads the inputs: the slot buffers are not needed any more
            nodes = up = down = None
        for offset, block in level_blocks(level):
            step_down(block, flat_view(parents, offset, heads, (block.num_families, )))
            if release:
                weights[block.index] = None
    leaves = layout.slotted_leaves
    if leaves.numel() > 0:
        _, q_rows, k_rows, v_rows, gamma = grad_columns.split(read_leaves(down, layout, heads))
        if leaves.numel() == num_leaves:
            grad_q, grad_k, grad_v = q_rows, k_rows, v_rows
            leaf_gamma = gamma
        else:
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
        grad_k = torch.addcmul(grad_k, leaf_gamma[..., None], k, value=-scale)
    return grad_q, grad_k, grad_v, grad_bias


def summary_rows(state: ForwardState, nodes: Tensor, layout: SlotLayout, heads: int) -> Tensor:
    r"""``[S, H, C]`` slot-buffer rows of the clusters :obj:`nodes`: mean
    query, key and value, :math:`\phi` (with the Euclidean energy without
    the row term) and, for that energy, the mean squared key norm."""
    rows = layout.rows(layout.node_slot[nodes], heads)
    return state.nodes[rows.view(-1)].view(*rows.shape, state.nodes.size(1))


def _summary_push(grad: Tensor, nodes: Tensor, count: Tensor, layout: SlotLayout,
                  scale: float, columns: GradColumns) -> Tensor:
    r"""``[H * rows, C]`` the gradients of the summary rows of :obj:`nodes`
    as additions to the backward's top-down buffer: :math:`-\partial L /
    \partial \phi` to :math:`\delta`, a mean's gradient over :math:`|B|`
    to the accumulated gradients, the key norm's as :math:`\gamma`."""
    dim, value_dim = columns.dim, columns.value_dim
    heads = grad.size(1)
    count = count.to(grad.dtype)[:, None, None]
    row = grad.new_zeros(*grad.shape[:2], columns.width)
    row[..., 0] = -grad[..., 2 * dim + value_dim]
    row[..., 1:1 + 2 * dim + value_dim] = grad[..., :2 * dim + value_dim] / count
    if columns.euclidean:  # d mean|k|^2 / dk_j = 2 k_j / |B|; a unit of gamma gives -scale k_j
        row[..., -1] = -2.0 * grad[..., -1] / (scale * count[..., 0])
    push = grad.new_zeros(heads * layout.num_rows, columns.width)
    push[layout.rows(layout.node_slot[nodes], heads).view(-1)] = row.view(-1, columns.width)
    return push


# ------------------------------------------------------------------ autograd
def autocast_off(device: torch.device):
    r"""A context that turns autocast off on :obj:`device`'s type, so that
    the sweeps run in their inputs' dtype; nothing on a device type without
    autocast (:obj:`"meta"`: shapes only)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def forward_sweeps(q: Tensor, k: Tensor, v: Tensor, layout: SlotLayout, scale: float,
                   terms: ScoreTerms) -> Tuple[ForwardState, TopDown]:
    r"""Both forward sweeps (no autograd), run in the inputs' dtype even
    inside :func:`torch.autocast`."""
    with autocast_off(q.device):
        state = bottom_up(q, k, v, layout, scale, terms)
        return state, top_down(v, layout, state)


class HSAFunction(torch.autograd.Function):
    r"""Fused HSA on ``[N, H, D]`` inputs (any memory layout) and an
    optional padded pair bias ``[H, P]``. Saves the slot buffer, the
    family weights and per-leaf state: nothing quadratic. With
    :obj:`summary_nodes` (cluster ids), also returns those clusters' rows
    ``[S, H, C]`` (:func:`summary_rows`), and with :obj:`self_weight` the
    leaves' :math:`\log a_{ii}` ``[N, H]``; both differentiable."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, pair_bias: Optional[Tensor],
                layout: SlotLayout, scale: float, euclidean: bool = False,
                causal: bool = False, summary_nodes: Optional[Tensor] = None,
                summary_count: Optional[Tensor] = None, self_weight: bool = False):
        terms = ScoreTerms(pair_bias, euclidean, causal)
        state, result = forward_sweeps(q, k, v, layout, scale, terms)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v)
        # the backward pass needs neither log mu nor the leaves' own terms
        ctx.state = state._replace(self_log=None, leaf_phi=None, leaf_key_norm=None)
        ctx.leaf_log_mass, ctx.family_log_mass = result.leaf_log_mass, result.family_log_mass
        ctx.layout, ctx.scale = layout, scale
        ctx.terms = ScoreTerms(None, euclidean, causal)
        ctx.summary_nodes, ctx.summary_count = summary_nodes, summary_count
        ctx.self_weight = self_weight
        outputs = [result.out]
        if summary_nodes is not None:
            outputs.append(summary_rows(state, summary_nodes, layout, q.size(1)))
        if self_weight:
            outputs.append(result.leaf_log_mass.clone())
        return tuple(outputs) if len(outputs) > 1 else result.out

    @staticmethod
    def backward(ctx, grad_out: Optional[Tensor], *extra_grads: Optional[Tensor]):
        refuse_double_backward()
        q, k, v = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(v)
        extra_grads = list(extra_grads)
        summary_grad = extra_grads.pop(0) if ctx.summary_nodes is not None else None
        self_weight_grad = extra_grads.pop(0) if ctx.self_weight else None
        if self_weight_grad is not None:  # read through strided views of its leaf ranges
            self_weight_grad = self_weight_grad.contiguous()
        # When autograd frees the graph after this pass (no retain_graph), the
        # sweeps may drop the forward state as they go.
        release = not _graph_is_kept()
        with autocast_off(q.device):
            grad_q, grad_k, grad_v, grad_bias = backward_sweeps(
                grad_out, q, k, v, ctx.layout, ctx.scale,
                ctx.__dict__.pop('state') if release else ctx.state, ctx.leaf_log_mass,
                ctx.family_log_mass, ctx.terms, grad_pair_bias=ctx.needs_input_grad[3],
                release=release, summary_nodes=ctx.summary_nodes, summary_grad=summary_grad,
                summary_count=ctx.summary_count, leaf_log_mass_grad=self_weight_grad)
        return grad_q, grad_k, grad_v, grad_bias, None, None, None, None, None, None, None


def refuse_double_backward() -> None:
    r"""The fused backward passes are hand-derived, not differentiable."""
    if torch.is_grad_enabled():
        raise RuntimeError("hsa(backend='fused') can be differentiated once; for "
                           "higher-order gradients (create_graph=True) use "
                           "backend='scatter'")


def _graph_is_kept() -> bool:
    r"""Whether the running backward pass keeps the graph (``retain_graph``);
    :obj:`True` when torch cannot tell, which only costs memory."""
    keep_graph = getattr(torch._C._autograd, '_get_current_graph_task_keep_graph', None)
    return True if keep_graph is None else bool(keep_graph())
