"""The accelerator check: exactness, step, update and compile on one device.

Run by `benchmarks/gpu_check.sh` on a lent GPU (it also runs on the CPU, with
`--small` for a quick try). Each section prints a table as it finishes and
appends it to `$OUT/device_check.md`:

- env:     devices and versions;
- exact:   the default update of ResNet-50's conv kernels on the device
           against float64 dense solves and against the CPU backend; the
           same update with the CPU's layout view (`view`) and with
           `method="stencil"` (15 taps at the default, no FFT); a traced
           smoothing against the same number; forward, reverse and batched
           transformations against the CPU backend, for both methods;
- step:    a jitted CIFAR ResNet-18 step (benchmarks/step.py's), batch 128
           and 32: plain SGD-momentum, the control (`optax.clip(1e6)`),
           `cdg` (the library, its FFT), `cdg-stencil` (the library's
           `method="stencil"`) and `cdg-view` (the FFT on the view
           `(in, *spatial, out)`, the CPU's layout), interleaved; two
           reference variants that are not the library: one FFT pair per
           width (every leaf's fibers of one length concatenated) and a
           dense `x @ A^{-1}` (HIGHEST precision);
- update:  the update of ResNet-18's and ResNet-50's kernels alone against
           a device copy: `optax.scale`, a bare rfft/irfft pair, cdg,
           cdg-stencil, cdg-view;
- compile: the first compile of ResNet-50's update (cdg, cdg-stencil)
           against `optax.scale`.

Usage:
  OUT=out python benchmarks/device_check.py [--small] [--sections ...]
Never run it while another job uses the device.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import importlib.util
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_cdg
import update_cost  # this folder's: the nets' kernel shapes

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.environ.get("OUT", ".")
LAM = optax_cdg.DEFAULT_SMOOTHING


def log(*parts: object) -> None:
  line = " ".join(str(p) for p in parts)
  print(line, flush=True)
  with open(os.path.join(OUT, "device_check.md"), "a") as f:
    f.write(line + "\n")


def resnet18_shapes(small: bool) -> list[tuple[int, ...]]:
  """The conv kernels of benchmarks/step.py's CIFAR ResNet-18."""
  shapes, cin = [(3, 3, 3, 64)], 64
  for stage, w in enumerate((64, 128, 256, 512)):
    for b in range(2):
      shapes += [(3, 3, cin, w), (3, 3, w, w)]
      if (stage and not b) or cin != w:
        shapes.append((1, 1, cin, w))
      cin = w
  return shapes[:6] if small else shapes


def resnet50_shapes(small: bool) -> list[tuple[int, ...]]:
  shapes = update_cost.resnet50()
  return shapes[:8] if small else shapes


def kernel_tree(shapes, seed: int = 0) -> dict:
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return {f"conv{i}": {"kernel": jax.random.normal(k, s)}
          for i, (k, s) in enumerate(zip(keys, shapes, strict=True))}


def dense_inverse(n: int, lam: float = LAM) -> np.ndarray:
  """A^{-1} of the default metric (sobolev, grid, periodic), float64."""
  d = np.roll(np.eye(n), 1, axis=1) - np.eye(n)  # forward differences
  return np.linalg.inv(np.eye(n) + lam * d.T @ d)


def view_update(tree):
  """The default update, with the FFT on the view (in, *spatial, out)."""
  def one(g):
    n = g.shape[-1]
    gain = jnp.asarray(optax_cdg.spectral_gain(n), jnp.float32)
    perm = (g.ndim - 2, *range(g.ndim - 2), g.ndim - 1)
    v = jnp.transpose(g, perm)
    y = jnp.fft.irfft(jnp.fft.rfft(v, axis=-1) * gain, n=n, axis=-1)
    return jnp.transpose(y, np.argsort(perm))
  return jax.tree.map(one, tree)


def grouped_update(tree):
  """The default update with one FFT pair per width: every leaf's fibers of
  one length concatenated (a reference variant, not the library)."""
  leaves, treedef = jax.tree.flatten(tree)
  out = list(leaves)
  groups: dict[int, list[int]] = {}
  for i, g in enumerate(leaves):
    if g.ndim == 4 and g.shape[-1] > 1:
      groups.setdefault(g.shape[-1], []).append(i)
  for n, index in groups.items():
    flat = jnp.concatenate([leaves[i].reshape(-1, n) for i in index])
    gain = jnp.asarray(optax_cdg.spectral_gain(n), jnp.float32)
    y = jnp.fft.irfft(jnp.fft.rfft(flat, axis=-1) * gain, n=n, axis=-1)
    start = 0
    for i in index:
      out[i] = y[start:start + leaves[i].size // n].reshape(leaves[i].shape)
      start += leaves[i].size // n
  return jax.tree.unflatten(treedef, out)


def dense_update(tree):
  """The default update as `x @ A^{-1}` per leaf, float32 at HIGHEST
  precision (a reference variant, not the library)."""
  def one(g):
    inverse = jnp.asarray(dense_inverse(g.shape[-1]), jnp.float32)
    return jnp.matmul(g, inverse, precision=jax.lax.Precision.HIGHEST)
  return jax.tree.map(lambda g: one(g) if g.ndim == 4 else g, tree)


def rfft_pair(tree):
  """A bare rfft/irfft pair along the last axis: the floor of any FFT path."""
  return jax.tree.map(lambda g: jnp.fft.irfft(
      jnp.fft.rfft(g, axis=-1), n=g.shape[-1], axis=-1), tree)


def cdg_update(tree, lam=LAM, method="auto"):
  tx = optax_cdg.channel_directed(lam, method=method)
  return tx.update(tree, optax.EmptyState())[0]


def stencil_update(tree, lam=LAM):
  """The update with `method="stencil"` (a traced `lam` takes the FFT)."""
  return cdg_update(tree, lam, "stencil")


def worst_rel(a, b) -> float:
  return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)
                          ).max() / max(np.abs(np.asarray(y)).max(), 1e-30))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                             strict=True))


def sec_exact(small: bool) -> None:
  shapes = resnet50_shapes(small)
  tree = kernel_tree(shapes, 1)
  dev = jax.devices()[0]
  cpu = jax.devices("cpu")[0]
  out = jax.jit(cdg_update)(tree)
  on_cpu = jax.jit(cdg_update)(jax.device_put(tree, cpu))
  dense = {k: {"kernel": np.asarray(v["kernel"], np.float64)
               @ dense_inverse(v["kernel"].shape[-1])}
           for k, v in tree.items()}
  lam = jnp.asarray(LAM, jnp.float32)
  traced = jax.jit(cdg_update)(tree, lam)
  same = all(bool(jnp.array_equal(a, b)) for a, b in zip(
      jax.tree.leaves(traced), jax.tree.leaves(out), strict=True))
  log(f"\n## exact ({dev.platform}, ResNet-50 kernels: {len(shapes)} leaves)\n")
  log("| check | max relative error |")
  log("|---|---|")
  log("| default update vs float64 dense solve | "
      f"{worst_rel(out, dense):.2e} |")
  log(f"| default update vs the CPU backend | {worst_rel(out, on_cpu):.2e} |")
  log("| with the layout view vs the library | "
      f"{worst_rel(jax.jit(view_update)(tree), out):.2e} |")
  stencil = jax.jit(stencil_update)(tree)
  log("| method='stencil' vs float64 dense solve | "
      f"{worst_rel(stencil, dense):.2e} |")
  stencil_cpu = jax.jit(stencil_update)(jax.device_put(tree, cpu))
  log("| method='stencil' vs the CPU backend | "
      f"{worst_rel(stencil, stencil_cpu):.2e} |")
  log("| method='stencil', traced smoothing (the FFT) vs the number | "
      f"{worst_rel(jax.jit(stencil_update)(tree, lam), stencil):.2e} |")
  log("| one FFT pair per width (reference) vs the library | "
      f"{worst_rel(jax.jit(grouped_update)(tree), out):.2e} |")
  log("| dense x @ A^-1, HIGHEST (reference) vs float64 | "
      f"{worst_rel(jax.jit(dense_update)(tree), dense):.2e} |")
  log(f"| traced smoothing vs the number (bitwise equal: {same}) | "
      f"{worst_rel(traced, out):.2e} |")
  # Transformations on a few leaves, each against the CPU backend.
  small_tree = {k: tree[k] for k in list(tree)[:4]}
  tangent = jax.tree.map(lambda x: jnp.cos(x), small_tree)
  checks: dict[str, Callable] = {
      "jvp in the updates": lambda t, u: jax.jvp(cdg_update, (t,), (u,))[1],
      "vjp in the updates": lambda t, u: jax.vjp(cdg_update, t)[1](u)[0],
      "stencil: vjp in the updates": lambda t, u: jax.vjp(
          stencil_update, t)[1](u)[0],
      "stencil: vmap over the updates": lambda t, u: jax.vmap(
          stencil_update)(jax.tree.map(lambda a, b: jnp.stack([a, b]), t, u)),
      "vmap over the updates": lambda t, u: jax.vmap(cdg_update)(
          jax.tree.map(lambda a, b: jnp.stack([a, b]), t, u)),
      "jvp in the smoothing": lambda t, u: jax.jvp(
          lambda s: cdg_update(t, s), (lam,), (jnp.ones_like(lam),))[1],
      "hessian in the smoothing": lambda t, u: jax.hessian(
          lambda s: sum(jnp.sum(a ** 2) for a in jax.tree.leaves(
              cdg_update(t, s))))(lam),
      "vmap over the smoothing": lambda t, u: jax.vmap(
          lambda s: cdg_update(t, s))(jnp.asarray([0.05, 0.1, 0.2])),
  }
  for name, fn in checks.items():
    got = jax.jit(fn)(small_tree, tangent)
    want = jax.jit(fn)(*jax.device_put((small_tree, tangent), cpu))
    log(f"| {name} vs the CPU backend | {worst_rel(got, want):.2e} |")


def interleave(fns: dict[str, Callable[[], float]], reps: int,
               blocks: int) -> dict[str, list[float]]:
  times: dict[str, list[float]] = {k: [] for k in fns}
  names = list(fns)
  for b in range(blocks):
    for r in range(reps):
      shift = (r + b) % len(names)
      for k in names[shift:] + names[:shift]:
        times[k].append(fns[k]())
  return times


def report(times: dict[str, list[float]], base: str, unit: str) -> None:
  scale = {"ms": 1e3, "us": 1e6}[unit]
  mb = statistics.median(times[base])
  log(f"| variant | median {unit} | ratio of medians to {base} | "
      f"median paired ratio |")
  log("|---|---|---|---|")
  for k, v in times.items():
    paired = statistics.median(a / b for a, b in zip(v, times[base],
                                                     strict=True))
    log(f"| {k} | {statistics.median(v) * scale:.3f} | "
        f"{statistics.median(v) / mb:.3f} | {paired:.3f} |")


def timer(fn: Callable[[], object]) -> Callable[[], float]:
  def run() -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t
  return run


def per_leaf(update) -> optax.GradientTransformation:
  return optax.GradientTransformation(
      lambda p: optax.EmptyState(), lambda u, s, p=None: (update(u), s))


def sec_step(small: bool, batch: int, reps: int, blocks: int) -> None:
  spec = importlib.util.spec_from_file_location(
      "cdg_step_benchmark", os.path.join(HERE, "step.py"))
  step_mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = step_mod  # flax's dataclasses look it up
  spec.loader.exec_module(step_mod)
  model = step_mod.CifarResNet18()
  x = jax.random.normal(jax.random.key(1), (batch, 32, 32, 3))
  y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
  variables = model.init(jax.random.key(0), x[:1])
  sgd = optax.sgd(0.1, momentum=0.9)
  txs = {"plain": sgd,
         "control": optax.chain(optax.clip(1e6), sgd),
         "cdg": optax.chain(optax_cdg.channel_directed(), sgd),
         "cdg-stencil": optax.chain(
             optax_cdg.channel_directed(method="stencil"), sgd),
         "cdg-view": optax.chain(per_leaf(lambda u: jax.tree.map(
             lambda g: view_update(g) if g.ndim == 4 else g, u)), sgd),
         "ref: one FFT pair per width": optax.chain(
             per_leaf(grouped_update), sgd),
         "ref: dense x @ A^-1": optax.chain(per_leaf(dense_update), sgd)}
  log(f"\n## step (CIFAR ResNet-18, batch {batch}, float32, SGD momentum)\n")
  states, fns = {}, {}
  for name, tx in txs.items():
    step = step_mod.make_step(model, tx)
    params = jax.tree.map(jnp.copy, variables["params"])
    stats = jax.tree.map(jnp.copy, variables["batch_stats"])
    states[name] = [params, stats, tx.init(params)]
    t = time.perf_counter()
    *states[name], loss = step(*states[name], x, y)  # donates its state
    jax.block_until_ready(loss)
    log(f"- {name}: first call (compile and run) "
        f"{time.perf_counter() - t:.1f} s")

    def call(name=name, step=step):
      *states[name], loss = step(*states[name], x, y)
      return loss
    fns[name] = timer(call)
    fns[name]()
  log("")
  report(interleave(fns, reps, blocks), "plain", "ms")


def sec_update(small: bool, reps: int, blocks: int, net: str) -> None:
  shapes = {"ResNet-18": resnet18_shapes,
            "ResNet-50": resnet50_shapes}[net](small)
  tree = kernel_tree(shapes)
  size = sum(int(np.prod(s)) for s in shapes)
  fns = {"copy": jax.jit(lambda t: jax.tree.map(jnp.copy, t)),
         "optax.scale": jax.jit(
             lambda t: optax.scale(0.5).update(t, optax.EmptyState())[0]),
         "rfft/irfft pair": jax.jit(rfft_pair),
         "cdg": jax.jit(cdg_update),
         "cdg-stencil": jax.jit(stencil_update),
         "cdg-view": jax.jit(view_update)}
  for f in fns.values():
    jax.block_until_ready(f(tree))
  log(f"\n## update ({net} kernels, {len(shapes)} leaves, "
      f"{size / 1e6:.1f}M float32, stored row-major)\n")
  report(interleave({k: timer(lambda f=f: f(tree)) for k, f in fns.items()},
                    reps, blocks), "copy", "us")


def sec_compile(small: bool, reps: int) -> None:
  tree = kernel_tree(resnet50_shapes(small))
  fns = {"optax.scale": lambda t: optax.scale(0.5).update(
      t, optax.EmptyState())[0], "cdg": cdg_update,
      "cdg-stencil": stencil_update}
  times: dict[str, list[float]] = {k: [] for k in fns}
  # A number's gains are compiled once per kernel shape and kept: cold means
  # without them too (0.2 had no such cache).
  gains_cache = next((getattr(getattr(optax_cdg, m, None), f, None)
                      for m, f in (("_apply", "_constants"),  # 0.4
                                   ("_operator", "_constants"),  # 0.3
                                   ("_operator", "_gains_in_a_thread"))
                      if getattr(getattr(optax_cdg, m, None), f, None)),
                     None)
  for _ in range(reps):
    for name, fn in fns.items():
      jax.clear_caches()
      if gains_cache is not None:
        gains_cache.cache_clear()
      t = time.perf_counter()
      jax.jit(fn).lower(tree).compile()
      times[name].append(time.perf_counter() - t)
  log("\n## compile (ResNet-50 update, cold caches)\n")
  log("| update | median s | all runs |")
  log("|---|---|---|")
  for k, v in times.items():
    log(f"| {k} | {statistics.median(v):.3f} | "
        f"{', '.join(f'{s:.3f}' for s in v)} |")
  extra = (statistics.median(times["cdg"])
           - statistics.median(times["optax.scale"]))
  log(f"\ncdg - optax.scale: {extra:+.3f} s")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--small", action="store_true",
                      help="a few leaves, batch 8, few repetitions")
  parser.add_argument("--sections", nargs="+",
                      default=["env", "exact", "step", "update", "compile"])
  parser.add_argument("--batches", nargs="+", type=int, default=[128, 32])
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--blocks", type=int, default=3)
  args = parser.parse_args(argv)
  if args.small:
    args.batches, args.reps, args.blocks = [8], 3, 1
  for section in args.sections:
    t = time.perf_counter()
    try:
      if section == "env":
        import jaxlib  # pylint: disable=import-outside-toplevel
        log(f"## env\n\njax {jax.__version__}, jaxlib {jaxlib.__version__}, "
            f"optax {optax.__version__}, optax_cdg {optax_cdg.__version__}, "
            f"numpy {np.__version__}; devices {jax.devices()}")
      elif section == "exact":
        sec_exact(args.small)
      elif section == "step":
        for batch in args.batches:
          sec_step(args.small, batch, args.reps, args.blocks)
      elif section == "update":
        for net in ("ResNet-18", "ResNet-50"):
          sec_update(args.small, args.reps * 2, args.blocks, net)
      elif section == "compile":
        sec_compile(args.small, 3)
      else:
        parser.error(f"unknown section {section!r}")
    except Exception as e:  # one call on a lent device: report, go on
      log(f"\nsection {section} failed: {type(e).__name__}: {e}")
    log(f"\n[{section}: {time.perf_counter() - t:.1f} s]")


if __name__ == "__main__":
  sys.exit(main())
