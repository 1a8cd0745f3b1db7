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
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from hsa_geo.distributed.partition import HierarchyPartition


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


def all_reduce_gradients(parameters: Union[torch.nn.Module, Iterable[Tensor]],
                         group: Optional[dist.ProcessGroup] = None,
                         average: bool = False) -> None:
    r"""Sums the gradients of :obj:`parameters` (a module's, or any) over
    the ranks of :obj:`group`, in place: afterwards every rank holds the
    gradient of the sum of the ranks' losses, what the optimizer needs
    when each rank's loss is its share of a global loss
    (``local_loss / global_count``).

    A parameter without a gradient on this rank (:obj:`None`: a rank that
    holds no leaves never evaluates the positional term of its local
    trees) counts as zeros, so every rank reduces the same tensors; after
    the call no gradient of a parameter that requires one is
    :obj:`None`. The gradients are reduced in one all-reduce per dtype and
    device; the ranks first check that they pass the same number and
    sizes of parameters (one all-gather of two numbers per rank), and get
    a :class:`ValueError` naming the ranks otherwise.

    **With DistributedDataParallel.** Use one or the other, not both. DDP
    *averages* the gradients over ranks (this function with
    :obj:`average=True`): with a loss that is each rank's share of the
    global loss, scale it by the world size under DDP. DDP reduces
    unused parameters only with ``find_unused_parameters=True`` (the
    :obj:`None` gradients above). And DDP's all-reduces run during the
    backward, as distributed HSA's do: give DDP a process group of its own
    (``process_group=dist.new_group()``) so that the two cannot pair up
    in different orders on different ranks.

    Args:
        parameters (torch.nn.Module or iterable of torch.Tensor): The
            parameters, in the same order on every rank; those that do
            not require a gradient are left alone.
        group (ProcessGroup, optional): The ranks (default: the world).
        average (bool, optional): Divide by the number of ranks, as DDP
            does. (default: :obj:`False`)
    """
    if isinstance(parameters, torch.nn.Module):
        parameters = parameters.parameters()
    parameters = [p for p in parameters if p.requires_grad]
    rank = dist.get_rank(group)
    device = parameters[0].device if parameters else None
    sizes = torch.tensor([len(parameters), sum(p.numel() for p in parameters)],
                         dtype=torch.float64, device=device)
    everyone = all_gather_rows(sizes, 'all_reduce_gradients', group).cpu()
    other = [r for r in range(everyone.size(0)) if not torch.equal(everyone[r], everyone[rank])]
    if other:
        raise ValueError(f"rank {rank}: all_reduce_gradients got {len(parameters)} parameters "
                         f"of {int(everyone[rank, 1])} numbers here, other counts on ranks "
                         f"{other}: every rank must pass the same parameters")
    buckets: Dict[Tuple[torch.dtype, torch.device], List[Tensor]] = {}
    for parameter in parameters:  # in the parameters' order: the same on every rank
        buckets.setdefault((parameter.dtype, parameter.device), []).append(parameter)
    for members in buckets.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in members])
        collective(lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group),
                   'all_reduce_gradients', group)
        if average:
            flat.div_(dist.get_world_size(group))
        for parameter, grad in zip(members, flat.split([p.numel() for p in members])):
            if parameter.grad is None:
                parameter.grad = grad.view_as(parameter)
            else:
                parameter.grad.copy_(grad.view_as(parameter))


def scatter_shards(partition, src: int = 0,
                   group: Optional[dist.ProcessGroup] = None):
    r"""This rank's :class:`~hsa_geo.distributed.HierarchyShard`, sent by
    rank :obj:`src`, which alone builds the hierarchy and its
    :class:`~hsa_geo.distributed.HierarchyPartition` (the other ranks pass
    :obj:`None`): no rank but :obj:`src` ever holds the whole tree."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    shards = None
    if rank == src:
        if partition is not None and not isinstance(partition, HierarchyPartition):
            raise TypeError(f"rank {src} must pass a HierarchyPartition (partition_hierarchy or "
                            f"HierarchyPartition.from_parts; got {type(partition).__name__})")
        if partition is None or partition.world_size != world_size:
            raise ValueError(f"rank {src} must pass a partition over {world_size} ranks (got "
                             f"{None if partition is None else partition.world_size})")
        shards = partition.shards()
    received = [None]
    dist.scatter_object_list(received, shards, src=src, group=group)
    return received[0]
