r"""The score terms of HSA as one value, carried from the checks at the
boundary (:func:`hsa_geo.functional.checks.check_score_terms`) into every engine.

The scores HSA approximates are

.. math::
    s_{ij} = \tau\, q_i^\top k_j + r_i + c_j + b(B, C),

a bilinear term, a row term :math:`r_i`, a column term :math:`c_j` and the
bias of the sibling pair :math:`(B, C)` that holds the block of
:math:`(i, j)` (docs/derivation.rst). The dot energy has no row or column
term; the Euclidean energy
:math:`-\tfrac{\tau}{2}\Vert q_i - k_j\Vert^2` has
:math:`r_i = -\tfrac{\tau}{2}\Vert q_i\Vert^2` (constant along a row, so it
cancels from the attention and only enters :math:`\phi`) and
:math:`c_j = -\tfrac{\tau}{2}\Vert k_j\Vert^2` (which the sweeps carry as
the mean squared key norm of every subtree).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

from torch import Tensor


class ScoreTerms(NamedTuple):
    r"""Everything of the scores beyond :math:`\tau\, q_i^\top k_j`."""
    #: the pair bias: ``[E, H]`` in :meth:`~hsa_geo.Hierarchy.sibling_pairs`
    #: order at the seam; inside an engine, in that engine's order (``[H, E]``
    #: for the CPU kernel, ``[H, P]`` padded for the tensor sweeps)
    pair_bias: Optional[Tensor] = None
    #: the Euclidean energy's row and column terms
    euclidean: bool = False
    #: a child attends only to itself and to earlier siblings
    causal: bool = False

    @classmethod
    def of(cls, energy: str, pair_bias: Optional[Tensor] = None,
           causal: Union[bool, str] = False) -> 'ScoreTerms':
        r"""The terms of :obj:`energy` (:obj:`"dot"` or :obj:`"euclidean"`);
        :obj:`causal="strict"` counts as causal."""
        return cls(pair_bias, energy == 'euclidean', bool(causal))

    @property
    def energy(self) -> str:
        return 'euclidean' if self.euclidean else 'dot'

    def row_term(self, q: Tensor, scale: float) -> Optional[Tensor]:
        r""":math:`r_i` of every row ``[N, H]``, or :obj:`None` (dot)."""
        return -0.5 * scale * (q * q).sum(-1) if self.euclidean else None

    def column_term(self, k: Tensor, scale: float) -> Optional[Tensor]:
        r""":math:`c_j` of every column ``[N, H]``, or :obj:`None` (dot)."""
        return -0.5 * scale * (k * k).sum(-1) if self.euclidean else None
