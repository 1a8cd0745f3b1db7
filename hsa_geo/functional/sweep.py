r"""The exact HSA dynamic program: a bottom-up and a top-down sweep over the
families of a :class:`~hsa_geo.hierarchy.plan.SweepPlan`, and the
hand-derived backward pass (two more sweeps). docs/derivation.rst derives
every line; the names here follow it:

* ``t[h, f, b, c]`` = :math:`\bar s(B, C) + \log|C|` for siblings
  :math:`B \neq C`, :math:`-\phi(B)` on the diagonal;
* ``weight`` = :math:`\exp(t - \log Z_B)`, row-stochastic over :math:`c`: the
  share of :math:`B`'s mass sent to the whole of :math:`C` (to itself on the
  diagonal, :math:`\mu(B)`);
* ``self_log`` = :math:`\log \mu(B)`, ``log_mass`` = :math:`\log P(B)`, the
  log of the product of :math:`\mu` from below the root down to :math:`B`.

Tensors are heads-first, ``[H, nodes, D]``, so every sibling interaction of
a block is one batched matrix product per head. Leaf buffers hold the
:math:`N` leaves, cluster buffers the :math:`M` clusters, node buffers all
:math:`N + M` nodes.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

from hsa_geo.hierarchy.plan import FamilyBlock, SweepPlan


# --------------------------------------------------------------- index helpers
def gather_children(leaf: Tensor, cluster: Tensor, block: FamilyBlock,
                    contiguous: bool = True) -> Tensor:
    r"""``[H, F, b, ...]`` rows of the children of :obj:`block`, read from the
    leaf or the cluster buffer (a view when the children are a leaf range)."""
    family, size = block.children.shape
    heads, rest = leaf.size(0), leaf.shape[2:]
    if block.leaf_range is not None:
        start, end = block.leaf_range
        rows = leaf[:, start:end].view(heads, family, size, *rest)
        # A rows-first leaf tensor ([N, H, D] seen heads-first) is transposed
        # here, one cache-sized block at a time, instead of as a whole.
        return rows if rows[0].is_contiguous() or not contiguous else rows.contiguous()
    if block.leaf_slot.numel() == 0:
        return cluster[:, block.cluster_id].view(heads, family, size, *rest)
    out = leaf.new_empty((heads, family * size) + rest)
    out[:, block.leaf_slot] = leaf[:, block.leaf_id]
    if block.cluster_slot.numel() > 0:
        out[:, block.cluster_slot] = cluster[:, block.cluster_id]
    return out.view(heads, family, size, *rest)


def node_rows(buffer: Tensor, block: FamilyBlock) -> Tensor:
    r"""``[H, F, b]`` entries of a node buffer ``[H, N + M]`` for the
    children of :obj:`block` (a view for a leaf range)."""
    if block.leaf_range is not None:
        start, end = block.leaf_range
        return buffer[:, start:end].view(buffer.size(0), *block.children.shape)
    return buffer[:, block.children]


def leaf_target(leaf: Tensor, block: FamilyBlock) -> Optional[Tensor]:
    r"""``[H, F, b, ...]`` view of the leaf buffer rows of a leaf-range
    block (results are written straight into it), else :obj:`None`."""
    if block.leaf_range is None:
        return None
    start, end = block.leaf_range
    return leaf[:, start:end].view(leaf.size(0), *block.children.shape, *leaf.shape[2:])


def write_children(values: Tensor, leaf: Tensor, cluster: Tensor, block: FamilyBlock,
                   cluster_values: Optional[Tensor] = None) -> None:
    r"""Writes ``[H, F, b, ...]`` rows of the leaf children to the leaf
    buffer and of the cluster children (from :obj:`cluster_values` if given)
    to the cluster buffer."""
    heads = values.size(0)
    flat = values.reshape((heads, -1) + values.shape[3:])
    if block.leaf_slot.numel() > 0:
        leaf[:, block.leaf_id] = flat[:, block.leaf_slot]
    if block.cluster_slot.numel() > 0:
        source = flat if cluster_values is None else cluster_values.reshape(flat.shape)
        cluster[:, block.cluster_id] = source[:, block.cluster_slot]


#: Blocks whose product has at most this many entries are multiplied in one
#: batched call (operands copied as needed) rather than one call per head:
#: on short documents the per-call overhead outweighs the copies.
SMALL_PRODUCT = 1 << 15


def per_head_matmul(left: Tensor, right: Tensor, base: Optional[Tensor] = None,
                    alpha: float = 1.0, out: Optional[Tensor] = None) -> Tensor:
    r"""``base + alpha * left @ right`` for ``[H, F, x, y] @ [H, F, y, z]``
    (:obj:`base` broadcast to ``[H, F, x, z]``). Without grad it is one
    fused ``baddbmm`` per head; operands may be per-head-contiguous views or
    transposes of them (no copies), and a rows-first :obj:`out` is filled by
    one block-sized copy. Small products take one batched call."""
    if torch.is_grad_enabled():
        product = torch.matmul(left, right) * alpha
        return product if base is None else product + base
    shape = left.shape[:3] + right.shape[3:]
    if shape.numel() <= SMALL_PRODUCT:
        product = torch.matmul(left, right)
        if alpha != 1.0:
            product.mul_(alpha)
        if base is not None:
            product.add_(base)
        if out is not None:
            return out.copy_(product)
        return product
    target = out
    if out is None or not out[0].is_contiguous():
        out = left.new_empty(shape)
    beta = 1.0
    if base is None:
        base, beta = left.new_zeros(()), 0.0
    base = base.expand(out.shape)
    for head in range(left.size(0)):
        torch.baddbmm(base[head], left[head], right[head], beta=beta, alpha=alpha, out=out[head])
    if target is not None and target is not out:
        target.copy_(out)
    return out


def diagonal(pairs: Tensor) -> Tensor:
    r"""``[H, F, b]`` view of the :math:`B = C` entries of ``[H, F, b, b]``."""
    return pairs.diagonal(dim1=-2, dim2=-1)


def family_mean(rows: Tensor, block: FamilyBlock) -> Tensor:
    r"""``[H, F, D]`` leaf-weighted mean of the children's means."""
    if block.equal_children:
        return rows.mean(2)
    return (rows * block.share.to(rows.dtype)[None, :, :, None]).sum(2)


def block_pairs(buffer: Tensor, block: FamilyBlock) -> Tensor:
    r"""``[H, F, b, c]`` view of a heads-first per-pair buffer ``[H, E]``
    on the sibling pairs of :obj:`block`."""
    family, size = block.children.shape
    return buffer[:, block.pair_slice].view(buffer.size(0), family, size, size)


def subtree_means(values: Tensor, plan: SweepPlan) -> Tensor:
    r"""``[H, N + M]`` mean over the leaves below every node of per-leaf
    scalars ``[H, N]`` (bottom-up, one step per block)."""
    means = values.new_zeros(values.size(0), plan.num_nodes)
    means[:, :plan.num_leaves] = values
    for block in plan.blocks:
        rows = node_rows(means, block)[..., None]
        means[:, plan.num_leaves + block.parents] = family_mean(rows, block)[..., 0]
    return means


def cluster_means(x: Tensor, plan: SweepPlan) -> Tensor:
    r"""``[H, M, D]`` mean over the leaves below every cluster of heads-first
    leaf rows ``[H, N, D]`` (bottom-up; differentiable by autograd)."""
    means = x.new_zeros(x.size(0), plan.num_clusters, x.size(2))
    for block in plan.blocks:
        means[:, block.parents] = family_mean(gather_children(x, means, block, contiguous=False),
                                              block)
    return means


class ScoreTerms(NamedTuple):
    r"""What is added to the dot-product scores :math:`\tau\, q_i^\top k_j`
    (docs/derivation.rst): a bias per sibling pair, the Euclidean energy's
    key term and the causal mask."""
    #: ``[H, E]`` heads-first bias per sibling pair (plan order), or None
    pair_bias: Optional[Tensor] = None
    #: Euclidean energy :math:`-\tfrac{\tau}{2}\Vert q_i - k_j\Vert^2`: the
    #: sweeps add the column term :math:`-\tfrac{\tau}{2}\,\overline{\Vert k
    #: \Vert^2}(C)` (the row term cancels from the attention)
    euclidean: bool = False
    #: a child attends only to itself and to earlier siblings
    causal: bool = False


def block_score_base(block: FamilyBlock, terms: ScoreTerms, key_norm: Optional[Tensor],
                     scale: float, dtype: torch.dtype) -> Optional[Tensor]:
    r"""The part of a block's sibling scores that does not depend on the
    query-key product, in the column-major pair layout ``[H, F, c, b]``:
    :math:`\log|C|`, the Euclidean key term of column :math:`C` and the
    pair bias (:obj:`None` when all are absent)."""
    terms_present = []
    if not block.unit_children:
        terms_present.append(block.child_count.log().to(dtype)[None, :, :, None])
    if key_norm is not None:
        terms_present.append(node_rows(key_norm, block)[..., None] * (-0.5 * scale))
    if terms.pair_bias is not None:
        terms_present.append(block_pairs(terms.pair_bias, block).transpose(-1, -2))
    if not terms_present:
        return None
    base = terms_present[0]
    for term in terms_present[1:]:
        base = base + term
    return base


def leaf_self_scores(query: Tensor, key: Tensor, block: FamilyBlock, terms: ScoreTerms,
                     key_norm: Optional[Tensor], scale: float) -> Tensor:
    r"""``[H, F * b]`` self score :math:`s_{ii}` of every child position of
    :obj:`block` (meaningful at leaf positions), pair bias and Euclidean key
    term included."""
    heads = query.size(0)
    self_score = scale * (query * key).sum(-1).view(heads, -1)
    if key_norm is not None:
        self_score = self_score - 0.5 * scale * node_rows(key_norm, block).reshape(heads, -1)
    if terms.pair_bias is not None:
        self_score = self_score + diagonal(block_pairs(terms.pair_bias, block)).reshape(heads, -1)
    return self_score


def future_mask(size: int, device: torch.device) -> Tensor:
    r"""``[c, b]`` mask of the later siblings :math:`c > b` (column-major
    pair layout), which causal HSA excludes."""
    return torch.ones(size, size, dtype=torch.bool, device=device).tril(-1)


def cluster_diagonal_positions(block: FamilyBlock) -> Tensor:
    r"""Flat positions in ``[F * b * b]`` of the :math:`(B, B)` pairs of
    cluster children, which have no score of their own."""
    size = block.num_children
    return block.cluster_slot * size + block.cluster_slot % size


# ------------------------------------------------------------------ bottom-up
class BottomUp(NamedTuple):
    mean_q: Tensor  #: ``[H, M, D]``
    mean_k: Tensor  #: ``[H, M, D]``
    mean_v: Optional[Tensor]  #: ``[H, M, D_v]``
    phi: Tensor  #: ``[H, N + M]``
    self_log: Tensor  #: ``[H, N + M]`` log mu of every non-root node
    weights: List[Tensor]  #: ``[H, F, b, c]`` per block (column-major views)


def bottom_up(q: Tensor, k: Tensor, v: Optional[Tensor], plan: SweepPlan,
              scale: float, terms: ScoreTerms = ScoreTerms()) -> BottomUp:
    r"""Cluster means, :math:`\phi`, :math:`\log\mu` and the family weights.

    Inputs are heads-first ``[H, N, D]``. Differentiable by autograd when
    grad mode is on; the fused HSA function calls it without grad. With the
    Euclidean energy, :math:`\phi` leaves out the row term
    :math:`\tfrac{\tau}{2}\overline{\Vert q\Vert^2}` (it does not change
    the attention; :func:`hsa_geo.functional.hsa_log_partition` adds it).
    """
    heads, num_leaves = q.size(0), q.size(1)
    mean_q = q.new_zeros(heads, plan.num_clusters, q.size(2))
    mean_k = k.new_zeros(heads, plan.num_clusters, k.size(2))
    mean_v = None if v is None else v.new_zeros(heads, plan.num_clusters, v.size(2))
    phi = q.new_zeros(heads, plan.num_nodes)
    self_log = q.new_zeros(heads, plan.num_nodes)
    weights = []
    key_norm = subtree_means((k * k).sum(-1), plan) if terms.euclidean else None
    grad_mode = torch.is_grad_enabled()
    for block in plan.blocks:
        query = gather_children(q, mean_q, block)
        key = gather_children(k, mean_k, block)
        mean_q[:, block.parents] = family_mean(query, block)
        mean_k[:, block.parents] = family_mean(key, block)
        if v is not None:
            # a mean needs no contiguous copy of the children's values
            mean_v[:, block.parents] = family_mean(
                gather_children(v, mean_v, block, contiguous=False), block)
        if block.leaf_slot.numel() > 0:
            # phi of a leaf, -s_ii, from the rows already in cache
            self_score = leaf_self_scores(query, key, block, terms, key_norm, scale)
            if block.leaf_range is not None:
                phi[:, block.leaf_range[0]:block.leaf_range[1]] = -self_score
            else:
                phi[:, block.leaf_id] = -self_score[:, block.leaf_slot]

        # Pair tensors are stored column-major, [H, F, c, b], and used through
        # their transposed view: the softmax over siblings c then reduces over
        # a non-innermost axis, which vectorises across b (about 3x faster
        # than reducing over a short innermost axis).
        base = block_score_base(block, terms, key_norm, scale, q.dtype)
        scores = per_head_matmul(key, query.transpose(-1, -2), base, alpha=scale)
        if terms.causal and block.num_children > 1:
            mask = future_mask(block.num_children, scores.device)
            scores = (scores.masked_fill(mask, float('-inf')) if grad_mode
                      else scores.masked_fill_(mask, float('-inf')))
        child_phi = node_rows(phi, block)
        diagonal(scores).copy_(-child_phi)
        # Softmax over siblings c (axis -2) with its log-partition. Composed
        # of elementwise ops rather than log_softmax, whose kernel over a
        # non-innermost axis opens a thread pool even for tiny families.
        top = scores.amax(-2, keepdim=True)
        if grad_mode:
            weight = (scores - top).exp()
        else:
            weight = scores.sub_(top).exp_()
        total = weight.sum(-2, keepdim=True)
        weight = weight / total if grad_mode else weight.div_(total)
        log_z = (top + total.log()).squeeze(-2)  # [H, F, b]
        self_log[:, block.children] = -child_phi - log_z
        phi[:, num_leaves + block.parents] = -(block.share.to(q.dtype)[None] * log_z).sum(-1)
        weights.append(weight.transpose(-1, -2))
    # an isolated leaf attends to itself alone: its phi never enters a softmax
    isolated = plan.isolated_leaves
    phi[:, isolated] = -scale * (q[:, isolated] * k[:, isolated]).sum(-1)
    if key_norm is not None:
        phi[:, isolated] = phi[:, isolated] + 0.5 * scale * key_norm[:, isolated]
    return BottomUp(mean_q, mean_k, mean_v, phi, self_log, weights)


# ------------------------------------------------------------------- forward
def subtree_log_mass(plan: SweepPlan, self_log: Tensor) -> Tensor:
    r"""``[H, N + M]`` :math:`\log P(B) = \sum \log \mu` over the path from
    below the root down to :math:`B` (0 at roots)."""
    log_mass = torch.zeros_like(self_log)
    for block in reversed(plan.blocks):
        parent_log_mass = log_mass[:, plan.num_leaves + block.parents]
        log_mass[:, block.children] = parent_log_mass[..., None] + self_log[:, block.children]
    return log_mass


def top_down(v: Tensor, plan: SweepPlan, state: BottomUp):
    r"""Outputs ``[H, N, D_v]`` and :math:`\log P` of every node.

    For a leaf :math:`i` in family :math:`A`,
    :math:`y_i = u_A + P(A) \sum_c \mathrm{weight}_{ic} \bar v_c`, where
    :math:`u_A` (``out_cluster``) is what reaches :math:`A` from its
    ancestors' siblings and the diagonal term is the leaf's own share; for a
    cluster child the diagonal term is removed, as that mass is handed further
    down.
    """
    log_mass = subtree_log_mass(plan, state.self_log)
    out_cluster = v.new_zeros(state.mean_v.shape)
    out = v.new_empty(v.size(1), v.size(0), v.size(2)).transpose(0, 1)  # rows-first memory
    out[:, plan.isolated_leaves] = v[:, plan.isolated_leaves]
    for block, weight in zip(reversed(plan.blocks), reversed(state.weights)):
        value = gather_children(v, state.mean_v, block)
        parent_mass = log_mass[:, plan.num_leaves + block.parents].exp()[..., None, None]
        scaled_weight = weight * parent_mass  # P(A) w_bc
        child_out = per_head_matmul(scaled_weight, value, out_cluster[:, block.parents, None],
                                    out=leaf_target(out, block))
        if block.leaf_range is None:
            own = None
            if block.cluster_slot.numel() > 0:
                own = child_out - diagonal(scaled_weight)[..., None] * value
            write_children(child_out, out, out_cluster, block, own)
    return out, log_mass


# ------------------------------------------------------------------ backward
def coupling(weight: Tensor, grad: Tensor, value: Tensor) -> Tensor:
    r""":math:`w_{bc}\,(g_b \cdot \bar v_c)`, ``[H, F, b, c]`` in the layout
    of :obj:`weight`."""
    return per_head_matmul(value, grad.transpose(-1, -2)).mul_(
        weight.transpose(-1, -2)).transpose(-1, -2)


def backward_sweeps(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, plan: SweepPlan,
                    scale: float, state: BottomUp, log_mass: Tensor, release: bool = False,
                    terms: ScoreTerms = ScoreTerms(), grad_pair_bias: bool = False):
    r"""Gradients of :math:`L = \sum_i g_i \cdot y_i` for q, k, v (all
    heads-first) and, with :obj:`grad_pair_bias`, for the pair bias
    (``[H, E]``) by a bottom-up and a top-down sweep (docs/derivation.rst,
    "Backward pass"). With :obj:`release`, the caller hands :obj:`state`
    over and each buffer is dropped once no block needs it any more, which
    lowers the peak while the gradients fill."""
    num_leaves = plan.num_leaves
    mean_q, mean_k, mean_v = state.mean_q, state.mean_k, state.mean_v
    weights = list(state.weights)
    del state
    grad_cluster = grad_out.new_zeros(mean_v.shape)
    # through[B] = dL/dlog P(B): everything below B, weighted by its mass.
    through = q.new_zeros(q.size(0), plan.num_nodes)
    through[:, :num_leaves] = log_mass[:, :num_leaves].exp() * (grad_out * v).sum(-1)
    for block, weight in zip(plan.blocks, weights):
        grad = gather_children(grad_out, grad_cluster, block)
        grad_cluster[:, block.parents] = grad.sum(2)
        coupled = coupling(weight, grad, gather_children(v, mean_v, block))
        parent = num_leaves + block.parents
        off_diagonal = coupled.sum((-1, -2)) - diagonal(coupled).sum(-1)
        through[:, parent] = (log_mass[:, parent].exp() * off_diagonal
                              + node_rows(through, block).sum(-1))

    # delta[B] = dL/dt_BB: gradient of B's own (diagonal) score.
    delta = q.new_zeros(q.size(0), plan.num_nodes)
    acc_q, acc_k, acc_v = torch.zeros_like(mean_q), torch.zeros_like(mean_k), torch.zeros_like(mean_v)
    # empty_like keeps the inputs' memory layout, so gradients come back in it
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    grad_q[:, plan.isolated_leaves] = 0.0
    grad_k[:, plan.isolated_leaves] = 0.0
    grad_v[:, plan.isolated_leaves] = grad_out[:, plan.isolated_leaves]
    # d L / d pair bias is the score gradient of the pair (zero on the
    # diagonal of a cluster child, which has no score of its own)
    grad_bias = q.new_zeros(q.size(0), plan.num_pairs) if grad_pair_bias else None
    # Euclidean key term: key_gamma[C] = sum over C and its ancestors X of
    # (column score gradient of X) / |X|; d L / d k_j gains -scale gamma_j k_j
    key_gamma = q.new_zeros(q.size(0), plan.num_nodes) if terms.euclidean else None
    # top-down, blocks after this one have leaf children only: cluster
    # means and sums are not read any more
    last_with_clusters = min((index for index, block in enumerate(plan.blocks)
                              if block.cluster_slot.numel() > 0), default=len(plan.blocks))
    for index in reversed(range(len(plan.blocks))):
        block, weight = plan.blocks[index], weights[index]
        if release:
            weights[index] = None
            if index < last_with_clusters:
                mean_q = mean_k = mean_v = grad_cluster = None
        # Recomputed rather than kept from the way up: H sum(b^2) numbers
        # fewer at the peak, for one more small product per block.
        grad = gather_children(grad_out, grad_cluster, block)
        coupled = coupling(weight, grad, gather_children(v, mean_v, block))
        parent = num_leaves + block.parents
        parent_mass = log_mass[:, parent].exp()[..., None, None]  # [H, F, 1, 1]
        through_children = node_rows(through, block)
        row_sum = parent_mass[..., 0] * (coupled.sum(-1) - diagonal(coupled)) + through_children
        from_phi = delta[:, parent][..., None] * block.share.to(q.dtype)[None]
        residual = row_sum - from_phi  # [H, F, b]
        # score gradient, diagonal included: P w_bc (g_b . v_c) - w_bc residual_b
        grad_scores = coupled.mul_(parent_mass).sub_(weight * residual[..., None])
        delta[:, block.children] = through_children - diagonal(weight) * residual
        if grad_bias is not None or key_gamma is not None:
            score_terms_backward(grad_scores, block, grad_bias, key_gamma, num_leaves)

        query = gather_children(q, mean_q, block)
        key = gather_children(k, mean_k, block)
        scaled_weight = weight * parent_mass
        # Leaves take the full products (their diagonal term is exactly their
        # own-score gradient); clusters drop it and divide by |C|.
        products = [
            (grad_scores, key, acc_q, grad_q, scale),
            (grad_scores.transpose(-1, -2), query, acc_k, grad_k, scale),
            (scaled_weight.transpose(-1, -2), grad, acc_v, grad_v, 1.0),
        ]
        for left, right, acc, leaf, factor in products:
            new = per_head_matmul(left, right, acc[:, block.parents, None], alpha=factor,
                                  out=leaf_target(leaf, block))
            if block.leaf_range is not None:
                continue
            cluster_new = None
            if block.cluster_slot.numel() > 0:
                own = diagonal(left)[..., None] * right * factor
                inverse = (1.0 / block.child_count.to(q.dtype))[None, :, :, None]
                cluster_new = acc[:, block.parents, None] + (new - acc[:, block.parents, None]
                                                             - own) * inverse
            write_children(new, leaf, acc, block, cluster_new)
    if key_gamma is not None:
        grad_k.addcmul_(key_gamma[:, :num_leaves, None], k, value=-scale)
    return grad_q, grad_k, grad_v, grad_bias


def score_terms_backward(grad_scores: Tensor, block: FamilyBlock, grad_bias: Optional[Tensor],
                         key_gamma: Optional[Tensor], num_leaves: int) -> None:
    r"""Gradients of the pair bias and of the Euclidean key term of one
    block from its score gradients ``[H, F, b, c]`` (diagonal: a leaf's own
    score; meaningless for cluster children, whose diagonal is
    :math:`-\phi`)."""
    heads = grad_scores.size(0)
    cluster_diagonal = cluster_diagonal_positions(block)
    if grad_bias is not None:
        target = block_pairs(grad_bias, block)
        target.copy_(grad_scores)
        if cluster_diagonal.numel() > 0:
            target.view(heads, -1)[:, cluster_diagonal] = 0.0
    if key_gamma is not None:
        column = grad_scores.sum(-2)  # [H, F, c]
        if cluster_diagonal.numel() > 0:
            own = diagonal(grad_scores).reshape(heads, -1)[:, block.cluster_slot]
            column = column.reshape(heads, -1)
            column[:, block.cluster_slot] -= own
            column = column.view(grad_scores.shape[:3])
        parent_gamma = key_gamma[:, num_leaves + block.parents, None]
        key_gamma[:, block.children] = parent_gamma + column / block.child_count.to(column.dtype)


class HSAFunction(torch.autograd.Function):
    r"""Fused HSA on ``[N, H, D]`` inputs (any memory layout; a transposed
    view of a heads-first ``[H, N, D]`` tensor is read without copies) and
    an optional heads-first pair bias ``[H, E]``.
    Saves per-node state and the family weights (:math:`H \sum_A b_A^2`
    numbers), nothing quadratic; no full copy of q, k or v is made."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, pair_bias: Optional[Tensor],
                plan: SweepPlan, scale: float, euclidean: bool = False,
                causal: bool = False) -> Tensor:
        heads_first = [t.transpose(0, 1) for t in (q, k, v)]  # views, no copies
        terms = ScoreTerms(pair_bias, euclidean, causal)
        state = bottom_up(*heads_first, plan, scale, terms)
        out, log_mass = top_down(heads_first[2], plan, state)
        ctx.save_for_backward(q, k, v)
        # phi is not needed on the way back; the rest is per-node state and
        # the family weights (no autograd graph: plain attributes suffice).
        # The bias itself is not needed either: the weights hold its effect.
        ctx.state, ctx.log_mass = state._replace(phi=None), log_mass
        ctx.plan, ctx.scale = plan, scale
        ctx.terms = ScoreTerms(None, euclidean, causal)
        return out.transpose(0, 1)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError("hsa(backend='fused') can be differentiated once; for "
                               "higher-order gradients (create_graph=True) use "
                               "backend='scatter'")
        q, k, v = (t.transpose(0, 1) for t in ctx.saved_tensors)
        # When autograd frees the graph after this pass (no retain_graph), the
        # sweeps may release the forward state block by block.
        release = not _graph_is_kept()
        *grads, grad_bias = backward_sweeps(
            grad_out.transpose(0, 1), q, k, v, ctx.plan, ctx.scale,
            ctx.__dict__.pop('state') if release else ctx.state, ctx.log_mass,
            release=release, terms=ctx.terms, grad_pair_bias=ctx.needs_input_grad[3])
        return tuple(g.transpose(0, 1) for g in grads) + (grad_bias, None, None, None, None)


def _graph_is_kept() -> bool:
    r"""Whether the running backward pass keeps the graph (``retain_graph``);
    :obj:`True` when torch cannot tell, which only costs memory."""
    keep_graph = getattr(torch._C._autograd, '_get_current_graph_task_keep_graph', None)
    return True if keep_graph is None else bool(keep_graph())
