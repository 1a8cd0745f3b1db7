r"""The Triton programs of :mod:`hsa_geo.functional.triton_sweeps`: one
program per (family, head), one launch per level and sweep.

This module imports :mod:`triton` and decorates its programs when it is
imported: only :func:`hsa_geo.functional.triton_sweeps.programs` imports it,
on first use, so that ``import hsa_geo`` never needs Triton and the
programs are decorated as Triton's standard library was (compiled, or for
its interpreter).

Every program holds its family's children as a dense ``BLOCK_B`` block
(masked beyond the family's ``size`` children), the formulas and names of
``hsa_geo/csrc/hsa_sweeps.cpp`` (docs/derivation.rst) as block operations:

* ``forward_up``: scores, row log-sum-exp, weights, each child's
  :math:`\log \mu`, the parent's :math:`\phi` and leaf-weighted means;
* ``forward_down``: a leaf's output, a cluster's message
  :math:`u = y_i - P(A) w_{ii} \bar v_i`, :math:`\log P`;
* ``backward_up``: the summed upstream gradient of every cluster and
  ``through`` (:math:`\partial L / \partial \log P`);
* ``backward_down``: the score gradients, the pair bias's, and the
  gradients of q, k, v, accumulated down the clusters' rows.

Products are ``tl.dot`` in IEEE float32 (no TF32), so blocks are at least
16 wide.
"""
from hsa_geo.extras import require

triton = require('triton', 'triton')  # the programs are Triton's: no use without it
tl = require('triton.language', 'triton')


@triton.jit
def _child_rows(leaf_ptr, cluster_ptr, child, is_leaf, is_cluster, head, heads, num_leaves,
                leaf_width, cluster_width, column, offs, width):
    r"""``[BLOCK_B, BLOCK]`` rows of the children: a leaf's from
    ``leaf_ptr`` ``[N, H, leaf_width]``, a cluster's from columns
    ``column ..`` of its row of ``cluster_ptr`` ``[M, H, cluster_width]``;
    zeros beyond the family and beyond ``width``."""
    inside = (offs < width)[None, :]
    leaf = tl.where(is_leaf, child, 0)
    cluster = tl.where(is_cluster, child - num_leaves, 0)
    leaf_rows = tl.load(leaf_ptr + ((leaf * heads + head) * leaf_width)[:, None] + offs[None, :],
                        mask=is_leaf[:, None] & inside, other=0.0)
    cluster_rows = tl.load(
        cluster_ptr + ((cluster * heads + head) * cluster_width + column)[:, None] + offs[None, :],
        mask=is_cluster[:, None] & inside, other=0.0)
    return leaf_rows + cluster_rows


@triton.jit
def _child_qkv(q, k, v, means, child, is_leaf, is_cluster, head, heads, num_leaves, dim,
               value_dim, width, d, e):
    r"""The children's query, key and value rows (:func:`_child_rows`): a
    leaf's inputs, a cluster's means (columns ``0``, ``D`` and ``2D`` of its
    row of ``means``)."""
    query = _child_rows(q, means, child, is_leaf, is_cluster, head, heads, num_leaves, dim, width,
                        0, d, dim)
    key = _child_rows(k, means, child, is_leaf, is_cluster, head, heads, num_leaves, dim, width,
                      dim, d, dim)
    value = _child_values(v, means, child, is_leaf, is_cluster, head, heads, num_leaves, dim,
                          value_dim, e)
    return query, key, value


@triton.jit
def _store_child_rows(leaf_ptr, cluster_ptr, rows, child, is_leaf, is_cluster, head, heads,
                      num_leaves, leaf_width, cluster_width, column, offs, width):
    r"""Writes ``rows`` where :func:`_child_rows` reads them."""
    inside = (offs < width)[None, :]
    leaf = tl.where(is_leaf, child, 0)
    cluster = tl.where(is_cluster, child - num_leaves, 0)
    tl.store(leaf_ptr + ((leaf * heads + head) * leaf_width)[:, None] + offs[None, :], rows,
             mask=is_leaf[:, None] & inside)
    tl.store(cluster_ptr + ((cluster * heads + head) * cluster_width + column)[:, None]
             + offs[None, :], rows, mask=is_cluster[:, None] & inside)


@triton.jit
def _family(family_node, child_ptr, children, pair_ptr, level_start, num_leaves,
            BLOCK_B: tl.constexpr):
    r"""The family of this program and its children: ``(head, parent,
    size, first pair, child ids, leaf?, cluster?, sibling index)``."""
    family = level_start + tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    first = tl.load(child_ptr + family)
    size = tl.load(child_ptr + family + 1) - first
    pair0 = tl.load(pair_ptr + family)
    parent = tl.load(family_node + family)
    sibling = tl.arange(0, BLOCK_B)
    inside = sibling < size
    child = tl.load(children + first + sibling, mask=inside, other=0)
    is_leaf = inside & (child < num_leaves)
    is_cluster = inside & (child >= num_leaves)
    return head, parent, size, pair0, child, is_leaf, is_cluster, sibling


@triton.jit
def _pair_offsets(pair0, size, sibling):
    r"""``[BLOCK_B, BLOCK_B]`` positions of the family's pairs (row-major
    from ``pair0``) and which of them exist."""
    inside = sibling < size
    return pair0 + sibling[:, None] * size + sibling[None, :], inside[:, None] & inside[None, :]


@triton.jit
def _family_weights(weights, head, num_pairs, pair0, size, sibling):
    r"""The family's pair positions, which of them exist, and their
    weights ``[BLOCK_B, BLOCK_B]`` (zeros outside the family)."""
    pair, pair_inside = _pair_offsets(pair0, size, sibling)
    weight = tl.load(weights + head * num_pairs + pair, mask=pair_inside, other=0.0)
    return pair, pair_inside, weight


@triton.jit
def _child_values(v, means, child, is_leaf, is_cluster, head, heads, num_leaves, dim, value_dim,
                  e):
    r"""The children's value rows (:func:`_child_rows`): a leaf's v, a
    cluster's mean value (column ``2D`` of its row of ``means``)."""
    return _child_rows(v, means, child, is_leaf, is_cluster, head, heads, num_leaves, value_dim,
                       2 * dim + value_dim + 2, 2 * dim, e, value_dim)


@triton.jit
def forward_up(q, k, v, means, count, log_count, bias, weights, self_log,
               family_node, child_ptr, children, pair_ptr, level_start,
               num_leaves, heads, dim, value_dim, num_pairs, scale,
               EUCLIDEAN: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
               BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    r"""Bottom-up forward sweep over one level: the weights of every pair,
    :math:`\log \mu` of every child and the parent's row of ``means``
    (mean query, key, value, :math:`\phi`, mean squared key norm)."""
    head, parent, size, pair0, child, is_leaf, is_cluster, sibling = _family(
        family_node, child_ptr, children, pair_ptr, level_start, num_leaves, BLOCK_B)
    inside = sibling < size
    width = 2 * dim + value_dim + 2
    d = tl.arange(0, BLOCK_D)
    e = tl.arange(0, BLOCK_DV)
    query, key, value = _child_qkv(q, k, v, means, child, is_leaf, is_cluster, head, heads,
                                   num_leaves, dim, value_dim, width, d, e)
    cluster_row = (tl.where(is_cluster, child - num_leaves, 0) * heads + head) * width
    phi = tl.load(means + cluster_row + 2 * dim + value_dim, mask=is_cluster, other=0.0)
    child_count = tl.load(count + child, mask=inside, other=0.0)
    share = child_count / tl.load(count + parent)
    diagonal = sibling[:, None] == sibling[None, :]

    # S_ij = scale q.k + log|B_j| (j != i) (+ key term, + bias); S_ii = -phi(B_i) at a cluster
    scores = scale * tl.dot(query, tl.trans(key), input_precision="ieee")
    log_size = tl.load(log_count + child, mask=inside, other=0.0)
    scores += tl.where(diagonal, 0.0, log_size[None, :])
    if EUCLIDEAN:
        key_norm = tl.where(is_leaf, tl.sum(key * key, 1),
                            tl.load(means + cluster_row + 2 * dim + value_dim + 1,
                                    mask=is_cluster, other=0.0))
        scores += -0.5 * scale * key_norm[None, :]
    pair, pair_inside = _pair_offsets(pair0, size, sibling)
    if HAS_BIAS:
        scores += tl.load(bias + head * num_pairs + pair, mask=pair_inside, other=0.0)
    scores = tl.where(diagonal & is_cluster[:, None], -phi[:, None], scores)
    # every row, padding rows included, keeps a column: no 0/0
    allowed = inside[None, :]
    if CAUSAL:
        allowed = allowed & (sibling[None, :] <= sibling[:, None])
    scores = tl.where(allowed, scores, float('-inf'))
    largest = tl.max(scores, 1)
    exponent = tl.where(allowed, tl.exp(scores - largest[:, None]), 0.0)
    total = tl.sum(exponent, 1)
    weight = exponent / total[:, None]
    log_partition = largest + tl.log(total)
    own = tl.sum(tl.where(diagonal & allowed, scores, 0.0), 1)
    tl.store(weights + head * num_pairs + pair, weight, mask=pair_inside)
    tl.store(self_log + child * heads + head, own - log_partition, mask=inside)

    parent_row = means + ((parent - num_leaves) * heads + head) * width
    tl.store(parent_row + d, tl.sum(share[:, None] * query, 0), mask=d < dim)
    tl.store(parent_row + dim + d, tl.sum(share[:, None] * key, 0), mask=d < dim)
    tl.store(parent_row + 2 * dim + e, tl.sum(share[:, None] * value, 0), mask=e < value_dim)
    parent_phi = -tl.sum(tl.where(inside, share * log_partition, 0.0), 0)
    tl.store(parent_row + 2 * dim + value_dim, parent_phi)
    if EUCLIDEAN:
        tl.store(parent_row + 2 * dim + value_dim + 1, tl.sum(share * key_norm, 0))
    else:
        tl.store(parent_row + 2 * dim + value_dim + 1, 0.0)


@triton.jit
def forward_down(v, means, message, weights, self_log, log_mass, out,
                 family_node, child_ptr, children, pair_ptr, level_start,
                 num_leaves, heads, dim, value_dim, num_pairs,
                 BLOCK_B: tl.constexpr, BLOCK_DV: tl.constexpr):
    r"""Top-down forward sweep over one level: :math:`y_i = u_A + P(A)
    \sum_j w_{ij} v_j` is a leaf's output; a cluster passes
    :math:`u = y_i - P(A) w_{ii} \bar v_i` and :math:`\log P` down."""
    head, parent, size, pair0, child, is_leaf, is_cluster, sibling = _family(
        family_node, child_ptr, children, pair_ptr, level_start, num_leaves, BLOCK_B)
    inside = sibling < size
    e = tl.arange(0, BLOCK_DV)
    value = _child_values(v, means, child, is_leaf, is_cluster, head, heads, num_leaves, dim,
                          value_dim, e)
    pair, pair_inside, weight = _family_weights(weights, head, num_pairs, pair0, size, sibling)
    parent_log_mass = tl.load(log_mass + parent * heads + head)
    parent_message = tl.load(message + ((parent - num_leaves) * heads + head) * value_dim + e,
                             mask=e < value_dim, other=0.0)
    diagonal = sibling[:, None] == sibling[None, :]
    row_weight = tl.where(diagonal & is_cluster[:, None], 0.0, tl.exp(parent_log_mass) * weight)
    y = parent_message[None, :] + tl.dot(row_weight, value, input_precision="ieee")
    _store_child_rows(out, message, y, child, is_leaf, is_cluster, head, heads, num_leaves,
                      value_dim, value_dim, 0, e, value_dim)
    own = tl.load(self_log + child * heads + head, mask=inside, other=0.0)
    tl.store(log_mass + child * heads + head, parent_log_mass + own, mask=inside)


@triton.jit
def backward_up(grad_out, v, means, gradient, weights, log_mass, through, leaf_log_mass_grad,
                family_node, child_ptr, children, pair_ptr, level_start,
                num_leaves, heads, dim, value_dim, num_pairs,
                HAS_LEAF_GRAD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_DV: tl.constexpr):
    r"""Bottom-up backward sweep over one level: the parent's summed
    upstream gradient :math:`G_A = \sum_i G_i` and
    :math:`\mathrm{through}_A = \sum_i \mathrm{through}_i + P(A)
    \sum_{i \ne j} w_{ij} (G_i \cdot v_j)`; a leaf's through is
    :math:`P(i) (g_i \cdot v_i) + \partial L / \partial \log a_{ii}`."""
    head, parent, size, pair0, child, is_leaf, is_cluster, sibling = _family(
        family_node, child_ptr, children, pair_ptr, level_start, num_leaves, BLOCK_B)
    inside = sibling < size
    e = tl.arange(0, BLOCK_DV)
    value = _child_values(v, means, child, is_leaf, is_cluster, head, heads, num_leaves, dim,
                          value_dim, e)
    grad = _child_rows(grad_out, gradient, child, is_leaf, is_cluster, head, heads, num_leaves,
                       value_dim, value_dim, 0, e, value_dim)
    pair, pair_inside, weight = _family_weights(weights, head, num_pairs, pair0, size, sibling)
    child_log_mass = tl.load(log_mass + child * heads + head, mask=is_leaf, other=0.0)
    leaf_through = tl.exp(child_log_mass) * tl.sum(grad * value, 1)
    if HAS_LEAF_GRAD:
        leaf_through += tl.load(leaf_log_mass_grad + child * heads + head, mask=is_leaf, other=0.0)
    child_through = tl.where(is_leaf, leaf_through,
                             tl.load(through + child * heads + head, mask=is_cluster, other=0.0))
    tl.store(through + child * heads + head, child_through, mask=is_leaf)
    coupling = weight * tl.dot(grad, tl.trans(value), input_precision="ieee")
    diagonal = sibling[:, None] == sibling[None, :]
    off_diagonal = tl.sum(tl.sum(tl.where(diagonal, 0.0, coupling), 1), 0)
    parent_mass = tl.exp(tl.load(log_mass + parent * heads + head))
    tl.store(through + parent * heads + head, tl.sum(child_through, 0) + parent_mass * off_diagonal)
    tl.store(gradient + ((parent - num_leaves) * heads + head) * value_dim + e, tl.sum(grad, 0),
             mask=e < value_dim)


@triton.jit
def backward_down(q, k, v, grad_out, means, gradient, weights, log_mass, through, delta,
                  accumulated, count, grad_bias, grad_q, grad_k, grad_v,
                  family_node, child_ptr, children, pair_ptr, level_start,
                  num_leaves, heads, dim, value_dim, num_pairs, scale,
                  EUCLIDEAN: tl.constexpr, BIAS_GRAD: tl.constexpr, BLOCK_B: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    r"""Top-down backward sweep over one level. ``delta`` (the gradient of
    a cluster's own diagonal score :math:`-\phi`) and ``accumulated`` (its
    ancestors' share of the gradients of the mean query, key, value and the
    key-norm term, ``[M, H, 2D + D_v + 1]``) come in holding the upstream
    gradients of the clusters' own rows; the program adds what reaches a
    cluster child from its parent and siblings, and writes a leaf child's
    gradients of q, k and v."""
    head, parent, size, pair0, child, is_leaf, is_cluster, sibling = _family(
        family_node, child_ptr, children, pair_ptr, level_start, num_leaves, BLOCK_B)
    inside = sibling < size
    width = 2 * dim + value_dim + 2
    acc_width = 2 * dim + value_dim + 1
    d = tl.arange(0, BLOCK_D)
    e = tl.arange(0, BLOCK_DV)
    query, key, value = _child_qkv(q, k, v, means, child, is_leaf, is_cluster, head, heads,
                                   num_leaves, dim, value_dim, width, d, e)
    grad = _child_rows(grad_out, gradient, child, is_leaf, is_cluster, head, heads, num_leaves,
                       value_dim, value_dim, 0, e, value_dim)
    pair, pair_inside, weight = _family_weights(weights, head, num_pairs, pair0, size, sibling)
    parent_mass = tl.exp(tl.load(log_mass + parent * heads + head))
    parent_cluster = (parent - num_leaves) * heads + head
    parent_delta = tl.load(delta + parent_cluster)
    parent_acc = accumulated + parent_cluster * acc_width
    child_count = tl.load(count + child, mask=inside, other=1.0)
    share = child_count / tl.load(count + parent)
    inverse_count = 1.0 / child_count
    child_through = tl.load(through + child * heads + head, mask=inside, other=0.0)
    diagonal = sibling[:, None] == sibling[None, :]

    # couplings c_ij = w_ij (G_i . v_j);
    # residual_i = P(A) sum_{j != i} c_ij + through_i - delta_A |B_i| / |A|
    coupling = weight * tl.dot(grad, tl.trans(value), input_precision="ieee")
    residual = (parent_mass * tl.sum(tl.where(diagonal, 0.0, coupling), 1) + child_through
                - parent_delta * share)
    # score gradients P(A) c_ij - w_ij residual_i; on the diagonal
    # through_i - w_ii residual_i: a leaf's own score, a cluster's -phi
    # (its delta, which reaches q, k and the bias through its children)
    own = child_through - tl.sum(tl.where(diagonal, weight, 0.0), 1) * residual
    grad_score = parent_mass * coupling - weight * residual[:, None]
    grad_score = tl.where(diagonal, tl.where(is_leaf, own, 0.0)[:, None], grad_score)
    grad_score = tl.where(pair_inside, grad_score, 0.0)
    if BIAS_GRAD:
        tl.store(grad_bias + head * num_pairs + pair, grad_score, mask=pair_inside)

    # a child's gradients: its ancestors' accumulated share plus its own
    # products, divided among its |B| leaves
    value_weight = tl.where(diagonal & is_cluster[:, None], 0.0, tl.trans(weight))
    query_grad = tl.load(parent_acc + d, mask=d < dim, other=0.0)[None, :] + (
        scale * inverse_count)[:, None] * tl.dot(grad_score, key, input_precision="ieee")
    key_grad = tl.load(parent_acc + dim + d, mask=d < dim, other=0.0)[None, :] + (
        scale * inverse_count)[:, None] * tl.dot(tl.trans(grad_score), query,
                                                 input_precision="ieee")
    value_grad = tl.load(parent_acc + 2 * dim + e, mask=e < value_dim, other=0.0)[None, :] + (
        parent_mass * inverse_count)[:, None] * tl.dot(value_weight, grad, input_precision="ieee")
    gamma = tl.load(parent_acc + acc_width - 1) + inverse_count * tl.sum(grad_score, 0)

    # clusters: add to what `accumulated` and `delta` hold (their own rows' gradients)
    cluster = tl.where(is_cluster, child - num_leaves, 0) * heads + head
    cluster_acc = accumulated + cluster * acc_width
    rows = is_cluster[:, None]
    for_query = cluster_acc[:, None] + d[None, :]
    tl.store(for_query, tl.load(for_query, mask=rows & (d < dim)[None, :], other=0.0) + query_grad,
             mask=rows & (d < dim)[None, :])
    for_key = cluster_acc[:, None] + dim + d[None, :]
    tl.store(for_key, tl.load(for_key, mask=rows & (d < dim)[None, :], other=0.0) + key_grad,
             mask=rows & (d < dim)[None, :])
    for_value = cluster_acc[:, None] + 2 * dim + e[None, :]
    tl.store(for_value, tl.load(for_value, mask=rows & (e < value_dim)[None, :], other=0.0)
             + value_grad, mask=rows & (e < value_dim)[None, :])
    for_gamma = cluster_acc + acc_width - 1
    tl.store(for_gamma, tl.load(for_gamma, mask=is_cluster, other=0.0) + gamma, mask=is_cluster)
    for_delta = delta + cluster
    tl.store(for_delta, tl.load(for_delta, mask=is_cluster, other=0.0) + own, mask=is_cluster)

    # leaves: d s_ij / d k_j gains -scale k_j per unit of gamma (Euclidean key term)
    if EUCLIDEAN:
        key_grad -= (scale * gamma)[:, None] * key
    leaf_row = tl.where(is_leaf, child, 0) * heads + head
    leaf_mask = is_leaf[:, None]
    tl.store(grad_q + (leaf_row * dim)[:, None] + d[None, :], query_grad,
             mask=leaf_mask & (d < dim)[None, :])
    tl.store(grad_k + (leaf_row * dim)[:, None] + d[None, :], key_grad,
             mask=leaf_mask & (d < dim)[None, :])
    tl.store(grad_v + (leaf_row * value_dim)[:, None] + e[None, :], value_grad,
             mask=leaf_mask & (e < value_dim)[None, :])
