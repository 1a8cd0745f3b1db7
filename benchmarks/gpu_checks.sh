#!/usr/bin/env bash
# The checks and timings a lent CUDA machine runs in one call, from the
# repository root (see "On a GPU" in docs/results_speed.rst): the CUDA
# tests, the batches table and the scaling sweep on the GPU. Results go to
# $OUT (default: benchmarks/results/gpu).
# The batch workloads need the offline data, absent there: save them first
# with `python -m benchmarks.batches --save-workloads .gpu/workloads.pt`
# and carry .gpu along.
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,utilization.gpu --format=csv
$PYTHON -c "import torch, torch_geometric; print('torch', torch.__version__, 'pyg', torch_geometric.__version__, torch.cuda.get_device_name())"
timeout "${TEST_TIMEOUT:-200}" $PYTHON -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    tests/test_functional.py tests/test_distributed.py -k "cuda" 2>&1 | tee "$OUT/test_cuda.log" | tail -25
# the Triton sweeps compiled (never run on a GPU before: engine('auto') does not pick them
# until this passes); a first run compiles their programs
timeout "${TRITON_TIMEOUT:-240}" $PYTHON -m pytest -q -p no:cacheprovider tests/test_triton.py \
    -k "cuda" 2>&1 | tee "$OUT/test_triton_cuda.log" | tail -15
timeout "${BATCHES_TIMEOUT:-150}" $PYTHON -m benchmarks.batches --device cuda \
    --saved-workloads .gpu/workloads.pt --repeats 15 --out "$OUT/batches_cuda.json" 2>&1 \
    | tee "$OUT/batches_cuda.log" | tail -20
timeout "${SCALING_TIMEOUT:-200}" $PYTHON -m benchmarks.scaling --device cuda \
    --min-log2 12 --max-log2 20 --dense-max-log2 17 --repeats 5 --budget-s 10 --out "$OUT/scaling_cuda.json" 2>&1 \
    | tee "$OUT/scaling_cuda.log" | tail -25
