r"""The collectives of distributed HSA, differentiable, and a meter of the
bytes they move.

Exact distributed HSA exchanges only the summaries of the parts (their
mean query, key and value, :math:`\phi`; a few numbers per part and head):
one all-reduce forward, one backward, whatever :math:`N`, each after the
ranks' check of the call (:mod:`hsa_geo.distributed.agreement`). A failure
in any of them names this rank and the call (:func:`collective`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor


class CommunicationMeter:
    r"""Counts the collectives and the bytes of their buffers on this rank
    (the reduced or gathered tensors; what crosses the wire depends on the
    backend's algorithm, e.g. about twice that for a ring all-reduce)."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0

    def add(self, tensor: Tensor) -> None:
        self.bytes += tensor.numel() * tensor.element_size()
        self.calls += 1


_METERS: List[CommunicationMeter] = []


@contextlib.contextmanager
def count_communication() -> Iterator[CommunicationMeter]:
    r"""Counts the bytes of distributed HSA's collectives in the block,
    forward and backward::

        with count_communication() as meter:
            distributed_hsa(q, k, v, shard).sum().backward()
        print(meter.bytes, meter.calls)
    """
    meter = CommunicationMeter()
    _METERS.append(meter)
    try:
        yield meter
    finally:
        _METERS.remove(meter)


def _record(tensor: Tensor) -> None:
    for meter in _METERS:
        meter.add(tensor)


def collective(run: Callable[[], object], context: str,
               group: Optional[dist.ProcessGroup] = None) -> None:
    r"""Runs one collective; a failure of the backend (a peer that closed
    the connection, the process group's timeout) becomes a
    :class:`RuntimeError` that names this rank and :obj:`context`, the
    call it belongs to."""
    try:
        run()
    except RuntimeError as error:
        raise RuntimeError(
            f"rank {dist.get_rank(group)}: {context} failed in the exchange between the ranks "
            f"({str(error).strip()}). A rank that skipped this call or the backward through "
            f"its output, or stopped, leaves the others waiting until it exits or the process "
            f"group's timeout passes (init_process_group(timeout=...)): every rank of the group "
            f"must call distributed_hsa (HSAConv over a shard) as often as the others, a rank "
            f"without leaves too, and backward through every output, in the same order"
        ) from error


def all_reduce_sum(tensor: Tensor, context: str,
                   group: Optional[dist.ProcessGroup] = None) -> Tensor:
    r"""The sum over ranks of :obj:`tensor` (not differentiated)."""
    tensor = tensor.detach().clone()
    _record(tensor)
    collective(lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group), context, group)
    return tensor


def all_gather_rows(row: Tensor, context: str,
                    group: Optional[dist.ProcessGroup] = None) -> Tensor:
    r"""``[world_size, *row.shape]`` every rank's :obj:`row` (not
    differentiated)."""
    everyone = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    _record(row.new_empty((len(everyone), ) + row.shape))
    collective(lambda: dist.all_gather(everyone, row.contiguous(), group=group), context, group)
    return torch.stack(everyone)


def share_rows(rows: Tensor, positions: Tensor, num_rows: int, call: str,
               group: Optional[dist.ProcessGroup] = None,
               before_backward: Optional[Callable[[], None]] = None) -> Tensor:
    r"""``[num_rows, ...]``: every rank's :obj:`rows` at its
    :obj:`positions` (each row owned by one rank), differentiable: the
    gradient of a rank's rows is the sum over ranks of the gradients at its
    positions.

    One all-reduce of the zero-filled ``[num_rows, ...]`` tensor, forward
    and backward: ranks may own different numbers of rows, and nothing is
    padded. :obj:`call` names the call in errors ("call 3 of ...");
    :obj:`before_backward` runs first in the backward (the ranks' check
    that they are in step)."""
    return _ShareRows.apply(rows, positions, num_rows, call, group, before_backward)


class _ShareRows(torch.autograd.Function):

    @staticmethod
    def forward(ctx, rows: Tensor, positions: Tensor, num_rows: int, call: str,
                group: Optional[dist.ProcessGroup],
                before_backward: Optional[Callable[[], None]]) -> Tensor:
        ctx.group, ctx.call, ctx.before_backward = group, call, before_backward
        ctx.save_for_backward(positions)
        shared = rows.new_zeros((num_rows, ) + rows.shape[1:])
        shared[positions] = rows
        _record(shared)
        collective(lambda: dist.all_reduce(shared, op=dist.ReduceOp.SUM, group=group),
                   f'the forward of {call}', group)
        return shared

    @staticmethod
    def backward(ctx, grad: Tensor):
        positions, = ctx.saved_tensors
        if ctx.before_backward is not None:
            ctx.before_backward()
        grad = grad.contiguous().clone()
        _record(grad)
        collective(lambda: dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group),
                   f'the backward of {ctx.call}', ctx.group)
        return grad[positions], None, None, None, None, None


def scatter_shards(partition, src: int = 0,
                   group: Optional[dist.ProcessGroup] = None):
    r"""This rank's :class:`~hsa_geo.distributed.HierarchyShard`, sent by
    rank :obj:`src`, which alone builds the hierarchy and its
    :class:`~hsa_geo.distributed.HierarchyPartition` (the other ranks pass
    :obj:`None`): no rank but :obj:`src` ever holds the whole tree."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    shards = None
    if rank == src:
        if partition is None or partition.world_size != world_size:
            raise ValueError(f"rank {src} must pass a partition over {world_size} ranks (got "
                             f"{None if partition is None else partition.world_size})")
        shards = partition.shards()
    received = [None]
    dist.scatter_object_list(received, shards, src=src, group=group)
    return received[0]
