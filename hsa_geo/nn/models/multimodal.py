r"""Per-modality input encoders projecting every leaf to one width."""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor
from torch.nn import Embedding, Module, ModuleDict

from hsa_geo.extras import require


class AtomFeatureEncoder(Module):
    r"""OGB atom features (the first 9 integer columns of :obj:`x`, as from
    :func:`ogb.utils.smiles2graph`) embedded by
    :class:`ogb.graphproppred.mol_encoder.AtomEncoder`.

    Args:
        channels (int): Output width.
    """

    def __init__(self, channels: int):
        super().__init__()
        encoders = require('ogb.graphproppred.mol_encoder', extra='ogb')
        self.channels = channels
        self.atom = encoders.AtomEncoder(channels)

    def reset_parameters(self):
        for emb in self.atom.atom_embedding_list:
            torch.nn.init.xavier_uniform_(emb.weight.data)

    def forward(self, x: Tensor) -> Tensor:
        return self.atom(x[:, :9].long())

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}({self.channels})'


class TokenEncoder(Module):
    r"""Token embedding plus learned position embedding,
    :math:`\mathbf{E}_{\mathrm{tok}}[x_{i,0}] + \mathbf{E}_{\mathrm{pos}}[x_{i,1}]`
    (column 0 the token id, column 1 the position in the sequence;
    positions beyond :obj:`max_positions - 1` share the last embedding).

    Args:
        vocab_size (int): Number of token ids.
        channels (int): Output width.
        max_positions (int, optional): Position embeddings. (default: :obj:`512`)
    """

    def __init__(self, vocab_size: int, channels: int, max_positions: int = 512):
        super().__init__()
        self.vocab_size = vocab_size
        self.channels = channels
        self.max_positions = max_positions
        self.token = Embedding(vocab_size, channels)
        self.position = Embedding(max_positions, channels)

    def reset_parameters(self):
        self.token.reset_parameters()
        self.position.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        x = x.long()
        if x.dim() == 1:
            x = torch.stack([x, torch.zeros_like(x)], dim=1)
        token = x[:, 0]
        if token.numel() and (int(token.min()) < 0 or int(token.max()) >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size - 1}]: "
                             f"[{int(token.min())}, {int(token.max())}]")
        return self.token(token) + self.position(x[:, 1].clamp(0, self.max_positions - 1))

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}({self.vocab_size}, {self.channels})'


class MultiModalEncoder(Module):
    r"""Encodes the leaves of a multi-modal nested signal: leaf :math:`i` of
    modality :math:`m_i` gets :math:`f_{m_i}(\mathbf{x}_i) + \mathbf{e}_{m_i}`,
    its modality's encoder plus a learned modality embedding, all of width
    :obj:`channels`.

    Leaves of every modality are stored as rows of one (padded) :obj:`x`;
    each encoder reads the columns it needs from its own rows.

    Args:
        encoders (Mapping[str, torch.nn.Module]): One encoder per modality,
            in modality-id order (id :math:`k` = the :math:`k`-th entry, the
            order of the parts given to :func:`hsa_geo.hierarchy.compose`).
        channels (int): Output width of every encoder.
        modality_embedding (bool, optional): Add a learned embedding per
            modality. (default: :obj:`True`)
    """

    def __init__(self, encoders: Mapping[str, Module], channels: int,
                 modality_embedding: bool = True):
        super().__init__()
        if len(encoders) == 0:
            raise ValueError("MultiModalEncoder needs at least one modality encoder")
        self.names = list(encoders)
        self.channels = channels
        self.encoders = ModuleDict(dict(encoders))
        self.modality = Embedding(len(self.names), channels) if modality_embedding else None

    def reset_parameters(self):
        for encoder in self.encoders.values():
            if hasattr(encoder, 'reset_parameters'):
                encoder.reset_parameters()
        if self.modality is not None:
            self.modality.reset_parameters()

    def forward(self, x: Tensor, modality: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        r"""Returns ``[N, channels]`` for leaf inputs :obj:`x` ``[N, *]`` and
        modality ids :obj:`modality` ``[N]``."""
        modality = modality.view(-1).long()
        if modality.numel() != x.size(0):
            raise ValueError(f"modality has {modality.numel()} entries for {x.size(0)} leaves")
        if modality.numel() and (int(modality.min()) < 0 or int(modality.max()) >= len(self.names)):
            raise ValueError(f"modality id out of range [0, {len(self.names) - 1}] "
                             f"(modalities {self.names})")
        out = None
        for index, name in enumerate(self.names):
            mask = modality == index
            if not bool(mask.any()):
                continue
            encoded = self.encoders[name](x[mask])
            if out is None:
                out = encoded.new_zeros(x.size(0), self.channels, dtype=dtype or encoded.dtype)
            out[mask] = encoded.to(out.dtype)
        if out is None:
            out = torch.zeros(x.size(0), self.channels, device=x.device,
                              dtype=dtype or torch.get_default_dtype())
        if self.modality is not None:
            out = out + self.modality(modality)
        return out

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}({self.names}, {self.channels})'
