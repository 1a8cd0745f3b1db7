r"""Experiments, not library code: scripts that time and size
:mod:`hsa_geo` against baselines and write JSON to ``benchmarks/results/``.

* :mod:`hsa_geo.benchmarks.scaling` -- HSA vs dense SDPA, a floor pass and
  SGFormer attention on balanced trees, :math:`N = 2^{12} \dots 2^{20}`
  (``python -m hsa_geo.benchmarks.scaling``).
* :mod:`hsa_geo.benchmarks.energy_terms` -- the cost of a learned
  sibling-position bias, the Euclidean energy and causal HSA relative to
  plain HSA on the same trees, :math:`N = 2^{12} \dots 2^{16}`
  (``python -m hsa_geo.benchmarks.energy_terms``).
* :mod:`hsa_geo.benchmarks.text_step` -- wall-clock of HSA against softmax
  attention on batches of real IMDB reviews: the attention alone and a
  whole training step (``python -m hsa_geo.benchmarks.text_step``).
* :mod:`hsa_geo.benchmarks.timing` -- the timing, peak-memory and
  process-isolation helpers they share.

Nothing here is imported by :mod:`hsa_geo` itself, and no test asserts a
timing.
"""
