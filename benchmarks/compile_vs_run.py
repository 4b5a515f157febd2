"""Compile time against run time of the CDG update, per method.

For the conv trees of ResNet-18 and ResNet-50: the cold compile time of the
jitted update (caches cleared before each) and its median run time, as ratios
to `optax.scale` on the same tree, for every method. On GPUs the compile time
includes XLA's autotuning of each distinct dot shape; run once more with
XLA_FLAGS=--xla_gpu_autotune_level=0 to see how much of it that is.

  python benchmarks/compile_vs_run.py
"""

import argparse
import importlib.util
import pathlib
import sys
import time

import jax
import numpy as np

from optax_cdg import _methods

_spec = importlib.util.spec_from_file_location(
    "cdg_operator_bench", pathlib.Path(__file__).with_name("operator.py"))
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # flax's dataclasses look the module up
_spec.loader.exec_module(bench)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--reps", type=int, default=21)
  parser.add_argument("--nets", default="resnet18,resnet50")
  args = parser.parse_args()
  print(bench.describe_device())
  print("| net | method | compile s | compile - scale s | run ms | run / scale |")
  print("|---|---|---|---|---|---|")
  for net in args.nets.split(","):
    tree = bench.kernel_tree(bench.NETS[net]())
    fns = {"scale": bench.floor_update}
    for method in ("fft", "matmul", "blocked", "auto"):
      fns[method] = bench.cdg_update(method)
    compiled, seconds = {}, {}
    for name, fn in fns.items():
      for cache in (_methods.dense_operator, _methods.blocked_factors,
                    _methods.eigenbasis):
        cache.cache_clear()
      jax.clear_caches()
      t = time.perf_counter()
      compiled[name] = jax.jit(fn).lower(tree).compile()
      seconds[name] = time.perf_counter() - t
    times = bench.interleaved({k: (lambda c=c: c(tree))
                               for k, c in compiled.items()}, args.reps)
    base = bench.med(times["scale"])
    for name in fns:
      print(f"| {net} | {name} | {seconds[name]:.2f} | "
            f"{seconds[name] - seconds['scale']:+.2f} | "
            f"{bench.med(times[name]) * 1e3:.3f} | "
            f"{bench.med(times[name]) / base:.2f} |", flush=True)


if __name__ == "__main__":
  main()
