r"""The input checks of functional HSA, shared by every entry point
(:func:`~hsa_geo.functional.hsa`, :func:`~hsa_geo.functional.hsa_dense`,
:func:`~hsa_geo.distributed.distributed_hsa`, the layers): shapes, dtypes
and devices of q, k and v, the score scale, the score terms (pair bias,
energy, causal) and the memory the sibling pairs need. They run at the
boundary, once per call, never inside the sweeps."""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from hsa_geo.functional.terms import ScoreTerms
from hsa_geo.hierarchy.hierarchy import Hierarchy

_UPCAST = (torch.float16, torch.bfloat16)
ENERGIES = ('dot', 'euclidean')


def prepare_inputs(tensors: Tuple[Tensor, ...], hierarchy: Hierarchy):
    r"""Checks shapes against the hierarchy, adds the head axis to 2-D
    input and upcasts half precision."""
    if not isinstance(hierarchy, Hierarchy):
        raise TypeError(f"'hierarchy' must be a hsa_geo.Hierarchy (got {type(hierarchy).__name__})")
    names = 'qkv'
    check_types(tensors)
    first = tensors[0]
    if first.dim() not in (2, 3):
        raise ValueError(f"q must be [N, H, D] or [N, D] (got shape {tuple(first.shape)})")
    for name, tensor in zip(names, tensors):
        if tensor.dim() != first.dim() or tensor.shape[:-1] != first.shape[:-1]:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, incompatible with q's "
                             f"{tuple(first.shape)} (same number of rows and heads needed)")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor (got {tensor.dtype})")
        if tensor.device != first.device:
            raise ValueError(f"{name} is on {tensor.device} but q is on {first.device}")
    if first.size(-1) == 0:
        raise ValueError(f"q and k need at least one feature per head (got shape "
                         f"{tuple(first.shape)}): the scores are q . k / sqrt(D)")
    if first.dim() == 3 and first.size(1) == 0:
        raise ValueError(f"q has no heads (shape {tuple(first.shape)})")
    if tensors[1].size(-1) != first.size(-1):
        raise ValueError(f"k's last dimension {tensors[1].size(-1)} differs from q's "
                         f"{first.size(-1)}")
    if first.size(0) != hierarchy.num_leaves:
        raise ValueError(f"q has {first.size(0)} rows but the hierarchy has "
                         f"{hierarchy.num_leaves} leaves (one row per leaf needed)")
    return to_compute(tensors)


def check_types(tensors: Tuple[Tensor, ...]) -> None:
    for name, tensor in zip('qkv', tensors):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (got {type(tensor).__name__}); "
                            f"convert it with torch.as_tensor")


def to_compute(tensors: Tuple[Tensor, ...]):
    r"""Adds the head axis to 2-D input and upcasts half precision (no
    check: traced as is under :func:`torch.compile`)."""
    single_head = tensors[0].dim() == 2
    dtype = tensors[0].dtype
    compute = torch.float32 if dtype in _UPCAST else dtype
    tensors = tuple((t.unsqueeze(1) if single_head else t).to(compute) for t in tensors)
    return tensors, single_head, dtype


def resolve_scale(scale, q: Tensor) -> float:
    r"""The score scale as a number (:math:`1/\sqrt{D}` by default)."""
    if scale is None:
        return q.size(-1) ** -0.5
    if isinstance(scale, Tensor) and scale.requires_grad:
        raise ValueError("'scale' is a tensor that requires grad, but HSA takes the scale as a "
                         "number (its gradient would be lost); to learn a temperature, multiply "
                         "q by it before calling hsa")
    if isinstance(scale, Tensor) and scale.numel() != 1:
        raise ValueError(f"'scale' must be one number (got a tensor of shape {tuple(scale.shape)})")
    if not math.isfinite(float(scale)):
        raise ValueError(f"'scale' must be a finite number (got {float(scale)})")
    return float(scale)


def check_terms(pair_bias: Optional[Tensor], energy: str, causal: bool,
                hierarchy: Hierarchy, q: Tensor) -> Optional[Tensor]:
    r"""Validates the score terms; returns :obj:`pair_bias` as ``[E, H]``
    in :obj:`q`'s compute dtype (the pair bias of
    :func:`check_score_terms`)."""
    return check_score_terms(pair_bias, energy, causal, hierarchy, q).pair_bias


def check_score_terms(pair_bias: Optional[Tensor], energy: str, causal: bool,
                      hierarchy: Hierarchy, q: Tensor) -> ScoreTerms:
    r"""Validates the score terms; returns them as one
    :class:`~hsa_geo.functional.terms.ScoreTerms`, the pair bias as
    ``[E, H]`` in :obj:`q`'s compute dtype."""
    check_energy(energy)
    check_causal(causal)
    if causal:
        hierarchy.check_contiguous()
    if pair_bias is None:
        return ScoreTerms.of(energy, None, causal)
    if not isinstance(pair_bias, Tensor) or not pair_bias.is_floating_point():
        raise ValueError("'pair_bias' must be a floating-point tensor [E, H] or [E]")
    num_pairs, heads = hierarchy.num_sibling_pairs, q.size(1)
    if pair_bias.dim() == 1:
        pair_bias = pair_bias[:, None]
    if pair_bias.dim() != 2 or pair_bias.size(0) != num_pairs or pair_bias.size(1) not in (1, heads):
        raise ValueError(f"'pair_bias' has shape {tuple(pair_bias.shape)}, but the hierarchy has "
                         f"E={num_pairs} ordered sibling pairs (hierarchy.sibling_pairs()) "
                         f"and q has {heads} heads: expected [{num_pairs}, {heads}] or "
                         f"[{num_pairs}]")
    if pair_bias.device != q.device:
        raise ValueError(f"'pair_bias' is on {pair_bias.device} but q is on {q.device}")
    finite = torch.isfinite(pair_bias).all(1)
    if not pair_bias.is_meta and not bool(finite.all()):  # meta: shapes only
        pair = int((~finite).nonzero()[0])
        row, col = hierarchy.plan(q.device).sibling_pairs()[:, pair].tolist()
        raise ValueError(f"'pair_bias' is not finite at row {pair}, the pair of nodes "
                         f"({row}, {col}); to keep two subtrees apart, split the hierarchy "
                         f"or use causal=True rather than an infinite bias")
    return ScoreTerms.of(energy, pair_bias.to(q.dtype).expand(num_pairs, heads), causal)


def check_energy(energy) -> None:
    if energy not in ENERGIES:
        raise ValueError(f"Unknown energy {energy!r}; choose one of {list(ENERGIES)}")


def check_causal(causal) -> None:
    r"""Raises a :class:`ValueError` unless :obj:`causal` is :obj:`False`,
    :obj:`True` or :obj:`"strict"`."""
    if not isinstance(causal, bool) and causal != 'strict':
        raise ValueError(f"'causal' must be False, True or 'strict' (got {causal!r})")


def check_not_strict(causal) -> None:
    if causal == 'strict':
        raise ValueError("causal='strict' attention is not block-constant across rows: it "
                         "has no per-subtree log-partition, block weights or self weights "
                         "from the sweeps; use causal=True, or hsa_dense(..., "
                         "causal='strict') for the matrix")


def check_cluster_ids(nodes, hierarchy: Hierarchy, device) -> Tensor:
    r""":obj:`nodes` as a ``[S]`` int64 tensor on :obj:`device` after
    checking that it holds distinct cluster ids of :obj:`hierarchy`
    (:math:`N \le` id :math:`< N + M`); a :class:`ValueError` names the
    first entry that does not."""
    if not isinstance(nodes, Tensor) or nodes.is_floating_point() or nodes.is_complex() \
            or nodes.dtype == torch.bool:
        kind = nodes.dtype if isinstance(nodes, Tensor) else type(nodes).__name__
        raise ValueError(f"'nodes' must be an integer tensor of cluster ids (got {kind})")
    if nodes.dim() != 1:
        raise ValueError(f"'nodes' must be one-dimensional, [S] cluster ids (got shape "
                         f"{tuple(nodes.shape)})")
    first, end = hierarchy.num_leaves, hierarchy.num_nodes
    outside = (nodes < first) | (nodes >= end)
    if bool(outside.any()):
        position = int(outside.nonzero()[0])
        node = int(nodes[position])
        what = 'a leaf' if 0 <= node < first else 'not a node'
        clusters = f"ids {first} to {end - 1}" if end > first else "it has none"
        raise ValueError(f"'nodes'[{position}] = {node} is {what} of the hierarchy: summary "
                         f"rows exist for its clusters only ({clusters})")
    ordered, order = nodes.sort(stable=True)
    repeated = ordered[1:] == ordered[:-1]
    if bool(repeated.any()):
        later, earlier = order[1:][repeated], order[:-1][repeated]
        pick = int(later.argmin())
        position, node = int(later[pick]), int(nodes[later[pick]])
        raise ValueError(f"'nodes'[{position}] = {node} repeats 'nodes'[{int(earlier[pick])}]: "
                         f"each cluster's summary row can be asked for once")
    return nodes.to(device=device, dtype=torch.long)


#: Per-pair numbers the sweeps hold at once, per head: the weights, their
#: gradients and the couplings (or the edge lists of the scatter backend).
PAIR_BUFFERS = 3


def check_pair_memory(hierarchy: Hierarchy, q: Tensor) -> None:
    r"""Refuses at once, naming the widest family, a hierarchy whose
    :math:`\sum_A b_A^2` sibling pairs would not fit in this machine's
    memory (a flat tree over 200,000 leaves needs some 160 GB), instead of
    failing deep inside an allocation."""
    pairs = hierarchy.num_sibling_pairs
    needed = PAIR_BUFFERS * pairs * q.size(1) * q.element_size()
    available = _physical_memory()
    if available is not None and needed > available:
        children = hierarchy.num_children
        widest = int(children.argmax())
        raise MemoryError(
            f"HSA over this hierarchy needs about {needed / 2**30:.0f} GiB for its {pairs} "
            f"sibling pairs x {q.size(1)} heads, more than this machine's "
            f"{available / 2**30:.0f} GiB: node {widest} alone has {int(children[widest])} "
            f"children (b^2 pairs). Split wide families first, e.g. "
            f"hsa_geo.hierarchy.limit_children(hierarchy, max_children=64)")


def _physical_memory() -> Optional[int]:
    try:
        return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return None
