r"""Zero-shot HSA inside a pretrained BERT-style model (paper §4.3).

The self-attention modules of chosen layers keep their weights; only the
step from :math:`Q, K, V` to the attention output changes. Nothing is
trained, and :meth:`HSAInjection.remove` restores the original forward.
The modes:

* ``'hsa'``: HSA over a per-input token hierarchy.
* ``'hsa_global'``: HSA with exact global tokens (e.g. ``[CLS]`` and
  ``[SEP]``). A global token's row is the exact softmax over all keys. Every
  other row :math:`i` mixes the HSA output over the non-global tokens (the
  hierarchy covers those only) with the global tokens' values, weighted by
  their exact scores:

  .. math::
      y_i = \frac{\tilde Z_i\, y^{\mathrm{HSA}}_i + \sum_{g} e^{s_{ig}} v_g}
                 {\tilde Z_i + \sum_{g} e^{s_{ig}}},
      \qquad \tilde Z_i = e^{s_{ii}} / a^{\mathrm{HSA}}_{ii},

  where :math:`\tilde Z_i` is HSA's own estimate of the row's softmax
  normaliser over the non-global keys: the one under which HSA's weight of
  the token on itself is exact. On a flat hierarchy HSA is softmax, the
  estimate is exact and the whole layer is the original attention. Extra
  FLOPs: :func:`~hsa_geo.flops.global_token_flops`.
* ``'block'``: softmax restricted to token groups (e.g. sentences).
* ``'block_global'``: the same plus global tokens (Longformer/BigBird
  style: they attend to and are attended by every token, exactly).
* ``'window_global'``: softmax inside a sliding window of half-width
  :math:`w` (per input) plus global tokens.
* ``'hsa_key_clusters'``: ``'hsa_global'`` over a hierarchy that follows
  the layer rather than the text: in every replaced layer and input, a
  root over the k-means clusters of the non-global tokens' keys
  (:func:`~hsa_geo.hierarchy.from_kmeans`; per-head L2-normalised keys
  summed over the heads, one tree shared by the heads; see
  :class:`KeyClustering`).
* ``'cluster_global'``: the baseline given the same clusters: softmax
  inside every key cluster plus global tokens (content-routed attention, as
  in the Routing Transformer).

The three softmax baselines are computed as masked dense softmax: their
FLOPs are those of their pattern (:mod:`hsa_geo.flops`), their wall-clock
time is not that of a sparse kernel.

Works with Hugging Face BERT/RoBERTa-style encoders (``transformers`` ≥ 5):
a self-attention module with ``query``, ``key`` and ``value`` linear maps,
``num_attention_heads``, ``attention_head_size`` and ``scaling``, called as
``module(hidden_states, attention_mask=..., ...)`` and returning
``(output, weights)``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hsa_geo.flops import kmeans_flops
from hsa_geo.functional import hsa
from hsa_geo.functional.checks import to_compute
from hsa_geo.hierarchy.builders.kmeans import from_cluster_labels, kmeans_labels
from hsa_geo.hierarchy.hierarchy import Hierarchy

MODES = ('hsa', 'hsa_global', 'block', 'block_global', 'window_global', 'hsa_key_clusters',
         'cluster_global')
#: the modes with global tokens
GLOBAL_MODES = ('hsa_global', 'block_global', 'window_global', 'hsa_key_clusters',
                'cluster_global')
#: the modes whose structure is built in every layer from its keys
KEY_CLUSTER_MODES = ('hsa_key_clusters', 'cluster_global')


#: the token features :class:`KeyClustering` can cluster
KEY_FEATURES = ('head_sum', 'projection')


@dataclass(frozen=True)
class KeyClustering:
    r"""How modes ``'hsa_key_clusters'`` and ``'cluster_global'`` group a
    layer's non-global tokens: k-means (:func:`~hsa_geo.hierarchy.from_kmeans`)
    into :math:`\lceil n / \text{cluster\_size} \rceil` clusters of
    features of their keys, L2-normalised per head and then either summed
    over the heads (:obj:`features="head_sum"`, :math:`D` features for
    about :math:`4nHD` FLOPs) or concatenated and mapped to
    :obj:`projection_dim` features by a fixed Gaussian random projection
    (:obj:`"projection"`, seeded; :math:`2nHD \cdot` :obj:`projection_dim`
    FLOPs). On MiniLM's upper layers the head sum kept the embeddings as
    close as a 32-dimensional projection at a twentieth of its cost, and one
    Lloyd iteration as close as three (``examples/zero_shot_minilm.py``)."""
    cluster_size: int = 4
    iterations: int = 1
    features: str = 'head_sum'
    projection_dim: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.features not in KEY_FEATURES:
            raise ValueError(f"KeyClustering.features must be one of {KEY_FEATURES} (got "
                             f"{self.features!r})")

    def token_features(self, keys: Tensor) -> Tensor:
        r"""``[n, F]`` features of the tokens whose keys are :obj:`keys`
        ``[n, H, D]``."""
        normalised = F.normalize(keys.detach().float(), dim=-1)
        if self.features == 'head_sum':
            return normalised.sum(1)
        generator = torch.Generator().manual_seed(self.seed)
        width = normalised.size(1) * normalised.size(2)
        matrix = torch.randn(width, self.projection_dim, generator=generator)
        return normalised.flatten(1) @ (matrix / math.sqrt(self.projection_dim)).to(keys.device)

    def num_clusters(self, num_tokens: int) -> int:
        r""":math:`\lceil n / \text{cluster\_size} \rceil`."""
        return math.ceil(num_tokens / self.cluster_size)

    def labels(self, keys: Tensor) -> Tensor:
        r"""``[n]`` cluster labels of the tokens whose keys are
        :obj:`keys` ``[n, H, D]``."""
        num_clusters = self.num_clusters(keys.size(0))
        if num_clusters <= 1:
            return torch.zeros(keys.size(0), dtype=torch.long)
        return kmeans_labels(self.token_features(keys).cpu(), num_clusters, self.iterations)

    def flops(self, num_tokens: int, heads: int, dim: int) -> int:
        r"""FLOPs of grouping :obj:`num_tokens` tokens with :obj:`heads`
        keys of width :obj:`dim` each: the features (normalisation and head
        sum, or the projection) and k-means
        (:func:`~hsa_geo.flops.kmeans_flops`), once per layer and input."""
        num_clusters = self.num_clusters(num_tokens)
        if num_clusters <= 1:
            return 0
        normalise = 3 * num_tokens * heads * dim  # squares, sums, divisions
        if self.features == 'head_sum':
            width, features = normalise + num_tokens * heads * dim, dim
        else:
            width = normalise + 2 * num_tokens * heads * dim * self.projection_dim
            features = self.projection_dim
        return width + kmeans_flops(num_tokens, num_clusters, features, self.iterations)


@dataclass
class KeyClusters:
    r"""The clusters one replaced layer used for one batch: its index and,
    per row, the label of every non-global token
    (:attr:`HSAInjection.key_clusters` keeps them, e.g. to count FLOPs)."""
    layer: int
    labels: List[Tensor]


def find_self_attention_modules(model: nn.Module) -> List[nn.Module]:
    r"""The self-attention modules of :obj:`model` in layer order (those
    with ``query``/``key``/``value`` linear maps and a head count)."""
    found = []
    for module in model.modules():
        if all(isinstance(getattr(module, name, None), nn.Linear)
               for name in ('query', 'key', 'value')) and hasattr(module, 'num_attention_heads'):
            found.append(module)
    return found


class HSAInjection:
    r"""Handle of an injection made by :func:`inject_hsa`.

    Set the per-input structure before each forward call with
    :meth:`set_hierarchies` (modes ``'hsa'``, ``'hsa_global'``),
    :meth:`set_groups` (``'block'``, ``'block_global'``) or
    :meth:`set_windows` (``'window_global'``), one entry per row of the
    batch, covering exactly the tokens the attention mask lets through, in
    order; the global modes also take the positions of every row's global
    tokens among them. Use as a context manager or call :meth:`remove` to
    undo.
    """

    def __init__(self, modules: Sequence[nn.Module], layers: Sequence[int], mode: str,
                 key_clustering: Optional[KeyClustering] = None):
        self.modules = list(modules)
        self.layers = list(layers)
        self.mode = mode
        self.key_clustering = key_clustering or KeyClustering()
        #: what the key-cluster modes built, one entry per layer call
        self.key_clusters: List[KeyClusters] = []
        self._forest: Optional[Hierarchy] = None
        self._global: Optional[List[Tensor]] = None  # per row: which tokens are global
        self._allowed: Optional[List[Tensor]] = None  # per row: [n, n] keys of every query
        self._sizes: Optional[List[int]] = None
        self._saved = []
        for module in self.modules:
            self._saved.append(module.__dict__.get('forward'))
            module.forward = self._make_forward(module)

    # ----------------------------------------------------------- structure
    def set_hierarchies(self, hierarchies: Sequence[Hierarchy],
                        global_tokens: Optional[Sequence] = None) -> 'HSAInjection':
        r"""One hierarchy per batch row over its unmasked tokens; with mode
        ``'hsa_global'``, over its non-global tokens (in order), and
        :obj:`global_tokens` gives the positions of the global ones among
        all the row's unmasked tokens."""
        self._check_mode(('hsa', 'hsa_global'), 'set_hierarchies()')
        hierarchies = list(hierarchies)
        if self.mode == 'hsa_global':
            positions = self._global_positions(global_tokens, len(hierarchies))
            sizes = [h.num_leaves + p.numel() for h, p in zip(hierarchies, positions)]
            self._global = _global_flags(positions, sizes)
        else:
            self._refuse_global(global_tokens)
            sizes = [h.num_leaves for h in hierarchies]
        self._sizes = sizes
        self._forest = Hierarchy.batch_hierarchies(hierarchies)
        return self

    def set_groups(self, groups: Sequence[Tensor],
                   global_tokens: Optional[Sequence] = None) -> 'HSAInjection':
        r"""One group-id tensor per batch row over its unmasked tokens:
        tokens attend only to tokens of their own group (and, with mode
        ``'block_global'``, to the row's :obj:`global_tokens`, positions
        among its unmasked tokens, which attend to every token)."""
        self._check_mode(('block', 'block_global'), 'set_groups()')
        groups = [torch.as_tensor(g, dtype=torch.long).view(-1) for g in groups]
        self._set_allowed([g[:, None] == g[None, :] for g in groups], global_tokens)
        return self

    def set_windows(self, windows: Sequence[int], num_tokens: Sequence[int],
                    global_tokens: Sequence) -> 'HSAInjection':
        r"""One half-width :math:`w` per batch row of :obj:`num_tokens`
        unmasked tokens: token :math:`i` attends to the tokens :math:`j`
        with :math:`|i - j| \le w` and to the row's :obj:`global_tokens`
        (positions among its unmasked tokens), which attend to every token
        (mode ``'window_global'``)."""
        self._check_mode(('window_global', ), 'set_windows()')
        windows, num_tokens = list(windows), list(num_tokens)
        if len(windows) != len(num_tokens):
            raise ValueError(f"{len(windows)} windows for {len(num_tokens)} rows")
        allowed = []
        for row, (window, count) in enumerate(zip(windows, num_tokens)):
            if int(window) != window or window < 0:
                raise ValueError(f"Row {row}: the window must be an integer >= 0 (got {window!r})")
            position = torch.arange(int(count))
            allowed.append((position[:, None] - position[None, :]).abs() <= int(window))
        self._set_allowed(allowed, global_tokens)
        return self

    def set_global_tokens(self, num_tokens: Sequence[int],
                          global_tokens: Sequence) -> 'HSAInjection':
        r"""For modes ``'hsa_key_clusters'`` and ``'cluster_global'``, whose
        structure every layer builds from its own keys: the number of
        unmasked tokens of every batch row and the positions of its global
        tokens among them."""
        self._check_mode(KEY_CLUSTER_MODES, 'set_global_tokens()')
        sizes = [int(n) for n in num_tokens]
        positions = self._global_positions(global_tokens, len(sizes))
        self._global, self._sizes = _global_flags(positions, sizes), sizes
        for row, flags in enumerate(self._global):
            if bool(flags.all()):
                raise ValueError(f"Row {row}: every token is global; key clusters need at "
                                 f"least one other token")
        return self

    def _set_allowed(self, allowed: List[Tensor], global_tokens: Optional[Sequence]) -> None:
        sizes = [a.size(0) for a in allowed]
        if self.mode in GLOBAL_MODES:
            flags = _global_flags(self._global_positions(global_tokens, len(allowed)), sizes)
            allowed = _open_to_globals(allowed, flags)
        else:
            self._refuse_global(global_tokens)
        self._allowed, self._sizes = allowed, sizes

    def _check_mode(self, modes: Sequence[str], method: str) -> None:
        if self.mode not in modes:
            setter = {'hsa': 'set_hierarchies()', 'hsa_global': 'set_hierarchies()',
                      'block': 'set_groups()', 'block_global': 'set_groups()',
                      'window_global': 'set_windows()',
                      'hsa_key_clusters': 'set_global_tokens()',
                      'cluster_global': 'set_global_tokens()'}[self.mode]
            raise ValueError(f"{method} is for mode {' or '.join(map(repr, modes))}; mode "
                             f"{self.mode!r} takes {setter}")

    def _global_positions(self, global_tokens: Optional[Sequence], rows: int) -> List[Tensor]:
        if global_tokens is None:
            raise ValueError(f"Mode {self.mode!r} needs 'global_tokens': the positions of every "
                             f"row's global tokens (e.g. [CLS] and [SEP])")
        positions = [torch.as_tensor(p, dtype=torch.long).view(-1) for p in global_tokens]
        if len(positions) != rows:
            raise ValueError(f"'global_tokens' has {len(positions)} rows, the structure {rows}")
        return positions

    def _refuse_global(self, global_tokens: Optional[Sequence]) -> None:
        if global_tokens is not None:
            raise ValueError(f"Mode {self.mode!r} has no global tokens; use one of "
                             f"{GLOBAL_MODES}")

    # ---------------------------------------------------------------- undo
    def remove(self) -> None:
        r"""Restores the original attention of every replaced layer."""
        for module, saved in zip(self.modules, self._saved):
            if saved is None:
                module.__dict__.pop('forward', None)
            else:
                module.forward = saved
        self.modules, self._saved = [], []

    def __enter__(self) -> 'HSAInjection':
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}(layers={self.layers}, mode={self.mode!r})'

    # ------------------------------------------------------------- forward
    def _make_forward(self, module: nn.Module):
        def forward(hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                    past_key_values=None, cache=None, **kwargs):
            if past_key_values is not None or cache is not None:
                raise ValueError("HSA injection supports encoders only (no key/value cache)")
            return self._attend(module, hidden_states, attention_mask), None
        return forward

    def _attend(self, module: nn.Module, hidden: Tensor, mask: Optional[Tensor]) -> Tensor:
        size, length, _ = hidden.shape
        heads, head_dim = module.num_attention_heads, module.attention_head_size
        scale = getattr(module, 'scaling', head_dim ** -0.5)
        q = module.query(hidden).view(size, length, heads, head_dim)
        k = module.key(hidden).view(size, length, heads, head_dim)
        v = module.value(hidden).view(size, length, heads, head_dim)
        valid = _allowed_keys(mask, size, length, hidden.device)
        counts = valid.sum(1).tolist()
        if self._sizes is None:
            raise RuntimeError("Set the structure (set_hierarchies/set_groups/set_windows/"
                               "set_global_tokens) before the forward call")
        if counts != self._sizes:
            raise ValueError(f"The attention mask lets through {counts} tokens per row, but "
                             f"the structure covers {self._sizes}")
        if self.mode in KEY_CLUSTER_MODES:
            self._cluster_keys(k[valid], self.layers[self.modules.index(module)])
        out = hidden.new_zeros(size, length, heads, head_dim)
        if self.mode in ('hsa', 'hsa_global', 'hsa_key_clusters'):
            out[valid] = self._hsa_rows(q[valid], k[valid], v[valid], scale)
        else:
            for row in range(size):
                keep = valid[row]
                out[row, keep] = masked_softmax(q[row, keep], k[row, keep], v[row, keep],
                                                 self._allowed[row].to(hidden.device), scale)
        # Masked (padding) query rows: the original softmax over the
        # unmasked keys, so that the whole output matches the original model
        # wherever the structure is flat.
        for row in (~valid).any(1).nonzero().view(-1).tolist():
            pad, keep = ~valid[row], valid[row]
            out[row, pad] = masked_softmax(q[row, pad], k[row, keep], v[row, keep], None, scale)
        return out.reshape(size, length, heads * head_dim)

    def _cluster_keys(self, keys: Tensor, layer: int) -> None:
        # this layer's structure from its keys [T, H, D] (packed unmasked tokens)
        labels, start = [], 0
        for flags in self._global:
            row_keys = keys[start:start + flags.numel()][~flags.to(keys.device)]
            labels.append(self.key_clustering.labels(row_keys))
            start += flags.numel()
        self.key_clusters.append(KeyClusters(layer, labels))
        if self.mode == 'hsa_key_clusters':
            self._forest = Hierarchy.batch_hierarchies([from_cluster_labels(row)
                                                        for row in labels])
            return
        within = []
        for flags, row in zip(self._global, labels):
            label = torch.full((flags.numel(), ), -1, dtype=torch.long)
            label[~flags] = row
            within.append(label[:, None] == label[None, :])
        self._allowed = _open_to_globals(within, self._global)

    def _hsa_rows(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        # [T, H, D] packed unmasked tokens of the batch, rows one after another
        forest = self._forest.to(q.device)
        if self.mode == 'hsa':
            return hsa(q, k, v, forest, scale)
        # in float32 for half precision (as hsa itself computes), the output
        # back in the input's dtype
        (q, k, v), _, dtype = to_compute((q, k, v))
        is_global = torch.cat(self._global).to(q.device)
        local = ~is_global
        q_local, k_local, v_local = q[local], k[local], v[local]
        local_out, log_self_weight = hsa(q_local, k_local, v_local, forest, scale,
                                         return_log_self_weight=True)
        # log of HSA's normaliser estimate: s_ii - log a_ii
        log_normaliser = scale * (q_local * k_local).sum(-1) - log_self_weight
        out = torch.empty_like(v)
        start = local_start = 0
        for flags in self._global:
            flags = flags.to(q.device)
            rows = slice(start, start + flags.numel())
            local_rows = slice(local_start, local_start + int((~flags).sum()))
            q_row, k_row, v_row = q[rows], k[rows], v[rows]
            # global rows: the exact softmax over every key of the row
            global_out = masked_softmax(q_row[flags], k_row, v_row, None, scale)
            # other rows: HSA's mass and the global keys' exact scores
            scores = torch.einsum('qhd,khd->qhk', q_local[local_rows], k_row[flags]) * scale
            weights = torch.cat([log_normaliser[local_rows, :, None], scores], -1).softmax(-1)
            mixed = (weights[..., :1] * local_out[local_rows]
                     + torch.einsum('qhk,khd->qhd', weights[..., 1:], v_row[flags]))
            row_out = out[rows]
            row_out[flags] = global_out
            row_out[~flags] = mixed
            start, local_start = rows.stop, local_rows.stop
        return out.to(dtype)


def inject_hsa(model: nn.Module, layers: Optional[Sequence[int]] = None,
               mode: str = 'hsa', key_clustering: Optional[KeyClustering] = None
               ) -> HSAInjection:
    r"""Replaces the softmax attention of :obj:`layers` of :obj:`model` by
    HSA computed from that layer's own :math:`W_Q, W_K, W_V` and attention
    mask (or by a local softmax baseline: see :obj:`mode`).

    Args:
        model (torch.nn.Module): A BERT/RoBERTa-style Hugging Face model.
        layers (list of int, optional): Indices of the self-attention
            modules to replace, in layer order. (default: all)
        mode (str, optional): One of :obj:`MODES` (see the module
            docstring): ``'hsa'``, ``'hsa_global'``, ``'block'``,
            ``'block_global'``, ``'window_global'``, ``'hsa_key_clusters'``
            or ``'cluster_global'``. (default: :obj:`'hsa'`)
        key_clustering (KeyClustering, optional): How the key-cluster modes
            group tokens. (default: :obj:`KeyClustering()`)

    Returns:
        :class:`HSAInjection`: set the structure on it before every forward
        call; :meth:`~HSAInjection.remove` undoes the injection.

    Example::

        >>> handle = inject_hsa(model, layers=[0, 1])          # doctest: +SKIP
        >>> handle.set_hierarchies([document_hierarchy(doc)])  # doctest: +SKIP
        >>> out = model(input_ids, attention_mask=mask)        # doctest: +SKIP
        >>> handle.remove()                                    # doctest: +SKIP
    """
    if mode not in MODES:
        raise ValueError(f"'mode' must be one of {MODES} (got {mode!r})")
    modules = find_self_attention_modules(model)
    _refuse_decoders(model, modules)
    if not modules:
        raise ValueError(f"No BERT-style self-attention module found in "
                         f"{model.__class__.__name__}")
    layers = list(range(len(modules))) if layers is None else [int(i) for i in layers]
    for index in layers:
        if not 0 <= index < len(modules):
            raise ValueError(f"Layer {index} out of range: the model has {len(modules)} "
                             f"self-attention layers")
        if 'forward' in modules[index].__dict__:
            raise ValueError(f"Layer {index} is already replaced; remove() that injection "
                             f"first")
    if key_clustering is not None and mode not in KEY_CLUSTER_MODES:
        raise ValueError(f"'key_clustering' is for modes {KEY_CLUSTER_MODES} (got mode "
                         f"{mode!r})")
    return HSAInjection([modules[i] for i in layers], layers, mode, key_clustering)


def _refuse_decoders(model: nn.Module, modules: Sequence[nn.Module]) -> None:
    # A decoder's attention is causal and fills a key/value cache; under
    # sdpa, transformers passes it neither a mask nor (in every version) the
    # cache by a name the forward checks, so replacing it would silently
    # make it bidirectional and leave the cache empty. Its configuration
    # says so on every attention implementation.
    config = getattr(model, 'config', None)
    for flag in ('is_decoder', 'add_cross_attention', 'is_encoder_decoder'):
        if getattr(config, flag, False) is True:
            raise ValueError(f"HSA injection supports encoders only, but "
                             f"{model.__class__.__name__}'s config has {flag}=True (causal "
                             f"or cross-attention with a key/value cache); load the model as "
                             f"an encoder")
    for index, module in enumerate(modules):
        if getattr(module, 'is_causal', False) is True or \
                getattr(module, 'is_decoder', False) is True:
            raise ValueError(f"HSA injection supports encoders only, but self-attention layer "
                             f"{index} of {model.__class__.__name__} is causal (a decoder)")


def _allowed_keys(mask: Optional[Tensor], size: int, length: int, device) -> Tensor:
    # ``[B, L]`` keys the mask lets through. A Hugging Face 4-D mask is either
    # boolean (True = attend) or additive (0 = attend, very negative = not);
    # HSA can only honour a key-padding mask, the same for every query.
    if mask is None:
        return torch.ones(size, length, dtype=torch.bool, device=device)
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask > torch.finfo(mask.dtype).min / 2
    allowed = allowed.expand(size, -1, -1, length) if allowed.dim() == 4 else allowed
    allowed = allowed.reshape(size, -1, length)  # [B, 1 or L queries, L keys]
    keys = allowed.any(1)
    if allowed.size(1) == length:
        rows = allowed[keys]  # the rows of the unmasked queries
        if not torch.equal(rows, keys.unsqueeze(1).expand(-1, length, -1)[keys]):
            raise ValueError("HSA injection needs a key-padding attention mask (the same "
                             "keys for every query); got one that differs between queries")
    return keys


def _open_to_globals(allowed: List[Tensor], flags: List[Tensor]) -> List[Tensor]:
    # per row [n, n]: the allowed pairs plus every pair with a global token
    return [a | g[:, None] | g[None, :] for a, g in zip(allowed, flags)]


def _global_flags(positions: List[Tensor], sizes: List[int]) -> List[Tensor]:
    # one bool per unmasked token of every row: whether it is global
    flags = []
    for row, (position, size) in enumerate(zip(positions, sizes)):
        if position.numel() and (int(position.min()) < 0 or int(position.max()) >= size):
            raise ValueError(f"Row {row}: global token positions {position.tolist()} must lie "
                             f"in [0, {size})")
        if position.unique().numel() != position.numel():
            raise ValueError(f"Row {row}: global token positions {position.tolist()} repeat")
        flag = torch.zeros(size, dtype=torch.bool)
        flag[position] = True
        flags.append(flag)
    return flags


def masked_softmax(q: Tensor, k: Tensor, v: Tensor, allowed: Optional[Tensor],
                    scale: float) -> Tensor:
    # softmax attention of queries [n, H, D] over keys [m, H, D] restricted
    # to allowed [n, m] (None: all); every row allows its own token
    scores = torch.einsum('qhd,khd->hqk', q, k) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float('-inf'))
    return torch.einsum('hqk,khd->qhd', scores.softmax(-1), v)
