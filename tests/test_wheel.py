r"""The wheel is the library, and it runs where no compiler is.

Built here (with a compiler, against this environment's torch), the wheel is
installed into a fresh virtual environment with torch and the core
dependencies only; there, with no compiler on the PATH, the README's
quickstart (read from README.md, so the two cannot drift) runs on the CPU
kernel the wheel carries, every module of the package imports, and each
optional feature names the extra it needs. A few minutes: the venv installs
torch from the local wheel and the rest from the package index.
"""
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
COMPILERS = ('cc', 'c++', 'gcc', 'g++', 'clang', 'clang++', 'ninja')


def readme_quickstart() -> str:
    r"""The first ``python`` code block under README.md's "Quickstart"."""
    with open(osp.join(ROOT, 'README.md')) as handle:
        section = handle.read().split('\n## Quickstart\n', 1)[1]
    return re.search(r'```python\n(.*?)```', section, re.DOTALL).group(1)


def _run(command, **kwargs):
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f'{command}\n{done.stdout}\n{done.stderr}'
    return done


def _source_copy(target):
    # the files git would commit, so that a build here leaves no build/ or
    # egg-info in the checkout
    names = _run(['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z'],
                 cwd=ROOT).stdout.split('\0')
    for name in filter(None, names):
        source = osp.join(ROOT, name)
        if osp.isfile(source) and not name.startswith('benchmarks/results/'):
            os.makedirs(osp.dirname(osp.join(target, name)), exist_ok=True)
            shutil.copyfile(source, osp.join(target, name))
    return target


def test_readme_quickstart_runs_here():
    # the fast twin of the check below, in this environment
    exec(compile(readme_quickstart(), 'README.md', 'exec'), {})


def test_a_missing_optional_module_names_its_extra():
    import doctest

    from hsa_geo import extras
    assert doctest.testmod(extras).failed == 0
    with pytest.raises(ImportError, match=re.escape("pip install 'hsa_geo[plot]'")):
        extras.require('hsa_geo_no_such_module.figure', 'plot')


def test_the_build_on_first_use_is_keyed_by_environment_and_sources(monkeypatch, tmp_path):
    from hsa_geo import native
    folder, name = native.build_directory(), native.installed_name()
    native.load()  # torch's builder once appended to the flags, changing the key
    assert (native.build_directory(), native.installed_name()) == (folder, name)
    monkeypatch.setattr(sys, 'prefix', str(tmp_path))  # another venv
    assert native.build_directory() != folder
    monkeypatch.undo()
    edited = []
    for path in native.SOURCES:  # sources edited since the wheel was built
        edited.append(str(tmp_path / osp.basename(path)))
        shutil.copyfile(path, edited[-1])
    with open(edited[-1], 'a') as handle:
        handle.write('// edited\n')
    monkeypatch.setattr(native, 'SOURCES', edited)
    assert native.build_directory() != folder and native.installed_name() != name


@pytest.mark.slow
def test_wheel_in_a_clean_venv_without_compiler(tmp_path):
    # One test, not several sharing fixtures: under pytest-xdist each worker
    # would build the wheel and the venv again.
    wheel = _build_wheel(tmp_path)
    _check_wheel_contents(wheel)
    python = _clean_venv(wheel, tmp_path)
    env = _without_compiler(python, tmp_path)
    _check_readme_quickstart(python, env, tmp_path)
    _check_core_imports_and_extras(python, env, tmp_path)


def _build_wheel(tmp_path):
    source = _source_copy(str(tmp_path / 'source'))
    out = tmp_path / 'wheel'
    _run([sys.executable, '-m', 'pip', 'wheel', '--no-build-isolation', '--no-deps',
          '--wheel-dir', str(out), source], timeout=900)
    (path, ) = out.glob('hsa_geo-*.whl')
    return path


def _check_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    # the library alone: no benchmarks, examples or tests
    assert all(re.match(r'hsa_geo(/|-[^/]*\.dist-info/)', name) for name in names), \
        sorted({name.split('/')[0] for name in names})
    assert any(re.fullmatch(r'hsa_geo/csrc/_native_[0-9a-f]{16}\..*\.so', name) for name in names)
    assert 'hsa_geo/csrc/hsa_sweeps.cpp' in names  # for the build on first use


def _clean_venv(wheel, tmp_path):
    venv = tmp_path / 'venv'
    _run([sys.executable, '-m', 'venv', str(venv)], timeout=300)
    python = str(venv / 'bin' / 'python')
    # the torch the wheel's kernel was compiled against; the rest as pip resolves it
    torch_pin = 'torch==' + torch.__version__.split('+')[0]
    _run([python, '-m', 'pip', 'install', '-q', torch_pin, str(wheel)], timeout=1500)
    return python


def _without_compiler(python, tmp_path):
    env = {key: value for key, value in os.environ.items()
           if key not in ('CC', 'CXX', 'PYTHONPATH', 'HSA_GEO_CPU_KERNEL')}
    env.update(PATH=osp.dirname(python), TORCH_EXTENSIONS_DIR=str(tmp_path / 'extensions'))
    return env


def _check_readme_quickstart(python, env, tmp_path):
    script = '\n'.join([
        'import shutil',
        f'assert not any(map(shutil.which, {COMPILERS!r})), "a compiler on the PATH"',
        readme_quickstart(),
        'import hsa_geo',
        'from hsa_geo import native',
        'assert "site-packages" in hsa_geo.__file__, hsa_geo.__file__',
        'assert native.load() and native.installed_library()',
        'print("quickstart ran on", native.installed_library())',
    ])
    done = _run([python, '-c', script], cwd=str(tmp_path), env=env, timeout=600)
    assert 'quickstart ran on' in done.stdout
    assert 'could not be built' not in done.stderr, done.stderr
    # the installed kernel served: no build on first use was even begun
    assert "building hsa_geo's CPU kernel" not in done.stderr, done.stderr
    assert not osp.exists(env['TORCH_EXTENSIONS_DIR'])


def _check_core_imports_and_extras(python, env, tmp_path):
    # every module imports with the core dependencies alone, but for the
    # Triton programs, which say which extra they need; each optional
    # feature, used without its extra, says which extra to install
    script = textwrap.dedent("""
        import importlib, pkgutil
        import torch
        import hsa_geo
        from hsa_geo import Hierarchy
        for module in pkgutil.walk_packages(hsa_geo.__path__, 'hsa_geo.'):
            try:
                importlib.import_module(module.name)
            except ImportError as error:
                assert module.name == 'hsa_geo.functional.triton_kernels', module.name
                assert "'triton' extra" in str(error), str(error)

        from hsa_geo.hierarchy import from_edge_index_metis
        from hsa_geo.plot import plot_hierarchy
        from hsa_geo.pretrained import load_minilm
        from hsa_geo.text import load_imdb, load_wordpiece_tokenizer
        tree = Hierarchy.from_parent(torch.tensor([2, 2, -1]), num_leaves=2)
        features = [
            ('metis', lambda: from_edge_index_metis(torch.tensor([[0, 1], [1, 0]]), 2)),
            ('plot', lambda: plot_hierarchy(tree)),
            ('text', load_imdb),
            ('text', lambda: load_wordpiece_tokenizer('.')),
            ('hf', load_minilm),
        ]
        for extra, feature in features:
            try:
                feature()
            except ImportError as error:
                assert f"'{extra}' extra" in str(error), (extra, str(error))
                print('names its extra:', error)
            else:
                raise AssertionError(f'{feature} ran without the {extra} extra')
    """)
    done = _run([python, '-c', script], cwd=str(tmp_path), env=env, timeout=600)
    assert done.stdout.count('names its extra:') == 5, done.stdout
