r"""Which engine runs HSA's fused sweeps: the one seam.

``backend='fused'`` of :func:`~hsa_geo.functional.hsa` runs on one of three
engines that compute the same values:

* ``'kernel'``: the compiled CPU kernel (:mod:`hsa_geo.functional.kernel`),
  CPU tensors only;
* ``'tensor'``: the tensor sweeps over the slot layout
  (:mod:`hsa_geo.functional.sweep`), any device (the GPU engine);
* ``'triton'``: the kernel's sweeps in Triton
  (:mod:`hsa_geo.functional.triton_sweeps`), CUDA tensors (CPU tensors in
  Triton's interpreter, ``TRITON_INTERPRET=1``), opt-in only.

By default (``'auto'``) the kernel runs on CPU tensors when it is built and
not turned off by ``HSA_GEO_CPU_KERNEL=0``, the tensor sweeps elsewhere:
``'auto'`` keeps the tensor sweeps on GPUs until ``benchmarks/gpu_checks.sh``
has validated the Triton sweeps on one (so far they have run in Triton's
interpreter only).
:func:`engine` picks one for a block of code, as
:func:`torch.nn.attention.sdpa_kernel` does for scaled dot-product
attention; the choice lives in a :class:`contextvars.ContextVar`, so threads
and tasks do not see each other's. Nothing outside :mod:`hsa_geo.functional`
asks which engine runs: a caller that wants to lay out its inputs for it
asks :func:`node_major_inputs`, and a data loader that wants to build what
the engine will read asks :func:`prepare`.

What the engines derive from a hierarchy beyond its tree facts, sibling-pair
order and family tables has one owner here too: an :class:`EngineCache`
per live hierarchy (:func:`engine_cache`), held beside it, not on it.
"""
from __future__ import annotations

import contextlib
import contextvars
import weakref
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Dict, Iterator, List, Tuple, Union

import torch
from torch import Tensor

from hsa_geo import native
from hsa_geo.functional.causal import FamilyGroup, build_family_groups
from hsa_geo.functional.layout import PAIRS_PER_BLOCK, SlotLayout, build_slot_layout
from hsa_geo.functional.scatter_sweep import ScatterPlan, build_scatter_plan
from hsa_geo.functional.triton_sweeps import TritonPlan, build_triton_plan
from hsa_geo.hierarchy.hierarchy import Attachment, Hierarchy, register_attachment

if TYPE_CHECKING:  # nn imports this module, not the reverse
    from hsa_geo.nn.positional import PairCode, PairCodeKey

#: The engines :func:`engine` accepts.
ENGINES = ('auto', 'kernel', 'tensor', 'triton')

_REQUESTED: contextvars.ContextVar[str] = contextvars.ContextVar('hsa_geo_engine',
                                                                  default='auto')


@contextlib.contextmanager
def engine(name: str) -> Iterator[None]:
    r"""Runs the block with the fused sweeps on engine :obj:`name`:
    :obj:`"kernel"` (the CPU kernel; an error on other devices or when it
    cannot be built), :obj:`"tensor"` (the tensor sweeps, as on a GPU),
    :obj:`"triton"` (the Triton sweeps: CUDA tensors, not yet validated on
    a GPU) or :obj:`"auto"` (the default, see the module docstring).

    Example::

        >>> import torch
        >>> from hsa_geo import Hierarchy
        >>> from hsa_geo.functional import engine, hsa
        >>> h = Hierarchy.from_parent(torch.tensor([4, 4, 5, 5, 6, 6, -1]), num_leaves=4)
        >>> q = k = v = torch.randn(4, 2, 8)
        >>> with engine('tensor'):
        ...     out = hsa(q, k, v, h)
        >>> torch.allclose(out, hsa(q, k, v, h), atol=1e-6)
        True
    """
    if name not in ENGINES:
        raise ValueError(f"Unknown HSA engine {name!r}; choose one of {', '.join(ENGINES)}")
    token = _REQUESTED.set(name)
    try:
        yield
    finally:
        _REQUESTED.reset(token)


def current_engine() -> str:
    r"""The engine :func:`engine` asked for in this context
    (:obj:`"auto"` outside every :func:`engine` block)."""
    return _REQUESTED.get()


def kernel_runs(device: Union[str, torch.device]) -> bool:
    r"""Whether the fused sweeps on :obj:`device` run on the CPU kernel in
    this context (builds the kernel on first use)."""
    requested = _REQUESTED.get()
    if requested in ('tensor', 'triton'):
        return False
    on_cpu = torch.device(device).type == 'cpu'
    if requested == 'kernel':
        if not on_cpu:
            raise RuntimeError(f"engine('kernel') runs on CPU tensors only (got {device}); "
                               f"use engine('tensor') or engine('auto')")
        return True  # kernel_forward says why if it cannot be built
    return on_cpu and native.ENABLED_BY_ENVIRONMENT and native.load()


@torch.compiler.assume_constant_result
def compiled_on_kernel(device_type: str) -> bool:
    r""":func:`kernel_runs` as :func:`torch.compile` reads it: once, when
    the graph is traced (the engine of a compiled graph is the one in
    effect then; both compute the same values)."""
    return kernel_runs(device_type)


@torch.compiler.assume_constant_result
def compiled_on_triton() -> bool:
    r"""Whether :func:`engine` asks for the Triton sweeps, as
    :func:`torch.compile` reads it when it traces the graph (they run
    outside the graph)."""
    return _REQUESTED.get() == 'triton'


def node_major_inputs(tensor: Tensor) -> bool:
    r"""Whether q, k and v on :obj:`tensor`'s device are best built
    node-major, ``[N, H, C]`` contiguous (what the CPU kernel reads),
    rather than as views of heads-first ``[H, N, C]`` tensors (what the
    tensor sweeps work in). A hint for a layer's projection: every engine
    takes either layout and computes the same values. Under
    :func:`torch.compile` it is read once, when the graph is traced."""
    return compiled_on_kernel(tensor.device.type)


def prepare(hierarchy, device: Union[str, torch.device]) -> None:
    r"""Builds what the fused sweeps will read on :obj:`device` in this
    context, on the CPU (in a data-loading worker, say): the family tables
    of the kernel, or the slot layout of the tensor sweeps (moved to
    :obj:`device` when first used), and the leaf-ancestor pairs of
    :meth:`~hsa_geo.Hierarchy.subtree_means` (so that a model compiled with
    ``fullgraph=True`` finds them built)."""
    if kernel_runs(torch.device(device).type) or _REQUESTED.get() == 'triton':
        hierarchy.family_tables()
    else:
        prepare_slot_layout(hierarchy, device)
    hierarchy.leaf_ancestor_pairs()


@dataclass
class EngineCache:
    r"""What the engines derive from one hierarchy, built on first use:
    everything is checked against the hierarchy's parent pointers
    (:meth:`~hsa_geo.Hierarchy.check_unchanged`) before it is read. The
    copies :meth:`~hsa_geo.Hierarchy.to` makes, and those a data-loading
    worker hands over, start with what was built for the original."""
    #: device -> the tensor sweeps' slot layout (:func:`slot_layout`)
    slot_layouts: Dict[torch.device, SlotLayout] = field(default_factory=dict)
    #: device -> ``([E], [P])``, see :func:`sibling_pair_positions`
    pair_positions: Dict[torch.device, Tuple[Tensor, Tensor]] = field(default_factory=dict)
    #: device -> the scatter backend's edge lists
    #: (:func:`~hsa_geo.functional.scatter_sweep.build_scatter_plan`)
    scatter_plans: Dict[torch.device, ScatterPlan] = field(default_factory=dict)
    #: device -> strictly causal HSA's family groups
    #: (:func:`~hsa_geo.functional.causal.build_family_groups`)
    family_groups: Dict[torch.device, List[FamilyGroup]] = field(default_factory=dict)
    #: device -> the Triton sweeps' launch plan (:func:`triton_plan`)
    triton_plans: Dict[torch.device, TritonPlan] = field(default_factory=dict)
    #: the sibling position codes of :class:`hsa_geo.nn.SiblingPositionBias`
    #: per device and layout of the codes
    position_codes: Dict[PairCodeKey, PairCode] = field(default_factory=dict)


_CACHES: 'weakref.WeakKeyDictionary[Hierarchy, EngineCache]' = weakref.WeakKeyDictionary()


def engine_cache(hierarchy: Hierarchy) -> EngineCache:
    r"""The :class:`EngineCache` of :obj:`hierarchy` (created on first use,
    dropped with the hierarchy); raises if its parent pointers were edited
    in place since it was built."""
    hierarchy.check_unchanged()
    cache = _CACHES.get(hierarchy)
    if cache is None:
        cache = _CACHES[hierarchy] = EngineCache()
    return cache


def _export(hierarchy: Hierarchy):
    cache = _CACHES.get(hierarchy)
    if cache is None:
        return None
    # the copy gets its own dicts (entries are per device, so they stay valid)
    return EngineCache(**{f.name: dict(getattr(cache, f.name)) for f in fields(EngineCache)})


def _adopt(hierarchy: Hierarchy, cache: EngineCache) -> None:
    _CACHES[hierarchy] = cache


register_attachment(Attachment(export=_export, adopt=_adopt))


def _device(hierarchy: Hierarchy, device) -> torch.device:
    return torch.device(device) if device is not None else hierarchy.parent.device


def prepare_slot_layout(hierarchy: Hierarchy, device=None) -> SlotLayout:
    r"""Builds (once) the layout :func:`slot_layout` uses on :obj:`device`,
    keeping its tensors on the CPU until :func:`slot_layout` asks for it: a
    data-loading worker can plan a GPU batch without touching the GPU. GPU
    layouts use much larger blocks (few, large launches)."""
    device = _device(hierarchy, device)
    layouts = engine_cache(hierarchy).slot_layouts
    if device not in layouts:
        pairs_per_block = PAIRS_PER_BLOCK if device.type == 'cpu' else PAIRS_PER_BLOCK << 6
        layouts[device] = build_slot_layout(
            hierarchy.parent.cpu(), hierarchy.num_leaves, hierarchy.depth.cpu(),
            hierarchy.num_leaves_below.cpu(), hierarchy.first_leaf.cpu(), pairs_per_block)
    return layouts[device]


def slot_layout(hierarchy: Hierarchy, device=None) -> SlotLayout:
    r"""The slot layout of the tensor sweeps (:mod:`hsa_geo.functional.layout`)
    of :obj:`hierarchy` on :obj:`device`, built once per device and cached."""
    device = _device(hierarchy, device)
    layout = prepare_slot_layout(hierarchy, device)
    if layout.node_slot.device != device:
        layout = engine_cache(hierarchy).slot_layouts[device] = layout.to(device)
    return layout


def scatter_plan(hierarchy: Hierarchy, device=None) -> ScatterPlan:
    r"""The scatter backend's edge lists of :obj:`hierarchy` on
    :obj:`device` (cached)."""
    device = _device(hierarchy, device)
    plans = engine_cache(hierarchy).scatter_plans
    if device not in plans:
        plans[device] = build_scatter_plan(hierarchy.plan(device))
    return plans[device]


def triton_plan(hierarchy: Hierarchy, device=None) -> TritonPlan:
    r"""The Triton sweeps' :class:`~hsa_geo.functional.triton_sweeps.TritonPlan`
    of :obj:`hierarchy` on :obj:`device` (cached)."""
    device = _device(hierarchy, device)
    plans = engine_cache(hierarchy).triton_plans
    if device not in plans:
        plans[device] = build_triton_plan(hierarchy.family_tables(), hierarchy.num_leaves, device)
    return plans[device]


def family_groups(hierarchy: Hierarchy, device=None) -> List[FamilyGroup]:
    r"""Strictly causal HSA's family groups of :obj:`hierarchy` on
    :obj:`device` (cached)."""
    device = _device(hierarchy, device)
    groups = engine_cache(hierarchy).family_groups
    if device not in groups:
        groups[device] = build_family_groups(hierarchy.plan(device),
                                             hierarchy.first_leaf.to(device))
    return groups[device]


def sibling_pair_positions(hierarchy: Hierarchy, device=None, with_sources: bool = False):
    r"""``[E]`` positions of the ordered sibling pairs (in
    :meth:`~hsa_geo.Hierarchy.sibling_pairs` order) in the padded per-pair
    buffers of the tensor sweeps' slot layout and, with
    :obj:`with_sources`, the inverse map ``[P]``: the pair at every padded
    position (:math:`E` at padding). Cached per device."""
    device = _device(hierarchy, device)
    cache = engine_cache(hierarchy).pair_positions
    if device not in cache:
        layout = slot_layout(hierarchy, device)
        row, col = hierarchy.plan(device).sibling_pairs()
        positions = layout.pair_positions(layout.node_slot[row], layout.sibling_index[col])
        sources = torch.full((layout.num_pairs, ), positions.numel(), dtype=torch.long,
                             device=device)
        sources[positions] = torch.arange(positions.numel(), device=device)
        cache[device] = (positions, sources)
    positions, sources = cache[device]
    return (positions, sources) if with_sources else positions
