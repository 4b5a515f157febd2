#!/usr/bin/env bash
# One prepared accelerator check, run from the repository root on a GPU
# machine with jax[cuda], flax and optax installed (no network needed):
#   OUT=gpu_out bash benchmarks/gpu_check.sh
# It records the device, runs the operator benchmark's quick mode, measures
# CIFAR-10 ResNet-20 throughput on synthetic records in the binary format,
# runs the operator's exactness tests on the accelerator, then the first
# compile of the default update against optax.scale (issue 12) and the peak
# host memory of the large cases. Each step has a time limit so that one call
# fits a short device lease.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{ nvidia-smi -L; $PY -c "import jax, jaxlib, optax, flax, numpy; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'optax', optax.__version__, 'flax', flax.__version__, 'numpy', numpy.__version__); print(jax.devices())"; } 2>&1 | tee "$OUT/device.txt"
timeout "${T_OPERATOR:-270}" $PY benchmarks/operator.py --quick 2>&1 | tee "$OUT/operator_quick.txt"
timeout "${T_CIFAR:-150}" $PY examples/cifar10.py --synthetic 20000 --epochs 3 --out "$OUT/cifar_synth.json" 2>&1 | tail -n 30 | tee "$OUT/cifar_synth.txt"
timeout "${T_TESTS:-120}" $PY -m pytest -q -x -p no:cacheprovider tests/test_operator.py -k "MethodTest or DenseReferenceTest" 2>&1 | tail -n 15 | tee "$OUT/tests_gpu.txt"
# Issue 12, item 3: the first compile of the ResNet-50 update ("auto", "fft")
# against optax.scale, cold caches, the compiles in turn, with the number of
# distinct dot shapes (XLA autotunes each one); and LSGD on ResNet-18.
timeout "${T_STEP:-240}" $PY benchmarks/step.py --runs 3 --reps 12 2>&1 | tee "$OUT/step.txt"
timeout "${T_COMPILE:-180}" $PY benchmarks/operator.py --sections compile lsgd --compile-reps 3 --reps 11 2>&1 | tee "$OUT/compile_lsgd.txt"
# Bounded memory at the large sizes, on the accelerator too.
timeout "${T_MEMORY:-90}" $PY benchmarks/memory.py lsgd 3,3,128,128 axis 1048576 lsgd-tree resnet50 2>&1 | tee "$OUT/memory.txt"
