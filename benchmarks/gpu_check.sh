#!/usr/bin/env bash
# One prepared accelerator check, run from the repository root on a GPU
# machine with jax[cuda], flax and optax installed (no network needed):
#   OUT=gpu_out bash benchmarks/gpu_check.sh
# It records the device, runs the operator benchmark's quick mode, measures
# CIFAR-10 ResNet-20 throughput on synthetic records in the binary format,
# and runs the operator's exactness tests on the accelerator. Each step has a
# time limit so that one call fits a short device lease.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{ nvidia-smi -L; $PY -c "import jax, jaxlib, optax, flax, numpy; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'optax', optax.__version__, 'flax', flax.__version__, 'numpy', numpy.__version__); print(jax.devices())"; } 2>&1 | tee "$OUT/device.txt"
timeout "${T_OPERATOR:-270}" $PY benchmarks/operator.py --quick 2>&1 | tee "$OUT/operator_quick.txt"
timeout "${T_CIFAR:-150}" $PY examples/cifar10.py --synthetic 20000 --epochs 3 --out "$OUT/cifar_synth.json" 2>&1 | tail -n 30 | tee "$OUT/cifar_synth.txt"
timeout "${T_TESTS:-120}" $PY -m pytest -q -x -p no:cacheprovider tests/test_operator.py -k "MethodTest or DenseReferenceTest" 2>&1 | tail -n 15 | tee "$OUT/tests_gpu.txt"
