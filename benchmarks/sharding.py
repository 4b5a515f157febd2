"""The channel-directed update on sharded conv gradients, against unsharded.

For each way of sharding the kernels of a ResNet-18-like conv tree over a
2 x 4 mesh, in automatic and explicit sharding mode: the collectives in the
compiled update, and its median time as a ratio to the same update on the
unsharded (single-device) tree, interleaved in one process.

On the CPU it uses 8 virtual devices (they share the host's cores, so the
ratio measures overhead, not speed-up).

  python benchmarks/sharding.py [--reps 20]
"""

import argparse
import os
import re
import sys
import time

if "jax" not in sys.modules:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import optax_cdg

_COLL = re.compile(r"\b(all-gather|all-reduce|all-to-all|collective-permute"
                   r"|reduce-scatter)(-start)?\(")

# ResNet-18 conv kernels (HWIO), without the 7x7 stem's odd input width.
SHAPES = ([(3, 3, 64, 64)] * 4 + [(3, 3, 64, 128), (1, 1, 64, 128)]
          + [(3, 3, 128, 128)] * 3 + [(3, 3, 128, 256), (1, 1, 128, 256)]
          + [(3, 3, 256, 256)] * 3 + [(3, 3, 256, 512), (1, 1, 256, 512)]
          + [(3, 3, 512, 512)] * 3)

CASES = {
    "replicated": P(),
    "input axis": P(None, None, "a"),
    "input axis, 8-way": P(None, None, ("a", "b")),
    "input (b) + output (a)": P(None, None, "b", "a"),
    "output axis": P(None, None, None, "b"),
    "output axis, 8-way": P(None, None, None, ("a", "b")),
    "input + output": P(None, None, "a", "b"),
}


def _median_time(f, x, reps):
  jax.block_until_ready(f(x))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(f(x))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--reps", type=int, default=20)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  tree = {f"conv{i}": {"kernel": jnp.asarray(rng.standard_normal(s),
                                             jnp.float32)}
          for i, s in enumerate(SHAPES)}
  tx = optax_cdg.channel_directed()
  update = jax.jit(lambda g: tx.update(g, optax.EmptyState())[0])
  size = sum(x.size for x in jax.tree.leaves(tree))
  print(f"jax {jax.__version__}, {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}; {size / 1e6:.1f}M "
        "conv parameters; default channel_directed()")
  want = update(tree)
  print("| mode | kernel sharding | collectives in the update "
        "| time / unsharded | max abs diff |")
  print("|---|---|---|---|---|")
  for mode in ("auto", "explicit"):
    axis_type = AxisType.Explicit if mode == "explicit" else AxisType.Auto
    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(axis_type,) * 2)
    for spec in CASES.values():
      with jax.set_mesh(mesh):
        sharded = jax.device_put(tree, NamedSharding(mesh, spec))
        found = sorted({m.group(1) for m in _COLL.finditer(
            update.lower(sharded).compile().as_text())})
        diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
            jax.tree.leaves(update(sharded)), jax.tree.leaves(want),
            strict=True))
        ratios = []
        for _ in range(3):  # interleave the baseline and the sharded runs
          base = _median_time(update, tree, args.reps)
          ratios.append(_median_time(update, sharded, args.reps) / base)
      print(f"| {mode} | `{spec}` | {', '.join(found) or 'none'} | "
            f"{np.median(ratios):.2f}x | {diff:.1e} |")


if __name__ == "__main__":
  main()
