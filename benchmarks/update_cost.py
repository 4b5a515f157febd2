"""How much the channel-directed update costs, against its floor.

The floor of any gradient transformation is one read and one write of the
gradients: `optax.scale` over the same tree (and, for accelerators, a plain
device-to-device copy of it). Every number printed here is a ratio of medians
of interleaved repetitions measured in this one process, so that the load of
the machine hits both sides alike.

Sections (all by default, or pick with --sections):

- tree:    the conv kernels of ResNet-18, ResNet-50, VGG-16 and a ConvNeXt-T
           like net (HWIO, random): the jitted `channel_directed().update`
           against `optax.scale` and a copy, per metric and boundary; the
           first call's compile time; XLA's temporary memory for the update.
- compile: compile time of the update for ResNet-50's tree, with cold
           caches, against compiling `optax.scale` for it, taking turns.
- lsgd:    `laplacian_smoothing()` (LSGD, every leaf flattened) on the conv
           kernels of ResNet-18 against `optax.scale`.

What CDG costs in a training step is benchmarks/step.py.

Usage:
  python benchmarks/update_cost.py --quick      # a few minutes on 2 CPU cores
  python benchmarks/update_cost.py              # everything
  python benchmarks/update_cost.py --sections tree --reps 31
Runs unchanged on CPU, GPU and TPU; it prints the device.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import functools
import os
import platform
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

import optax_cdg

SECTIONS = ("tree", "compile", "lsgd")
LAM = {"sobolev": optax_cdg.DEFAULT_SMOOTHING,
       "sobolev_mean": 0.025, "reweighted": 4.0}


# ---------------------------------------------------------------------------
# Conv-kernel shapes (HWIO) of the benchmark nets.


def resnet18(stem: int = 7) -> list[tuple[int, ...]]:
  shapes = [(stem, stem, 3, 64)] + [(3, 3, 64, 64)] * 4
  for cin, c in ((64, 128), (128, 256), (256, 512)):
    shapes += [(3, 3, cin, c), (3, 3, c, c), (1, 1, cin, c), (3, 3, c, c),
               (3, 3, c, c)]
  return shapes


def resnet50() -> list[tuple[int, ...]]:
  shapes, cin = [(7, 7, 3, 64)], 64
  for blocks, w in ((3, 64), (4, 128), (6, 256), (3, 512)):
    for i in range(blocks):
      shapes += [(1, 1, cin, w), (3, 3, w, w), (1, 1, w, 4 * w)]
      if i == 0:
        shapes.append((1, 1, cin, 4 * w))
      cin = 4 * w
  return shapes


def vgg16() -> list[tuple[int, ...]]:
  widths = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
  cins = (3,) + widths[:-1]
  return [(3, 3, i, o) for i, o in zip(cins, widths, strict=True)]


def convnext_t() -> list[tuple[int, ...]]:
  """ConvNeXt-T with its pointwise layers as 1x1 convs."""
  shapes, dims = [(4, 4, 3, 96)], (96, 192, 384, 768)
  for stage, (depth, c) in enumerate(zip((3, 3, 9, 3), dims, strict=True)):
    if stage:
      shapes.append((2, 2, dims[stage - 1], c))
    shapes += [(7, 7, 1, c), (1, 1, c, 4 * c), (1, 1, 4 * c, c)] * depth
  return shapes


NETS = {"resnet18": resnet18, "resnet50": resnet50, "vgg16": vgg16,
        "convnext_t": convnext_t}


def kernel_tree(shapes: Sequence[tuple[int, ...]], seed: int = 0) -> dict:
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return {f"conv{i:02d}": {"kernel": jax.random.normal(k, s, jnp.float32)}
          for i, (k, s) in enumerate(zip(keys, shapes, strict=True))}


# ---------------------------------------------------------------------------
# Timing.


CPU_TIMES: dict[str, list[float]] = {}


def interleaved(fns: dict[str, Callable[[], Any]], reps: int,
                warmup: int = 2) -> dict[str, list[float]]:
  """Wall seconds per call of each thunk, the thunks taking turns every rep.

  The process CPU seconds of each call (all threads) go to CPU_TIMES: on a
  shared machine they do not count the time this process waits for a core.
  """
  for f in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(f())
  times = {k: [] for k in fns}
  CPU_TIMES.clear()
  CPU_TIMES.update({k: [] for k in fns})
  names = list(fns)
  for r in range(reps):
    order = names[r % len(names):] + names[:r % len(names)]
    for k in order:
      c, t = time.process_time(), time.perf_counter()
      jax.block_until_ready(fns[k]())
      times[k].append(time.perf_counter() - t)
      CPU_TIMES[k].append(time.process_time() - c)
  return times


def med(v: Sequence[float]) -> float:
  return statistics.median(v)


def spread(v: Sequence[float]) -> float:
  """Interquartile range over the median: the noise of one measurement."""
  q = np.percentile(v, [25, 75])
  return float((q[1] - q[0]) / np.median(v))


def compile_seconds(fn: Callable, *args) -> tuple[float, Any]:
  t = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return time.perf_counter() - t, compiled


def temp_bytes(compiled) -> float | None:
  try:
    return float(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


def table(rows: list[list[Any]], head: list[str]) -> str:
  cells = [[str(c) for c in r] for r in [head] + rows]
  width = [max(len(r[i]) for r in cells) for i in range(len(head))]
  def line(r):
    return "| " + " | ".join(
        c.ljust(w) for c, w in zip(r, width, strict=True)) + " |"
  sep = "|" + "|".join("-" * (w + 2) for w in width) + "|"
  return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def describe_device() -> str:
  d = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for ln in f:
        if ln.startswith("model name"):
          cpu = ln.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return (f"device: {d.platform} / {d.device_kind} (x{jax.device_count()}); "
          f"host CPU: {cpu}, {os.cpu_count()} cores; jax {jax.__version__}, "
          f"jaxlib {jaxlib.__version__}, optax {optax.__version__}, numpy "
          f"{np.__version__}, python {platform.python_version()}")


# ---------------------------------------------------------------------------
# Sections.


def cdg_update(**kw) -> Callable:
  tx = optax_cdg.channel_directed(**kw)
  return lambda t: tx.update(t, tx.init(t))[0]


def floor_update(t):
  return optax.scale(0.5).update(t, optax.EmptyState())[0]


def copy_tree(t):
  return jax.tree.map(jnp.copy, t)


def section_tree(args) -> None:
  print("\n## tree: jitted update of all conv kernels / optax.scale")
  nets = ("resnet18",) if args.quick else tuple(NETS)
  configs = [("sobolev", "periodic")]
  if not args.quick:
    configs += [("sobolev", "neumann"), ("sobolev_mean", "periodic"),
                ("sobolev_mean", "neumann"), ("reweighted", "periodic")]
  rows = []
  for net in nets:
    tree = kernel_tree(NETS[net]())
    params = sum(x.size for x in jax.tree.leaves(tree))
    fns = {"scale": jax.jit(floor_update), "copy": jax.jit(copy_tree)}
    info = {}
    for metric, boundary in configs:
      name = f"{metric}/{boundary}"
      f = cdg_update(smoothing=LAM[metric], metric=metric, boundary=boundary)
      secs, compiled = compile_seconds(f, tree)
      info[name] = (secs, temp_bytes(compiled))
      fns[name] = jax.jit(f)
    floor_secs, floor_compiled = compile_seconds(floor_update, tree)
    times = interleaved({k: functools.partial(f, tree)
                         for k, f in fns.items()}, args.reps)
    base, copy = med(times["scale"]), med(times["copy"])
    low, cpu = min(times["scale"]), med(CPU_TIMES["scale"])
    info["scale"] = (floor_secs, temp_bytes(floor_compiled))
    info["copy"] = (None, None)
    for name, (secs, tmp) in info.items():
      t = med(times[name])
      rows.append([net, f"{params / 1e6:.1f}M",
                   {"scale": "optax.scale (floor)"}.get(name, name),
                   f"{t * 1e3:.2f}", f"{t / base:.2f}",
                   f"{min(times[name]) / low:.2f}",
                   f"{med(CPU_TIMES[name]) / cpu:.2f}", f"{t / copy:.2f}",
                   f"{spread(times[name]):.2f}",
                   "-" if secs is None else f"{secs:.2f}",
                   "-" if tmp is None else f"{tmp / 2**20:.1f}"])
    print(f"  {net} done", flush=True)
  print(table(rows, ["net", "conv params", "update (metric/boundary)",
                     "median ms", "/ scale", "min / min", "cpu / cpu",
                     "/ copy", "IQR/med", "compile s", "temp MiB"]))


def section_compile(args) -> None:
  print("\n## compile: ResNet-50 tree, cold caches, the compiles in turn")
  tree = jax.eval_shape(lambda: kernel_tree(resnet50()))
  fns = {"scale": floor_update, "cdg": cdg_update()}
  secs = {k: [] for k in fns}
  cpu = {k: [] for k in fns}
  names = list(fns)
  for r in range(args.compile_reps):
    for name in names[r % len(names):] + names[:r % len(names)]:
      jax.clear_caches()
      c = time.process_time()
      secs[name].append(compile_seconds(fns[name], tree)[0])
      cpu[name].append(time.process_time() - c)
    print(f"  rep {r}: " + ", ".join(f"{k} {v[-1]:.2f}s"
                                     for k, v in secs.items()), flush=True)
  rows = []
  for name in names:
    rows.append([name, f"{med(secs[name]):.2f}", f"{min(secs[name]):.2f}",
                 f"{med(secs[name]) - med(secs['scale']):+.2f}",
                 f"{med(cpu[name]) - med(cpu['scale']):+.2f}"])
  print(table(rows, ["update", "median s", "min s", "median - scale s",
                     "cpu - scale s"]))


def section_lsgd(args) -> None:
  print("\n## lsgd: laplacian_smoothing on ResNet-18's conv kernels")
  tree = kernel_tree(resnet18())
  fns, compile_s = {"scale": jax.jit(floor_update)}, {}
  tx = optax_cdg.laplacian_smoothing()
  def f(t):
    return tx.update(t, tx.init(t))[0]
  compile_s["lsgd"] = compile_seconds(f, tree)[0]
  fns["lsgd"] = jax.jit(f)
  compile_s["scale"] = compile_seconds(floor_update, tree)[0]
  times = interleaved({k: functools.partial(f, tree)
                       for k, f in fns.items()}, args.reps)
  base, cpu = med(times["scale"]), med(CPU_TIMES["scale"])
  rows = [[name, f"{med(v) * 1e3:.2f}", f"{med(v) / base:.2f}",
           f"{min(v) / min(times['scale']):.2f}",
           f"{med(CPU_TIMES[name]) / cpu:.2f}", f"{spread(v):.2f}",
           f"{compile_s[name]:.2f}"] for name, v in times.items()]
  print(table(rows, ["update", "median ms", "/ scale", "min / min",
                     "cpu / cpu", "IQR/med", "compile s"]))


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Sections: " + ", ".join(SECTIONS))
  parser.add_argument("--quick", action="store_true",
                      help="fewer sizes, nets, configs and repetitions")
  parser.add_argument("--sections", nargs="+", choices=SECTIONS,
                      default=list(SECTIONS))
  parser.add_argument("--reps", type=int, default=None,
                      help="interleaved repetitions (default 21, quick 11)")
  parser.add_argument("--compile-reps", type=int, default=None,
                      help="cold compiles of each update (default 3, quick 1)")
  args = parser.parse_args(argv)
  if args.reps is None:
    args.reps = 11 if args.quick else 21
  if args.compile_reps is None:
    args.compile_reps = 1 if args.quick else 3
  print(describe_device())
  print(f"date: {time.strftime('%Y-%m-%d %H:%M')}; command: "
        f"python benchmarks/update_cost.py {' '.join(sys.argv[1:])}")
  for name in SECTIONS:
    if name in args.sections:
      globals()[f"section_{name}"](args)


if __name__ == "__main__":
  main()
