r"""Optional dependencies: one import that, when a module is missing, says
which extra of ``pip install 'hsa_geo[...]'`` brings it.

The core (:mod:`hsa_geo`, its layers, builders and functional HSA) imports
only torch, torch-geometric, networkx, numpy and scipy. The features that
need more (plots, the text and pretrained-model tools, METIS, OGB's
encoders) import it when first used; ``pyproject.toml`` lists the extras.
"""
from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    r"""Imports :obj:`module`; if it is missing, raises an
    :class:`ImportError` that names the extra which installs it.

    Example::

        >>> require('math', extra='plot').sqrt(4.0)
        2.0
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{module.split('.')[0]} is missing: it comes with hsa_geo's "
                          f"'{extra}' extra (pip install 'hsa_geo[{extra}]')") from error
