r"""What the ranks of one call of distributed HSA must agree on.

Ranks that pass different options to the same call exchange summaries that
do not fit together: other heads, dimensions or dtypes make buffers of
other sizes, on which the backend aborts or waits, and another
``causal``, ``scale`` or top-tree bias silently corrupts every rank's
output. Before each exchange, forward and backward, the ranks therefore
gather a *signature* of the call (16 numbers each) and raise a
:class:`ValueError` naming the ranks and what differs. The signature also
holds the call's number on its process group and whether it is the
forward or the backward, so a rank that skipped a call or a backward is
caught where its next exchange meets another rank's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from hsa_geo.distributed.collectives import all_gather_rows
from hsa_geo.distributed.partition import HierarchyShard
from hsa_geo.functional.checks import ENERGIES

_DTYPES = (torch.float32, torch.float64)
#: calls of distributed HSA on this process, per process group
_CALLS: Dict[object, int] = {}
#: top-tree biases agree when their checksums differ by less than this
#: fraction of their L1 norm (the same values, summed on other hardware)
_BIAS_TOLERANCE = 1e-5
_CALL, _PASS, _FINGERPRINT, _BIAS = 0, 1, slice(2, 4), slice(13, 16)  # positions


def _exact(index: int, name: str, show: Callable[[float], str] = lambda x: str(int(x))):
    return name, lambda a, b: bool(a[index] != b[index]), lambda row: show(float(row[index]))


def _bias_differs(a: Tensor, b: Tensor) -> bool:
    if a[12] != b[12]:  # given on one rank only
        return True
    tolerance = _BIAS_TOLERANCE * max(float(a[13]), float(b[13]))
    return bool(((a[_BIAS] - b[_BIAS]).abs() > tolerance).any())


#: (name, whether two signatures differ in it, how a signature shows it)
_OPTIONS: List[Tuple[str, Callable, Callable]] = [
    _exact(4, 'heads'), _exact(5, 'dim'), _exact(6, 'value_dim'),
    _exact(7, 'dtype', lambda x: str(_DTYPES[int(x)])),
    _exact(8, 'energy', lambda x: repr(list(ENERGIES)[int(x)])),
    _exact(9, 'causal', lambda x: str(bool(x))),
    ('scale', lambda a, b: bool(abs(a[10] - b[10]) > 1e-9 * abs(a[10])),
     lambda row: f"{float(row[10]):.6g}"),
    _exact(11, 'grad enabled', lambda x: str(bool(x))),
    ('top_pair_bias', _bias_differs,
     lambda row: 'None' if not row[12] else f"a tensor of checksum {float(row[15]):.6g}"),
]


@dataclass
class CallSignature:
    r"""One call of distributed HSA as the ranks compare it: its number on
    the process group and its options, ``float64 [16]`` on the device the
    backend exchanges."""
    call: int
    values: Tensor
    group: Optional[dist.ProcessGroup]

    @classmethod
    def of(cls, shard: HierarchyShard, q: Tensor, v: Tensor, scale: float, energy: str,
           causal, top_bias: Optional[Tensor],
           group: Optional[dist.ProcessGroup]) -> 'CallSignature':
        r"""The next call on :obj:`group`, with these (checked) inputs."""
        call = _CALLS[group] = _CALLS.get(group, 0) + 1
        fingerprint = shard.top.fingerprint()
        head = [call, 0, fingerprint >> 32, fingerprint & 0xFFFFFFFF, q.size(1), q.size(2),
                v.size(2), _DTYPES.index(q.dtype), list(ENERGIES).index(energy), bool(causal),
                scale, torch.is_grad_enabled(), top_bias is not None]
        values = torch.tensor([float(x) for x in head] + [0.0] * 3, dtype=torch.float64,
                              device=q.device)
        if top_bias is not None:  # checksums: the L1 norm, the sum, a weighted sum
            bias = top_bias.detach().to(torch.float64).reshape(-1)
            weight = 1 + (torch.arange(bias.numel(), device=bias.device) % 97) / 97
            values[_BIAS] = torch.stack([bias.abs().sum(), bias.sum(), (bias * weight).sum()])
        return cls(call, values, group)

    @property
    def name(self) -> str:
        return f"call {self.call} of distributed_hsa"

    def agree(self, backward: bool = False) -> None:
        r"""Gathers every rank's signature (one all-gather of
        ``[world_size, 16]``) and raises a :class:`ValueError` naming the
        ranks unless they all make this call, in the same pass, with the
        same partition and options."""
        values = self.values.clone()
        values[_PASS] = float(backward)
        context = f"the {'backward' if backward else 'forward'} of {self.name}"
        everyone = all_gather_rows(values, context, self.group).cpu()
        rank = dist.get_rank(self.group)
        message = _disagreement(everyone, rank)
        if message is not None:
            raise ValueError(f"rank {rank}: {message}")


def _disagreement(everyone: Tensor, rank: int) -> Optional[str]:
    r"""What the signatures :obj:`everyone` ``[world_size, 16]`` disagree
    on, as this rank sees it, or None."""
    mine = everyone[rank]

    def ranks_where(differs: Callable[[Tensor, Tensor], bool]) -> List[int]:
        return [other for other in range(everyone.size(0)) if differs(mine, everyone[other])]

    def step(row: Tensor) -> str:
        return f"the {'backward' if row[_PASS] else 'forward'} of call {int(row[_CALL])}"

    behind = ranks_where(lambda a, b: bool((a[:2] != b[:2]).any()))  # call, pass
    if behind:
        others = '; '.join(f"ranks {[r for r in behind if step(everyone[r]) == seen]} at {seen}"
                           for seen in dict.fromkeys(step(everyone[r]) for r in behind))
        return (f"distributed_hsa is out of step across the ranks: this rank is at "
                f"{step(mine)}, {others}. Every rank must call distributed_hsa (HSAConv over "
                f"a shard) as often as the others, a rank without leaves too, and backward "
                f"through every output, in the same order.")
    other_tree = ranks_where(lambda a, b: bool((a[_FINGERPRINT] != b[_FINGERPRINT]).any()))
    if other_tree:
        return (f"the ranks disagree on the top tree of the partition; ranks {other_tree} hold "
                f"another than this rank's. Build every rank's shard from the same hierarchy "
                f"and partition (same world size, same cut).")
    found = []
    for name, differs, show in _OPTIONS:
        ranks = ranks_where(differs)
        if ranks:
            theirs = dict.fromkeys(show(everyone[r]) for r in ranks)
            found.append(f"{name}: {show(mine)} here, " + ', '.join(
                f"{value} on ranks {[r for r in ranks if show(everyone[r]) == value]}"
                for value in theirs))
    if not found:
        return None
    return (f"the ranks disagree on the options of distributed_hsa ({step(mine)}): "
            f"{'; '.join(found)}. Every rank must pass the same energy, causal, scale, "
            f"top_pair_bias, heads, dimensions and dtype, under the same grad mode.")
