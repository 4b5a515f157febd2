#!/usr/bin/env bash
# The accelerator check, one call on a lent GPU machine (jax with CUDA, flax
# and optax installed; no network needed), from the repository root:
#   OUT=gpu_out bash benchmarks/gpu_check.sh
# It records the device and runs benchmarks/device_check.py: exactness on the
# device (against float64 and the CPU backend, transformations included), the
# ResNet-18 step at batch 128 and 32 with its control row, the update of
# ResNet-50's kernels against a device copy with and without the layout view,
# and the first compile of that update against optax.scale. It finishes in
# about 5 minutes on an H200 and is cut at 6; what finished is in
# $OUT/device_check.md.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export OUT PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi -L 2>&1 | tee "$OUT/nvidia-smi.txt"
timeout "${T_CHECK:-360}" "$PY" benchmarks/device_check.py "$@"
