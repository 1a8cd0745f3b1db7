r"""The fused HSA sweeps in Triton: the dynamic programme of the CPU kernel
(``hsa_geo/csrc/hsa_sweeps.cpp``) with one Triton program per family and
head, one launch per level and sweep.

Each program holds its family's :math:`b` children as a dense block
(``BLOCK_B``, a power of two :math:`\ge b` and :math:`\ge 16`, masked
beyond :math:`b`) and does what one iteration of the kernel's loops does
(docs/derivation.rst, "Forward pass" and "Backward pass"): bottom-up, the
scores of the children, their row log-sum-exp, weights and
:math:`\log \mu`, and the parent's :math:`\phi` and leaf-weighted means;
top-down, the outputs, the messages and :math:`\log P`; then the two
backward sweeps. The programs are in
:mod:`hsa_geo.functional.triton_kernels`.

It reads the hierarchy as :class:`~hsa_geo.hierarchy.plan.FamilyTables`
(families in bottom-up level order, children in sibling order, the
:math:`b^2` pairs of every family row-major), so a pair bias ``[H, E]``
and its gradient pass as they are, and saves what the kernel saves: the
clusters' rows ``[M, H, 2D + D_v + 2]``, the weights ``[H, E]`` and
:math:`\log P` ``[N + M, H]``.

Select it with :func:`hsa_geo.functional.engine` (``engine('triton')``).
``'auto'`` does not pick it: so far it has only run in Triton's
interpreter, and ``'auto'`` keeps the tensor sweeps on GPUs until
``benchmarks/gpu_checks.sh`` has validated it on one. It runs on CUDA
tensors, and on CPU tensors in
Triton's interpreter (``TRITON_INTERPRET=1`` set before :mod:`triton` is
first imported, see :func:`interpreting`: slow, for tests). Inputs are
computed in float32 (float16 and bfloat16 are upcast by the caller).

What it refuses, each with an error that names the engine to use instead:
float64 inputs, ``causal='strict'``, higher-order gradients, families of
more than :data:`MAX_CHILDREN` children and heads wider than
:data:`MAX_HEAD_WIDTH` (one family is one block of registers).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from hsa_geo.functional.family_sweeps import FamilySweeps, FamilySweepsFunction
from hsa_geo.hierarchy.plan import FamilyTables

#: Widest family one program holds (its b x b scores and weights live in
#: registers); wider hierarchies run on engine('tensor').
MAX_CHILDREN = 128
#: Widest head (q, k and v features per head) one program holds.
MAX_HEAD_WIDTH = 256

STRICT_CAUSAL_REFUSAL = ("engine('triton') runs the sweeps over the tree, and causal='strict' "
                         "is no such sweep; use engine('auto') (or causal=True)")


@dataclass
class TritonPlan:
    r"""What the Triton sweeps read of one hierarchy on one device: the
    :class:`~hsa_geo.hierarchy.plan.FamilyTables` there, the leaves below
    every node and one launch per level."""
    num_leaves: int
    num_nodes: int
    num_pairs: int  #: :math:`E = \sum_A b_A^2`
    family_node: Tensor  #: ``[F]`` (int64, on the device)
    child_ptr: Tensor  #: ``[F + 1]``
    children: Tensor  #: node ids, sibling order
    pair_ptr: Tensor  #: ``[F + 1]``
    count: Tensor  #: ``[N + M]`` leaves below every node (float32)
    log_count: Tensor  #: ``[N + M]`` their logarithms
    #: ``(first family, families, BLOCK_B)`` of every level, deepest first
    levels: Tuple[Tuple[int, int, int], ...]
    widest: int  #: the largest number of children of a family (0 without families)


def build_triton_plan(tables: FamilyTables, num_leaves: int, device) -> TritonPlan:
    r""":class:`TritonPlan` of a hierarchy's family tables: the leaf counts
    bottom-up, one segment sum per level, :math:`O(N + M)`."""
    device = torch.device(device)
    sizes = tables.child_ptr.diff()
    count = torch.ones(tables.num_nodes, dtype=torch.float64)
    levels = []
    level_ptr = tables.level_ptr.tolist()
    for first, end in zip(level_ptr[:-1], level_ptr[1:]):
        if end == first:
            continue
        level_sizes = sizes[first:end]
        family = torch.repeat_interleave(torch.arange(first, end), level_sizes)
        child = tables.children[int(tables.child_ptr[first]):int(tables.child_ptr[end])]
        parents = tables.family_node[first:end]
        count[parents] = 0
        count.index_add_(0, tables.family_node[family], count[child])
        levels.append((first, end - first, _block(int(level_sizes.max()))))
    widest = int(sizes.max()) if sizes.numel() else 0
    return TritonPlan(num_leaves=num_leaves, num_nodes=tables.num_nodes,
                      num_pairs=tables.num_pairs,
                      family_node=tables.family_node.to(device),
                      child_ptr=tables.child_ptr.to(device),
                      children=tables.children.to(device), pair_ptr=tables.pair_ptr.to(device),
                      count=count.to(device, torch.float32),
                      log_count=count.log().to(device, torch.float32),
                      levels=tuple(levels), widest=widest)


def _block(size: int) -> int:
    r"""The block of ``size`` entries: a power of two, at least 16 (``tl.dot``)."""
    return max(16, 1 << max(size - 1, 0).bit_length())


def interpreting() -> bool:
    r"""Whether Triton runs its programs in its interpreter in this process.
    Triton reads ``TRITON_INTERPRET`` when it decorates a program, and it
    decorates its standard library (``tl.sum``, ``tl.max``, ...) when
    :mod:`triton` is first imported, which :mod:`torch_geometric` does: the
    variable counts if it is set before that, and this reads what was
    decided then."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(tl.sum, InterpretedFunction)


_PROGRAMS = None


def programs():
    r"""The module of Triton programs (:mod:`hsa_geo.functional.triton_kernels`),
    imported on first use and decorated as Triton's standard library was
    (:func:`interpreting`), whatever ``TRITON_INTERPRET`` says by then."""
    global _PROGRAMS
    if _PROGRAMS is None:
        interpret = interpreting()
        try:
            from triton import knobs
        except ImportError:  # triton < 3.3 reads the variable when it decorates
            from hsa_geo.functional import triton_kernels
        else:
            with knobs.runtime.scope():
                knobs.runtime.interpret = interpret
                from hsa_geo.functional import triton_kernels
        _PROGRAMS = triton_kernels
    return _PROGRAMS


def _programs_for(q: Tensor):
    r"""The programs that run on :obj:`q`'s device, after the checks."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        raise RuntimeError("engine('triton') needs the triton package (pip install "
                           "'triton>=3.0'); use engine('tensor') or engine('auto')") from error
    if q.device.type == 'cpu' and not interpreting():
        raise RuntimeError("engine('triton') runs on CUDA tensors, or on CPU tensors only in "
                           "Triton's interpreter (TRITON_INTERPRET=1 before triton is first "
                           "imported, for tests); on the CPU use engine('kernel') or "
                           "engine('auto')")
    if q.device.type not in ('cpu', 'cuda'):
        raise RuntimeError(f"engine('triton') runs on CUDA tensors (got {q.device}); use "
                           f"engine('tensor')")
    return programs()


def _check(q: Tensor, k: Tensor, v: Tensor, pair_bias: Optional[Tensor], plan: TritonPlan):
    if q.dtype != torch.float32 or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"engine('triton') computes in float32 (got {q.dtype}; float16 and "
                        f"bfloat16 are upcast by hsa); for float64 use engine('kernel') on the "
                        f"CPU or engine('tensor')")
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"engine('triton'): q, k [N, H, D] and v [N, H, D_v] expected (got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)})")
    if q.size(0) != plan.num_leaves:
        raise ValueError(f"engine('triton'): q has {q.size(0)} rows but the hierarchy has "
                         f"{plan.num_leaves} leaves")
    if plan.widest > MAX_CHILDREN:
        raise NotImplementedError(
            f"engine('triton') holds a family in one block of at most {MAX_CHILDREN} children; "
            f"this hierarchy has a family of {plan.widest}: use engine('tensor'), or split wide "
            f"families (hsa_geo.hierarchy.limit_children)")
    if max(q.size(2), v.size(2)) > MAX_HEAD_WIDTH:
        raise NotImplementedError(
            f"engine('triton') holds heads of at most {MAX_HEAD_WIDTH} features (got q "
            f"{q.size(2)}, v {v.size(2)}); use engine('tensor')")
    if plan.children.device != q.device:
        raise ValueError(f"engine('triton'): the plan is on {plan.children.device} but q is on "
                         f"{q.device}")
    if pair_bias is not None and (pair_bias.shape != (q.size(1), plan.num_pairs)
                                  or pair_bias.dtype != q.dtype):
        raise ValueError(f"engine('triton'): pair bias [H, E] = [{q.size(1)}, {plan.num_pairs}] "
                         f"in float32 expected (got {tuple(pair_bias.shape)}, {pair_bias.dtype})")


def _launch(plan: TritonPlan, heads: int, bottom_up: bool):
    r"""``(grid, first family, BLOCK_B)`` of every level in sweep order."""
    levels = plan.levels if bottom_up else reversed(plan.levels)
    for first, families, block in levels:
        yield (families, heads), first, block


def _on_device(q: Tensor):
    return torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()


def _tables(plan: TritonPlan):
    return plan.family_node, plan.child_ptr, plan.children, plan.pair_ptr


def triton_forward(q: Tensor, k: Tensor, v: Tensor, pair_bias: Optional[Tensor],
                   plan: TritonPlan, scale: float, euclidean: bool = False,
                   causal: bool = False):
    r"""HSA output ``[N, H, D_v]`` of float32 ``[N, H, D]`` inputs (pair
    bias ``[H, E]`` in :meth:`~hsa_geo.Hierarchy.sibling_pairs` order) and
    the state of the backward pass, ``(means, weights, log_mass)``, as
    :func:`~hsa_geo.functional.kernel.kernel_forward` returns them."""
    if causal == 'strict':
        raise NotImplementedError(STRICT_CAUSAL_REFUSAL)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    pair_bias = None if pair_bias is None else pair_bias.contiguous()
    _check(q, k, v, pair_bias, plan)
    program = _programs_for(q)
    num_leaves, heads, dim = q.shape
    value_dim = v.size(2)
    num_clusters = plan.num_nodes - num_leaves
    means = q.new_zeros(num_clusters, heads, 2 * dim + value_dim + 2)
    weights = q.new_zeros(heads, plan.num_pairs)
    self_log = q.new_zeros(plan.num_nodes, heads)
    log_mass = q.new_zeros(plan.num_nodes, heads)  # 0 at roots
    message = q.new_zeros(num_clusters, heads, value_dim)  # 0 at roots
    out = v.clone()  # an isolated leaf attends to itself; every other row is written
    sizes = (num_leaves, heads, dim, value_dim, plan.num_pairs)
    with _on_device(q):  # Triton launches on the current CUDA device
        for grid, first, block in _launch(plan, heads, bottom_up=True):
            program.forward_up[grid](
                q, k, v, means, plan.count, plan.log_count,
                weights if pair_bias is None else pair_bias, weights, self_log, *_tables(plan),
                first, *sizes, float(scale), EUCLIDEAN=bool(euclidean), CAUSAL=bool(causal),
                HAS_BIAS=pair_bias is not None, BLOCK_B=block, BLOCK_D=_block(dim),
                BLOCK_DV=_block(value_dim))
        for grid, first, block in _launch(plan, heads, bottom_up=False):
            program.forward_down[grid](
                v, means, message, weights, self_log, log_mass, out, *_tables(plan), first, *sizes,
                BLOCK_B=block, BLOCK_DV=_block(value_dim))
    return out, (means, weights, log_mass)


def triton_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, plan: TritonPlan,
                    state, scale: float, euclidean: bool = False, causal: bool = False,
                    bias_grad: bool = False, summary_nodes: Optional[Tensor] = None,
                    summary_grad: Optional[Tensor] = None,
                    leaf_log_mass_grad: Optional[Tensor] = None):
    r"""Gradients of q, k, v and (with :obj:`bias_grad`, else None) of the
    pair bias ``[H, E]``, from the state of :func:`triton_forward`;
    :obj:`summary_grad` ``[S, H, C]`` adds upstream gradients of the rows of
    the clusters :obj:`summary_nodes`, :obj:`leaf_log_mass_grad` ``[N, H]``
    those of the leaves' :math:`\log a_{ii}`, as
    :func:`~hsa_geo.functional.kernel.kernel_backward` takes them. The
    causal flag changes nothing here: the weights of later siblings are
    zero."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    program = _programs_for(q)
    means, weights, log_mass = state
    num_leaves, heads, dim = q.shape
    value_dim = v.size(2)
    num_clusters = plan.num_nodes - num_leaves
    grad_out = grad_out.to(q.dtype).contiguous()
    gradient = q.new_zeros(num_clusters, heads, value_dim)
    through = q.new_zeros(plan.num_nodes, heads)
    delta = q.new_zeros(num_clusters, heads)
    accumulated = q.new_zeros(num_clusters, heads, 2 * dim + value_dim + 1)
    if summary_grad is not None:
        _add_summary_gradients(accumulated, delta, summary_nodes - num_leaves,
                               summary_grad.to(q.dtype), plan.count[summary_nodes], dim,
                               value_dim, scale, euclidean)
    if leaf_log_mass_grad is not None:
        leaf_log_mass_grad = leaf_log_mass_grad.to(q.dtype).contiguous()
    grad_q, grad_k = torch.zeros_like(q), torch.zeros_like(k)
    grad_v = grad_out.clone()  # an isolated leaf's output is its own value
    grad_bias = q.new_zeros(heads, plan.num_pairs) if bias_grad else None
    sizes = (num_leaves, heads, dim, value_dim, plan.num_pairs)
    with _on_device(q):
        for grid, first, block in _launch(plan, heads, bottom_up=True):
            program.backward_up[grid](
                grad_out, v, means, gradient, weights, log_mass, through,
                through if leaf_log_mass_grad is None else leaf_log_mass_grad, *_tables(plan),
                first, *sizes, HAS_LEAF_GRAD=leaf_log_mass_grad is not None, BLOCK_B=block,
                BLOCK_DV=_block(value_dim))
        for grid, first, block in _launch(plan, heads, bottom_up=False):
            program.backward_down[grid](
                q, k, v, grad_out, means, gradient, weights, log_mass, through, delta, accumulated,
                plan.count, weights if grad_bias is None else grad_bias, grad_q, grad_k, grad_v,
                *_tables(plan), first, *sizes, float(scale), EUCLIDEAN=bool(euclidean),
                BIAS_GRAD=bias_grad, BLOCK_B=block, BLOCK_D=_block(dim),
                BLOCK_DV=_block(value_dim))
    return grad_q, grad_k, grad_v, grad_bias


def _add_summary_gradients(accumulated: Tensor, delta: Tensor, rows: Tensor, grad: Tensor,
                           count: Tensor, dim: int, value_dim: int, scale: float,
                           euclidean: bool) -> None:
    r"""Upstream gradients of clusters' rows enter where the kernel takes
    them: a mean's, shared by the cluster's :math:`|B|` leaves, joins its
    accumulated row; :math:`\phi`'s enters :math:`\delta_B = \partial L /
    \partial(-\phi(B))`; the mean squared key norm's the key-norm term
    (a unit of it gives :math:`-\text{scale}\, k_j`). The sweep adds its
    own share to these rows."""
    means_width = 2 * dim + value_dim
    inverse = (1.0 / count)[:, None, None]
    accumulated[rows, :, :means_width] += inverse * grad[..., :means_width]
    delta[rows] -= grad[..., means_width]
    if euclidean and grad.size(2) > means_width + 1:
        accumulated[rows, :, -1] -= 2 * inverse[..., 0] * grad[..., means_width + 1] / scale


#: the Triton sweeps' two passes, for
#: :class:`~hsa_geo.functional.family_sweeps.FamilySweepsFunction`
TRITON_SWEEPS = FamilySweeps(triton_forward, triton_backward)


def triton_hsa(q: Tensor, k: Tensor, v: Tensor, pair_bias: Optional[Tensor],
               tables, scale: float, euclidean: bool = False,
               causal: bool = False) -> Tensor:
    r"""HSA output ``[N, H, D_v]`` of ``[N, H, D]`` q and k and ``[N, H,
    D_v]`` v by the Triton sweeps, differentiable once (q, k, v and the
    pair bias).

    Args:
        pair_bias: ``[H, E]`` in the order of :obj:`tables`' pairs
            (:meth:`~hsa_geo.Hierarchy.sibling_pairs`), or None.
        tables: The hierarchy's :class:`~hsa_geo.hierarchy.plan.FamilyTables`
            (:meth:`~hsa_geo.Hierarchy.family_tables`) or a
            :class:`TritonPlan` of them (cached per hierarchy by
            :func:`hsa_geo.functional.engines.triton_plan`).
        scale: The score scale.
        euclidean: The Euclidean energy; q and k as the sweeps see them
            (:func:`~hsa_geo.functional.hsa` centres them first, this does not).
        causal: :obj:`True` for (non-strict) causal HSA; the leaves of every
            subtree must be consecutive (not checked here).

    float16 and bfloat16 inputs are computed in float32 and the output
    returned in their dtype. Checks only what the sweeps need; the checks
    of :func:`~hsa_geo.functional.hsa` (finite bias, a valid hierarchy)
    are the caller's."""
    if causal == 'strict':
        raise NotImplementedError(STRICT_CAUSAL_REFUSAL)
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        q, k, v = (t.to(torch.float32) for t in (q, k, v))
        if pair_bias is not None:
            pair_bias = pair_bias.to(torch.float32)
    plan = tables if isinstance(tables, TritonPlan) else build_triton_plan(
        tables, q.size(0), q.device)
    out = FamilySweepsFunction.apply(TRITON_SWEEPS, q, k, v, pair_bias, plan, scale, euclidean,
                                     bool(causal))
    return out.to(dtype)
