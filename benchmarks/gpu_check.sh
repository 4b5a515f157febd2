#!/usr/bin/env bash
# The accelerator check, one call on a lent GPU machine (jax with CUDA, flax
# and optax installed; no network needed), from the repository root:
#   OUT=gpu_out bash benchmarks/gpu_check.sh
# It records the device and runs benchmarks/device_check.py: exactness on the
# device (against float64 and the CPU backend, transformations included), the
# ResNet-18 step at batch 128 and 32 with its control row, the update of
# ResNet-18's and ResNet-50's kernels against a device copy, and the first
# compile of that update against optax.scale; each for the library's FFT
# (the default, the old path), its method="stencil", the FFT on the layout
# view and, in the step, two reference variants. It finishes in about 5
# minutes on an H200 and is cut at 6; what finished is in
# $OUT/device_check.md.
#
# With FASHION_DATA=DIR (a folder with Fashion-MNIST's four IDX files,
# carried with the working tree), a Fashion-MNIST worker then trains for
# T_FASHION seconds (default 240) into $OUT/fashion/runs.jsonl, the records
# of examples/fashion_mnist.py (each names its device; merge them into a
# study's runs.jsonl only where the whole study ran on that device).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export OUT PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi -L 2>&1 | tee "$OUT/nvidia-smi.txt"
timeout "${T_CHECK:-360}" "$PY" benchmarks/device_check.py "$@"
if [[ -n "${FASHION_DATA:-}" ]]; then
  timeout "${T_FASHION:-240}" "$PY" examples/fashion_mnist.py \
    --data-dir "$FASHION_DATA" --out "$OUT/fashion" \
    2>&1 | tail -40 | tee "$OUT/fashion.log"
fi
