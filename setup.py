r"""Compiles hsa_geo's CPU kernel (``hsa_geo/csrc``) into the package at
install time; everything else is declared in ``pyproject.toml``.

The library links against the torch that builds it, so build without
isolation, in the environment that will run it::

    pip install --no-build-isolation .

The extension is optional: without torch in the build environment (an
isolated build) or without a C++ compiler the install still succeeds, and
:func:`hsa_geo.native.load` builds the kernel on first use instead (or, with
no compiler there either, HSA runs its tensor sweeps).
"""
import importlib.util
import os
import sys

from setuptools import setup


def _native():
    # hsa_geo/native.py alone (it imports only the standard library at the
    # top): the sources, flags and library name the runtime looks for
    spec = importlib.util.spec_from_file_location(
        '_hsa_geo_native', os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                        'hsa_geo', 'native.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _skip(reason):
    print(f"hsa_geo: the CPU kernel is not compiled at install time ({reason}); "
          f"it is built on first use instead", file=sys.stderr)
    return {}


def _extension():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return _skip('no torch in the build environment: '
                     'pip install --no-build-isolation builds against yours')

    class OptionalBuildExtension(BuildExtension):
        # torch's builder raises more than setuptools' optional=True catches
        # (a missing compiler or a failed ninja build is a RuntimeError)
        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 - any failure leaves the JIT path
                _skip(f'{type(error).__name__}: {error}')

    native = _native()
    relative = [os.path.relpath(path, os.path.dirname(os.path.abspath(__file__)))
                for path in native.SOURCES]
    extension = CppExtension(f'hsa_geo.csrc.{native.installed_name()}', relative,
                             # -g0 overrides the -g of Python's own flags: without debug
                             # information the build is faster and the library smaller
                             extra_compile_args={'cxx': [*native.CFLAGS, '-g0']},
                             extra_link_args=list(native.LDFLAGS), optional=True)
    return {'ext_modules': [extension], 'cmdclass': {'build_ext': OptionalBuildExtension}}


setup(**_extension())
