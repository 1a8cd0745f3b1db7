r"""The collectives of distributed HSA, differentiable, and a meter of the
bytes they move.

Exact distributed HSA exchanges only the summaries of the parts (their
mean query, key and value, :math:`\phi`; a few numbers per part and head):
one all-reduce forward, one backward, whatever :math:`N`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

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


def all_reduce_sum(tensor: Tensor, group: Optional[dist.ProcessGroup] = None) -> Tensor:
    r"""The sum over ranks of :obj:`tensor` (not differentiated)."""
    tensor = tensor.detach().clone()
    _record(tensor)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def share_rows(rows: Tensor, positions: Tensor, num_rows: int,
               group: Optional[dist.ProcessGroup] = None) -> Tensor:
    r"""``[num_rows, ...]``: every rank's :obj:`rows` at its
    :obj:`positions` (each row owned by one rank), differentiable: the
    gradient of a rank's rows is the sum over ranks of the gradients at its
    positions.

    One all-reduce of the zero-filled ``[num_rows, ...]`` tensor, forward
    and backward: ranks may own different numbers of rows, and nothing is
    padded."""
    return _ShareRows.apply(rows, positions, num_rows, group)


class _ShareRows(torch.autograd.Function):

    @staticmethod
    def forward(ctx, rows: Tensor, positions: Tensor, num_rows: int,
                group: Optional[dist.ProcessGroup]) -> Tensor:
        ctx.group = group
        ctx.save_for_backward(positions)
        shared = rows.new_zeros((num_rows, ) + rows.shape[1:])
        shared[positions] = rows
        _record(shared)
        dist.all_reduce(shared, op=dist.ReduceOp.SUM, group=group)
        return shared

    @staticmethod
    def backward(ctx, grad: Tensor):
        positions, = ctx.saved_tensors
        grad = grad.contiguous().clone()
        _record(grad)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[positions], None, None, None


def check_same_everywhere(value: int, what: str,
                          group: Optional[dist.ProcessGroup] = None,
                          device: Optional[torch.device] = None) -> None:
    r"""Raises a :class:`ValueError` naming the ranks unless every rank
    passes the same :obj:`value` (a 63-bit integer); :obj:`device` is where
    the backend exchanges tensors (a GPU for nccl)."""
    world_size = dist.get_world_size(group)
    mine = torch.tensor([value], dtype=torch.long, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world_size)]
    _record(mine.new_empty(world_size))
    dist.all_gather(everyone, mine, group=group)
    values = [int(t) for t in everyone]
    if len(set(values)) > 1:
        rank = dist.get_rank(group)
        differing = [r for r, other in enumerate(values) if other != values[rank]]
        raise ValueError(f"rank {rank}: the ranks disagree on {what}; ranks {differing} hold "
                         f"another than this rank's. Build every rank's shard from the same "
                         f"hierarchy and partition (same world size, same cut).")


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
