r"""hsa_geo's compiled CPU code (``hsa_geo/csrc``), built on first use.

Two parts, one extension: the fused HSA sweeps
(:mod:`hsa_geo.functional.kernel`) and the linear-time tree analysis that
builds a hierarchy's depths, leaf counts and family tables
(:mod:`hsa_geo.hierarchy.native_tables`). Both have a pure PyTorch
equivalent that gives the same results.

The extension is compiled with :func:`torch.utils.cpp_extension.load` (a
C++ compiler and ninja are needed; ``make setup`` builds it ahead) and
cached by torch between runs. Without a compiler hsa_geo warns once and
uses the PyTorch code; ``HSA_GEO_CPU_KERNEL=0`` turns the compiled code off.
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Optional

_SOURCES = [os.path.join(os.path.dirname(__file__), 'csrc', name)
            for name in ('hsa_sweeps.cpp', 'tree_tables.cpp')]
_LOCK = threading.Lock()
#: None until the first attempt, then whether the extension loaded
_LOADED: Optional[bool] = None
#: False when ``HSA_GEO_CPU_KERNEL=0``: nothing compiled is used
ENABLED_BY_ENVIRONMENT = os.environ.get('HSA_GEO_CPU_KERNEL', '1') != '0'


def load(verbose: bool = False) -> bool:
    r"""Compiles (once; torch caches the build) and loads the extension.
    Returns whether it is available; warns once if it cannot be built."""
    global _LOADED
    with _LOCK:
        if _LOADED is None:
            try:
                from torch.utils.cpp_extension import load as load_extension
                # OpenMP: at::parallel_for is a header template that runs the
                # families of a level on torch's threads only when the
                # extension itself is built with it (libgomp is torch's own)
                load_extension('hsa_geo_native', _SOURCES, extra_cflags=['-O3', '-fopenmp'],
                               extra_ldflags=['-fopenmp'], is_python_module=False,
                               verbose=verbose)
                _LOADED = True
            except Exception as error:  # no compiler, no ninja, a read-only cache...
                _LOADED = False
                message = str(error).strip()
                warnings.warn(f"hsa_geo's compiled CPU code could not be built "
                              f"({type(error).__name__}: "
                              f"{message.splitlines()[-1] if message else ''}); HSA runs on "
                              f"the tensor sweeps instead (same results, slower on small "
                              f"graphs)", RuntimeWarning, stacklevel=2)
    return _LOADED
