"""Peak memory and time of the operator's first call, each case in a fresh
process.

Cases:

- `lsgd SHAPE`: `laplacian_smoothing()` on one leaf of that shape (HWIO), the
  jitted update's first call (trace, compile and run);
- `lsgd-tree NET`: the same on the conv-kernel tree of a benchmark net
  (resnet18, resnet50, ...);
- `axis N`: `metric_gradient` along one axis of N values (a `(1, N)` array,
  default method), jitted first call.

Each case runs in its own child process, so that the peak resident set size
(`ru_maxrss`) is that case's alone; the time is wall seconds of the first
call, and the process CPU seconds (all threads) of it.

  python benchmarks/memory.py lsgd 3,3,64,64 lsgd 3,3,128,128
  python benchmarks/memory.py lsgd-tree resnet50 axis 1048576
  python benchmarks/memory.py --method fft axis 1048576
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = r"""
import json, resource, sys, time
import jax, jax.numpy as jnp
import optax_cdg
kind, arg, method = KIND, ARG, METHOD
if kind == "lsgd-tree":
  import update_cost  # the benchmark nets' conv shapes
  tree = update_cost.kernel_tree(update_cost.NETS[arg]())
elif kind == "lsgd":
  shape = tuple(int(s) for s in arg.split(","))
  tree = {"k": jax.random.normal(jax.random.key(0), shape)}
else:
  tree = jax.random.normal(jax.random.key(0), (1, int(arg)))
jax.block_until_ready(tree)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if kind == "axis":
  kw = {} if method is None else {"method": method}
  fn = jax.jit(lambda g: optax_cdg.metric_gradient(g, 1e-3, **kw))
else:
  kw = {} if method is None else {"method": method}
  tx = optax_cdg.laplacian_smoothing(**kw)
  fn = jax.jit(lambda g: tx.update(g, tx.init(g))[0])
c, t = time.process_time(), time.perf_counter()
jax.block_until_ready(fn(tree))
wall, cpu = time.perf_counter() - t, time.process_time() - c
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"case": kind + " " + arg, "method": method,
                  "first_call_s": wall, "cpu_s": cpu,
                  "peak_rss_mib": peak / 1024,
                  "rss_before_call_mib": base / 1024}))
"""


def run_case(kind: str, arg: str, method: str | None = None,
             timeout: float | None = None) -> dict:
  """Runs one case in a fresh Python process and returns its measurements."""
  here = os.path.dirname(os.path.abspath(__file__))
  code = (_CHILD.replace("KIND", repr(kind)).replace("ARG", repr(arg))
          .replace("METHOD", repr(method)))
  # The package (the repository root) and this folder's update_cost module.
  path = [os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")]
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=timeout, check=False,
                       env={**os.environ,
                            "PYTHONPATH": os.pathsep.join(filter(None, path))})
  if out.returncode:
    raise RuntimeError(f"{kind} {arg} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--method", default=None,
                      help="forced method (default: the transform's default)")
  parser.add_argument("cases", nargs="+",
                      help="pairs KIND ARG: lsgd SHAPE, lsgd-tree NET, axis N")
  args = parser.parse_args()
  if len(args.cases) % 2:
    parser.error("cases come in pairs: KIND ARG")
  for kind, arg in zip(args.cases[::2], args.cases[1::2], strict=True):
    print(json.dumps(run_case(kind, arg, args.method)), flush=True)


if __name__ == "__main__":
  main()
