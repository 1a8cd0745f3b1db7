r"""Options that make :func:`torch.compile` pay for training on the CPU.

Two costs of inductor's CPU code, measured on the demo model
(``benchmarks/compile_step.py``), are not HSA's and not the model's:

* **Boolean masks saved for the backward pass.** AOTAutograd's partitioner
  moves the comparison a ReLU's backward needs (``out <= 0``) into the
  forward graph and saves its boolean result, the smallest tensor to keep.
  Inductor's C++ kernels store and load boolean tensors through a slow
  path (``VecMask`` to ``bool``): a ReLU's forward and backward on an
  :math:`820 \times 64` batch take ~2 ms compiled against ~0.07 ms eager
  (torch 2.13, AVX-512). :class:`RecomputeBooleanMasks` has the partitioner
  recompute every such mask in the backward graph from the float tensor it
  compares (fused into the backward kernel there), so no boolean tensor
  crosses between the graphs. Values and gradients are unchanged; random
  masks (dropout's) are still saved, as the partitioner never recomputes a
  random operation.
* **Dropout masks** drawn by inductor's per-element CPU generator cost
  several times eager mode's: ``fallback_random`` keeps aten's.

:func:`cpu_training_options` returns both, for
``torch.compile(model, options=cpu_training_options())``.
"""
from __future__ import annotations

import operator
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.custom_graph_pass import CustomPartitionerFn, get_hash_for_files
from torch.utils.checkpoint import CheckpointPolicy

__all__ = ['RecomputeBooleanMasks', 'cpu_training_options']


class RecomputeBooleanMasks(CustomPartitionerFn):
    r"""AOTAutograd's min-cut partitioner with every boolean node of the
    joint graph marked *must recompute* (but a random draw's own output,
    such as dropout's mask), so the forward graph saves the float tensors
    a mask is computed from instead of the mask. Pass it as
    ``options={'custom_partitioner_fn': RecomputeBooleanMasks()}``."""

    def __call__(self, graph_module: torch.fx.GraphModule, joint_inputs: Sequence[object],
                 **kwargs: Any) -> Tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
        drawn = set()  # random draws and their outputs (dropout's mask): saved, never recomputed
        for node in graph_module.graph.nodes:  # in topological order
            if _draws_random(node) or (node.target is operator.getitem
                                       and node.args[0] in drawn):
                drawn.add(node)
                continue
            value = node.meta.get('val')
            if (node.op == 'call_function' and isinstance(value, torch.Tensor)
                    and value.dtype == torch.bool and 'recompute' not in node.meta):
                node.meta['recompute'] = CheckpointPolicy.MUST_RECOMPUTE
        return min_cut_rematerialization_partition(graph_module, joint_inputs, **kwargs)

    def uuid(self) -> Optional[Any]:
        return get_hash_for_files((__file__, ))


def _draws_random(node: torch.fx.Node) -> bool:
    tags = getattr(node.target, 'tags', ())
    return node.op == 'call_function' and torch.Tag.nondeterministic_seeded in tags


def cpu_training_options() -> Dict[str, Any]:
    r"""Inductor options for training on the CPU: masks recomputed in the
    backward graph (:class:`RecomputeBooleanMasks`) and aten's dropout
    generator (``fallback_random``)."""
    return {'custom_partitioner_fn': RecomputeBooleanMasks(), 'fallback_random': True}
