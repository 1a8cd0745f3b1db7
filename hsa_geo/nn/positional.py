r"""Positional energies within families: a score bias per ordered sibling
pair from the positions of the two siblings among their family."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.nn import Module, Parameter

from hsa_geo.functional.engines import engine_cache
from hsa_geo.hierarchy.builders.limits import DEFAULT_MAX_CHILDREN
from hsa_geo.hierarchy.hierarchy import Hierarchy, reduce_to_ancestors

KINDS = ('learned', 'sinusoidal', 'rotary')

#: Expected bias of a sibling with itself at initialisation, |eps|^2 / sqrt(d);
#: small, so a fresh module barely moves attention, but not zero: the bias is
#: quadratic in eps, so eps = 0 would be a saddle with zero gradient.
INIT_SELF_BIAS = 0.1


@dataclass
class PairCode:
    r"""Row of the bias table of every ordered sibling pair of a hierarchy,
    for one table layout; built once per hierarchy and device, kept in the
    hierarchy's cache."""
    code: Tensor  #: ``[E]`` rows of the flattened table, modality part left out
    width: int  #: positions per family in the table: the largest family
    pairs: Optional[Tensor] = None  #: ``[2, E]`` node ids, only when modalities are used
    #: the last modality tensor seen, its version and the code including it
    modality_code: Optional[Tuple[Tensor, int, Tensor]] = None


class PairCodeKey(NamedTuple):
    r"""What a :class:`PairCode` depends on besides the tree: modules that
    agree on it share the hierarchy's cached code."""
    device: torch.device
    layout: str  #: ``'relative'`` (rotary) or ``'pairs'``
    num_levels: Optional[int]
    num_modalities: Optional[int]
    limit: Optional[int]  #: ``max_children`` of the learned kind, else None


class SiblingPositionBias(Module):
    r"""The positional term of the interaction energy of the `"Hierarchical
    Self-Attention: Generalizing Neural Attention Mechanics to Multi-Scale
    Problems" <https://arxiv.org/abs/2509.15448>`_ paper: every child
    :math:`B` of a family gets an embedding :math:`\varepsilon(B)` of its
    position :math:`p_B` among its siblings (ordered by first leaf,
    :attr:`Hierarchy.sibling_index <hsa_geo.Hierarchy.sibling_index>`),
    shared by every family (of the same level and modality), and two
    siblings score

    .. math::
        \beta_h(B, C) = \frac{1}{\sqrt{d}}\,
        \langle \varepsilon_h(B), \varepsilon_h(C) \rangle

    on top of their mean query-key score (the paper's energy
    :math:`-\varepsilon(B)^\top \varepsilon(C)`, in score form). The output
    is the :obj:`pair_bias` ``[E, H]`` of :func:`hsa_geo.functional.hsa`,
    one row per column of :meth:`hierarchy.sibling_pairs()
    <hsa_geo.Hierarchy.sibling_pairs>`. Three kinds of
    :math:`\varepsilon_h \in \mathbb{R}^d`:

    * :obj:`"learned"`: a table,
      :math:`\varepsilon_h(B) = \mathbf{E}[\ell, m_B, p_B, h]`.
    * :obj:`"sinusoidal"`: a fixed code of the position, projected per head,
      :math:`\varepsilon_h(B) = \mathbf{W}_{\ell, m_B, h}\,
      \mathbf{s}(p_B)` with :math:`\mathbf{s}(p) = (\sin \omega_f p,
      \cos \omega_f p)_{f < d/2}`; defined at any position, so it
      extrapolates to families larger than seen in training.
    * :obj:`"rotary"`: a learned vector rotated by the position,
      :math:`\varepsilon_h(B) = R(\omega p_B)\, \mathbf{u}_{\ell, m_B, h}`
      (a rotation by :math:`\omega_f p_B` in each plane :math:`f`), so
      :math:`\beta_h(B, C) = \frac{1}{\sqrt d} \sum_f
      |\mathbf{u}_{h, f}|^2 \cos(\omega_f (p_C - p_B))` within one modality:
      a purely relative bias with learned amplitudes.

    The frequencies are :math:`\omega_f = P^{-f / (d/2 - 1)}` for
    :math:`P` = :obj:`max_children`, from one down to :math:`1 / P`.
    :math:`\ell` is the depth of the family's parent when
    :obj:`num_levels` is set (else 0) and :math:`m_B` the modality of
    :math:`B` when :obj:`num_modalities` is set (else 0).

    The bias is computed without gathering per-pair embeddings: the
    :math:`\beta` of every combination of (level, modality, position) pairs
    is a small table, and every sibling pair reads its row, :math:`O(EH)`
    with :math:`E` the number of sibling pairs (the row indices are built
    once per hierarchy and kept in its cache). On a flat tree over a
    sequence (:meth:`Hierarchy.flat <hsa_geo.Hierarchy.flat>`) it is a
    (relative, for :obj:`"rotary"`) position bias of softmax attention.

    Positions need a hierarchy whose sibling order means something
    (:attr:`Hierarchy.ordered <hsa_geo.Hierarchy.ordered>`): those of the
    sequence and grid builders; a :class:`ValueError` is raised for
    hierarchies from clusterings.

    Args:
        heads (int): Number of attention heads :math:`H`.
        max_children (int, optional): For :obj:`"learned"`, the positions
            with an embedding (the largest family it accepts); for the other
            kinds the scale :math:`P` of the frequencies, beyond which
            positions are allowed. (default: :obj:`32`, the builders'
            bound)
        dim (int, optional): Width :math:`d` of :math:`\varepsilon_h`; even
            for :obj:`"sinusoidal"` and :obj:`"rotary"`. (default: :obj:`16`)
        kind (str, optional): :obj:`"learned"`, :obj:`"sinusoidal"` or
            :obj:`"rotary"`. (default: :obj:`"learned"`)
        num_levels (int, optional): If set, separate embeddings for families
            whose parent is at depth :math:`0, \ldots,` :obj:`num_levels`
            :math:`- 1` (the root's family is level 0). (default: :obj:`None`)
        num_modalities (int, optional): If set, separate embeddings per
            modality; :meth:`forward` then takes the modality of every leaf
            (or node). A cluster gets the modality of its leaves when they
            all share one, and the extra id :obj:`num_modalities`
            ("mixed", e.g. the root of :func:`hsa_geo.hierarchy.compose`)
            otherwise. (default: :obj:`None`)

    Shapes:
        - **input:** a :class:`~hsa_geo.Hierarchy` with :math:`E` ordered
          sibling pairs, optionally modality ids :math:`(N)` or
          :math:`(N + M)`
        - **output:** pair bias :math:`(E, H)`

    Example::

        >>> import torch
        >>> from hsa_geo.hierarchy import chunk_sequence
        >>> from hsa_geo.nn import SiblingPositionBias
        >>> h = chunk_sequence(64, chunk_size=8)
        >>> positional = SiblingPositionBias(heads=4, max_children=8)
        >>> positional(h).shape == (h.num_sibling_pairs, 4)
        True
    """

    def __init__(self, heads: int, max_children: int = DEFAULT_MAX_CHILDREN, dim: int = 16,
                 kind: str = 'learned', num_levels: Optional[int] = None,
                 num_modalities: Optional[int] = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"Unknown kind {kind!r}; choose one of {list(KINDS)}")
        for name, value, minimum in (('heads', heads, 1), ('max_children', max_children, 1),
                                     ('dim', dim, 1), ('num_levels', num_levels, 1),
                                     ('num_modalities', num_modalities, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < minimum):
                raise ValueError(f"'{name}' must be an integer >= {minimum} (got {value!r})")
        if kind != 'learned' and dim % 2 != 0:
            raise ValueError(f"kind={kind!r} pairs the {dim} dimensions into rotation planes: "
                             f"'dim' must be even")
        self.heads = heads
        self.max_children = max_children
        self.dim = dim
        self.kind = kind
        self.num_levels = num_levels
        self.num_modalities = num_modalities

        levels, modalities = num_levels or 1, self._num_modality_slots
        if kind == 'learned':
            self.embedding = Parameter(torch.empty(levels, modalities, max_children, heads, dim))
        elif kind == 'sinusoidal':
            self.projection = Parameter(torch.empty(levels, modalities, heads, dim, dim))
        else:
            self.amplitude = Parameter(torch.empty(levels, modalities, heads, dim // 2, 2))
        if kind != 'learned':
            planes = dim // 2
            exponent = torch.arange(planes, dtype=torch.float64) / max(planes - 1, 1)
            self.register_buffer('frequency', (float(max_children) ** -exponent).float())
        self.reset_parameters()

    def reset_parameters(self):
        # std of each embedding entry so that E|eps|^2 / sqrt(d) = INIT_SELF_BIAS
        std = (INIT_SELF_BIAS / math.sqrt(self.dim)) ** 0.5
        if self.kind == 'learned':
            torch.nn.init.normal_(self.embedding, std=std)
        elif self.kind == 'sinusoidal':
            # |s(p)|^2 = d / 2, so W s(p) has entries of variance std_W^2 d / 2
            torch.nn.init.normal_(self.projection, std=std * (2 / self.dim) ** 0.5)
        else:
            torch.nn.init.normal_(self.amplitude, std=std)

    # ------------------------------------------------------------ embeddings
    @property
    def _num_modality_slots(self) -> int:
        # one extra slot for clusters whose leaves mix modalities
        return self.num_modalities + 1 if self.num_modalities else 1

    def embeddings(self, num_positions: int) -> Tensor:
        r"""``[L, K, P, H, d]``: :math:`\varepsilon_h` for every level
        :math:`\ell < L`, modality slot :math:`m < K` (the last one the
        mixed slot when :obj:`num_modalities` is set) and position
        :math:`p <` :obj:`num_positions`."""
        if self.kind == 'learned':
            if num_positions > self.max_children:
                raise ValueError(f"Learned positions exist up to max_children="
                                 f"{self.max_children} (asked for {num_positions})")
            return self.embedding[:, :, :num_positions]
        phase = self._phase(num_positions)  # [P, d/2]
        if self.kind == 'sinusoidal':
            code = torch.cat([phase.sin(), phase.cos()], dim=-1).to(self.projection.dtype)
            return torch.einsum('lmhde,pe->lmphd', self.projection, code)
        cos, sin = phase.cos(), phase.sin()  # rotate each plane (a, b) by the phase
        a, b = self.amplitude[..., 0].unsqueeze(2), self.amplitude[..., 1].unsqueeze(2)
        cos, sin = cos[:, None, :].to(a.dtype), sin[:, None, :].to(a.dtype)
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    def _phase(self, num_positions: int, start: int = 0) -> Tensor:
        position = torch.arange(start, num_positions, device=self.frequency.device,
                                dtype=torch.float64)
        return position[:, None] * self.frequency.to(torch.float64)[None, :]

    def bias_table(self, width: int) -> Tensor:
        r"""The flattened table of :math:`\beta_h` over all (level, modality,
        position) combinations of siblings, ``[T, H]``, for families of up
        to :obj:`width` children; :meth:`forward` reads it with the row of
        every pair. Rows run over (level, modality of :math:`B`, position
        of :math:`B`, modality of :math:`C`, position of :math:`C`), or for
        :obj:`"rotary"`, which depends on the offset only, over (level,
        modality of :math:`B`, modality of :math:`C`, :math:`p_C - p_B +`
        :obj:`width` :math:`- 1`)."""
        if self.kind == 'rotary':
            return self._relative_table(width)
        eps = self.embeddings(width)  # [L, K, P, H, d]
        table = torch.einsum('lmphd,lnqhd->lmpnqh', eps, eps) / math.sqrt(self.dim)
        return table.reshape(-1, self.heads)

    def _relative_table(self, width: int) -> Tensor:
        # <R(w p_B) u_B, R(w p_C) u_C> = sum_f dot_f cos(w_f d) - cross_f sin(w_f d)
        # with d = p_C - p_B, dot_f = <u_B,f, u_C,f>, cross_f = u_B,f x u_C,f:
        # a table over the 2 * width - 1 offsets d instead of width^2 pairs.
        a, b = self.amplitude[..., 0], self.amplitude[..., 1]  # [L, K, H, d/2]
        dot = torch.einsum('lmhf,lnhf->lmnhf', a, a) + torch.einsum('lmhf,lnhf->lmnhf', b, b)
        cross = torch.einsum('lmhf,lnhf->lmnhf', a, b) - torch.einsum('lmhf,lnhf->lmnhf', b, a)
        phase = self._phase(width, start=1 - width).to(a.dtype)  # [2 width - 1, d/2]
        table = (torch.einsum('lmnhf,tf->lmnth', dot, phase.cos())
                 - torch.einsum('lmnhf,tf->lmnth', cross, phase.sin()))
        return table.reshape(-1, self.heads) / math.sqrt(self.dim)

    def _strides(self, width: int) -> Tuple[int, int, int, int, int, int]:
        r"""Row of pair :math:`(B, C)` in :meth:`bias_table`:
        ``offset + level * s_l + m_B * s_mB + m_C * s_mC + p_B * s_pB +
        p_C * s_pC``, returned as ``(offset, s_l, s_mB, s_mC, s_pB, s_pC)``."""
        slots = self._num_modality_slots
        if self.kind == 'rotary':  # [L, K, K, 2 width - 1] over offsets p_C - p_B
            offsets = 2 * width - 1
            return width - 1, slots * slots * offsets, slots * offsets, offsets, -1, 1
        # [L, K, width, K, width]
        return 0, (slots * width) ** 2, slots * width * width, width, slots * width, 1

    # --------------------------------------------------------------- forward
    def forward(self, hierarchy: Hierarchy, modality: Optional[Tensor] = None) -> Tensor:
        r"""Returns the pair bias ``[E, H]`` of :obj:`hierarchy`.

        Args:
            hierarchy (Hierarchy): An ordered tree or forest
                (:attr:`~hsa_geo.Hierarchy.ordered`).
            modality (torch.Tensor, optional): Modality id of every leaf
                ``[N]`` (in :math:`[0, K)` for :math:`K` =
                :obj:`num_modalities`), or of every node ``[N + M]`` (in
                :math:`[0, K]`, :math:`K` meaning mixed); required exactly
                when :obj:`num_modalities` is set. (default: :obj:`None`)
        """
        if not isinstance(hierarchy, Hierarchy):
            raise ValueError(f"SiblingPositionBias expects a Hierarchy "
                             f"(got {type(hierarchy).__name__})")
        if not hierarchy.ordered:
            raise ValueError(
                f"{hierarchy!r} records no sibling order (it was built from clusters, "
                f"e.g. by louvain, METIS or a dendrogram, whose children have no "
                f"meaningful position), so positional terms are off for it by default. "
                f"Build it with a sequence or grid builder (from_segments, "
                f"from_nested_lengths, chunk_sequence, grid_quadtree), or pass "
                f"ordered=True to Hierarchy.from_parent when the leaf order is meaningful")
        device = self._device()
        pair_code = self._pair_code(hierarchy, device)
        code = pair_code.code
        if self.num_modalities is not None:
            code = self._with_modality(hierarchy, pair_code, modality, device)
        elif modality is not None:
            raise ValueError("A modality was given, but the module was built without "
                             "num_modalities; pass num_modalities=K to use it")
        # Heads-first gather: [H, E] is the layout the sweeps read the bias
        # in, so the [E, H] view returned costs HSA no transpose copy, and
        # index_select's backward is one index_add over E.
        return self.bias_table(pair_code.width).t().index_select(1, code).t()

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _pair_code(self, hierarchy: Hierarchy, device: torch.device) -> PairCode:
        r"""The cached :class:`PairCode` of :obj:`hierarchy` for this
        module's layout, validating the hierarchy on first use."""
        layout = 'relative' if self.kind == 'rotary' else 'pairs'
        limit = self.max_children if self.kind == 'learned' else None
        key = PairCodeKey(device, layout, self.num_levels, self.num_modalities, limit)
        hierarchy.check_unchanged()  # the codes cached below are the tree's as built
        cache = engine_cache(hierarchy).position_codes
        if key in cache:
            return cache[key]
        plan = hierarchy.plan(device)
        width = max((block.num_children for block in plan.blocks), default=1)
        for block in plan.blocks:
            self._check_block(block, hierarchy.num_leaves)
        offset, s_level, _, _, s_first, s_second = self._strides(width)
        codes = []
        for block in plan.blocks:
            position = torch.arange(block.num_children, device=device)
            level = block.depth if self.num_levels is not None else 0
            family = (offset + level * s_level + position[:, None] * s_first
                      + position[None, :] * s_second)
            codes.append(family.view(1, -1).expand(block.num_families, -1).reshape(-1))
        code = torch.cat(codes) if codes else torch.zeros(0, dtype=torch.long, device=device)
        pairs = plan.sibling_pairs() if self.num_modalities is not None else None
        cache[key] = PairCode(code, width, pairs)
        return cache[key]

    def _check_block(self, block, num_leaves: int) -> None:
        parent = int(block.parents[0]) + num_leaves
        if self.kind == 'learned' and block.num_children > self.max_children:
            node = int(block.children[0, self.max_children])
            raise ValueError(
                f"Node {node} is child number {self.max_children} (counted from 0) of "
                f"cluster {parent}, which has {block.num_children} children, but "
                f"kind='learned' has embeddings for positions 0..{self.max_children - 1} "
                f"only; raise max_children, bound the families (limit_children), or use "
                f"kind='sinusoidal' or 'rotary'")
        if self.num_levels is not None and block.depth >= self.num_levels:
            raise ValueError(
                f"Cluster {parent} is at depth {block.depth}, so its family is level "
                f"{block.depth}, but num_levels={self.num_levels} (levels 0.."
                f"{self.num_levels - 1}); raise num_levels to at least the hierarchy's "
                f"max_depth ({block.depth + 1} or more)")

    def _with_modality(self, hierarchy: Hierarchy, pair_code: PairCode,
                       modality: Optional[Tensor], device: torch.device) -> Tensor:
        r"""The pair rows including both siblings' modality, cached for the
        last :obj:`modality` tensor seen (layers of one model share it)."""
        cached = pair_code.modality_code
        if cached is not None and cached[0] is modality and cached[1] == modality._version:
            return cached[2]
        node_modality = self._node_modality(hierarchy, modality, device)
        _, _, s_first, s_second, _, _ = self._strides(pair_code.width)
        first, second = node_modality[pair_code.pairs]
        code = pair_code.code + first * s_first + second * s_second
        pair_code.modality_code = (modality, modality._version, code)
        return code

    def _node_modality(self, hierarchy: Hierarchy, modality: Optional[Tensor],
                       device: torch.device) -> Tensor:
        r"""``[N + M]`` modality slot of every node: a leaf's own, a
        cluster's shared by all its leaves, or :obj:`num_modalities` where
        they mix."""
        count = self.num_modalities
        if modality is None:
            raise ValueError(f"The module has num_modalities={count}: pass the modality of "
                             f"every leaf [N={hierarchy.num_leaves}] or node "
                             f"[N+M={hierarchy.num_nodes}]")
        if (not isinstance(modality, Tensor) or modality.is_floating_point()
                or modality.is_complex() or modality.dtype == torch.bool
                or modality.dim() != 1
                or modality.numel() not in (hierarchy.num_leaves, hierarchy.num_nodes)):
            shape = tuple(modality.shape) if isinstance(modality, Tensor) else type(modality)
            raise ValueError(f"'modality' must be an integer vector with one id per leaf "
                             f"[N={hierarchy.num_leaves}] or per node "
                             f"[N+M={hierarchy.num_nodes}] (got {shape})")
        modality = modality.to(device=device, dtype=torch.long)
        per_node = modality.numel() == hierarchy.num_nodes
        largest = count if per_node else count - 1
        bad = ((modality < 0) | (modality > largest)).nonzero().view(-1)
        if bad.numel() > 0:
            node = int(bad[0])
            raise ValueError(f"Node {node} has modality {int(modality[node])}, outside "
                             f"[0, {largest}] (num_modalities={count}"
                             f"{', the id num_modalities meaning mixed' if per_node else ''})")
        if per_node:
            return modality
        parent, depth = hierarchy.parent.to(device), hierarchy.depth.to(device)
        padded = torch.full((hierarchy.num_nodes, ), count, dtype=torch.long, device=device)
        padded[:hierarchy.num_leaves] = modality
        lowest = reduce_to_ancestors(parent, depth, padded, 'amin')
        padded[hierarchy.num_leaves:] = -1
        highest = reduce_to_ancestors(parent, depth, padded, 'amax')
        return torch.where(lowest == highest, lowest, torch.full_like(lowest, count))

    def __repr__(self) -> str:
        extra = ''.join(f', {name}={getattr(self, name)}'
                        for name in ('num_levels', 'num_modalities')
                        if getattr(self, name) is not None)
        return (f'{self.__class__.__name__}(heads={self.heads}, max_children='
                f'{self.max_children}, dim={self.dim}, kind={self.kind!r}{extra})')
