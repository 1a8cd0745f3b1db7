r"""hsa_geo's compiled CPU code (``hsa_geo/csrc``): built at install time,
or on first use.

Two parts, one library: the fused HSA sweeps
(:mod:`hsa_geo.functional.kernel`) and the linear-time tree analysis that
builds a hierarchy's depths, leaf counts and family tables
(:mod:`hsa_geo.hierarchy.native_tables`). Both have a pure PyTorch
equivalent that gives the same results.

:func:`load` takes the first of:

1. the library that ``setup.py`` compiled into the package
   (``pip install --no-build-isolation .``, or a wheel built that way). Its
   file name carries :func:`source_hash`, so a library left over from older
   sources (an editable install whose ``csrc`` changed) is never loaded;
2. a build on first use with :func:`torch.utils.cpp_extension.load` (a C++
   compiler and ninja are needed; ``make setup`` runs it ahead). It says so
   before it compiles, and caches the result per environment: the build
   folder is keyed by ``sys.prefix``, the Python and torch versions and the
   sources, so two virtual environments, or two checkouts of different
   sources, never rebuild each other's;
3. nothing: hsa_geo warns once and uses the PyTorch code.

``HSA_GEO_CPU_KERNEL=0`` turns the compiled code off.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.machinery
import os
import sys
import threading
import warnings
from typing import List, Optional, Tuple

# the sources, and the library setup.py compiles from them: a folder that is
# no Python package, so that nothing that walks hsa_geo's modules imports it
_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc')
#: the C++ sources, shipped with the package for the build on first use
SOURCES: List[str] = [os.path.join(_CSRC, name) for name in ('hsa_sweeps.cpp', 'tree_tables.cpp')]
# OpenMP: at::parallel_for is a header template that runs the families of a
# level on torch's threads only when the library itself is built with it
# (libgomp is torch's own). -fno-trapping-math changes no result (nothing
# here reads the floating-point exception flags); it lets the compiler turn
# comparisons into selects, so that the kernel's float32 exp loop vectorises.
# Both builds use these flags.
# Tuples: torch's builders append to the lists they are given.
CFLAGS: Tuple[str, ...] = ('-O3', '-fopenmp', '-fno-trapping-math')
LDFLAGS: Tuple[str, ...] = ('-fopenmp', )
#: what the build on first use is named (torch.ops sees the operators, not this)
JIT_NAME = 'hsa_geo_native'
_LOCK = threading.Lock()
#: None until the first attempt, then whether the library loaded
_LOADED: Optional[bool] = None
#: False when ``HSA_GEO_CPU_KERNEL=0``: nothing compiled is used
ENABLED_BY_ENVIRONMENT = os.environ.get('HSA_GEO_CPU_KERNEL', '1') != '0'


def source_hash() -> str:
    r"""The first 16 hex digits of the SHA-256 of :obj:`SOURCES` and the
    compiler flags: what names the installed library and keys the build on
    first use."""
    digest = hashlib.sha256(' '.join(CFLAGS + LDFLAGS).encode())
    for path in SOURCES:
        with open(path, 'rb') as handle:
            digest.update(handle.read())
    return digest.hexdigest()[:16]


def installed_name() -> str:
    r"""The name (in ``hsa_geo/csrc``, before the extension suffix) of the
    library that ``setup.py`` compiles from the current sources."""
    return f'_native_{source_hash()}'


def installed_library() -> Optional[str]:
    r"""Path of the installed library built from the current sources, or
    :obj:`None` when there is none (a wheel built without a compiler, an
    editable install, sources changed since the build)."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(_CSRC, installed_name() + suffix)
        if os.path.isfile(path):
            return path
    return None


def build_directory() -> str:
    r"""Where the build on first use goes: a folder of torch's extension
    root (``TORCH_EXTENSIONS_DIR`` or torch's default) named by this
    environment (``sys.prefix``, Python, torch) and :func:`source_hash`."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root
    key = '\0'.join([os.path.realpath(sys.prefix), sys.version, torch.__version__,
                     source_hash()])
    root = os.environ.get('TORCH_EXTENSIONS_DIR') or get_default_build_root()
    return os.path.join(root, f'hsa_geo_{hashlib.sha256(key.encode()).hexdigest()[:16]}')


def load(verbose: bool = False) -> bool:
    r"""Loads the library (the installed one, else a build on first use,
    see the module's description). Returns whether it is available; warns
    once if it is neither installed nor can be built."""
    global _LOADED
    with _LOCK:
        if _LOADED is None:
            import torch
            try:
                installed, reason = installed_library(), 'none was compiled at install'
            except OSError as error:  # sources missing: the build below says so
                installed, reason = None, _last_line(error)
            if installed is not None:
                try:
                    torch.ops.load_library(installed)
                    _LOADED = True
                except Exception as error:  # e.g. built against another torch
                    reason = f'the one compiled at install does not load ({_last_line(error)})'
            if not _LOADED:
                _LOADED = _build_on_first_use(reason, verbose)
    return _LOADED


def _build_on_first_use(reason: str, verbose: bool) -> bool:
    try:
        from torch.utils.cpp_extension import load as load_extension
        folder = build_directory()
        if not glob.glob(os.path.join(folder, f'{JIT_NAME}*.so')):
            print(f"hsa_geo: building hsa_geo's CPU kernel, ~40 s, once per environment "
                  f"({reason}; cached in {folder})", file=sys.stderr, flush=True)
        os.makedirs(folder, exist_ok=True)
        load_extension(JIT_NAME, SOURCES, extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                       build_directory=folder, is_python_module=False, verbose=verbose)
        return True
    except Exception as error:  # no compiler, no ninja, a read-only cache...
        warnings.warn(f"hsa_geo's compiled CPU code could not be built "
                      f"({type(error).__name__}: {_last_line(error)}); HSA runs on "
                      f"the tensor sweeps instead (same results, slower on small "
                      f"graphs)", RuntimeWarning, stacklevel=3)
        return False


def _last_line(error: BaseException) -> str:
    message = str(error).strip()
    return message.splitlines()[-1] if message else ''
