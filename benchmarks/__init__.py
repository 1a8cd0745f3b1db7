r"""Experiments, not library code: scripts that time and size
:mod:`hsa_geo` against baselines and write JSON to ``benchmarks/results/``.
They live beside the package, not in it (a wheel does not ship them), and
run from the repository root as modules: ``python -m benchmarks.<name>``.

* :mod:`benchmarks.scaling` -- HSA vs dense SDPA, a floor pass and
  SGFormer attention on balanced trees, :math:`N = 2^{12} \dots 2^{20}`
  (``python -m benchmarks.scaling``).
* :mod:`benchmarks.energy_terms` -- the cost of a learned
  sibling-position bias, the Euclidean energy and causal HSA relative to
  plain HSA on the same trees, :math:`N = 2^{12} \dots 2^{16}`
  (``python -m benchmarks.energy_terms``).
* :mod:`benchmarks.text_step` -- wall-clock of HSA against softmax
  attention on batches of real IMDB reviews: the attention alone and a
  whole training step (``python -m benchmarks.text_step``).
* :mod:`benchmarks.timing` -- the timing, peak-memory and
  process-isolation helpers they share.

Nothing here is imported by :mod:`hsa_geo` itself, and no test asserts a
timing.
"""
