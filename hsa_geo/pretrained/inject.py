r"""Zero-shot HSA inside a pretrained BERT-style model (paper §4.3).

The self-attention modules of chosen layers keep their weights; only the
step from :math:`Q, K, V` to the attention output changes: it becomes HSA
over a per-input token hierarchy (or, as a baseline, softmax restricted to
token groups). Nothing is trained, and :meth:`HSAInjection.remove` restores
the original forward.

Works with Hugging Face BERT/RoBERTa-style encoders (``transformers`` ≥ 5):
a self-attention module with ``query``, ``key`` and ``value`` linear maps,
``num_attention_heads``, ``attention_head_size`` and ``scaling``, called as
``module(hidden_states, attention_mask=..., ...)`` and returning
``(output, weights)``."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from hsa_geo.functional import hsa
from hsa_geo.hierarchy.hierarchy import Hierarchy

MODES = ('hsa', 'block')


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
    :meth:`set_hierarchies` (mode ``'hsa'``) or :meth:`set_groups` (mode
    ``'block'``), one entry per row of the batch, covering exactly the
    tokens the attention mask lets through, in order. Use as a context
    manager or call :meth:`remove` to undo.
    """

    def __init__(self, modules: Sequence[nn.Module], layers: Sequence[int], mode: str):
        self.modules = list(modules)
        self.layers = list(layers)
        self.mode = mode
        self._forest: Optional[Hierarchy] = None
        self._groups: Optional[List[Tensor]] = None
        self._sizes: Optional[List[int]] = None
        self._saved = []
        for module in self.modules:
            self._saved.append(module.__dict__.get('forward'))
            module.forward = self._make_forward(module)

    # ----------------------------------------------------------- structure
    def set_hierarchies(self, hierarchies: Sequence[Hierarchy]) -> 'HSAInjection':
        r"""One hierarchy per batch row over its unmasked tokens."""
        if self.mode != 'hsa':
            raise ValueError("set_hierarchies() is for mode='hsa'; use set_groups()")
        self._sizes = [h.num_leaves for h in hierarchies]
        self._forest = Hierarchy.batch_hierarchies(list(hierarchies))
        return self

    def set_groups(self, groups: Sequence[Tensor]) -> 'HSAInjection':
        r"""One group-id tensor per batch row over its unmasked tokens:
        tokens attend only to tokens of their own group."""
        if self.mode != 'block':
            raise ValueError("set_groups() is for mode='block'; use set_hierarchies()")
        self._groups = [torch.as_tensor(g, dtype=torch.long).view(-1) for g in groups]
        self._sizes = [g.numel() for g in self._groups]
        return self

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
                    past_key_values=None, **kwargs):
            if past_key_values is not None:
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
            raise RuntimeError("Set the structure (set_hierarchies/set_groups) before the "
                               "forward call")
        if counts != self._sizes:
            raise ValueError(f"The attention mask lets through {counts} tokens per row, but "
                             f"the structure covers {self._sizes}")
        out = hidden.new_zeros(size, length, heads, head_dim)
        if self.mode == 'hsa':
            packed = hsa(q[valid], k[valid], v[valid], self._forest.to(hidden.device), scale)
            out[valid] = packed
        else:
            for row in range(size):
                out[row, valid[row]] = _grouped_softmax(
                    q[row, valid[row]], k[row, valid[row]], v[row, valid[row]],
                    self._groups[row].to(hidden.device), scale)
        # Masked (padding) query rows: the original softmax over the
        # unmasked keys, so that the whole output matches the original model
        # wherever the structure is flat.
        for row in (~valid).any(1).nonzero().view(-1).tolist():
            pad, keep = ~valid[row], valid[row]
            scores = torch.einsum('qhd,khd->hqk', q[row, pad], k[row, keep]) * scale
            out[row, pad] = torch.einsum('hqk,khd->qhd', scores.softmax(-1), v[row, keep])
        return out.reshape(size, length, heads * head_dim)


def inject_hsa(model: nn.Module, layers: Optional[Sequence[int]] = None,
               mode: str = 'hsa') -> HSAInjection:
    r"""Replaces the softmax attention of :obj:`layers` of :obj:`model` by
    HSA computed from that layer's own :math:`W_Q, W_K, W_V` and attention
    mask (or, with :obj:`mode='block'`, by softmax inside token groups).

    Args:
        model (torch.nn.Module): A BERT/RoBERTa-style Hugging Face model.
        layers (list of int, optional): Indices of the self-attention
            modules to replace, in layer order. (default: all)
        mode (str, optional): ``'hsa'`` or ``'block'``. (default: :obj:`'hsa'`)

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
    return HSAInjection([modules[i] for i in layers], layers, mode)


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


def _grouped_softmax(q: Tensor, k: Tensor, v: Tensor, group: Tensor, scale: float) -> Tensor:
    scores = torch.einsum('qhd,khd->hqk', q, k) * scale
    same = group[:, None] == group[None, :]
    scores = scores.masked_fill(~same, float('-inf'))
    return torch.einsum('hqk,khd->qhd', scores.softmax(-1), v)
