"""CDG on MNIST-1D at several widths: stability first, then accuracy.

MNIST-1D (Greydanus 2020) is generated locally by the `mnist1d` package from
its templates (no download): the standard 4,000 training sequences (its
default arguments, seed 42), plus a validation set and a larger test set drawn
from the same generator with other seeds. Models: a 3-layer 1-D CNN of
`width` channels per layer (kernel 5, stride 2, ReLU, no normalization; the
published MNIST-1D CNN has 25 channels and reaches about 94 %) and a small
1-D ResNet of the same width.

All members of one setting (every learning rate of the grid times every
seed) train at once: one `jax.vmap` inside one `jax.jit`, a `lax.scan` over
the steps. Member (lr, seed) starts from the seed's initialization and sees
the seed's batch order, so methods are paired seed by seed. Every finished
member is saved as one JSON file under DIR/runs/ as soon as its setting
ends; a re-run (or --resume) skips what is there, so an interrupted sweep
continues where it stopped and `--report-only` turns whatever has finished
into results.json, results.md and plots. A setting in training saves its
state under DIR/checkpoints/ at each of its 6 evaluations, so a killed run
loses at most a sixth of one setting and resumes bit for bit. Where DIR/runs/
is missing, DIR/runs.tar.xz (runs/ and mechanism.json) is unpacked into DIR:
the full sweep's cache is kept in the repository that way, in one file.

Phases (the full mode runs them in this order, decisive comparisons first):

  reported   the check reported in the issue: width 128, Adam at a
             constant 3e-3 and 1e-2, 3,000 steps, seed 0, every finalist.
  stability  every method of --candidates at widths 32/64/128, seed 0,
             Adam and SGD-momentum over learning-rate grids that reach low
             enough, 1,000 steps: which learning rates train, per method and
             width (a run "trains" if its final validation accuracy is at
             least 50 %; chance is 10 %).
  mechanism  width 128, Adam 1e-2, seed 0, 300 steps: the channel-mean
             share of kernels and updates, dead ReLU channels, per method.
  decisive   baseline, the former default and the candidate defaults at
             widths 32/64/128 with AdamW and SGD-momentum, every learning
             rate of the grid, 5 paired seeds; the learning rate of each
             method is chosen on validation.
  confirm    the baseline and the default, each at the rate it chose in
             its decisive cell, with 20 paired seeds (the decisive 5 and 15
             more): an interval near +-0.3 points where 5 seeds give +-1.
  edge       the stability grid above the usual rates (Adam 2e-2, 5e-2;
             SGD 0.3, 1.0): where training breaks, with and without CDG.
  sweep      at width 64: the three metrics over a smoothing sweep along the
             output channels, the input and spatial directions, LSGD.
  resnet     the 1-D ResNet at widths 32/64/128: the baseline, the former
             default and the default the rule chose on the CNN.

  python examples/mnist1d_evidence.py --quick --out /tmp/m1d      # < 15 min
  python examples/mnist1d_evidence.py --out /work/sweeps/mnist1d  # full, hours
  # The report now, from the runs finished so far:
  python examples/mnist1d_evidence.py --report-only \\
      --out /work/sweeps/mnist1d --results examples/results/mnist1d

The committed report: results.md and the plots again from results.json alone
(--from-results), or everything again from the packed run cache:

  python examples/mnist1d_evidence.py --from-results \\
      --results examples/results/mnist1d
  python examples/mnist1d_evidence.py --report-only \\
      --out examples/results/mnist1d

Widths 256 and 512 (a GPU host without network): make the arrays on a CPU
host, then run the decisive phase from the file:

  python examples/mnist1d_evidence.py --make-data mnist1d_arrays.npz
  python examples/mnist1d_evidence.py --data mnist1d_arrays.npz --out DIR \\
      --phases decisive --widths 256,512 --optimizers adamw
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import dataclasses
import json
import math
import os
import platform
import sys
import tarfile
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

# The models and training loop shared with the examples, and reproduce.py's
# optimizers and statistics: modules beside this script.
from common import Split
import optax_cdg
from reproduce import mean_ci95
from reproduce import optimizer_chain
from reproduce import select_lr

# ----------------------------------------------------------------------- data

VAL_SEED, TEST_SEED = 1, 2


def _generate(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  from mnist1d.data import get_dataset_args  # pylint: disable=g-import-not-at-top
  from mnist1d.data import make_dataset  # pylint: disable=g-import-not-at-top
  args = get_dataset_args()
  args.num_samples, args.seed, args.train_split = num_samples, seed, 1.0
  d = make_dataset(args)
  return d["x"].astype(np.float32), d["y"].astype(np.int32)


def make_mnist1d(val: int = 5000, test: int = 20000) -> dict[str, np.ndarray]:
  """The arrays: standard train (4,000, seed 42) and its 1,000 standard test
  sequences, plus `val` and `test` sequences from seeds 1 and 2.

  The generator standardizes every set it makes by that set's own mean and
  standard deviation (for sets of thousands these agree to about 1 %).
  """
  from mnist1d.data import make_dataset  # pylint: disable=g-import-not-at-top
  for name, n in (("val", val), ("test", test)):
    if n < 10 or n % 10:
      raise ValueError(f"{name}={n} must be a positive multiple of 10 (the "
                       "generator makes the same number of each digit).")
  std = make_dataset()  # default arguments: 5,000 samples, seed 42, 80/20
  out = {"x_train": std["x"].astype(np.float32),
         "y_train": std["y"].astype(np.int32),
         "x_std_test": std["x_test"].astype(np.float32),
         "y_std_test": std["y_test"].astype(np.int32)}
  out["x_val"], out["y_val"] = _generate(val, VAL_SEED)
  out["x_test"], out["y_test"] = _generate(test, TEST_SEED)
  return out


def save_arrays(path: str, arrays: dict[str, np.ndarray]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_arrays(path: str) -> dict[str, np.ndarray]:
  """Reads a .npz written by save_arrays (plain arrays, never pickles)."""
  with np.load(path, allow_pickle=False) as z:
    arrays = {k: z[k] for k in z.files}
  need = {"x_train", "y_train", "x_val", "y_val", "x_test", "y_test"}
  if not need <= set(arrays):
    raise ValueError(f"{path} lacks {sorted(need - set(arrays))}.")
  return arrays


def load_mnist1d(cache: str | None = None, val: int = 5000,
                 test: int = 20000) -> dict[str, Split]:
  """The splits as (n, 40, 1) float32 sequences; generated once into
  `cache` (a .npz) if given, read from it afterwards."""
  if cache and os.path.exists(cache):
    a = load_arrays(cache)
    if len(a["x_val"]) != val or len(a["x_test"]) != test:
      raise ValueError(f"{cache} holds {len(a['x_val'])} validation and "
                       f"{len(a['x_test'])} test sequences; asked for {val} "
                       f"and {test}.")
  else:
    a = make_mnist1d(val, test)
    if cache:
      save_arrays(cache, a)
  return {k: Split(a[f"x_{k}"][..., None], a[f"y_{k}"])
          for k in ("train", "val", "test")}


# --------------------------------------------------------------------- models


class Conv1D(nn.Module):
  """A 1-D convolution written as patches @ kernel (padding size // 2).

  The kernel has Flax's layout and name, `kernel` of shape `(size, in,
  out)`, so CDG selects it like an `nn.Conv` kernel. Written as a matmul
  because a vmapped `nn.Conv` becomes a grouped convolution, which XLA runs
  about 1.6x slower per member on CPU (measured at width 128); a vmapped
  matmul stays a batched matmul.
  """

  features: int
  size: int = 5
  stride: int = 1
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init,
                        (self.size, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    pad = self.size // 2
    xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)))
    out_len = (x.shape[1] + 2 * pad - self.size) // self.stride + 1
    span = self.stride * (out_len - 1) + 1
    patches = jnp.stack([xp[:, j:j + span:self.stride]
                         for j in range(self.size)], axis=2)
    return jnp.einsum("blkc,kco->blo", patches, kernel) + bias


class CNN1D(nn.Module):
  """`depth` convs of `width` channels (kernel 5, stride 2, ReLU), Dense."""

  width: int = 32
  depth: int = 3
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    for _ in range(self.depth):
      x = nn.relu(Conv1D(self.width, 5, 2)(x))
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class ResNet1D(nn.Module):
  """A stem conv, then `blocks` residual blocks (two kernel-3 convs each),
  halving the length after every block but the last, global mean, Dense."""

  width: int = 32
  blocks: int = 3
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(Conv1D(self.width, 5)(x))
    for b in range(self.blocks):
      h = nn.relu(Conv1D(self.width, 3)(x))
      # Zero-initialized second conv: each block starts as the identity.
      h = Conv1D(self.width, 3, kernel_init=nn.initializers.zeros)(h)
      x = nn.relu(x + h)
      if b < self.blocks - 1:
        x = nn.avg_pool(x, (2,), strides=(2,))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=1))


def make_model(name: str, width: int) -> nn.Module:
  if name == "cnn":
    return CNN1D(width)
  if name == "resnet":
    return ResNet1D(width)
  raise ValueError(f"model={name!r}; expected 'cnn' or 'resnet'.")


# -------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class Method:
  """baseline, CDG (metric, scale, smoothing, direction) or LSGD (sigma)."""

  transform: str                  # "baseline" | "cdg" | "lsgd"
  metric: str | None = None
  scale: str | None = None
  smoothing: float | None = None
  direction: str = "output"

  @classmethod
  def parse(cls, spec: str) -> Method:
    """"baseline", "lsgd:SIGMA" or "METRIC:SCALE:LAM[:DIRECTION]"."""
    parts = spec.split(":")
    try:
      if parts == ["baseline"]:
        return cls("baseline")
      if parts[0] == "lsgd" and len(parts) == 2:
        return cls("lsgd", smoothing=float(parts[1]))
      if len(parts) in (3, 4) and parts[1] in ("unit", "grid"):
        return cls("cdg", parts[0], parts[1], float(parts[2]),
                   parts[3] if len(parts) == 4 else "output")
    except ValueError:
      pass
    raise ValueError(f"method spec {spec!r}: expected 'baseline', "
                     "'lsgd:SIGMA' or 'METRIC:SCALE:LAM[:DIRECTION]' with "
                     "SCALE 'unit' or 'grid'.")

  @property
  def spec(self) -> str:
    if self.transform == "baseline":
      return "baseline"
    if self.transform == "lsgd":
      return f"lsgd:{self.smoothing:g}"
    s = f"{self.metric}:{self.scale}:{self.smoothing:g}"
    return s if self.direction == "output" else f"{s}:{self.direction}"

  def top_gain(self, n: int) -> float | None:
    """What CDG multiplies the highest output-channel frequency by at
    `n` channels (periodic boundary)."""
    if self.transform != "cdg" or self.direction != "output":
      return None
    g = optax_cdg.spectral_gain(n, self.smoothing, metric=self.metric,
                                scale=self.scale)
    return float(np.min(np.asarray(g)))


# The default this comparison was built to test ("sobolev", scale "unit",
# 1e-4, whose damping grows with the width); pinned, since the run cache is
# labelled by it and the evidence replaced it (optax_cdg.DEFAULT_SCALE).
FORMER_DEFAULT = Method("cdg", "sobolev", "unit", 1e-4)
DEFAULT = Method("cdg", "sobolev", optax_cdg.DEFAULT_SCALE,
                 optax_cdg.DEFAULT_SMOOTHING)
# Candidate defaults. "grid" scale keeps the damping of the top frequency
# fixed as the width grows (1 / (1 + 4 lam)) where "unit" makes it grow as
# N^2; a smaller "unit" lam; the re-weighted metric, width-independent too.
CANDIDATES = ("sobolev:grid:0.1", "reweighted:unit:1.5", "sobolev:grid:0.5")
# In the stability grid only: a smaller "unit" lam still damps the top
# frequency more the wider the layer (top gain 0.60 at 128 channels).
STABILITY_EXTRA = ("sobolev:unit:1e-05",)


def _optimizer(name: str, learning_rate, total_steps: int) -> list[Any]:
  """No warmup; a cosine decay from the learning rate to 0. "sgd" (momentum
  0.9, coupled weight decay 5e-4) and "adamw" (decoupled 1e-2) are
  reproduce.py's; "adam" is "adamw" without weight decay."""
  if name == "adam":
    return [optax.scale_by_adam(),
            optax.scale_by_learning_rate(learning_rate),
            optax.scale_by_schedule(
                optax.cosine_decay_schedule(1.0, total_steps))]
  if name == "adam_constant":  # the reported check: no schedule
    return [optax.scale_by_adam(),
            optax.scale_by_learning_rate(learning_rate)]
  return optimizer_chain(name, learning_rate, total_steps)


def make_tx(method: Method, optimizer: str,
            total_steps: int) -> optax.GradientTransformation:
  """The chain with the learning rate as an injected hyperparameter (one
  value per vmapped member)."""

  def factory(learning_rate):
    first = []
    if method.transform == "cdg":
      first = [optax_cdg.channel_directed(
          method.smoothing, metric=method.metric, scale=method.scale,
          direction=method.direction)]
    elif method.transform == "lsgd":
      first = [optax_cdg.laplacian_smoothing(method.smoothing)]
    return optax.chain(*first, *_optimizer(optimizer, learning_rate,
                                           total_steps))

  return optax.inject_hyperparams(factory)(learning_rate=1.0)


# ------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class Setting:
  """Everything a run depends on besides the method, learning rate, seed."""

  model: str
  width: int
  optimizer: str
  steps: int
  batch_size: int = 100

  @property
  def name(self) -> str:
    return (f"{self.model}-w{self.width}-{self.optimizer}-steps{self.steps}"
            f"-batch{self.batch_size}")


def batch_indices(n: int, batch_size: int, steps: int,
                  seed: int) -> np.ndarray:
  """(steps, batch_size) indices: the seed's epochs of shuffled batches."""
  rng = np.random.default_rng(seed)
  per_epoch = n // batch_size
  epochs = -(-steps // per_epoch)
  idx = np.concatenate([rng.permutation(n)[:per_epoch * batch_size]
                        for _ in range(epochs)])
  return idx.reshape(-1, batch_size)[:steps].astype(np.int32)


EVAL_BATCH = 1000
_COMPILED: dict[Any, Any] = {}  # jitted functions, shared across settings


def _accuracy_fn(model, batch: int = EVAL_BATCH):
  """Accuracy of every member, `batch` sequences at a time: 15 members of
  the width-64 ResNet on 20,000 sequences at once would hold over 10 GB."""
  key = ("accuracy", model, batch)
  if key in _COMPILED:  # one compile per model, not per setting
    return _COMPILED[key]

  @jax.jit
  def correct(params, x, y):
    logits = jax.vmap(lambda p: model.apply({"params": p}, x))(params)
    return jnp.sum(jnp.argmax(logits, -1) == y, axis=-1)

  def acc(params, x, y):
    total = sum(np.asarray(correct(params, x[i:i + batch], y[i:i + batch]))
                for i in range(0, len(x), batch))
    return total / len(x)

  _COMPILED[key] = acc
  return acc


def _chunk_fn(model, tx):
  """jit(scan over steps of vmap over members of one SGD step)."""
  key = (model, tx)
  if key in _COMPILED:
    return _COMPILED[key]

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def chunk(params, opt_state, x_train, y_train, idx):
    # idx: (steps, members, batch)
    def body(carry, idx_t):
      p, s = carry
      p, s, loss = jax.vmap(step)(p, s, x_train[idx_t], y_train[idx_t])
      return (p, s), loss
    (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), idx)
    return params, opt_state, losses

  _COMPILED[key] = chunk
  return chunk


def train_members(model: nn.Module, method: Method, setting: Setting,
                  data: dict[str, Split],
                  members: Sequence[tuple[float, int]], *,
                  evals: int = 6, test: bool = True,
                  checkpoint: str | None = None) -> list[dict]:
  """Trains every (learning_rate, seed) member at once; one record each.

  Validation accuracy is measured `evals` times (evenly spaced), test
  accuracy once at the end. A member whose loss turns non-finite keeps
  training (its numbers become NaN) without touching the others.

  With `checkpoint` (a .npz path), the state is saved after every
  evaluation and a killed run resumes from it, bit for bit: a width-128
  ResNet setting trains for over an hour. The file is removed at the end.
  """
  tx = make_tx(method, setting.optimizer, setting.steps)
  lrs = np.array([m[0] for m in members], np.float32)
  seeds = [m[1] for m in members]
  x_init = jnp.zeros((1,) + data["train"].x.shape[1:], jnp.float32)
  inits = {s: model.init(jax.random.key(s), x_init)["params"]
           for s in set(seeds)}
  params = jax.tree.map(lambda *a: jnp.stack(a), *[inits[s] for s in seeds])
  opt_state = jax.vmap(tx.init)(params)
  opt_state.hyperparams["learning_rate"] = jnp.asarray(lrs)
  n = len(data["train"].x)
  idx = {s: batch_indices(n, setting.batch_size, setting.steps, s)
         for s in set(seeds)}
  idx = np.stack([idx[s] for s in seeds], axis=1)  # (steps, members, batch)
  chunk = _chunk_fn(model, tx)
  acc = _accuracy_fn(model)
  x_tr, y_tr = jnp.asarray(data["train"].x), jnp.asarray(data["train"].y)
  bounds = np.linspace(0, setting.steps, evals + 1).round().astype(int)
  key = np.array(members, np.float64)
  losses, val_curve, spent = [], [], 0.0
  if checkpoint:
    state = _load_checkpoint(checkpoint, key, bounds, (params, opt_state))
    if state is not None:
      (params, opt_state), losses, val_curve, spent = state
  start = time.perf_counter() - spent
  for k in range(len(losses), evals):
    params, opt_state, loss = chunk(params, opt_state, x_tr, y_tr,
                                    jnp.asarray(idx[bounds[k]:bounds[k + 1]]))
    losses.append(np.asarray(loss))
    val_curve.append(np.asarray(acc(params, data["val"].x, data["val"].y)))
    if checkpoint and k + 1 < evals:
      _save_checkpoint(checkpoint, key, bounds, (params, opt_state), losses,
                       val_curve, time.perf_counter() - start)
  eval_steps = [int(b) for b in bounds[1:]]
  seconds = time.perf_counter() - start
  losses = np.concatenate(losses)  # (steps, members)
  test_acc = (np.asarray(acc(params, data["test"].x, data["test"].y))
              if test else np.full(len(members), np.nan))
  val_curve = np.stack(val_curve, axis=1)  # (members, evals)
  # Training loss averaged over each tenth of the run.
  tenth = max(1, setting.steps // 10)
  records = []
  for i, (lr, seed) in enumerate(members):
    records.append({
        "method": method.spec, "setting": setting.name,
        "learning_rate": float(lr), "seed": int(seed),
        "val_acc": float(val_curve[i, -1]),
        "test_acc": float(test_acc[i]),
        "val_curve": [float(v) for v in val_curve[i]],
        "eval_steps": eval_steps,
        "train_loss": [float(np.mean(losses[j:j + tenth, i]))
                       for j in range(0, setting.steps, tenth)],
        "final_loss": float(np.mean(losses[-tenth:, i])),
        "seconds": seconds / len(members),
        "members_trained_together": len(members),
    })
  if checkpoint and os.path.exists(checkpoint):
    os.remove(checkpoint)
  return records


def _save_checkpoint(path, key, bounds, state, losses, val_curve,
                     seconds) -> None:
  leaves = jax.tree.leaves(state)
  # save_arrays writes and renames: a half-written checkpoint is never read.
  save_arrays(path, dict(
      members=key, bounds=bounds, seconds=np.asarray(seconds),
      losses=np.concatenate(losses), val_curve=np.stack(val_curve),
      **{f"leaf{i}": np.asarray(a) for i, a in enumerate(leaves)}))


def _load_checkpoint(path, key, bounds, like):
  """(state, losses, val_curve, seconds) saved for these members, steps and
  evaluations, or None (no file, or one saved for another run)."""
  if not os.path.exists(path):
    return None
  with np.load(path, allow_pickle=False) as f:
    leaves, treedef = jax.tree.flatten(like)
    saved = [f.get(f"leaf{i}") for i in range(len(leaves))]
    if (f["members"].shape != key.shape or np.any(f["members"] != key)
        or not np.array_equal(f["bounds"], bounds)
        or any(s is None or s.shape != a.shape or s.dtype != a.dtype
               for s, a in zip(saved, leaves, strict=True))):
      return None
    done = len(f["val_curve"])
    losses = np.split(f["losses"], np.cumsum(np.diff(bounds[:done + 1]))[:-1])
    state = jax.tree.unflatten(treedef, [jnp.asarray(s) for s in saved])
    return state, losses, list(f["val_curve"]), float(f["seconds"])


# ------------------------------------------------------------------ run cache


class Cache:
  """One JSON file per finished member under DIR/runs/<setting>/; the
  state of one in training under DIR/checkpoints/<setting>/. Where DIR/runs/
  is missing, DIR/runs.tar.xz (runs/ and mechanism.json) is unpacked first."""

  def __init__(self, out: str):
    self.dir = os.path.join(out, "runs")
    self.checkpoints = os.path.join(out, "checkpoints")
    archive = os.path.join(out, "runs.tar.xz")
    if not os.path.isdir(self.dir) and os.path.isfile(archive):
      with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")  # nothing lands outside DIR

  def checkpoint(self, setting: Setting, method: Method) -> str:
    """Where a (setting, method) in training keeps its state."""
    return os.path.join(self.checkpoints, setting.name, f"{method.spec}.npz")

  def _path(self, setting: Setting, method: Method, lr: float,
            seed: int) -> str:
    return os.path.join(self.dir, setting.name,
                        f"{method.spec}_lr{lr!r}_seed{seed}.json")

  def load(self, setting, method, lr, seed) -> dict | None:
    path = self._path(setting, method, lr, seed)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def save(self, setting, method, record: dict) -> None:
    path = self._path(setting, method, record["learning_rate"],
                      record["seed"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(record, f)
    os.replace(path + ".tmp", path)  # a half-written record is never read

  def all_records(self) -> list[dict]:
    out = []
    if not os.path.isdir(self.dir):
      return out
    for sub in sorted(os.listdir(self.dir)):
      d = os.path.join(self.dir, sub)
      for name in sorted(os.listdir(d)):
        if name.endswith(".json"):
          with open(os.path.join(d, name)) as f:
            out.append(json.load(f))
    return out


def run_setting(cache: Cache, data, setting: Setting, method: Method,
                lrs: Sequence[float], seeds: Sequence[int], *,
                log=print) -> list[dict]:
  """The records of every (lr, seed), training (together) those missing."""
  have, missing = {}, []
  for lr in lrs:
    for s in seeds:
      r = cache.load(setting, method, lr, s)
      if r is None:
        missing.append((lr, s))
      else:
        have[(lr, s)] = r
  if missing:
    t = time.perf_counter()
    model = make_model(setting.model, setting.width)
    for r in train_members(model, method, setting, data, missing,
                           checkpoint=cache.checkpoint(setting, method)):
      cache.save(setting, method, r)
      have[(r["learning_rate"], r["seed"])] = r
    log(f"{setting.name} {method.spec}: {len(missing)} members in "
        f"{time.perf_counter() - t:.0f} s; val "
        + " ".join(f"{have[m]['val_acc']:.3f}" for m in missing))
  return [have[(lr, s)] for lr in lrs for s in seeds]


# ---------------------------------------------------------------------- plans


@dataclasses.dataclass(frozen=True)
class Job:
  phase: str
  setting: Setting
  method: Method
  lrs: tuple[float, ...]
  seeds: tuple[int, ...]


CONFIRM_SEEDS = 20  # paired seeds of the confirm phase (the first 5 reused)


def resolve(job: Job, index: dict, confirm_seeds: int = CONFIRM_SEEDS
            ) -> Job | None:
  """A confirm job at the rate its method chose (mean validation accuracy
  over the decisive seeds) with `confirm_seeds` seeds; None while the
  decisive members are missing. Any other job is returned as it is."""
  if job.phase != "confirm":
    return job
  members = index.get(job.setting.name, {}).get(job.method.spec, {})
  if not _complete(members, job.lrs, job.seeds):
    return None
  lr = select_lr({lr: [members[(lr, s)]["val_acc"] for s in job.seeds]
                  for lr in job.lrs})
  return Job("confirm", job.setting, job.method, (lr,),
             tuple(range(confirm_seeds)))


def new_seeds(job: Job) -> tuple[int, ...]:
  """The seeds a job adds beyond the decisive ones it reuses (confirm)."""
  if job.phase != "confirm":
    return job.seeds
  return tuple(range(len(job.seeds), CONFIRM_SEEDS))


STABILITY_LR = {"adam": (1e-3, 2e-3, 5e-3, 1e-2),
                "sgd": (0.01, 0.03, 0.1)}
# Accuracy grids bracket the best rate seen in the stability grid (its top
# value at every width, for both optimizers).
SWEEP_LR = {"adamw": (3e-3, 1e-2, 3e-2), "sgd": (0.03, 0.1, 0.3)}
# Above the usual rates: where training breaks, with and without CDG.
EDGE_LR = {"adam": (2e-2, 5e-2), "sgd": (0.3, 1.0)}
TRAINS_AT = 0.5  # final validation accuracy that counts as "trains"


def plan(quick: bool, candidates: Sequence[str], widths: Sequence[int],
         phases: Sequence[str], *, steps: int | None = None,
         stability_steps: int | None = None, seeds: int | None = None,
         optimizers: Sequence[str] | None = None) -> list[Job]:
  """The jobs in the order they run (decisive comparisons first);
  `optimizers` keeps only the jobs of those optimizers."""
  base, default = Method("baseline"), FORMER_DEFAULT
  cands = [Method.parse(c) for c in candidates]
  if quick:
    cands = cands[:2]
  finalists = [base, default] + [c for c in cands if c != default]
  extra = [Method.parse(c) for c in STABILITY_EXTRA] if not quick else []
  jobs = []
  if quick:
    stab_widths, sweep_width = tuple(widths[:2]), widths[0]
  else:
    stab_widths, sweep_width = tuple(widths), widths[min(1, len(widths) - 1)]
  stab_steps = stability_steps or (500 if quick else 1000)
  steps = steps or (1000 if quick else 3000)
  seeds = tuple(range(seeds or (3 if quick else 5)))
  if "stability" in phases:
    for w in stab_widths:
      for opt in ("adam", "sgd"):
        for m in finalists + [e for e in extra if e not in finalists]:
          jobs.append(Job("stability", Setting("cnn", w, opt, stab_steps), m,
                          STABILITY_LR[opt], (0,)))
  if "reported" in phases and not quick:
    # The reported check: the widest CNN, Adam at a constant rate, 3,000
    # steps (counted with the stability grid).
    for m in finalists:
      jobs.append(Job("stability", Setting("cnn", max(widths),
                                           "adam_constant", steps), m,
                      (3e-3, 1e-2), (0,)))
  decisive_widths = tuple(widths[:1]) if quick else tuple(widths)
  if "decisive" in phases:
    for w in decisive_widths:
      for opt in ("adamw", "sgd"):
        for m in finalists:
          jobs.append(Job("decisive", Setting("cnn", w, opt, steps), m,
                          SWEEP_LR[opt], seeds))
  if "confirm" in phases and not quick:
    # More seeds for the baseline and the default, each at the rate it chose
    # on the decisive seeds: the rate is known only once those have run, so
    # the job holds the decisive grid and seeds until `resolve` fixes it.
    for w in decisive_widths:
      for opt in ("adamw", "sgd"):
        for m in (base, DEFAULT):
          jobs.append(Job("confirm", Setting("cnn", w, opt, steps), m,
                          SWEEP_LR[opt], seeds))
  if "edge" in phases:
    for w in stab_widths:
      for opt in ("adam", "sgd"):
        for m in finalists:
          jobs.append(Job("stability", Setting("cnn", w, opt, stab_steps), m,
                          EDGE_LR[opt], (0,)))
  if "sweep" in phases:
    sweep = [Method("cdg", "sobolev", "unit", lam) for lam in
             (1e-5, 1e-4, 1e-3, 1e-2)]
    sweep += [Method("cdg", "sobolev", "grid", lam) for lam in
              (0.1, 0.5, 2.0)]
    sweep += [Method("cdg", "sobolev_mean", "unit", lam) for lam in
              (1e-3, 1e-2)]
    sweep += [Method("cdg", "reweighted", "unit", lam) for lam in
              (1.5, 3.0)]
    sweep += [Method("cdg", "sobolev", "unit", 1e-3, d) for d in
              ("input", "spatial")]
    sweep += [Method("lsgd", smoothing=s) for s in (0.5, 2.0)]
    if quick:
      sweep = [Method("cdg", "sobolev_mean", "unit", 1e-2),
               Method("cdg", "sobolev", "unit", 1e-3, "input"),
               Method("cdg", "sobolev", "unit", 1e-3, "spatial"),
               Method("lsgd", smoothing=0.5)]
    for opt in ("adamw", "sgd") if not quick else ("adamw",):
      for m in [base] + [m for m in sweep if m not in finalists]:
        jobs.append(Job("sweep", Setting("cnn", sweep_width, opt, steps), m,
                        SWEEP_LR[opt], seeds))
  if "resnet" in phases:
    # The rule has chosen on the CNN: the ResNet asks whether its choice
    # (and the former default's harm) carries over to a deeper net.
    resnet_methods = [base, default] if quick else [base, DEFAULT, default]
    for w in (tuple(widths[:1]) if quick else tuple(widths)):
      for opt in ("adamw",) if quick else ("adamw", "sgd"):
        for m in resnet_methods:
          # The ResNet costs about 5x the CNN per step: shorter in quick.
          jobs.append(Job("resnet", Setting("resnet", w, opt,
                                            stab_steps if quick else steps),
                          m, SWEEP_LR[opt], seeds))
  # The same (setting, method) may be planned by two phases: run it once.
  seen, out = set(), []
  for j in jobs:
    if optimizers and j.setting.optimizer not in optimizers:
      continue
    key = (j.setting, j.method, j.lrs, j.seeds, j.phase == "confirm")
    if key not in seen:
      seen.add(key)
      out.append(j)
  return out


# ------------------------------------------------------------------ mechanism


def _conv_kernels(tree) -> dict[str, Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): v for p, v in flat
          if getattr(v, "ndim", 0) == 3}


def _mean_share(w) -> float:
  """Share of a kernel's energy in its output-channel mean (k = 0): 1/N for
  channels that are unrelated, 1 for channels that are all the same."""
  w = np.asarray(w, np.float64).reshape(-1, w.shape[-1])
  total = np.sum(w ** 2)
  return float(w.shape[-1] * np.sum(np.mean(w, -1) ** 2) / max(total, 1e-30))


def _logged_step(model, tx: optax.GradientTransformation,
                 cdg: optax.GradientTransformation | None):
  """A jitted step that also returns the gradient (after `cdg`, when given)
  and the update, for the mechanism's log."""

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x), y).mean()

  @jax.jit
  def step(p, s, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    u, s = tx.update(g, s, p)
    if cdg is not None:
      g = cdg.update(g, cdg.init(g))[0]
    return optax.apply_updates(p, u), s, loss, g, u

  return step


def mechanism(data, methods: Sequence[Method], *, width: int = 128,
              optimizer: str = "adam", lr: float = 1e-2, steps: int = 300,
              every: int = 25, seed: int = 0) -> dict:
  """One seed, one learning rate: what happens to the kernels early on.

  Logged every `every` steps, per conv layer: the channel-mean share of the
  kernel, of the optimizer's update and of the (transformed) gradient; the
  ratio |update| / |kernel|; the share of channels whose ReLU output is zero
  on all of 1,000 validation sequences (dead).
  """
  model = make_model("cnn", width)
  x_val = jnp.asarray(data["val"].x[:1000])
  out = {"width": width, "optimizer": optimizer, "learning_rate": lr,
         "seed": seed, "steps": steps, "methods": {}}
  idx = batch_indices(len(data["train"].x), 100, steps, seed)

  def dead(params):
    _, inter = model.apply({"params": params}, x_val,
                           capture_intermediates=True)
    acts = [v["__call__"][0] for k, v in sorted(inter["intermediates"].items())
            if k.startswith("Conv1D")]
    return [float(np.mean(np.all(np.asarray(a) <= 0, axis=(0, 1))))
            for a in acts]

  for method in methods:
    tx = make_tx(method, optimizer, steps)
    params = model.init(jax.random.key(seed), x_val[:1])["params"]
    state = tx.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    # The transformed gradient, for the log (the same CDG as in tx).
    cdg = (optax_cdg.channel_directed(
        method.smoothing, metric=method.metric, scale=method.scale,
        direction=method.direction) if method.transform == "cdg" else None)
    step = _logged_step(model, tx, cdg)
    log = []
    for t in range(steps):
      x = data["train"].x[idx[t]]
      y = data["train"].y[idx[t]]
      new, state, loss, g, u = step(params, state, x, y)
      if t % every == 0 or t == steps - 1:
        ks, us, gs = (_conv_kernels(params), _conv_kernels(u),
                      _conv_kernels(g))
        log.append({
            "step": t, "loss": float(loss),
            "kernel_mean_share": [_mean_share(v) for v in ks.values()],
            "update_mean_share": [_mean_share(v) for v in us.values()],
            "grad_mean_share": [_mean_share(v) for v in gs.values()],
            "update_to_kernel": [
                float(np.linalg.norm(us[k]) / np.linalg.norm(ks[k]))
                for k in ks],
            "dead_channels": dead(params),
        })
      params = new
    out["methods"][method.spec] = log
  return out


# --------------------------------------------------------------------- report


def mde80(sd: float | None, n: int) -> float | None:
  """Minimum detectable paired effect (two-sided 5 % test, 80 % power) for
  `n` paired seeds whose differences have standard deviation `sd`."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  if sd is None or n < 2 or not math.isfinite(sd):
    return None
  return float((stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1))
               * sd / math.sqrt(n))


def _index(records: Sequence[dict]) -> dict:
  """{setting name: {method spec: {(lr, seed): record}}}."""
  out: dict = {}
  for r in records:
    out.setdefault(r["setting"], {}).setdefault(r["method"], {})[
        (r["learning_rate"], r["seed"])] = r
  return out


def _complete(members: dict, lrs, seeds) -> bool:
  return all((lr, s) in members for lr in lrs for s in seeds)


def stability_table(index: dict, jobs: Sequence[Job]) -> list[dict]:
  """Per (width, optimizer, method): final validation accuracy at every
  learning rate of the grid (seed 0) and the rates that train."""
  rows, lrs_of = [], {}
  for j in jobs:  # the edge phase adds rates to a stability setting
    if j.phase == "stability":
      lrs_of.setdefault((j.setting, j.method), set()).update(j.lrs)
  for (setting, method), lrs in lrs_of.items():
    j = Job("stability", setting, method, tuple(sorted(lrs)), (0,))
    members = index.get(j.setting.name, {}).get(j.method.spec, {})
    val = {lr: members[(lr, 0)]["val_acc"] if (lr, 0) in members else None
           for lr in j.lrs}
    rows.append({
        "width": j.setting.width, "optimizer": j.setting.optimizer,
        "steps": j.setting.steps, "method": j.method.spec,
        "top_gain": j.method.top_gain(j.setting.width),
        "val_acc_by_lr": {str(lr): v for lr, v in val.items()},
        "trains": [lr for lr, v in val.items()
                   if v is not None and v >= TRAINS_AT],
        "complete": all(v is not None for v in val.values()),
    })
  return rows


# The optimizers' usual rates (no warmup); the default must not collapse a
# run there. Rates above (the edge phase) are reported, not ruled on.
USUAL_LR = {"adam": (1e-3, 1e-2), "adam_constant": (1e-3, 1e-2),
            "adamw": (1e-3, 1e-2), "sgd": (0.01, 0.1)}


def collapses(rows: Sequence[dict], usual_only: bool = False) -> list[dict]:
  """The (width, optimizer, lr, method) where the baseline trains and the
  method does not (with `usual_only`, at the usual rates only)."""
  base = {(r["width"], r["optimizer"]): r for r in rows
          if r["method"] == "baseline"}
  out = []
  for r in rows:
    b = base.get((r["width"], r["optimizer"]))
    if b is None or r["method"] == "baseline":
      continue
    lo, hi = USUAL_LR.get(r["optimizer"], (0.0, math.inf))
    for lr, v in r["val_acc_by_lr"].items():
      if usual_only and not lo <= float(lr) <= hi:
        continue
      bv = b["val_acc_by_lr"].get(lr)
      if v is not None and bv is not None and bv >= TRAINS_AT > v:
        out.append({"width": r["width"], "optimizer": r["optimizer"],
                    "learning_rate": float(lr), "method": r["method"],
                    "val_acc": v, "baseline_val_acc": bv})
  return out


def seed_collapses(index: dict, tables: Sequence[dict]) -> list[dict]:
  """Per accuracy cell, learning rate and method: the seeds at which the
  baseline trains and the method does not (every rate of the grid, not only
  the chosen one)."""
  out = []
  for t in tables:
    by = index.get(t["name"], {})
    base = by.get("baseline", {})
    for row in t["rows"]:
      m = by.get(row["method"], {})
      for lr in t["learning_rates"]:
        seeds = [s for s in t["seeds"] if (lr, s) in m and (lr, s) in base
                 and base[(lr, s)]["val_acc"] >= TRAINS_AT
                 > m[(lr, s)]["val_acc"]]
        if seeds and row["method"] != "baseline":
          out.append({"cell": t["name"], "phase": t["phase"],
                      "learning_rate": lr, "method": row["method"],
                      "seeds": seeds, "of": len(t["seeds"])})
  return out


def comparison_table(index: dict, setting: Setting, methods: Sequence[Method],
                     lrs, seeds, fixed_lr: dict | None = None) -> dict:
  """Each complete method at its learning rate chosen on mean validation
  accuracy (or at `fixed_lr[method]`); test (and validation) paired deltas
  to the baseline."""
  by = index.get(setting.name, {})
  rows, pending = [], []
  grid = {m: lrs if fixed_lr is None else (fixed_lr[m],) for m in methods}
  done = [m for m in methods
          if _complete(by.get(m.spec, {}), grid[m], seeds)]
  pending = [m.spec for m in methods if m not in done]
  chosen = {m: select_lr({lr: [by[m.spec][(lr, s)]["val_acc"]
                               for s in seeds] for lr in grid[m]})
            for m in done}
  base = Method("baseline")
  for m in done:
    lr = chosen[m]
    rec = [by[m.spec][(lr, s)] for s in seeds]
    test = [r["test_acc"] for r in rec]
    val = [r["val_acc"] for r in rec]
    row = {"method": m.spec, "learning_rate": lr,
           "lr_at_grid_edge": (fixed_lr is None and len(lrs) > 1
                               and lr in (lrs[0], lrs[-1])),
           "top_gain": m.top_gain(setting.width), "seeds": list(seeds),
           "test_acc_per_seed": test, "val_acc_per_seed": val,
           "val_acc_mean_by_lr": {str(g): float(np.mean(
               [by[m.spec][(g, s)]["val_acc"] for s in seeds]))
               for g in grid[m]},
           "seconds_per_run": float(np.mean([r["seconds"] for r in rec])),
           "val_curve_mean": np.mean([r["val_curve"] for r in rec],
                                     0).tolist()}
    row["test_acc_mean"], row["test_acc_ci95"] = mean_ci95(test)
    row["val_acc_mean"] = float(np.mean(val))
    for key in ("delta", "val_delta"):
      row[f"{key}_mean"] = row[f"{key}_ci95"] = row[f"{key}_per_seed"] = None
    row["collapsed_seeds"] = [s for s, v in zip(seeds, val,
                                                strict=True) if v < TRAINS_AT]
    row["delta_both_train_mean"] = row["delta_both_train_ci95"] = None
    row["both_train_seeds"] = None
    if m != base and base in chosen:
      brec = [by["baseline"][(chosen[base], s)] for s in seeds]
      for key, field in (("delta", "test_acc"), ("val_delta", "val_acc")):
        d = [a[field] - b[field] for a, b in zip(rec, brec, strict=False)]
        row[f"{key}_per_seed"] = d
        row[f"{key}_mean"], row[f"{key}_ci95"] = mean_ci95(d)
      # A collapsed seed (chance accuracy) dominates a paired mean: report
      # the delta over the seeds where both train as well.
      both = [(a, b) for a, b in zip(rec, brec, strict=False)
              if min(a["val_acc"], b["val_acc"]) >= TRAINS_AT]
      row["both_train_seeds"] = len(both)
      if len(both) > 1:
        row["delta_both_train_mean"], row["delta_both_train_ci95"] = (
            mean_ci95([a["test_acc"] - b["test_acc"] for a, b in both]))
    rows.append(row)
  sds = [float(np.std(r["delta_per_seed"], ddof=1)) for r in rows
         if r["delta_per_seed"] is not None and len(seeds) > 1]
  # Pooled over the table's methods: one design, one detectable effect.
  pooled = float(np.sqrt(np.mean(np.square(sds)))) if sds else None
  return {"setting": dataclasses.asdict(setting), "name": setting.name,
          "learning_rates": list(lrs), "seeds": list(seeds), "rows": rows,
          "pending": pending, "delta_sd_pooled": pooled,
          "mde80": mde80(pooled, len(seeds))}


def apply_rule(stab_rows, tables, candidates: Sequence[Method]) -> dict:
  """The default-selection rule of docs/evidence.md (validation only).

  1. A candidate that collapses a run that trains without it (stability
     grid at the usual rates, any width, Adam or SGD) is out.
  2. A candidate whose paired validation delta has its 95 % interval below
     0 in any decisive cell (width x optimizer) does measurable harm: out.
  3. Of the rest, the highest mean paired validation delta over the cells.
  """
  coll = collapses(stab_rows, usual_only=True)
  cells = [t for t in tables if t["phase"] == "decisive"]
  verdict = {}
  for c in candidates:
    deltas, harm, missing = [], [], []
    for t in cells:
      row = next((r for r in t["rows"] if r["method"] == c.spec), None)
      if row is None or row["val_delta_mean"] is None:
        missing.append(t["name"])
        continue
      deltas.append(row["val_delta_mean"])
      if row["val_delta_ci95"] is not None and (
          row["val_delta_mean"] + row["val_delta_ci95"] < 0):
        harm.append(t["name"])
    verdict[c.spec] = {
        "collapses": [x for x in coll if x["method"] == c.spec],
        "harm_cells": harm, "missing_cells": missing,
        "mean_val_delta": float(np.mean(deltas)) if deltas else None,
        "cells": len(deltas)}
  ok = [s for s, v in verdict.items() if not v["collapses"]
        and not v["harm_cells"] and v["mean_val_delta"] is not None]
  chosen = max(ok, key=lambda s: verdict[s]["mean_val_delta"], default=None)
  partial = any(v["missing_cells"] for v in verdict.values()) or any(
      not r["complete"] for r in stab_rows)
  return {"candidates": verdict, "eligible": ok, "chosen": chosen,
          "partial": partial}


def _fmt(mean, ci, signed=False, scale=100.0):
  if mean is None:
    return "—"
  s = f"{mean * scale:+.2f}" if signed else f"{mean * scale:.2f}"
  return s + ("" if ci is None else f" ± {ci * scale:.2f}")


def _trains(row: dict) -> str:
  """The rates that train; "pending" where no run has finished."""
  if all(v is None for v in row["val_acc_by_lr"].values()):
    return "pending"
  done = ", ".join(f"{x:g}" for x in row["trains"]) or "none"
  return done if row["complete"] else done + " (so far)"


def _summary(results: dict) -> list[str]:
  """One line per decisive cell: the former default and the default, paired
  deltas to the baseline (validation decides, test is reported)."""
  cells = [t for t in results["tables"] if t["phase"] == "decisive"]
  if not cells:
    return []
  lines = ["## Summary: the former default and the default, per cell", "",
           "Paired deltas to the baseline in points, 95 % intervals; each "
           "method at its own rate.", "",
           "| cell | MDE | former default: val | test | default: val | "
           "test |", "|---|---|---|---|---|---|"]
  for t in cells:
    rows = {r["method"]: r for r in t["rows"]}
    cols = []
    for m in (FORMER_DEFAULT, DEFAULT):
      r = rows.get(m.spec)
      cols += (["—", "—"] if r is None else
               [_fmt(r["val_delta_mean"], r["val_delta_ci95"], True),
                _fmt(r["delta_mean"], r["delta_ci95"], True)])
    mde = "—" if t["mde80"] is None else f"{100 * t['mde80']:.2f}"
    lines.append(f"| {t['name']} | {mde} | " + " | ".join(cols) + " |")
  return lines + [""]


def markdown(results: dict) -> str:
  lines = [f"# MNIST-1D: {results['status']}", "",
           f"Runs finished: {results['runs_finished']} of "
           f"{results['runs_planned']} planned; "
           f"{results['seconds_in_runs'] / 3600:.2f} h of training loops.",
           "", "## Stability (seed 0; final validation accuracy %; "
           f"a run trains if >= {TRAINS_AT:.0%})", ""]
  stab = results["stability"]
  for opt in ("adam", "sgd", "adam_constant"):
    rows = [r for r in stab if r["optimizer"] == opt]
    if not rows:
      continue
    # Every rate any row was run at; a rate not planned for a row is blank.
    lrs = sorted({lr for r in rows for lr in r["val_acc_by_lr"]}, key=float)
    lines += [f"{opt}, {rows[0]['steps']} steps:", "",
              "| width | method | top gain | " +
              " | ".join(f"lr {lr}" for lr in lrs) + " | trains at |",
              "|---|---|---|" + "---|" * len(lrs) + "---|"]
    for r in rows:
      v_by = r["val_acc_by_lr"]
      cells = ["" if lr not in v_by else "—" if v_by[lr] is None
               else f"{100 * v_by[lr]:.1f}" for lr in lrs]
      tg = "" if r["top_gain"] is None else f"{r['top_gain']:.2f}"
      lines.append(f"| {r['width']} | {r['method']} | {tg} | "
                   + " | ".join(cells) + " | " + _trains(r) + " |")
    lines.append("")
  if results["collapses"]:
    lines += ["Collapses (the baseline trains, the method does not):", ""]
    lines += [f"- width {c['width']}, {c['optimizer']} {c['learning_rate']:g}"
              f": {c['method']} {100 * c['val_acc']:.1f} % (baseline "
              f"{100 * c['baseline_val_acc']:.1f} %)"
              for c in results["collapses"]]
    lines.append("")
  if results.get("seed_collapses"):
    lines += ["Collapses in the accuracy cells (a seed at which the baseline "
              f"ends at {TRAINS_AT:.0%} validation accuracy or more and the "
              "method below), at every rate of the grid:", ""]
    lines += [f"- {c['cell']}, lr {c['learning_rate']:g}: {c['method']} at "
              f"{len(c['seeds'])} of {c['of']} seeds" for c in
              results["seed_collapses"]]
    lines.append("")
  for t in results["tables"]:
    s = t["setting"]
    lines += [f"## {t['phase']}: {s['model']} width {s['width']}, "
              f"{s['optimizer']}, {s['steps']} steps, "
              f"{len(t['seeds'])} seeds", ""]
    mde = t["mde80"]
    lines.append("Minimum detectable paired effect (80 % power, 5 % "
                 "two-sided): " + ("n/a" if mde is None else
                                   f"{100 * mde:.2f} points") +
                 (f" (pooled SD of the paired test deltas "
                  f"{100 * t['delta_sd_pooled']:.2f} points)."
                  if t["delta_sd_pooled"] is not None else "."))
    if t["pending"]:
      lines.append(f"Partial: not finished yet: {', '.join(t['pending'])}.")
    lines += ["", "| method | top gain | lr | test acc % | paired delta "
              "pts (test) | val acc % | paired delta pts (val) |",
              "|---|---|---|---|---|---|---|"]
    for r in t["rows"]:
      tg = "" if r["top_gain"] is None else f"{r['top_gain']:.2f}"
      edge = " (edge)" if r["lr_at_grid_edge"] else ""
      lines.append(
          f"| {r['method']} | {tg} | {r['learning_rate']:g}{edge} | "
          f"{_fmt(r['test_acc_mean'], r['test_acc_ci95'])} | "
          f"{_fmt(r['delta_mean'], r['delta_ci95'], True)} | "
          f"{100 * r['val_acc_mean']:.2f} | "
          f"{_fmt(r['val_delta_mean'], r['val_delta_ci95'], True)} |")
    lines.append("")
    if any(r["collapsed_seeds"] for r in t["rows"]):
      text = ("Collapsed seeds (final validation accuracy below "
              f"{TRAINS_AT:.0%}) at the chosen rate: " + "; ".join(
                  f"{r['method']} {len(r['collapsed_seeds'])} of "
                  f"{len(t['seeds'])}" for r in t["rows"]) + ".")
      both = [f"{r['method']} " + _fmt(r["delta_both_train_mean"],
                                       r["delta_both_train_ci95"], True)
              + f" ({r['both_train_seeds']} seeds)" for r in t["rows"]
              if r["both_train_seeds"]]
      if both:
        text += (" Paired test delta over the seeds where both train: "
                 + "; ".join(both) + ".")
      lines += [text, ""]
  lines += _summary(results)
  rule = results["rule"]
  lines += ["## Default rule (validation only)", "",
            f"Chosen: {rule['chosen']}" + (" (PARTIAL: not every cell has "
                                           "finished)" if rule["partial"]
                                           else ""), ""]
  for spec, v in rule["candidates"].items():
    lines.append(
        f"- {spec}: collapses {len(v['collapses'])}, harm cells "
        f"{v['harm_cells'] or 'none'}, mean val delta "
        + ("—" if v["mean_val_delta"] is None
           else f"{100 * v['mean_val_delta']:+.2f}")
        + f" pts over {v['cells']} cells")
  return "\n".join(lines) + "\n"


def _width_tables(results: dict) -> list[dict]:
  return [t for t in results["tables"] if t["phase"] in ("decisive", "resnet")]


_BEST = "best CDG (by validation)"
# Series of the width plot: (x shift, so that intervals at one width do not
# overlap; colour; marker; line style). The ResNet's series are dashed.
_WIDTH_STYLE = {
    _BEST: (0.96, "C0", "o", "-"),
    "former default": (1.0, "C1", "o", "-"),
    "default": (1.04, "C2", "o", "-"),
    "former default, ResNet": (0.92, "C1", "s", "--"),
    "default, ResNet": (1.08, "C2", "s", "--"),
}


def width_series(results: dict, candidates: Sequence[str]
                 ) -> dict[str, dict[str, list[tuple[int, dict]]]]:
  """{optimizer: {series: [(width, table row), ...]}} for `plot_width`: the
  best CDG candidate (chosen on validation), the former default and the
  default in the decisive CNN cells, and both defaults on the ResNet."""
  tables = _width_tables(results)
  out = {}
  for opt in sorted({t["setting"]["optimizer"] for t in tables}):
    series = {name: [] for name in _WIDTH_STYLE}
    for t in tables:
      if t["setting"]["optimizer"] != opt:
        continue
      w = t["setting"]["width"]
      suffix = ", ResNet" if t["phase"] == "resnet" else ""
      rows = [r for r in t["rows"] if r["delta_mean"] is not None]
      cdg = [r for r in rows if r["method"] in candidates]
      if cdg and not suffix:
        series[_BEST].append(
            (w, max(cdg, key=lambda r: r["val_acc_mean"])))
      for name, spec in (("former default", FORMER_DEFAULT.spec),
                         ("default", DEFAULT.spec)):
        row = next((r for r in rows if r["method"] == spec), None)
        if row is not None:
          series[name + suffix].append((w, row))
    if any(series.values()):
      out[opt] = {k: sorted(v, key=lambda p: p[0]) for k, v in series.items()}
  return out


def plot_width(results: dict, path: str, candidates: Sequence[str]) -> None:
  """Paired test delta against width (`width_series`) per optimizer, 95 %
  intervals; the ResNet dashed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  by_opt = width_series(results, candidates)
  widths = sorted({t["setting"]["width"] for t in _width_tables(results)})
  fig, axes = plt.subplots(1, max(1, len(by_opt)), squeeze=False,
                           figsize=(5 * max(1, len(by_opt)), 3.6))
  for ax, (opt, series) in zip(axes[0], by_opt.items(), strict=False):
    for name, pts in series.items():
      if pts:
        shift, color, marker, ls = _WIDTH_STYLE[name]
        x = [p[0] * shift for p in pts]
        ax.errorbar(x, [100 * p[1]["delta_mean"] for p in pts],
                    yerr=[100 * (p[1]["delta_ci95"] or 0) for p in pts],
                    marker=marker, capsize=3, label=name, ls=ls, color=color)
        if name == _BEST:
          for xi, p in zip(x, pts, strict=True):
            ax.annotate(p[1]["method"], (xi, 100 * p[1]["delta_mean"]),
                        fontsize=6, xytext=(4, 4),
                        textcoords="offset points")
    ax.axhline(0, color="k", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlim(min(widths) / 1.4, max(widths) * 1.4)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.minorticks_off()
    ax.set_xlabel("channels per layer")
    ax.set_ylabel("paired test delta vs baseline (points, 95% CI)")
    ax.set_title(f"MNIST-1D, {opt}")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_mechanism(mech: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
  for k, (spec, log) in enumerate(mech["methods"].items()):
    steps = [e["step"] for e in log]
    axes[0].plot(steps, [e["loss"] for e in log], color=f"C{k}", label=spec)
    axes[1].plot(steps, [e["update_mean_share"][1] for e in log],
                 color=f"C{k}")
    axes[2].plot(steps, [e["kernel_mean_share"][1] for e in log],
                 color=f"C{k}")
    axes[3].plot(steps, [np.mean(e["dead_channels"]) for e in log],
                 color=f"C{k}")
  titles = ("training loss", "layer 2: update energy in channel mean",
            "layer 2: kernel energy in channel mean", "dead ReLU channels")
  for ax, title in zip(axes, titles, strict=True):
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
  axes[0].legend(fontsize=6)
  fig.suptitle(f"width {mech['width']}, {mech['optimizer']} "
               f"{mech['learning_rate']:g}, seed {mech['seed']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def report(jobs: Sequence[Job], cache: Cache, out: str, results_dir: str,
           candidates: Sequence[Method], extra: dict) -> dict:
  """results.json, results.md and plots from every finished run."""
  records = cache.all_records()
  index = _index(records)
  stab = stability_table(index, jobs)
  confirm = [j for j in jobs if j.phase == "confirm"]
  jobs = [j for j in jobs if j.phase != "confirm"]
  tables = []
  seen = set()
  for j in jobs:  # one table per setting, named after its first phase
    if j.phase == "stability" or j.setting in seen:
      continue
    seen.add(j.setting)
    methods = [k.method for k in jobs if k.setting == j.setting]
    t = comparison_table(index, j.setting, methods, j.lrs, j.seeds)
    t["phase"] = j.phase
    tables.append(t)
  resolved = [(j, resolve(j, index)) for j in confirm]
  for setting in dict.fromkeys(j.setting for j in confirm):
    cell = [(j, r) for j, r in resolved if j.setting == setting]
    if any(r is None for _, r in cell):
      continue  # reported once every method's rate is known
    t = comparison_table(index, setting, [j.method for j, _ in cell], (),
                         cell[0][1].seeds,
                         fixed_lr={j.method: r.lrs[0] for j, r in cell})
    t["phase"] = "confirm"
    tables.append(t)
  # A confirm job not yet resolved counts as its new seeds at one rate.
  jobs += [r or Job("confirm", j.setting, j.method, (math.nan,), new_seeds(j))
           for j, r in resolved]
  # Distinct runs: a confirm job reuses its decisive seeds.
  keys = {(j.setting.name, j.method.spec, lr, s)
          for j in jobs for lr in j.lrs for s in j.seeds}
  planned = len(keys)
  finished = sum(1 for name, spec, lr, s in keys
                 if (lr, s) in index.get(name, {}).get(spec, {}))
  results = {
      "status": ("complete" if finished == planned else
                 f"PARTIAL ({finished} of {planned} runs)"),
      "runs_planned": planned, "runs_finished": finished,
      "seconds_in_runs": float(sum(r["seconds"] for r in records)),
      "stability": stab, "collapses": collapses(stab), "tables": tables,
      "seed_collapses": seed_collapses(index, tables),
      "rule": apply_rule(stab, tables, candidates),
      "trains_at": TRAINS_AT,
      "notes": ("test/val accuracies are fractions; *_ci95 are half-widths "
                "of 95% t-intervals over seeds; deltas are paired by seed, "
                "each method at its own learning rate chosen on mean "
                "validation accuracy; mde80 is the paired effect detectable "
                "with 80% power at the 5% level (two-sided), from the pooled "
                "SD of the table's paired test deltas; top_gain is what CDG "
                "multiplies the highest output-channel frequency by."),
      "platform": {"python": platform.python_version(),
                   "jax": jax.__version__, "optax": optax.__version__,
                   "device": str(jax.devices()[0]),
                   "cpu_count": os.cpu_count()},
      **extra,
  }
  mech_path = os.path.join(out, "mechanism.json")
  if os.path.exists(mech_path):
    with open(mech_path) as f:
      results["mechanism"] = json.load(f)
  os.makedirs(results_dir, exist_ok=True)
  with open(os.path.join(results_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  render(results, results_dir)
  return results


def render(results: dict, results_dir: str) -> None:
  """results.md and the plots, from `results` alone: `--from-results`
  rewrites them from a results.json without the run cache."""
  if "mechanism" in results:
    plot_mechanism(results["mechanism"],
                   os.path.join(results_dir, "mechanism.png"))
  with open(os.path.join(results_dir, "results.md"), "w") as f:
    f.write(markdown(results))
  if any(t["phase"] == "decisive" and t["rows"] for t in results["tables"]):
    # The best CDG series picks among the candidates the rule judged.
    plot_width(results, os.path.join(results_dir, "delta_vs_width.png"),
               list(results["rule"]["candidates"]))


# ----------------------------------------------------------------------- main


PHASES = ("mechanism", "stability", "reported", "decisive", "confirm",
          "edge", "sweep", "resnet")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="small grids, 3 seeds, shorter runs (< 15 min on 2 "
                 "CPU cores)")
  p.add_argument("--out",
                 help="run cache directory (DIR/runs, the arrays .npz)")
  p.add_argument("--results", help="where results.json, results.md and "
                 "plots go (default: --out)")
  p.add_argument("--data", help="the MNIST-1D arrays .npz (default "
                 "DIR/mnist1d_arrays.npz; generated if missing)")
  p.add_argument("--phases", default=",".join(PHASES),
                 help="comma-separated, in order (default %(default)s)")
  p.add_argument("--widths", default="32,64,128")
  p.add_argument("--candidates", default=",".join(CANDIDATES),
                 help="candidate default settings METRIC:SCALE:LAM")
  p.add_argument("--optimizers", help="keep only these (comma-separated: "
                 "adam,adamw,sgd)")
  p.add_argument("--make-data", metavar="NPZ",
                 help="generate the MNIST-1D arrays into NPZ and exit (on "
                 "a CPU host, for a GPU host without the generator or "
                 "network)")
  p.add_argument("--steps", type=int, help="steps per accuracy run")
  p.add_argument("--stability-steps", type=int)
  p.add_argument("--seeds", type=int, help="paired seeds")
  p.add_argument("--mechanism-steps", type=int)
  p.add_argument("--val-size", type=int, default=5000)
  p.add_argument("--test-size", type=int, default=20000)
  p.add_argument("--report-only", action="store_true",
                 help="train nothing: report the runs finished in DIR/runs")
  p.add_argument("--from-results", action="store_true",
                 help="train and read no runs: rewrite results.md and the "
                 "plots from RESULTS/results.json")
  p.add_argument("--resume", action="store_true",
                 help="accepted for symmetry with reproduce.py: finished "
                 "runs in DIR/runs are always reused")
  p.add_argument("--plan", action="store_true",
                 help="print the jobs and exit")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.make_data:
    save_arrays(args.make_data, make_mnist1d(args.val_size, args.test_size))
    print(f"wrote {args.make_data}")
    return {}
  if args.from_results:
    results_dir = args.results or args.out
    if not results_dir:
      raise ValueError("--from-results needs --results DIR (or --out DIR).")
    with open(os.path.join(results_dir, "results.json")) as f:
      results = json.load(f)
    render(results, results_dir)
    print(f"wrote {results_dir}/results.md and plots from its results.json")
    return results
  if not args.out:
    raise ValueError("--out DIR is required (the run cache).")
  phases = [s.strip() for s in args.phases.split(",") if s.strip()]
  bad = [s for s in phases if s not in PHASES]
  if bad:
    raise ValueError(f"--phases: {bad} not in {PHASES}.")
  widths = [int(w) for w in args.widths.split(",")]
  candidates = [s.strip() for s in args.candidates.split(",") if s.strip()]
  cand_methods = [FORMER_DEFAULT] + [Method.parse(c) for c in candidates]
  jobs = plan(args.quick, candidates, widths, phases, steps=args.steps,
              stability_steps=args.stability_steps, seeds=args.seeds,
              optimizers=[o.strip() for o in (args.optimizers or "").split(
                  ",") if o.strip()])
  # A confirm job runs one rate, chosen once its decisive seeds are in.
  n_runs = sum(len(new_seeds(j)) * (1 if j.phase == "confirm" else len(j.lrs))
               for j in jobs)
  print(f"{'quick' if args.quick else 'full'} mode: {len(jobs)} settings, "
        f"{n_runs} runs", flush=True)
  if args.plan:
    for j in jobs:
      grid = (f"lrs {j.lrs} seeds {len(j.seeds)}" if j.phase != "confirm"
              else f"the lr it chose, seeds {CONFIRM_SEEDS}")
      print(f"  {j.phase:9s} {j.setting.name:34s} {j.method.spec:28s} "
            + grid)
    return {}
  results_dir = args.results or args.out
  cache = Cache(args.out)
  start = time.perf_counter()
  extra = {"mode": "quick" if args.quick else "full",
           "command": " ".join(["mnist1d_evidence.py"] + sys.argv[1:]),
           "val_size": args.val_size, "test_size": args.test_size,
           "train_size": 4000}
  if not args.report_only:
    data = load_mnist1d(args.data or os.path.join(args.out,
                                                  "mnist1d_arrays.npz"),
                        args.val_size, args.test_size)
    if "mechanism" in phases:
      mech_path = os.path.join(args.out, "mechanism.json")
      if not os.path.exists(mech_path):
        mech = mechanism(data, [Method("baseline")] + cand_methods,
                         width=max(widths),
                         steps=args.mechanism_steps or (100 if args.quick
                                                        else 300))
        os.makedirs(args.out, exist_ok=True)
        with open(mech_path, "w") as f:
          json.dump(mech, f)
        print(f"mechanism: {time.perf_counter() - start:.0f} s", flush=True)
    for k, j in enumerate(jobs):
      if j.phase == "confirm":
        r = resolve(j, _index(cache.all_records()))
        if r is None:
          print(f"[{k + 1}/{len(jobs)}] {j.setting.name} {j.method.spec}: "
                "confirm waits for its decisive runs", flush=True)
          continue
        j = r
      run_setting(cache, data, j.setting, j.method, j.lrs, j.seeds,
                  log=lambda s, k=k: print(f"[{k + 1}/{len(jobs)} "
                                           f"{time.perf_counter() - start:.0f}"
                                           f" s] {s}", flush=True))
      # Refresh the report as settings finish (cheap next to training).
      if k + 1 == len(jobs) or (k + 1) % 10 == 0:
        report(jobs, cache, args.out, results_dir, cand_methods, extra)
  results = report(jobs, cache, args.out, results_dir, cand_methods, extra)
  print(markdown(results))
  print(f"wall {time.perf_counter() - start:.0f} s")
  return results


if __name__ == "__main__":
  main()
