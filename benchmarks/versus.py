"""Two versions of optax_cdg side by side, in one process.

Separate runs of benchmarks/step.py on this noisy machine differ by more
than a version's change; here both versions' transforms take turns in one
process. `--old` is a checkout of the other version (for example
`git worktree add /tmp/old 05c0db1`); this checkout is the new one.

- step:   benchmarks/step.py's ResNet-18 step (batch 32): plain, the control
          (`optax.clip(1e6)`), CDG of the old and of the new version;
- update: the update of ResNet-18's kernels (random, row-major) against a
          bare rfft/irfft pair.

Usage:
  python benchmarks/versus.py --old /tmp/old --what step --reps 15 --blocks 2
Never run it while another job uses the machine.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def _both(old_path: str):
  """(old, new) optax_cdg modules; the old one keeps its own submodules."""
  # sys.path is edited here on purpose: two checkouts of the same package
  # cannot both be installed, so each is imported from its own tree in turn
  # (the old one first, then this one), and sys.modules is cleared between
  # them so that the second import loads this checkout's own files.
  sys.path.insert(0, old_path)
  old = importlib.import_module("optax_cdg")
  for name in [n for n in sys.modules
               if n == "optax_cdg" or n.startswith("optax_cdg.")]:
    del sys.modules[name]
  sys.path.remove(old_path)
  sys.path.insert(0, os.path.dirname(HERE))
  new = importlib.import_module("optax_cdg")
  if new.__file__ == old.__file__:
    raise SystemExit(f"--old {old_path} is this checkout")
  return old, new


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--old", required=True, help="the other checkout")
  parser.add_argument("--what", choices=("step", "update"), default="step")
  parser.add_argument("--reps", type=int, default=15)
  parser.add_argument("--blocks", type=int, default=2)
  args = parser.parse_args()
  old, new = _both(os.path.abspath(args.old))
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  os.environ.setdefault("OUT", tempfile.mkdtemp())  # device_check's log
  import device_check as dc  # pylint: disable=import-outside-toplevel

  print(f"jax {jax.__version__}; old {old.__version__} ({old.__file__}); "
        f"new {new.__version__} ({new.__file__})")
  cdg = {f"cdg {v.__version__} (old)" if v is old
         else f"cdg {v.__version__} (new)": v for v in (old, new)}
  if args.what == "update":
    tree = dc.kernel_tree(dc.resnet18_shapes(False))
    fns = {"copy": jax.jit(lambda t: jax.tree.map(jnp.copy, t)),
           "rfft/irfft pair": jax.jit(dc.rfft_pair)}
    for name, lib in cdg.items():
      fns[name] = jax.jit(lambda t, lib=lib: lib.channel_directed().update(
          t, optax.EmptyState())[0])
    for f in fns.values():
      jax.block_until_ready(f(tree))
    dc.report(dc.interleave({k: dc.timer(lambda f=f: f(tree))
                             for k, f in fns.items()}, args.reps,
                            args.blocks), "rfft/irfft pair", "us")
    return
  spec = importlib.util.spec_from_file_location(
      "cdg_step_benchmark", os.path.join(HERE, "step.py"))
  step_mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = step_mod
  spec.loader.exec_module(step_mod)
  model = step_mod.CifarResNet18()
  x = jax.random.normal(jax.random.key(1), (32, 32, 32, 3))
  y = jax.random.randint(jax.random.key(2), (32,), 0, 10)
  variables = model.init(jax.random.key(0), x[:1])
  sgd = optax.sgd(0.1, momentum=0.9)
  txs = {"plain": sgd, "control": optax.chain(optax.clip(1e6), sgd)}
  txs.update({k: optax.chain(lib.channel_directed(), sgd)
              for k, lib in cdg.items()})
  states, fns = {}, {}
  for name, tx in txs.items():
    step = step_mod.make_step(model, tx)
    params = jax.tree.map(jnp.copy, variables["params"])
    states[name] = [params, jax.tree.map(jnp.copy, variables["batch_stats"]),
                    tx.init(params)]
    for _ in range(2):  # compile, then one warm step (it donates its state)
      *states[name], loss = step(*states[name], x, y)
      jax.block_until_ready(loss)

    def call(name=name, step=step):
      *states[name], loss = step(*states[name], x, y)
      return loss
    fns[name] = dc.timer(call)
  dc.report(dc.interleave(fns, args.reps, args.blocks), "plain", "ms")


if __name__ == "__main__":
  main()
