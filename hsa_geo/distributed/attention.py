r"""Exact HSA over a hierarchy partitioned across ranks.

Every rank runs the sweeps over the subtrees of its own parts; the ranks
then exchange one summary per part (mean query, key and value,
:math:`\phi`), sweep the small top tree, each on its own copy, and finish
locally. For a leaf :math:`i` below part :math:`B`, with :math:`y^B_i` the
HSA output of :math:`B`'s subtree alone,

.. math::
    y_i = P(B)\,\big(y^B_i - \bar v_B\big) + y_B,

where :math:`P(B)` is the attention mass a leaf of :math:`B` keeps inside
:math:`B` and :math:`y_B` the output of :math:`B` treated as one leaf of
the top tree (docs/distributed.rst). Both come from the top sweep, which
needs only the parts' summaries: :math:`\phi(B)` depends on :math:`B`'s
subtree alone, and the block scores are bilinear in the mean query and key.
The result equals :func:`hsa_geo.functional.hsa` on the whole hierarchy;
gradients flow through the exchange (an all-reduce forward and one
backward).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from hsa_geo.distributed.agreement import CallSignature
from hsa_geo.distributed.collectives import all_reduce_sum, share_rows
from hsa_geo.distributed.partition import HierarchyShard
from hsa_geo.functional.attention import hsa_with_summaries, leaf_pair_index
from hsa_geo.functional.checks import (ENERGIES, check_causal, check_score_terms, resolve_scale,
                                       to_compute)
from hsa_geo.functional.engines import scatter_plan
from hsa_geo.functional.terms import ScoreTerms
from hsa_geo.functional.scatter_sweep import (NodeSummaries, leaf_self_scores,
                                              subtree_mean, summaries_bottom_up,
                                              summaries_top_down)


@torch.compiler.disable  # collectives and the shard's bookkeeping run eagerly
def distributed_hsa(q: Tensor, k: Tensor, v: Tensor, shard: HierarchyShard,
                    scale: Optional[float] = None, *,
                    pair_bias: Optional[Tensor] = None, top_pair_bias: Optional[Tensor] = None,
                    energy: str = 'dot', causal: bool = False,
                    group: Optional[dist.ProcessGroup] = None) -> Tensor:
    r"""HSA over the leaves of a hierarchy spread over the ranks of
    :obj:`group`, this rank's rows: exactly the rows
    :obj:`shard.leaves` of :func:`hsa_geo.functional.hsa` over the whole
    hierarchy, differentiable. Every rank of the group calls it (a rank
    without leaves too, with ``[0, H, D]`` tensors), and every rank calls
    backward through its output: the exchange is collective. Before each
    exchange the ranks compare their calls (options, partition, the call's
    number and pass): ranks that disagree get a :class:`ValueError`
    naming the ranks and what differs, and a failure of the exchange (a
    peer gone, the group's timeout) a :class:`RuntimeError` naming this
    rank and the call.

    Communication per call: one all-reduce of :math:`P \cdot H \cdot (2D +
    D_v + 1)` numbers forward (:math:`P` parts; one more column, the mean
    squared key norm, and :math:`HD + 1` numbers for the keys' common
    centre with the Euclidean energy) and one as large backward, each after
    an all-gather of 16 numbers per rank (the check); none of it grows with
    :math:`N`.

    Args:
        q (torch.Tensor): This rank's queries ``[n_r, H, D]`` (or
            ``[n_r, D]``), rows in the order of :obj:`shard.leaves`.
        k (torch.Tensor): Keys, same shape.
        v (torch.Tensor): Values ``[n_r, H, D_v]`` (or ``[n_r, D_v]``).
        shard (HierarchyShard): This rank's shard of the partition
            (:meth:`HierarchyPartition.shard`).
        scale (float, optional): Score scale. (default: :math:`1/\sqrt{D}`)
        pair_bias (torch.Tensor, optional): Bias of the sibling pairs of
            :obj:`shard.local` ``[E_r, H]`` (or ``[E_r]``); the rows
            :obj:`shard.pair_index` of a global pair bias.
            (default: :obj:`None`)
        top_pair_bias (torch.Tensor, optional): Bias of the sibling pairs of
            the top tree ``[E_top, H]`` (or ``[E_top]``), the same on every
            rank; the rows :obj:`shard.top.pair_index` of a global pair
            bias. Its gradient on each rank is this rank's share: summed
            over ranks (as data-parallel training does with parameters) it
            is the full gradient. (default: :obj:`None`)
        energy (str, optional): :obj:`"dot"` or :obj:`"euclidean"`.
            (default: :obj:`"dot"`)
        causal (bool, optional): The block-constant causal restriction
            (:obj:`"strict"` is not block-constant and cannot be split
            this way). (default: :obj:`False`)
        group (ProcessGroup, optional): The ranks (default: the world).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("distributed_hsa needs torch.distributed initialised "
                           "(torch.distributed.init_process_group, or run under torchrun)")
    _check_shard(shard, group)
    if energy not in ENERGIES:
        raise ValueError(f"Unknown energy {energy!r}; choose one of {list(ENERGIES)}")
    check_causal(causal)
    if causal == 'strict':
        raise ValueError("causal='strict' projects every row on its own: it is not "
                         "block-constant and has no per-part summary; use causal=True")
    (q, k, v), single_head, dtype = _check_inputs(q, k, v, shard)
    # as hsa: float32 or float64 throughout, even inside torch.autocast
    with torch.autocast(q.device.type, enabled=False):
        out = _distributed(q, k, v, shard, scale, pair_bias, top_pair_bias, energy,
                           causal, group)
    out = out.to(dtype)
    return out.squeeze(1) if single_head else out


def _distributed(q: Tensor, k: Tensor, v: Tensor, shard: HierarchyShard,
                 scale: Optional[float], pair_bias: Optional[Tensor],
                 top_pair_bias: Optional[Tensor], energy: str, causal: bool, group) -> Tensor:
    dim = q.size(2)
    scale = resolve_scale(scale, q)
    top = shard.top
    try:  # the top tree's bias is checked as hsa checks a pair bias
        top_terms = check_score_terms(top_pair_bias, energy, causal, top.hierarchy, q)
    except ValueError as error:
        raise ValueError(f"top_pair_bias (over shard.top.hierarchy): {error}") from None
    top_bias, euclidean = top_terms.pair_bias, top_terms.euclidean
    terms = top_terms._replace(pair_bias=None)
    if shard.local is not None:
        terms = check_score_terms(pair_bias, energy, causal, shard.local, q)
    # every check that may fail on one rank alone is behind us: the ranks
    # now compare their calls before the first exchange, and again before
    # the backward's
    signature = CallSignature.of(shard, q, v, scale, energy, causal, top_bias, group)
    signature.agree()
    if euclidean:  # one centre for all ranks (the result does not depend on it)
        q, k = _centered_globally(q, k, signature.name, group)
    local_out, summaries = _part_summaries(q, k, v, shard, scale, terms, top_bias)
    if torch.is_grad_enabled() and not summaries.requires_grad:
        # a rank without leaves (or without inputs that need gradients)
        # still takes part in the backward's all-reduce
        summaries = summaries.detach().requires_grad_()
    # every rank's summaries, in top-tree leaf order [P, H, width]
    mine = shard.parts.to(q.device)
    rows = share_rows(summaries, mine, top.num_parts, signature.name, group,
                      lambda: signature.agree(backward=True))
    part_out, part_log_mass = _top_sweep(rows, top, scale, top_terms, dim, v.size(2))
    # y_i = P(B) y^B_i + u_B, with u_B = y_B - P(B) mean_v(B) what reaches B from outside
    leaf_part = shard.leaf_part.to(q.device)
    mass = part_log_mass[mine].exp()  # [p_r, H]
    mean_v = summaries[..., 2 * dim:2 * dim + v.size(2)]
    incoming = part_out[mine] - mass[..., None] * mean_v
    return torch.addcmul(incoming[leaf_part], local_out, mass[leaf_part][..., None])


def _check_shard(shard: HierarchyShard, group) -> None:
    if not isinstance(shard, HierarchyShard):
        raise TypeError(f"'shard' must be a HierarchyShard (HierarchyPartition.shard(rank)); "
                        f"got {type(shard).__name__}")
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    if shard.world_size != world_size or shard.rank != rank:
        raise ValueError(f"rank {rank} of {world_size} was given the shard of rank {shard.rank} "
                         f"of a partition over {shard.world_size} ranks")


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, shard: HierarchyShard):
    for name, tensor in zip('qkv', (q, k, v)):
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor")
        if tensor.dim() != q.dim() or tensor.dim() not in (2, 3) or \
                tensor.shape[:-1] != q.shape[:-1]:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; q, k, v must be "
                             f"[n, H, D] (or [n, D]) with the same rows and heads as q's "
                             f"{tuple(q.shape)}")
    if k.size(-1) != q.size(-1) or q.size(-1) == 0:
        raise ValueError(f"q and k need the same, positive, last dimension "
                         f"(got {q.size(-1)} and {k.size(-1)})")
    if q.size(0) != shard.num_leaves:
        raise ValueError(f"rank {shard.rank}: q has {q.size(0)} rows but the shard holds "
                         f"{shard.num_leaves} leaves (x[shard.leaves] gives one row per leaf)")
    return to_compute((q, k, v))


def _centered_globally(q: Tensor, k: Tensor, call: str, group) -> Tuple[Tensor, Tensor]:
    r"""q and k minus the mean key over all ranks (detached)."""
    total = torch.cat([k.detach().sum(0).reshape(-1), k.new_full((1, ), k.size(0))])
    total = all_reduce_sum(total, f'the forward of {call}', group)
    center = (total[:-1] / total[-1].clamp(min=1)).view(1, *k.shape[1:])
    return q - center, k - center


def _part_summaries(q: Tensor, k: Tensor, v: Tensor, shard: HierarchyShard, scale: float,
                    terms: ScoreTerms, top_bias: Optional[Tensor]):
    r"""The local output and the parts' summaries ``[p_r, H, C]``.

    A summary row per part and head: mean query, key and value,
    :math:`\phi` as the sweeps hold it (with the Euclidean energy without
    the row term, for the common centre) and, for that energy, the mean
    squared key norm. The engine computes the rows of the parts that are
    clusters with the output (and takes their gradients into its backward);
    a part that is one leaf is that leaf's row. A bundle of whole trees
    keeps a row of zeros: as a root of the top tree it receives nothing, and
    what it sends no other part reads."""
    heads, dim, value_dim = q.size(1), q.size(2), v.size(2)
    euclidean = terms.euclidean
    width = 2 * dim + value_dim + 1 + int(euclidean)
    rows = q.new_zeros(shard.parts.numel(), heads, width)
    if shard.local is None:
        # no leaves, no rows; but the rows depend on q, k and v as on every
        # other rank, so that a backward pass towards them (autograd.grad
        # included) reaches the collective on every rank
        return v, rows + 0.0 * (q.sum() + k.sum() + v.sum())
    local = shard.local
    roots = shard.part_root.to(q.device)  # -1 for the bundle
    clusters = (roots >= local.num_leaves).nonzero().view(-1)
    leaves = ((roots >= 0) & (roots < local.num_leaves)).nonzero().view(-1)
    local_out, cluster_rows = hsa_with_summaries(q, k, v, local, scale, terms, roots[clusters])
    rows = rows.index_put((clusters, ), cluster_rows)
    if leaves.numel() > 0:
        # phi = -s_ii; the leaf's own pair lies in the top tree, so does its bias
        own_q, own_k, own_v = (t[roots[leaves]] for t in (q, k, v))
        own_pair = None
        if top_bias is not None:
            own_pairs = leaf_pair_index(shard.top.hierarchy, q.device)
            own_pair = own_pairs[shard.parts.to(q.device)[leaves]]
        self_score = leaf_self_scores(own_q, own_k, own_pair, scale,
                                      terms._replace(pair_bias=top_bias))
        columns = [own_q, own_k, own_v, -self_score[..., None]]
        if euclidean:
            columns.append((own_k * own_k).sum(-1)[..., None])
        rows = rows.index_put((leaves, ), torch.cat(columns, dim=-1))
    return local_out, rows


def _top_sweep(rows: Tensor, top, scale: float, top_terms: ScoreTerms, dim: int,
               value_dim: int):
    r"""Output ``[P, H, D_v]`` and :math:`\log P` ``[P, H]`` of every part
    as a leaf of the top tree, from the parts' summary rows."""
    plan = scatter_plan(top.hierarchy, rows.device)
    count = top.num_leaves_below.to(rows.device, rows.dtype)  # [P + T]
    node_rows = subtree_mean(rows, plan, leaf_count=count[:top.num_parts])  # [P + T, H, width]
    query, key = node_rows[..., :dim], node_rows[..., dim:2 * dim]
    value = rows[..., 2 * dim:2 * dim + value_dim]
    # the rows hold the mean squared key norm; its column term is linear in it
    column = -0.5 * scale * node_rows[..., -1] if top_terms.euclidean else None
    nodes = NodeSummaries(count, query, key, column, rows[..., 2 * dim + value_dim])
    _, log_weights, kept_pairs = summaries_bottom_up(nodes, plan, scale, top_terms)
    node_value = node_rows[..., 2 * dim:2 * dim + value_dim]
    return summaries_top_down(value, node_value, plan, log_weights, kept_pairs)
