r"""Public functional HSA: the attention itself, its log-partition
:math:`\phi`, and its block-level weights."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from hsa_geo.functional.causal import hsa_strict_causal
from hsa_geo.functional.checks import (check_causal, check_cluster_ids, check_energy,
                                       check_not_strict, check_pair_memory, check_score_terms,
                                       check_types, prepare_inputs, resolve_scale, to_compute)
from hsa_geo.functional.compiled import fused_hsa
from hsa_geo.functional.dense import path_to_root
from hsa_geo.functional.engines import (compiled_on_kernel, compiled_on_triton,
                                        current_engine, family_groups, kernel_runs,
                                        scatter_plan, sibling_pair_positions, slot_layout,
                                        triton_plan)
from hsa_geo.functional.family_sweeps import FamilySweepsFunction
from hsa_geo.functional.kernel import KERNEL_SWEEPS
from hsa_geo.functional.scatter_sweep import (Aggregate, hsa_scatter, leaf_self_scores,
                                              scatter_aggregate, scatter_bottom_up, subtree_mean)
from hsa_geo.functional.sweep import HSAFunction, autocast_off, bottom_up, top_down
from hsa_geo.functional.terms import ScoreTerms
from hsa_geo.functional.triton_sweeps import STRICT_CAUSAL_REFUSAL, TRITON_SWEEPS
from hsa_geo.hierarchy.hierarchy import Hierarchy

_TERMS_DOC = r"""
        pair_bias (torch.Tensor, optional): Additive score term per ordered
            sibling pair and head, ``[E, H]`` (or ``[E]`` for all heads),
            one row per column of :meth:`Hierarchy.sibling_pairs()
            <hsa_geo.Hierarchy.sibling_pairs>`, in that order: added to the
            block score :math:`\bar s(B, C)` of siblings :math:`B \neq C`
            and to the self score :math:`s_{ii}` of a leaf's own pair
            :math:`(i, i)`; the :math:`(B, B)` rows of cluster nodes are not
            used (their gradient is zero). Build it with
            :class:`hsa_geo.nn.SiblingPositionBias`. (default: :obj:`None`)
        energy (str, optional): :obj:`"dot"`,
            :math:`s_{ij} = \text{scale}\cdot q_i^\top k_j`, or
            :obj:`"euclidean"`, the paper's
            :math:`s_{ij} = -\tfrac{\text{scale}}{2}\Vert q_i - k_j\Vert^2`
            (:math:`-\Vert q_i - k_j\Vert^2 / (2\sqrt D)` by default).
            (default: :obj:`"dot"`)
        causal (bool or str, optional): Leaf :math:`i` attends only to
            leaves :math:`j \le i`. :obj:`True`: the KL-closest
            block-constant approximation of causal softmax attention (same
            sweeps and cost; rows of a subtree share their weights, so a
            leaf's weights also depend on the queries and keys of later
            leaves of its subtrees, never on their values).
            :obj:`"strict"`: each row is projected on its own, so nothing of
            a later leaf reaches leaf :math:`i` (for autoregressive models);
            :math:`O(N\, b\, \mathrm{depth}\, HD)` time and memory, one
            backend. Both need every subtree to hold consecutive leaf ids
            (:meth:`Hierarchy.check_contiguous
            <hsa_geo.Hierarchy.check_contiguous>`). (default: :obj:`False`)"""


def hsa(q: Tensor, k: Tensor, v: Tensor, hierarchy: Hierarchy,
        scale: Optional[float] = None, backend: str = 'fused', *,
        pair_bias: Optional[Tensor] = None, energy: str = 'dot',
        causal: Union[bool, str] = False, return_log_partition: bool = False,
        return_log_self_weight: bool = False) -> Union[Tensor, Tuple[Tensor, ...]]:
    r"""Hierarchical Self-Attention over the leaves of :obj:`hierarchy`.

    Computes :math:`y_i = \sum_j a_{ij} v_j` where :math:`A` is the
    row-stochastic matrix closest in KL divergence to softmax attention
    :math:`\mathrm{softmax}_j(s_{ij})`, with scores
    :math:`s_{ij} = \text{scale}\cdot q_i^\top k_j` (plus the optional
    pair bias, or the Euclidean energy), among those constant on every block
    of leaves under two sibling subtrees (docs/derivation.rst). Two sweeps
    over the tree, no :math:`N \times N` tensor:
    :math:`O((N + M)\, b\, H D)` time for branching :math:`b`.

    Args:
        q (torch.Tensor): Queries ``[N, H, D]`` (or ``[N, D]``: one head).
        k (torch.Tensor): Keys, same shape as :obj:`q`.
        v (torch.Tensor): Values ``[N, H, D_v]`` (or ``[N, D_v]``).
        hierarchy (Hierarchy): Tree (or forest) over the :math:`N` leaves;
            attention never crosses trees.
        scale (float, optional): Score scale. (default: :math:`1/\sqrt{D}`)
        backend (str, optional): :obj:`"fused"` (sweeps over dense family
            blocks with a hand-derived backward: fast, lean) or
            :obj:`"scatter"` (edge lists and
            :func:`torch_geometric.utils.scatter`, which uses
            ``torch_scatter`` when installed; plain autograd, so it supports
            double backward, with :math:`O(\sum_A b_A^2 HD)` memory).
            Both compute the same values. (default: :obj:`"fused"`)
        {terms}
        return_log_partition (bool, optional): Also return :math:`\phi` of
            every node, ``[N + M, H]`` (``[N + M]`` for one head), as
            :func:`hsa_log_partition` computes it, from the same sweeps and
            differentiable with the output (not with
            :obj:`causal="strict"`). (default: :obj:`False`)
        return_log_self_weight (bool, optional): Also return the log of
            every leaf's weight on itself, :math:`\log a_{ii}`, ``[N, H]``
            (``[N]`` for one head), from the same sweeps (in log space, so
            it does not underflow) and differentiable with the output on
            every engine (not with :obj:`causal="strict"`).
            :math:`e^{s_{ii}} / a_{ii}` is HSA's estimate of row
            :math:`i`'s softmax normaliser, exact on a flat tree.
            (default: :obj:`False`)

    Returns:
        ``[N, H, D_v]`` (or ``[N, D_v]``), then :math:`\phi` with
        :obj:`return_log_partition`, then :math:`\log a_{ii}` with
        :obj:`return_log_self_weight`. float16/bfloat16 inputs are
        computed in float32 and returned in their own dtype, so their error is
        that of rounding inputs and output: on unit-variance inputs the
        largest deviation from float64 stays below 5e-3 (float16) and 5e-2
        (bfloat16), and below 1e-5 for float32 (checked in
        tests/test_functional.py).
    """
    if backend not in ('fused', 'scatter'):
        raise ValueError(f"Unknown backend {backend!r}; choose 'fused' or 'scatter'")
    check_types((q, k, v))
    terms = dict(pair_bias=pair_bias, energy=energy, causal=causal)
    outputs = dict(return_log_partition=return_log_partition,
                   return_log_self_weight=return_log_self_weight)
    if return_log_partition or return_log_self_weight:
        check_not_strict(causal)
    if torch.compiler.is_compiling():
        if (backend == 'fused' and causal != 'strict' and not any(outputs.values())
                and not compiled_on_triton()):  # Triton's programs run outside the graph
            return _hsa_compiled(q, k, v, hierarchy, scale, **terms)
        return _hsa_eager_outside_graph(q, k, v, hierarchy, scale, backend, **terms, **outputs)
    # every input the sweeps see runs in float32 or float64: under autocast
    # the products inside would otherwise be cast down (and mix dtypes)
    with autocast_off(q.device):
        return _hsa_eager(q, k, v, hierarchy, scale, backend, **terms, **outputs)


def hsa_propagate(q: Tensor, k: Tensor, v: Tensor, hierarchy: Hierarchy, aggregate: Aggregate,
                  scale: Optional[float] = None, *, pair_bias: Optional[Tensor] = None,
                  energy: str = 'dot', causal: Union[bool, str] = False) -> Tensor:
    r""":func:`hsa` (same arguments, same values) by the scatter sweeps with
    every sum along edges done by :obj:`aggregate` (see
    :data:`~hsa_geo.functional.scatter_sweep.Aggregate`; e.g. a layer's
    :meth:`~torch_geometric.nn.conv.MessagePassing.propagate`): children to
    parent on the way up, siblings to a node and parent to children on the
    way down. Differentiable by autograd. Not for :obj:`causal="strict"`,
    whose rows are no sweep over the tree."""
    check_types((q, k, v))
    check_not_strict(causal)
    with autocast_off(q.device):
        return _hsa_eager(q, k, v, hierarchy, scale, 'scatter', pair_bias, energy, causal,
                          aggregate=aggregate)


def _hsa_eager(q: Tensor, k: Tensor, v: Tensor, hierarchy: Hierarchy, scale: Optional[float],
               backend: str, pair_bias: Optional[Tensor], energy: str,
               causal: Union[bool, str], return_log_partition: bool = False,
               return_log_self_weight: bool = False,
               aggregate: Aggregate = scatter_aggregate):
    (q, k, v), single_head, dtype = prepare_inputs((q, k, v), hierarchy)
    scale = resolve_scale(scale, q)
    terms = check_score_terms(pair_bias, energy, causal, hierarchy, q)
    if causal != 'strict':
        check_pair_memory(hierarchy, q)
    if terms.euclidean:
        q, k = _centered(q, k)
    if q.is_meta:
        out, phi, log_self_weight = _shapes_only(q, v, hierarchy, k, terms.pair_bias)
    elif causal == 'strict':
        if current_engine() == 'triton':
            raise NotImplementedError(STRICT_CAUSAL_REFUSAL)
        out = hsa_strict_causal(q, k, v, hierarchy.plan(q.device),
                                scatter_plan(hierarchy, q.device),
                                family_groups(hierarchy, q.device), scale, terms)
    elif backend == 'fused':
        clusters = None
        if return_log_partition:
            clusters = torch.arange(hierarchy.num_leaves, hierarchy.num_nodes, device=q.device)
        result = hsa_with_summaries(q, k, v, hierarchy, scale, terms, clusters,
                                    self_weight=return_log_self_weight)
        out, *extra = result if isinstance(result, tuple) else (result, )
        if return_log_partition:
            rows = extra.pop(0)
            leaf_pairs = (None if terms.pair_bias is None
                          else leaf_pair_index(hierarchy, q.device))
            leaf_phi = -leaf_self_scores(q, k, leaf_pairs, scale, terms)
            phi = torch.cat([leaf_phi, rows[..., 2 * q.size(2) + v.size(2)]])
        log_self_weight = extra.pop(0) if return_log_self_weight else None
    else:
        out, phi, log_self_weight = hsa_scatter(q, k, v, scatter_plan(hierarchy, q.device),
                                                scale, terms, aggregate)
    outputs = [out]
    if return_log_partition:
        if terms.euclidean:  # the row term the sweeps leave out
            phi = phi - hierarchy.subtree_means(terms.row_term(q, scale))
        outputs.append(phi)
    if return_log_self_weight:
        outputs.append(log_self_weight)
    outputs = [t.to(dtype).squeeze(1) if single_head else t.to(dtype) for t in outputs]
    return tuple(outputs) if len(outputs) > 1 else outputs[0]


def _shapes_only(q: Tensor, v: Tensor, hierarchy: Hierarchy, *inputs: Optional[Tensor]):
    r"""On the meta device (a model built without memory, shapes only)
    there is nothing to sweep: the output ``[N, H, D_v]``, :math:`\phi`
    ``[N + M, H]`` and :math:`\log a_{ii}` ``[N, H]`` as tensors without
    data, still connected to every input for autograd."""
    link = q.sum() + sum(t.sum() for t in inputs if t is not None)
    heads = q.size(1)
    return (v + 0.0 * link, link.expand(hierarchy.num_nodes, heads),
            link.expand(hierarchy.num_leaves, heads))


def hsa_with_summaries(q: Tensor, k: Tensor, v: Tensor, hierarchy: Hierarchy, scale: float,
                       terms: ScoreTerms, nodes: Optional[Tensor] = None, *,
                       self_weight: bool = False):
    r"""The fused engine on ``[N, H, D]`` inputs and score terms already
    checked (:func:`~hsa_geo.functional.checks.check_score_terms`: a pair bias
    ``[E, H]`` or None; with the Euclidean energy, q and k centred by the
    caller) and, with :obj:`nodes` (distinct cluster ids, checked here),
    those clusters' summary rows ``[S, H, 2D + D_v + 1 (+ 1)]``: mean
    query, key and value, :math:`\phi` without the Euclidean row term and,
    for that energy, the mean squared key norm; with :obj:`self_weight`,
    then the leaves' :math:`\log a_{ii}` ``[N, H]``. Every output is
    differentiable: the engines' backward takes the rows' gradients into
    their top-down sweep."""
    if nodes is not None:
        nodes = check_cluster_ids(nodes, hierarchy, q.device)
    name, engine_bias = _fused_engine(terms.pair_bias, hierarchy, q)
    if name in ('triton', 'kernel'):
        sweeps, tables = ((TRITON_SWEEPS, triton_plan(hierarchy, q.device)) if name == 'triton'
                          else (KERNEL_SWEEPS, hierarchy.family_tables()))
        return FamilySweepsFunction.apply(sweeps, q, k, v, engine_bias, tables, scale,
                                          terms.euclidean, terms.causal, nodes, self_weight)
    count = None if nodes is None else hierarchy.num_leaves_below.to(q.device)[nodes]
    return HSAFunction.apply(q, k, v, engine_bias, slot_layout(hierarchy, q.device), scale,
                             terms.euclidean, terms.causal, nodes, count, self_weight)


def leaf_pair_index(hierarchy: Hierarchy, device) -> Tensor:
    r"""``[N]`` position of every leaf's own pair :math:`(i, i)` in
    :meth:`Hierarchy.sibling_pairs` order, -1 for an isolated leaf."""
    rows, cols = hierarchy.sibling_pairs().to(device)
    own = ((rows == cols) & (rows < hierarchy.num_leaves)).nonzero().view(-1)
    positions = torch.full((hierarchy.num_leaves, ), -1, dtype=torch.long, device=device)
    positions[rows[own]] = own
    return positions


hsa.__doc__ = hsa.__doc__.replace('{terms}', _TERMS_DOC.strip())

#: Under torch.compile, the backends without a custom operator run eagerly
#: (a graph break) rather than be traced with guards on the hierarchy.
_hsa_eager_outside_graph = torch.compiler.disable(_hsa_eager)


def _hsa_compiled(q: Tensor, k: Tensor, v: Tensor, hierarchy: Hierarchy, scale: Optional[float],
                  pair_bias: Optional[Tensor], energy: str, causal: Union[bool, str]) -> Tensor:
    r""":func:`hsa` as traced by :func:`torch.compile`: one custom operator
    (:mod:`hsa_geo.functional.compiled`) that receives the hierarchy's
    parent pointers, a tensor, so that nothing of the Python object is
    traced, guarded or checked in the graph (the operator checks what
    needs the hierarchy)."""
    check_types((q, k, v))
    (q, k, v), single_head, dtype = to_compute((q, k, v))
    scale = resolve_scale(scale, q)
    check_energy(energy)
    check_causal(causal)
    if pair_bias is not None:
        if pair_bias.dim() == 1:
            pair_bias = pair_bias[:, None]
        pair_bias = pair_bias.to(q.dtype).expand(-1, q.size(1))
    if energy == 'euclidean':
        q, k = _centered(q, k)
    out = fused_hsa(q, k, v, pair_bias, hierarchy.parent, scale, energy == 'euclidean',
                    bool(causal), compiled_on_kernel(q.device.type))
    out = out.to(dtype)
    return out.squeeze(1) if single_head else out


def _fused_engine(pair_bias: Optional[Tensor], hierarchy: Hierarchy, q: Tensor):
    r"""Which engine runs ``backend='fused'`` on :obj:`q`'s device,
    :obj:`"triton"` (only when :func:`~hsa_geo.functional.engine` asks for
    it), :obj:`"kernel"` (the CPU kernel when it is available) or
    :obj:`"tensor"`, and the pair bias in that engine's order: ``[H, E]``
    for the kernel and Triton, padded ``[H, P]`` for the tensor sweeps."""
    if current_engine() == 'triton':
        return 'triton', None if pair_bias is None else pair_bias.t().contiguous()
    if kernel_runs(q.device):
        return 'kernel', None if pair_bias is None else pair_bias.t().contiguous()
    return 'tensor', padded_pair_bias(pair_bias, hierarchy, q)


def padded_pair_bias(pair_bias: Optional[Tensor], hierarchy: Hierarchy, q: Tensor):
    r"""The pair bias ``[E, H]`` in the padded per-pair layout of the fused
    sweeps, ``[H, P]`` (differentiable)."""
    if pair_bias is None:
        return None
    positions, sources = sibling_pair_positions(hierarchy, q.device, with_sources=True)
    return _ToLayoutOrder.apply(pair_bias.t().contiguous(), positions, sources)


class _ToLayoutOrder(torch.autograd.Function):
    r"""``[H, E]`` per-pair values in :meth:`Hierarchy.sibling_pairs` order
    to the padded per-pair order of the slot layout, ``[H, P]`` (zeros at
    padding), and back for the gradient: a gather both ways (the map is
    one-to-one), which is several times faster than a scatter along the
    pairs."""

    @staticmethod
    def forward(ctx, values: Tensor, positions: Tensor, sources: Tensor) -> Tensor:
        ctx.save_for_backward(positions)
        if sources.numel() > values.size(1):  # one zero column for the padding pairs
            values = torch.cat([values, values.new_zeros(values.size(0), 1)], dim=1)
        return values.index_select(1, sources)

    @staticmethod
    def backward(ctx, grad: Tensor):
        positions, = ctx.saved_tensors
        return grad.index_select(1, positions), None, None


def hsa_log_partition(q: Tensor, k: Tensor, hierarchy: Hierarchy,
                      scale: Optional[float] = None, *, pair_bias: Optional[Tensor] = None,
                      energy: str = 'dot', causal: bool = False) -> Tensor:
    r""":math:`\phi` of every node, ``[N + M, H]`` (``[N + M]`` for one
    head): :math:`\phi(i) = -s_{ii}` at a leaf and
    :math:`\phi(A) = -\sum_B \frac{|B|}{|A|} \log Z_B` at a cluster;
    :math:`|A|\,\phi(A)` is the minimum of the KL objective over the
    leaves of :math:`A` (up to the softmax normalisers). Differentiable
    (twice) by autograd: :math:`-\nabla_{q_i} N\phi(\mathrm{root}) =
    \sum_j a_{ij} \nabla_{q_i} s_{ij}`, i.e. :math:`\text{scale}\cdot AK`
    for the dot energy, for one tree (for a forest, sum
    :math:`|T|\,\phi(\mathrm{root}_T)` over its trees). Keywords as in
    :func:`hsa`."""
    (q, k), single_head, dtype = prepare_inputs((q, k), hierarchy)
    scale = resolve_scale(scale, q)
    check_not_strict(causal)
    terms = check_score_terms(pair_bias, energy, causal, hierarchy, q)
    if terms.euclidean:
        q, k = _centered(q, k)
    if q.is_meta:
        phi = _shapes_only(q, q, hierarchy, k, terms.pair_bias)[1]
    else:
        plan = scatter_plan(hierarchy, q.device)
        phi = scatter_bottom_up(q, k, plan, scale, terms)[0]
        if terms.euclidean:  # the row term the sweeps leave out
            phi = phi - subtree_mean(terms.row_term(q, scale), plan)
    phi = phi.to(dtype)
    return phi.squeeze(1) if single_head else phi


class BlockAttention(NamedTuple):
    r"""HSA attention at block level: enough to rebuild the dense matrix
    (see :func:`block_attention_to_dense`)."""
    #: ``[2, E]`` ordered sibling pairs :math:`(B, C)`, diagonal included.
    pair_index: Tensor
    #: ``[E, H]`` attention from one leaf of :math:`B` to one leaf of
    #: :math:`C` relative to the mass reaching :math:`B`'s parent,
    #: :math:`\exp \bar s(B,C) / Z_B`; on the diagonal :math:`\mu(B)`.
    pair_weight: Tensor
    #: ``[N + M, H]`` :math:`P(X)`: attention mass a leaf below :math:`X`
    #: keeps inside :math:`X` (1 at roots); :math:`a_{ii} = P(i)`.
    subtree_mass: Tensor


@torch.no_grad()
def hsa_block_weights(q: Tensor, k: Tensor, hierarchy: Hierarchy,
                      scale: Optional[float] = None, *, pair_bias: Optional[Tensor] = None,
                      energy: str = 'dot', causal: bool = False) -> BlockAttention:
    r"""Block-level HSA weights, one per ordered sibling pair and head,
    plus the per-subtree masses. ``O(sum of squared branching)`` memory.
    Keywords as in :func:`hsa` (later siblings get weight 0 when
    :obj:`causal`)."""
    (q, k), single_head, _ = prepare_inputs((q, k), hierarchy)
    scale = resolve_scale(scale, q)
    check_not_strict(causal)
    terms = check_score_terms(pair_bias, energy, causal, hierarchy, q)
    if q.is_meta:
        return _block_weight_shapes(q, k, hierarchy, terms.pair_bias, single_head)
    layout = slot_layout(hierarchy, q.device)
    heads = q.size(1)
    terms = terms._replace(pair_bias=padded_pair_bias(terms.pair_bias, hierarchy, q))
    if terms.euclidean:
        q, k = _centered(q, k)
    with autocast_off(q.device):
        state = bottom_up(q, k, q.new_zeros(q.size(0), heads, 0), layout, scale, terms)
        result = top_down(q.new_zeros(q.size(0), heads, 0), layout, state)
    # log P of every node: leaves from the sweep, clusters and roots from their slots
    log_mass = q.new_zeros(hierarchy.num_nodes, heads)
    log_mass[:hierarchy.num_leaves] = result.leaf_log_mass
    clusters = torch.arange(hierarchy.num_leaves, hierarchy.num_nodes, device=q.device)
    rows = layout.rows(layout.node_slot[clusters], heads)
    log_mass[clusters] = result.down[rows.view(-1), 0].view(-1, heads)
    pair_index = hierarchy.sibling_pairs()
    row, col = pair_index
    padded = torch.cat([w.flatten(1) for w in state.weights], dim=1) if state.weights \
        else q.new_empty(heads, 0)
    weights = padded[:, sibling_pair_positions(hierarchy, q.device)].t()  # [E, H]
    # per leaf of C: the block's share divided by |C|; mu(B) on the diagonal
    count = hierarchy.num_leaves_below.to(q.device, weights.dtype)[col]
    pair_weight = torch.where((row == col)[:, None], weights, weights / count[:, None])
    result = BlockAttention(pair_index, pair_weight, log_mass.exp())
    if single_head:
        result = BlockAttention(result.pair_index, result.pair_weight[:, 0],
                                result.subtree_mass[:, 0])
    return result


def _block_weight_shapes(q: Tensor, k: Tensor, hierarchy: Hierarchy,
                         pair_bias: Optional[Tensor], single_head: bool) -> BlockAttention:
    r""":func:`hsa_block_weights` on the meta device: shapes only."""
    link = _shapes_only(q, q, hierarchy, k, pair_bias)[1][:1]
    pair_index = hierarchy.sibling_pairs()
    pair_weight = link.expand(pair_index.size(1), -1)
    subtree_mass = link.expand(hierarchy.num_nodes, -1)
    if single_head:
        return BlockAttention(pair_index, pair_weight[:, 0], subtree_mass[:, 0])
    return BlockAttention(pair_index, pair_weight, subtree_mass)


def block_attention_to_dense(attention: BlockAttention, hierarchy: Hierarchy) -> Tensor:
    r"""Rebuilds the dense ``[H, N, N]`` (or ``[N, N]``) matrix from
    :class:`BlockAttention`: :math:`a_{ij} = P(\mathrm{parent}(B))\, w_{BC}`
    for :math:`i \in B \neq C \ni j` siblings, :math:`a_{ii} = P(i)`."""
    rows, cols = hierarchy.sibling_pairs()
    if (attention.pair_index.shape != (2, rows.numel())
            or attention.subtree_mass.size(0) != hierarchy.num_nodes
            or not torch.equal(attention.pair_index.cpu(), torch.stack([rows, cols]).cpu())):
        raise ValueError(f"the block attention ({attention.pair_index.size(-1)} sibling pairs, "
                         f"{attention.subtree_mass.size(0)} nodes) is not that of this hierarchy "
                         f"({rows.numel()} sibling pairs, {hierarchy.num_nodes} nodes): pass the "
                         f"hierarchy it was computed on")
    single_head = attention.pair_weight.dim() == 1
    pair_weight = attention.pair_weight[:, None] if single_head else attention.pair_weight
    mass = attention.subtree_mass[:, None] if single_head else attention.subtree_mass
    num_leaves = hierarchy.num_leaves
    parent = hierarchy.parent.to(pair_weight.device)
    leaves_of = _leaves_below(hierarchy)
    dense = pair_weight.new_zeros(pair_weight.size(1), num_leaves, num_leaves)
    rows, cols = attention.pair_index.tolist()
    for e, (row, col) in enumerate(zip(rows, cols)):
        if row == col:
            continue
        i, j = leaves_of[row], leaves_of[col]
        weight = mass[parent[row]] * pair_weight[e]  # [H]
        dense[:, i[:, None], j[None, :]] = weight[:, None, None]
    diagonal = torch.arange(num_leaves, device=dense.device)
    dense[:, diagonal, diagonal] = mass[:num_leaves].t()
    return dense[0] if single_head else dense


def _leaves_below(hierarchy: Hierarchy):
    parent = hierarchy.parent.tolist()
    leaves = [[] for _ in parent]
    for leaf in range(hierarchy.num_leaves):
        for node in path_to_root(leaf, parent):
            leaves[node].append(leaf)
    return [torch.tensor(members, dtype=torch.long) for members in leaves]


def _centered(q: Tensor, k: Tensor):
    r""":math:`q - c` and :math:`k - c` for the keys' mean :math:`c` (per
    head). :math:`\Vert q_i - k_j \Vert^2` does not change, but the
    sweeps expand it into :math:`q \cdot k` and :math:`\Vert k \Vert^2`
    terms, which cancel catastrophically when q and k share a large offset;
    centred, they stay at the scale of the differences. :math:`c` is
    detached: the result does not depend on it."""
    center = k.detach().mean(0, keepdim=True)
    return q - center, k - center


