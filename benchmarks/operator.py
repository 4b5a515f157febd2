"""How much the channel-directed update costs, against its floor.

The floor of any gradient transformation is one read and one write of the
gradients: `optax.scale` over the same tree (and, for accelerators, a plain
device-to-device copy of it). Every number printed here is a ratio of medians
of interleaved repetitions measured in this one process, so that the load of
the machine hits both sides alike.

Sections (all by default, or pick with --sections):

- sweep:   per axis length N, each exact method (fft, matmul, blocked) on a
           (E / N, N) array against the floor on the same array; the basis of
           the "auto" rule.
- tree:    the conv kernels of ResNet-18, ResNet-50, VGG-16 and a ConvNeXt-T
           like net (HWIO, random): the jitted `channel_directed().update`
           (method "auto", and "fft", the plain rfft/irfft version) against
           `optax.scale` and a copy, per metric and boundary; the first
           call's compile time; XLA's temporary memory for the update.
- batched: whether stacking all kernels that share N into one call helps.
- compile: compile time of the update for ResNet-50's tree, with cold
           caches, against compiling `optax.scale` for it, the three
           compiles taking turns; and the number of distinct dot shapes in
           each program (XLA autotunes each one on a GPU).
- lsgd:    `laplacian_smoothing()` (LSGD, every leaf flattened) on the conv
           kernels of ResNet-18 against `optax.scale`, "auto" and "fft".
- step:    a full training step of a CIFAR-style ResNet-18 (32x32, batch 32
           and 128), SGD with momentum, with and without CDG.

Usage:
  python benchmarks/operator.py --quick      # a few minutes on 2 CPU cores
  python benchmarks/operator.py              # everything
  python benchmarks/operator.py --sections tree step --reps 31
  python benchmarks/operator.py --sections sweep --sweep-sizes 4096 16384
Runs unchanged on CPU, GPU and TPU; it prints the device.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))
import optax_cdg  # pylint: disable=g-import-not-at-top,wrong-import-position
from optax_cdg import _methods  # pylint: disable=g-import-not-at-top
from optax_cdg import _operator  # pylint: disable=g-import-not-at-top

SECTIONS = ("sweep", "tree", "batched", "compile", "lsgd", "step")
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
  return [(3, 3, i, o) for i, o in zip(cins, widths)]


def convnext_t() -> list[tuple[int, ...]]:
  """ConvNeXt-T with its pointwise layers as 1x1 convs."""
  shapes, dims = [(4, 4, 3, 96)], (96, 192, 384, 768)
  for stage, (depth, c) in enumerate(zip((3, 3, 9, 3), dims)):
    if stage:
      shapes.append((2, 2, dims[stage - 1], c))
    shapes += [(7, 7, 1, c), (1, 1, c, 4 * c), (1, 1, 4 * c, c)] * depth
  return shapes


NETS = {"resnet18": resnet18, "resnet50": resnet50, "vgg16": vgg16,
        "convnext_t": convnext_t}


def kernel_tree(shapes: Sequence[tuple[int, ...]], seed: int = 0) -> dict:
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return {f"conv{i:02d}": {"kernel": jax.random.normal(k, s, jnp.float32)}
          for i, (k, s) in enumerate(zip(keys, shapes))}


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
  line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, width)) + " |"
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


def cdg_update(method: str = "auto", **kw) -> Callable:
  tx = optax_cdg.channel_directed(method=method, **kw)
  return lambda t: tx.update(t, tx.init(t))[0]


def floor_update(t):
  return optax.scale(0.5).update(t, optax.EmptyState())[0]


def copy_tree(t):
  return jax.tree.map(jnp.copy, t)


def section_sweep(args) -> None:
  print("\n## sweep: one (E / N, N) array, each method / optax.scale on it")
  quick = args.quick
  sizes = (64, 128, 256, 512) if quick else (16, 32, 64, 128, 256, 512,
                                             1024, 2048)
  sizes = tuple(args.sweep_sizes or sizes)
  cases = ([("sobolev", "periodic")] if quick else
           [("sobolev", "periodic"), ("sobolev", "neumann"),
            ("sobolev_mean", "periodic"), ("sobolev_mean", "neumann")])
  elements = 2 ** 20 if quick else 2 ** 21
  rows = []
  for metric, boundary in cases:
    for n in sizes:
      x = jax.random.normal(jax.random.key(n), (elements // n, n))
      fns = {"floor": jax.jit(lambda g: g * 0.5)}
      for method in ("fft", "matmul", "blocked"):
        if method == "matmul" and n > 1024:
          continue
        bs = (None,) if method != "blocked" else tuple(
            b for b in (8, 16, 32, 64) if n % b == 0 and n // b >= 2)
        for b in bs:
          name = method if b is None else f"blocked{b}"
          fn = jax.jit(functools.partial(
              _sweep_op, lam=LAM[metric], metric=metric, boundary=boundary,
              method=method, block=b))
          try:
            jax.block_until_ready(fn(x))
          except ValueError as e:  # e.g. no exact low-rank chunk structure
            print(f"  {name} skipped: {e}")
            continue
          fns[name] = fn
      times = interleaved({k: functools.partial(f, x) for k, f in fns.items()},
                          args.reps)
      base = med(times["floor"])
      ratios = {k: med(v) / base for k, v in times.items() if k != "floor"}
      best = min(ratios, key=ratios.get)
      auto = _methods.choose("auto", metric, (n,), LAM[metric],
                             boundary=boundary, scale="unit", last_axis=True,
                             backend=jax.default_backend())
      rows.append([metric, boundary, n, f"{base * 1e3:.3f}"] + [
          f"{ratios[k]:.2f}" if k in ratios else "-"
          for k in ("fft", "matmul", "blocked8", "blocked16", "blocked32",
                    "blocked64")] + [best, auto])
      print(f"  {metric} {boundary} N={n}: best {best} "
            f"({ratios[best]:.2f}x), auto picks {auto}", flush=True)
  print(table(rows, ["metric", "boundary", "N", "floor ms", "fft", "matmul",
                     "blk8", "blk16", "blk32", "blk64", "best", "auto"]))


def _sweep_op(x, *, lam, metric, boundary, method, block):
  # The chunk size is an argument of the private entry point (None: the rule).
  return _operator.apply(x, lam, metric=metric, axes=-1, boundary=boundary,
                         scale="unit", method=method, block=block)


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
      for method in ("auto", "fft"):
        if method == "fft" and metric == "reweighted":
          continue
        if method == "fft" and (metric, boundary) != configs[0] and args.quick:
          continue
        name = f"{metric}/{boundary}/{method}"
        f = cdg_update(method, smoothing=LAM[metric], metric=metric,
                       boundary=boundary)
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
  print(table(rows, ["net", "conv params", "update (metric/boundary/method)",
                     "median ms", "/ scale", "min / min", "cpu / cpu",
                     "/ copy", "IQR/med", "compile s", "temp MiB"]))


def _batched_update(tree, lam):
  """All kernels that share N stacked into one (rows, N) call."""
  leaves, treedef = jax.tree.flatten(tree)
  groups: dict[int, list[int]] = {}
  for i, x in enumerate(leaves):
    groups.setdefault(x.shape[-1], []).append(i)
  out = list(leaves)
  for n, idx in groups.items():
    flat = jnp.concatenate([leaves[i].reshape(-1, n) for i in idx])
    done = optax_cdg.metric_gradient(flat, lam)
    start = 0
    for i in idx:
      rows = leaves[i].size // n
      out[i] = done[start:start + rows].reshape(leaves[i].shape)
      start += rows
  return jax.tree.unflatten(treedef, out)


def section_batched(args) -> None:
  print("\n## batched: one call per N (stacked kernels) vs one per kernel")
  rows = []
  for net in (("resnet18", "convnext_t") if args.quick else tuple(NETS)):
    tree = kernel_tree(NETS[net]())
    lam = optax_cdg.DEFAULT_SMOOTHING
    fns = {"scale": jax.jit(floor_update),
           "per kernel": jax.jit(cdg_update(smoothing=lam)),
           "per N": jax.jit(functools.partial(_batched_update, lam=lam))}
    times = interleaved({k: functools.partial(f, tree)
                         for k, f in fns.items()}, args.reps)
    base = med(times["scale"])
    rows.append([net, f"{med(times['per kernel']) / base:.2f}",
                 f"{med(times['per N']) / base:.2f}"])
  print(table(rows, ["net", "per kernel / scale", "per N / scale"]))


def dot_shapes(fn: Callable, *args) -> int:
  """Distinct (operand shapes, dtypes) of the dots in `fn`'s lowered program."""
  text = jax.jit(fn).lower(*args).as_text()
  shapes = set()
  for line in text.splitlines():
    if "stablehlo.dot_general" in line:
      shapes.add(line.rsplit(":", 1)[-1].strip())
  return len(shapes)


def section_compile(args) -> None:
  print("\n## compile: ResNet-50 tree, cold caches, the compiles in turn")
  tree = jax.eval_shape(lambda: kernel_tree(resnet50()))
  fns = {"scale": floor_update, "auto": cdg_update(), "fft":
         cdg_update("fft")}
  secs = {k: [] for k in fns}
  cpu = {k: [] for k in fns}
  names = list(fns)
  for r in range(args.compile_reps):
    for name in names[r % 3:] + names[:r % 3]:
      for fn in (_methods.dense_operator, _methods.blocked_factors,
                 _methods.eigenbasis):
        fn.cache_clear()
      jax.clear_caches()
      c = time.process_time()
      secs[name].append(compile_seconds(fns[name], tree)[0])
      cpu[name].append(time.process_time() - c)
    print(f"  rep {r}: " + ", ".join(f"{k} {v[-1]:.2f}s"
                                     for k, v in secs.items()), flush=True)
  dots = {k: dot_shapes(f, tree) for k, f in fns.items()}
  rows = []
  for name in names:
    rows.append([name, f"{med(secs[name]):.2f}", f"{min(secs[name]):.2f}",
                 f"{med(secs[name]) - med(secs['scale']):+.2f}",
                 f"{med(cpu[name]) - med(cpu['scale']):+.2f}", dots[name]])
  print(table(rows, ["update", "median s", "min s", "median - scale s",
                     "cpu - scale s", "distinct dot shapes"]))


def section_lsgd(args) -> None:
  print("\n## lsgd: laplacian_smoothing on ResNet-18's conv kernels")
  tree = kernel_tree(resnet18())
  fns, compile_s = {"scale": jax.jit(floor_update)}, {}
  for method in ("auto", "fft"):
    tx = optax_cdg.laplacian_smoothing(method=method)
    f = lambda t, tx=tx: tx.update(t, tx.init(t))[0]
    compile_s[f"lsgd/{method}"] = compile_seconds(f, tree)[0]
    fns[f"lsgd/{method}"] = jax.jit(f)
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


class _Block(nn.Module):
  width: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9)
    h = nn.Conv(self.width, (3, 3), self.stride, use_bias=False)(x)
    h = nn.relu(norm()(h))
    h = norm()(nn.Conv(self.width, (3, 3), use_bias=False)(h))
    if self.stride != 1 or x.shape[-1] != self.width:
      x = norm()(nn.Conv(self.width, (1, 1), self.stride, use_bias=False)(x))
    return nn.relu(h + x)


class CifarResNet18(nn.Module):
  """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool): 11.2M conv params."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(64, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for stage, w in enumerate((64, 128, 256, 512)):
      for b in range(2):
        x = _Block(w, 2 if stage and not b else 1)(x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def _train_step(model, tx):
  def loss_fn(params, stats, x, y):
    logits, new = model.apply({"params": params, "batch_stats": stats}, x,
                              train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, new["batch_stats"]

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, stats, opt_state, x, y):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, stats, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss
  return step


def section_step(args) -> None:
  print("\n## step: CIFAR ResNet-18 training step, 32x32, SGD momentum")
  model = CifarResNet18()
  rows = []
  for batch in ((32,) if args.quick else (32, 128)):
    x = jax.random.normal(jax.random.key(1), (batch, 32, 32, 3))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    variables = model.init(jax.random.key(0), x[:1])
    sgd = optax.sgd(0.1, momentum=0.9)
    runs = {"plain": sgd,
            "cdg": optax.chain(optax_cdg.channel_directed(), sgd)}
    state, fns = {}, {}
    for name, tx in runs.items():
      step = _train_step(model, tx)
      p = jax.tree.map(jnp.copy, variables["params"])
      s = jax.tree.map(jnp.copy, variables["batch_stats"])
      state[name] = (p, s, tx.init(p))

      def run(name=name, step=step):
        p, s, o, loss = step(*state[name], x, y)
        state[name] = (p, s, o)
        return loss
      fns[name] = run
    reps = 7 if args.quick else max(7, args.reps // (1 if batch == 32 else 2))
    times = interleaved(fns, reps)
    cpu = {k: med(v) for k, v in CPU_TIMES.items()}
    plain, cdg = med(times["plain"]), med(times["cdg"])
    # The update alone on this model's gradients, against the floor: less
    # noisy than the difference of two long steps.
    grads = jax.tree.map(jnp.ones_like, variables["params"])
    update = {"cdg update": jax.jit(cdg_update()),
              "scale": jax.jit(floor_update)}
    alone = interleaved({k: functools.partial(f, grads)
                         for k, f in update.items()}, 3 * reps)
    extra = med(alone["cdg update"]) - med(alone["scale"])
    rows.append([batch, f"{plain * 1e3:.1f}", f"{cdg * 1e3:.1f}",
                 f"{cdg / plain:.4f}",
                 f"{min(times['cdg']) / min(times['plain']):.4f}",
                 f"{cpu['cdg'] / cpu['plain']:.4f}",
                 f"{spread(times['plain']):.3f}",
                 f"{spread(times['cdg']):.3f}", reps,
                 f"{med(alone['cdg update']) * 1e3:.2f}",
                 f"{1 + extra / plain:.4f}"])
    print(f"  batch {batch} done", flush=True)
  print(table(rows, ["batch", "plain ms", "cdg ms", "cdg / plain",
                     "min / min", "cpu / cpu", "IQR/med plain",
                     "IQR/med cdg", "reps", "update ms",
                     "1 + (update - scale) / plain"]))


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
  parser.add_argument("--sweep-sizes", type=int, nargs="+", default=None,
                      help="axis lengths of the sweep (default 16 .. 2048)")
  parser.add_argument("--compile-reps", type=int, default=None,
                      help="cold compiles of each update (default 3, quick 1)")
  args = parser.parse_args(argv)
  if args.reps is None:
    args.reps = 11 if args.quick else 21
  if args.compile_reps is None:
    args.compile_reps = 1 if args.quick else 3
  print(describe_device())
  print(f"date: {time.strftime('%Y-%m-%d %H:%M')}; command: "
        f"python benchmarks/operator.py {' '.join(sys.argv[1:])}")
  for name in SECTIONS:
    if name in args.sections:
      globals()[f"section_{name}"](args)


if __name__ == "__main__":
  main()
