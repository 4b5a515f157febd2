"""What CDG costs in a training step: a jitted CIFAR ResNet-18 step.

Each variant is the same jitted step (forward, backward, update, apply) of a
ResNet-18 for 32x32 inputs (11.2M conv parameters), SGD with momentum 0.9,
with one transform chained in front of the optimizer:

- plain:   none;
- control: `optax.clip(1e6)`, an elementwise pass over every gradient in the
           same place as CDG: what any transform there costs;
- cdg:     `optax_cdg.channel_directed()` at the defaults (one row per
           `--methods` entry where the library offers a choice).

The variants take turns within each repetition, so that the machine's load
hits all of them alike; a run reports each variant's median over its
repetitions, as a ratio to plain; `--runs` such runs are made, and the table
gives the median of the per-run ratios and their range, and the median over
all repetitions of the ratio to the plain step of the same repetition. A
control ratio near 1.00 says the measurement can see a cost of about 1 %.

Usage:
  python benchmarks/step.py                  # 3 runs of 12 repetitions
  python benchmarks/step.py --runs 5 --reps 12 --batch 32
Never run it while another job uses the machine.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import functools
import os
import platform
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import optax

import optax_cdg


class _Block(nn.Module):
  width: int
  stride: int

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
  """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool)."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(64, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for stage, w in enumerate((64, 128, 256, 512)):
      for b in range(2):
        x = _Block(w, 2 if stage and not b else 1)(x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def make_step(model: nn.Module, tx: optax.GradientTransformation):
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


def variants(methods: Sequence[str]) -> dict[str, optax.GradientTransformation]:
  sgd = optax.sgd(0.1, momentum=0.9)
  out = {"plain": sgd, "control": optax.chain(optax.clip(1e6), sgd)}
  for m in methods:
    kw = {} if m == "default" else {"method": m}
    out[f"cdg {m}"] = optax.chain(optax_cdg.channel_directed(**kw), sgd)
  return out


def one_run(txs, model, variables, x, y,
            reps: int) -> dict[str, list[float]]:
  """Seconds per step of each variant, the variants taking turns."""
  state, steps = {}, {}
  for name, tx in txs.items():
    steps[name] = make_step(model, tx)
    p = jax.tree.map(jnp.copy, variables["params"])
    s = jax.tree.map(jnp.copy, variables["batch_stats"])
    state[name] = (p, s, tx.init(p))
    for _ in range(2):  # compile, then one warm step
      *state[name], loss = steps[name](*state[name], x, y)
      jax.block_until_ready(loss)
  times = {k: [] for k in txs}
  names = list(txs)
  for r in range(reps):
    for name in names[r % len(names):] + names[:r % len(names)]:
      t = time.perf_counter()
      *state[name], loss = steps[name](*state[name], x, y)
      jax.block_until_ready(loss)
      times[name].append(time.perf_counter() - t)
  return times


def describe() -> str:
  cpu = platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(ln.split(":", 1)[1].strip() for ln in f
                 if ln.startswith("model name"))
  except (OSError, StopIteration):
    pass
  d = jax.devices()[0]
  return (f"device: {d.platform} / {d.device_kind}; host CPU: {cpu}, "
          f"{os.cpu_count()} cores; jax {jax.__version__}, jaxlib "
          f"{jaxlib.__version__}, optax {optax.__version__}, "
          f"optax_cdg {optax_cdg.__version__}, python "
          f"{platform.python_version()}")


def main(argv: Sequence[str] | None = None) -> dict[str, list[float]]:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--reps", type=int, default=12,
                      help="interleaved repetitions per run")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--methods", nargs="+", default=["default"],
                      help="CDG rows: 'default', or values of method=")
  args = parser.parse_args(argv)
  print(describe())
  print(f"date: {time.strftime('%Y-%m-%d %H:%M')}; command: python "
        "benchmarks/step.py "
        + " ".join(sys.argv[1:] if argv is None else argv))
  model = CifarResNet18()
  x = jax.random.normal(jax.random.key(1), (args.batch, 32, 32, 3))
  y = jax.random.randint(jax.random.key(2), (args.batch,), 0, 10)
  variables = model.init(jax.random.key(0), x[:1])
  txs = variants(args.methods)
  ratios = {k: [] for k in txs}
  paired = {k: [] for k in txs}  # per repetition: variant / plain
  plain_ms = []
  for r in range(args.runs):
    times = one_run(txs, model, variables, x, y, args.reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    plain_ms.append(med["plain"] * 1e3)
    for k in txs:
      ratios[k].append(med[k] / med["plain"])
      paired[k] += [a / b for a, b in
                    zip(times[k], times["plain"], strict=True)]
    print(f"run {r + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                       ((k, ratios[k][-1]) for k in txs)),
          flush=True)
  print(f"\nplain step: median {statistics.median(plain_ms):.1f} ms "
        f"(batch {args.batch})\n")
  print("| variant | step / plain (median of runs) | range over runs "
        "| median of paired repetitions |")
  print("|---|---|---|---|")
  for k, v in ratios.items():
    print(f"| {k} | {statistics.median(v):.4f} | {min(v):.4f} - "
          f"{max(v):.4f} | {statistics.median(paired[k]):.4f} |")
  return ratios


if __name__ == "__main__":
  main()
