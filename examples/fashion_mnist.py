"""Does CDG help a real CNN on real images? A seeded, paired study on
Fashion-MNIST: 60,000 training and 10,000 test images, 28x28 grayscale, 10
classes.

Data: the four gzipped IDX files of Fashion-MNIST, read with gzip and numpy
(nothing is downloaded or unpickled). By default from Debian's package
(`apt-get install dataset-fashion-mnist` puts them in
/usr/share/datasets/fashion-mnist/), or from any directory given with
--data-dir. 5,000 training images (a fixed random choice) are held out for
validation; the other 55,000 train.

Model: FashionCNN, three 3x3 conv layers of 64, 64 and 128 channels, each
with BatchNorm and ReLU (a stride-2 first layer and a 2x2 max pool, then two
layers at 7x7), global average pooling and a Dense head. 3 epochs of batch
128, cosine decay from the learning rate to 0. SGD: momentum 0.9, coupled
weight decay 5e-4; AdamW: decoupled weight decay 1e-2 (the optimizers of
examples/reproduce.py). CDG acts on the loss gradient before the optimizer.

The protocol (docs/evidence.md, "Fashion-MNIST") was committed before any
test number was read:

- primary: `channel_directed()` (the default) against the plain optimizer,
  with SGD-momentum and AdamW;
- each method's learning rate from a 3-point grid, by the mean validation
  accuracy of tuning seeds 0 and 1; a choice at the grid's edge adds the
  next point beyond it (twice at most per side);
- 10 paired final seeds (10 to 19: each seed fixes the initialization and
  the batch order for every method), scored once on the 10,000 test images;
- secondary: the input and spatial directions at the default (tuned the
  same way), and the smoothing chosen on validation among 0.03, 0.1, 0.3
  and 1 (grid scale) at the default's learning rate.

`--phases swap`, added after the primary result was read and outside the
protocol: where the two methods chose different rates, each also runs the
final seeds at the other's rate, so that a delta can be read at one rate.

`--rerun OPTIMIZER`, also outside the protocol: trains again, as runs of
phase "rerun", that optimizer's primary final seeds (baseline and default,
at their chosen rates) and the default's tuning seeds at its rate, on the
host of the worker. Runs are bit-identical on one host but not across
CPUs; where the secondary runs were trained on another host than the
primary ones, the report pairs them with the reruns too.

Every run appends one line to DIR/runs.jsonl. Any number of workers can run
on one host at once (each claims a run in DIR/claims/ before training it);
a killed worker loses only the run it was training, and the next worker
started with the same DIR takes it up. Two workers, one per core, make the
most of a 2-core machine:

  for core in 0 1; do
    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false taskset -c $core \\
      python examples/fashion_mnist.py --out DIR &
  done; wait
  python examples/fashion_mnist.py --report --out DIR \\
      --results examples/results/fashion_mnist
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import dataclasses
import functools
import gzip
import json
import math
import os
import platform
import subprocess
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

# The training loop and statistics of the examples beside this script.
from common import accuracy
from common import create_state
from common import set_hyperparams
from common import Split
from common import train_step
from common import variables_of
from mnist1d_evidence import mde80
import optax_cdg
from reproduce import mean_ci95
from reproduce import optimizer_chain
from reproduce import select_lr

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
OPTIMIZERS = ("sgd", "adamw")

# ------------------------------------------------------------------- data


def read_idx(path: str) -> np.ndarray:
  """The array of one gzipped IDX file of unsigned bytes.

  IDX: two zero bytes, a type byte (0x08: unsigned byte), the number of
  dimensions, each dimension as a big-endian uint32, then the values in C
  order.
  """
  with gzip.open(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[:2] != b"\0\0":
    raise ValueError(f"{path} is not an IDX file: it must start with two "
                     "zero bytes.")
  kind, ndim = data[2], data[3]
  if kind != 0x08:
    raise ValueError(f"{path} holds IDX type 0x{kind:02x}; expected 0x08 "
                     "(unsigned bytes), as Fashion-MNIST's files do.")
  start = 4 + 4 * ndim
  if len(data) < start:
    raise ValueError(f"{path} ends inside its header of {ndim} dimensions.")
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big")
                for i in range(ndim))
  if len(data) - start != math.prod(shape):
    raise ValueError(f"{path}: its header gives shape {shape} "
                     f"({math.prod(shape)} values), but {len(data) - start} "
                     "bytes follow it.")
  return np.frombuffer(data, np.uint8, offset=start).reshape(shape)


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes a uint8 array as a gzipped IDX file (the tests' inputs)."""
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise TypeError(f"array has dtype {array.dtype}; IDX type 0x08 needs "
                    "uint8.")
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
      n.to_bytes(4, "big") for n in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.tobytes())


def load_fashion_mnist(data_dir: str = DEFAULT_DATA_DIR, val: int = 5000,
                       split_seed: int = 0) -> dict[str, Split]:
  """Train, validation and test splits, images as float32 in [0, 1].

  The validation images are a fixed random choice (`split_seed`) of `val`
  training images; the test split is the IDX test file.
  """
  arrays = {}
  for split, names in FILES.items():
    paths = [os.path.join(data_dir, n) for n in names]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
      raise FileNotFoundError(
          f"Fashion-MNIST: {missing[0]} does not exist. Install Debian's "
          "package dataset-fashion-mnist (apt-get install "
          f"dataset-fashion-mnist, which puts its files in "
          f"{DEFAULT_DATA_DIR}), or pass --data-dir DIR, a directory with "
          f"{', '.join(n for pair in FILES.values() for n in pair)}.")
    images, labels = map(read_idx, paths)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
      raise ValueError(
          f"Fashion-MNIST {split}: images of shape {images.shape} and labels "
          f"of shape {labels.shape}; expected (n, height, width) and (n,).")
    if labels.size and labels.max() > 9:
      raise ValueError(f"Fashion-MNIST {split}: label {labels.max()} is not "
                       "a class 0 to 9.")
    x = (images / np.float32(255.0)).astype(np.float32)[..., None]
    arrays[split] = Split(x, labels.astype(np.int32))
  train = arrays["train"]
  if not 0 < val < len(train.x):
    raise ValueError(f"val={val} must leave training images: the file has "
                     f"{len(train.x)}.")
  order = np.random.default_rng(split_seed).permutation(len(train.x))
  held, kept = np.sort(order[:val]), np.sort(order[val:])
  return {"train": Split(train.x[kept], train.y[kept]),
          "val": Split(train.x[held], train.y[held]), "test": arrays["test"]}


# ------------------------------------------------------------------ model


class FashionCNN(nn.Module):
  """Three 3x3 conv layers with BatchNorm: stride 2 and a 2x2 max pool after
  the first (28x28 -> 7x7), global average pooling, a Dense head."""

  widths: Sequence[int] = (64, 64, 128)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, w in enumerate(self.widths):
      x = nn.Conv(w, (3, 3), strides=2 if i == 0 else 1, use_bias=False)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train,
                               momentum=0.9)(x))
      if i == 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


@functools.cache
def _model(widths: tuple[int, ...]) -> FashionCNN:
  """One instance per widths: the compiled steps are keyed on its apply."""
  return FashionCNN(widths)


# ------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class Method:
  """The plain optimizer (`smoothing=None`) or CDG in front of it."""

  smoothing: float | None = None
  direction: str = "output"

  @property
  def label(self) -> str:
    if self.smoothing is None:
      return "baseline"
    return f"cdg {self.direction} {self.smoothing:g}"


BASELINE = Method()
DEFAULT = Method(optax_cdg.DEFAULT_SMOOTHING)


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run depends on besides its method, rate and seed."""

  widths: tuple[int, ...] = (64, 64, 128)
  epochs: int = 3
  batch_size: int = 128
  val_size: int = 5000
  train_size: int | None = None  # a prefix of the training split (tests)
  lr_grid: tuple[tuple[str, tuple[float, ...]], ...] = (
      ("sgd", (0.05, 0.1, 0.2)), ("adamw", (1e-3, 2e-3, 4e-3)))
  max_extensions: int = 2  # grid points added beyond each edge, at most
  tune_seeds: tuple[int, ...] = (0, 1)
  final_seeds: tuple[int, ...] = tuple(range(10, 20))
  directions: tuple[str, ...] = ("input", "spatial")
  sweep: tuple[float, ...] = (0.03, 0.3, 1.0)  # with the default, 0.1

  def grid(self, optimizer: str) -> tuple[float, ...]:
    return dict(self.lr_grid)[optimizer]


QUICK = Config(widths=(8, 8, 16), epochs=1, batch_size=64, train_size=2048,
               val_size=1000, tune_seeds=(0,), final_seeds=(10, 11, 12))


@dataclasses.dataclass(frozen=True)
class Run:
  phase: str  # "primary", "secondary", "swap" or "rerun"
  optimizer: str
  method: Method
  lr: float
  seed: int
  final: bool  # a final seed: scored on the test split too

  @property
  def key(self) -> str:
    rerun = " rerun" if self.phase == "rerun" else ""
    return (f"{self.optimizer} {self.method.label} lr={self.lr!r} "
            f"seed={self.seed}{rerun}")


class Planner:
  """The runs the protocol needs, given the records so far.

  A run that depends on a choice (a learning rate, a smoothing) appears once
  the runs that make the choice are all recorded.
  """

  def __init__(self, config: Config, records: Sequence[dict]):
    self.config = config
    self.val = {r["key"]: r["val_acc"] for r in records}
    self.runs: list[Run] = []
    self.pending = False  # a choice still waits for runs

  def _tune(self, phase: str, optimizer: str, method: Method,
            lrs: Sequence[float]) -> dict[float, list[float]] | None:
    """The validation accuracies per rate, or None (runs added) if any is
    missing."""
    runs = [Run(phase, optimizer, method, lr, s, final=False)
            for lr in lrs for s in self.config.tune_seeds]
    missing = [r for r in runs if r.key not in self.val]
    if missing:
      self.runs += missing
      self.pending = True
      return None
    return {lr: [self.val[r.key] for r in runs if r.lr == lr] for lr in lrs}

  def learning_rate(self, phase: str, optimizer: str,
                    method: Method) -> float | None:
    """The rate chosen on validation; an edge choice extends the grid."""
    grid, low, high = list(self.config.grid(optimizer)), 0, 0
    while True:
      vals = self._tune(phase, optimizer, method, grid)
      if vals is None:
        return None
      best = select_lr(vals)
      if best == grid[0] and len(grid) > 1 and low < self.config.max_extensions:
        grid, low = [grid[0] / 2, *grid], low + 1
      elif best == grid[-1] and high < self.config.max_extensions:
        grid, high = [*grid, grid[-1] * 2], high + 1
      else:
        return best

  def finals(self, phase: str, optimizer: str, method: Method,
             lr: float | None) -> None:
    if lr is not None:
      self.runs += [Run(phase, optimizer, method, lr, s, final=True)
                    for s in self.config.final_seeds]

  def smoothing_vals(self, optimizer: str, lr: float, rerun: bool = False
                     ) -> dict[float, list[float]] | None:
    """The validation accuracies per smoothing at the default's rate (the
    default first), the default's from its reruns if `rerun`, or None if
    runs are missing."""
    options = [DEFAULT.smoothing, *self.config.sweep]
    vals = {}
    for lam in options:
      phase = "rerun" if rerun and lam == DEFAULT.smoothing else "secondary"
      got = self._tune(phase, optimizer, Method(lam), [lr])
      if got is not None:
        vals[lam] = got[lr]
    return vals if len(vals) == len(options) else None

  def smoothing(self, optimizer: str, lr: float) -> float | None:
    """The smoothing of the highest mean validation accuracy at the
    default's rate (the default first on a tie), or None if runs are
    missing."""
    vals = self.smoothing_vals(optimizer, lr)
    return None if vals is None else select_lr(vals)

  def plan(self, phases: Sequence[str],
           rerun: Sequence[str] = ()) -> list[Run]:
    for opt in OPTIMIZERS:
      for method in (BASELINE, DEFAULT):
        self.finals("primary", opt, method,
                    self.learning_rate("primary", opt, method))
    if "secondary" in phases:
      for opt in OPTIMIZERS:
        for d in self.config.directions:
          method = Method(DEFAULT.smoothing, d)
          self.finals("secondary", opt, method,
                      self.learning_rate("secondary", opt, method))
        lr = self.learning_rate("primary", opt, DEFAULT)
        lam = None if lr is None else self.smoothing(opt, lr)
        if lam is not None and lam != DEFAULT.smoothing:
          self.finals("secondary", opt, Method(lam), lr)
    if "swap" in phases:
      for opt in OPTIMIZERS:
        lr_b = self.learning_rate("primary", opt, BASELINE)
        lr_d = self.learning_rate("primary", opt, DEFAULT)
        if None not in (lr_b, lr_d) and lr_b != lr_d:
          self.finals("swap", opt, BASELINE, lr_d)
          self.finals("swap", opt, DEFAULT, lr_b)
    for opt in rerun:
      for method in (BASELINE, DEFAULT):
        self.finals("rerun", opt, method,
                    self.learning_rate("primary", opt, method))
      lr = self.learning_rate("primary", opt, DEFAULT)
      if lr is not None:  # for the smoothing's choice on one host
        self._tune("rerun", opt, DEFAULT, [lr])
    seen, out = set(), []
    for r in self.runs:  # a run may be planned twice (a shared tuning run)
      if r.key not in seen:
        seen.add(r.key)
        out.append(r)
    return out


# ------------------------------------------------------------------ train

_TX_CACHE: dict[Any, optax.GradientTransformation] = {}


def make_tx(optimizer: str, method: Method,
            total_steps: int) -> optax.GradientTransformation:
  """The run's transform, its learning rate an injected hyperparameter: one
  object (so one compiled step) per optimizer and method."""
  key = (optimizer, method, total_steps)
  if key not in _TX_CACHE:
    def factory(learning_rate):
      chain = optimizer_chain(optimizer, learning_rate, total_steps)
      if method.smoothing is not None:
        chain.insert(0, optax_cdg.channel_directed(
            method.smoothing, direction=method.direction))
      return optax.chain(*chain)

    _TX_CACHE[key] = optax.inject_hyperparams(factory)(learning_rate=1.0)
  return _TX_CACHE[key]


@functools.cache
def _provenance() -> dict[str, Any]:
  """The code and host of this process (the commit it started from)."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here,
                            capture_output=True, text=True,
                            check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = None
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0]
                  .splitlines() if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    # A cloud host may name only the brand ("AMD EPYC"); family and model
    # tell its generations apart.
    cpu = (f"{info.get('model name', cpu)} (family {info.get('cpu family')},"
           f" model {info.get('model')})")
  except OSError:
    pass
  import flax  # pylint: disable=g-import-not-at-top
  return {"commit": commit, "cpu": cpu, "device": str(jax.devices()[0]),
          "jax": jax.__version__, "optax": optax.__version__,
          "flax": flax.__version__, "optax_cdg": optax_cdg.__version__}


def train_run(run: Run, data: dict[str, Split], config: Config) -> dict:
  """Trains one run from its seed's initialization in its seed's batch
  order; returns its record."""
  train = data["train"]
  if config.train_size is not None:
    train = Split(train.x[:config.train_size], train.y[:config.train_size])
  model = _model(tuple(config.widths))
  steps_per_epoch = len(train.x) // config.batch_size
  tx = make_tx(run.optimizer, run.method, config.epochs * steps_per_epoch)
  state = create_state(model, tx, train.x, run.seed)
  state = state.replace(opt_state=set_hyperparams(
      state.opt_state, {"learning_rate": run.lr}))
  rng = np.random.default_rng(run.seed)
  start = time.perf_counter()
  losses, val_curve = [], []
  for _ in range(config.epochs):
    order = rng.permutation(len(train.x))
    epoch = []
    for i in range(steps_per_epoch):  # the ragged tail is dropped
      idx = order[i * config.batch_size:(i + 1) * config.batch_size]
      state, loss = train_step(state, train.x[idx], train.y[idx])
      epoch.append(loss)
    losses.append(float(np.mean(jax.device_get(epoch))))
    val_curve.append(accuracy(model, variables_of(state), data["val"]))
  variables = variables_of(state)
  return {
      "key": run.key, "phase": run.phase, "optimizer": run.optimizer,
      "method": run.method.label, "smoothing": run.method.smoothing,
      "direction": run.method.direction, "lr": run.lr, "seed": run.seed,
      "final": run.final, "val_acc": val_curve[-1], "val_curve": val_curve,
      "train_loss": losses,
      "test_acc": (accuracy(model, variables, data["test"]) if run.final
                   else None),
      "seconds": time.perf_counter() - start,
      "config": dataclasses.asdict(config), **_provenance()}


# ----------------------------------------------------------------- records


def load_records(out: str, config: Config) -> list[dict]:
  """The records of DIR/runs.jsonl made with `config` (others ignored)."""
  path = os.path.join(out, "runs.jsonl")
  if not os.path.exists(path):
    return []
  want = json.loads(json.dumps(dataclasses.asdict(config)))
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if r["config"] == want]


def append_record(out: str, record: dict) -> None:
  """One line, one write: appends from several workers do not interleave."""
  line = (json.dumps(record) + "\n").encode()
  fd = os.open(os.path.join(out, "runs.jsonl"),
               os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
  try:
    os.write(fd, line)
  finally:
    os.close(fd)


def _claim_path(out: str, key: str) -> str:
  return os.path.join(out, "claims", key.replace(" ", "_").replace("/", "-"))


def claim(out: str, key: str) -> bool:
  """Claims a run for this process; a claim whose process has ended (on
  this host) is taken over."""
  path = _claim_path(out, key)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  for _ in range(2):
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      try:
        with open(path) as f:
          pid = int(f.read() or 0)
        os.kill(pid, 0)
        return False  # its worker is alive
      except (ProcessLookupError, ValueError):
        os.remove(path)  # a dead worker's claim
        continue
      except FileNotFoundError:
        continue
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True
  return False


def work(out: str, data: dict[str, Split], config: Config,
         phases: Sequence[str], poll: float = 30.0,
         log: Any = print, rerun: Sequence[str] = ()) -> int:
  """Trains what the plan still needs until nothing is left; returns how
  many runs this worker trained."""
  os.makedirs(out, exist_ok=True)
  _provenance()  # now, before the checkout can change under this process
  trained = 0
  while True:
    records = load_records(out, config)
    done = {r["key"] for r in records}
    todo = [r for r in Planner(config, records).plan(phases, rerun)
            if r.key not in done]
    if not todo:
      return trained
    run = next((r for r in todo if claim(out, r.key)), None)
    if run is None:  # every run left is another worker's: wait for it
      time.sleep(poll)
      continue
    if run.key in {r["key"] for r in load_records(out, config)}:
      os.remove(_claim_path(out, run.key))  # finished since we looked
      continue
    record = train_run(run, data, config)
    append_record(out, record)
    os.remove(_claim_path(out, run.key))
    trained += 1
    log(f"{run.key}: val {record['val_acc']:.4f}, {record['seconds']:.0f} s "
        f"({len(todo) - 1} planned runs left)", flush=True)


# ------------------------------------------------------------------ report


def _stats(values: Sequence[float]) -> dict[str, Any]:
  mean, ci = mean_ci95(values)
  sd = float(np.std(values, ddof=1)) if len(values) > 1 else None
  return {"mean": mean, "ci95": ci, "sd": sd, "n": len(values)}


def _paired(runs: dict[int, dict],
            base: dict[int, dict] | None) -> dict[str, Any]:
  """The paired deltas `runs - base` over their common seeds, per split."""
  paired = [s for s in sorted(runs) if s in (base or {})]
  out = {}
  for split in ("test", "val") if paired else ():
    d = [runs[s][f"{split}_acc"] - base[s][f"{split}_acc"] for s in paired]
    stats = _stats(d)
    stats["per_seed"] = dict(zip(paired, d, strict=True))
    stats["mde80"] = mde80(stats["sd"], len(d))
    out[split] = stats
  return out


def summarize(records: Sequence[dict], config: Config,
              phases: Sequence[str],
              rerun: Sequence[str] = ()) -> dict[str, Any]:
  """Per optimizer: the tuning grid, the chosen rates, and the final
  seeds' test accuracy and paired deltas to the baseline. Complete when
  `phases` (and the reruns of `rerun`'s optimizers) need no more runs."""
  planner = Planner(config, records)
  done = {r["key"] for r in records}
  missing = [r for r in planner.plan(phases, rerun) if r.key not in done]
  by_key = {r["key"]: r for r in records}
  out: dict[str, Any] = {"config": dataclasses.asdict(config),
                         "phases": list(phases), "rerun": list(rerun),
                         "missing_runs": len(missing),
                         "optimizers": {}}
  for opt in OPTIMIZERS:
    tuning: dict[str, dict[str, Any]] = {}
    finals: dict[tuple[str, float], dict[int, dict]] = {}
    again: dict[tuple[str, float], dict[int, dict]] = {}  # reruns
    for r in records:
      if r["optimizer"] != opt:
        continue
      if r["phase"] == "rerun":
        if r["final"]:
          again.setdefault((r["method"], r["lr"]), {})[r["seed"]] = r
      elif r["final"]:
        finals.setdefault((r["method"], r["lr"]), {})[r["seed"]] = r
      else:
        tuning.setdefault(r["method"], {}).setdefault(
            repr(r["lr"]), []).append(r["val_acc"])
    # Deltas are to the baseline at its chosen rate; where it also ran at a
    # method's rate (swap), to the baseline at that rate; for another
    # direction or smoothing (secondary), to the default at its chosen rate;
    # and where the primary runs were trained again (rerun), to those.
    baselines = {lr: runs for (label, lr), runs in finals.items()
                 if label == BASELINE.label}
    base_lr = planner.learning_rate("primary", opt, BASELINE)
    default_lr = planner.learning_rate("primary", opt, DEFAULT)
    primary = {BASELINE.label: base_lr, DEFAULT.label: default_lr}
    rows = []
    for (label, lr), runs in [*finals.items(), *again.items()]:
      seeds = sorted(runs)
      phase = runs[seeds[0]]["phase"]
      row = {"method": label, "lr": lr, "phase": phase, "seeds": seeds,
             "test": _stats([runs[s]["test_acc"] for s in seeds]),
             "val": _stats([runs[s]["val_acc"] for s in seeds])}
      own = label == BASELINE.label
      other = label not in primary
      if phase == "rerun":
        against = {"delta": None if own else again.get((BASELINE.label,
                                                        base_lr)),
                   "host_delta": finals.get((label, lr))}
      else:
        against = {
            "delta": None if own and lr == base_lr
                     else baselines.get(base_lr),
            "same_rate_delta": None if own or lr == base_lr
                               else baselines.get(lr),
            "default_delta": finals.get((DEFAULT.label, default_lr))
                             if other else None,
            "rerun_delta": again.get((BASELINE.label, base_lr))
                           if other else None,
            "rerun_default_delta": again.get((DEFAULT.label, default_lr))
                                   if other else None}
      for name, base in against.items():
        for split, stats in _paired(runs, base).items():
          row[f"{name}_{split}"] = stats
      rows.append(row)
    order = {BASELINE.label: 0, DEFAULT.label: 1}
    rows.sort(key=lambda r: ({"swap": 1, "rerun": 2}.get(r["phase"], 0),
                             order.get(r["method"], 2), r["method"]))
    res = {"tuning": tuning, "baseline_lr": base_lr,
           "default_lr": default_lr, "rows": rows}
    # The smoothing's choice with every value's tuning runs from one host:
    # the default's own from its reruns.
    vals = (None if default_lr is None
            else planner.smoothing_vals(opt, default_lr, rerun=True))
    if vals is not None:
      res["rerun_smoothing"] = {
          "val": {repr(lam): float(np.mean(v)) for lam, v in vals.items()},
          "choice": select_lr(vals)}
    out["optimizers"][opt] = res
  out["runs"] = len(by_key)
  out["hours"] = sum(r["seconds"] for r in records) / 3600
  out["provenance"] = sorted({(r["cpu"], r["jax"], r["optax"], r["flax"],
                               r["commit"]) for r in records})
  return out


def _pm(stats: dict | None, signed: bool = False) -> str:
  if not stats:
    return "—"
  sign = "+" if signed else ""
  ci = "" if stats["ci95"] is None else f" ± {100 * stats['ci95']:.2f}"
  mean = 100 * stats["mean"]
  mean = 0.0 if round(mean, 2) == 0 else mean  # no "-0.00"
  return f"{mean:{sign}.2f}{ci}"


def _mde(stats: dict | None) -> str:
  if not stats or stats["mde80"] is None:
    return "—"
  return f"{100 * stats['mde80']:.2f}"


def markdown(results: dict) -> str:
  lines = ["# Fashion-MNIST: CDG against the plain optimizer", "",
           "Generated by `python examples/fashion_mnist.py --report`. "
           "Accuracy in percent; paired deltas in points, mean ± half-width "
           "of the 95 % t-interval over the final seeds; MDE: the smallest "
           "paired effect the design detects (two-sided 5 %, 80 % power).",
           "", f"Runs: {results['runs']}, {results['hours']:.1f} hours of "
           f"training summed over workers. Phases: "
           f"{', '.join(results['phases'])}"
           + "".join(f", {opt} rerun" for opt in results["rerun"])
           + "; runs the plan still needs: "
           f"{results['missing_runs']}.", ""]
  for opt, res in results["optimizers"].items():
    lines += [f"## {opt}", "",
              "| method | phase | lr | seeds | test acc % | val acc % | "
              "paired test delta | paired val delta | sd of test delta | "
              "MDE |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
      d = r.get("delta_test")
      sd = "—" if not d or d["sd"] is None else f"{100 * d['sd']:.2f}"
      lines.append(
          f"| {r['method']} | {r['phase']} | {r['lr']} | {len(r['seeds'])} | "
          f"{_pm(r['test'])} | {_pm(r['val'])} | "
          f"{_pm(d, True)} | {_pm(r.get('delta_val'), True)} | {sd} | "
          f"{_mde(d)} |")
    at = f"at its rate {res['default_lr']}"
    for name, title in (
        ("same_rate_delta", "Against the baseline at the same rate (swap)"),
        ("default_delta", f"Against the default ({DEFAULT.label}) {at}"),
        ("host_delta", "A rerun against the first run of each seed: what "
         "the host changes (rerun)"),
        ("rerun_delta", "Against the baseline's reruns (one host)"),
        ("rerun_default_delta", f"Against the default's reruns {at} "
         "(one host)")):
      rows = [r for r in res["rows"] if f"{name}_test" in r]
      if rows:
        lines += ["", f"{title}:", "",
                  "| method | phase | lr | paired test delta | "
                  "paired val delta | MDE |", "|---|---|---|---|---|---|"]
      for r in rows:
        d = r[f"{name}_test"]
        lines.append(f"| {r['method']} | {r['phase']} | {r['lr']} | "
                     f"{_pm(d, True)} | {_pm(r[f'{name}_val'], True)} | "
                     f"{_mde(d)} |")
    if "rerun_smoothing" in res:
      got = res["rerun_smoothing"]
      cells = ", ".join(f"{float(lam):g}: {100 * v:.2f}"
                        for lam, v in got["val"].items())
      lines += ["", f"The smoothing chosen with the default's reruns "
                f"(one host), mean val acc % {at}: {cells}; choice "
                f"{got['choice']:g}."]
    lines += ["", "Validation accuracy (%) of the tuning seeds, per rate:",
              "", "| method | rate: mean val acc |", "|---|---|"]
    for label, per_lr in sorted(res["tuning"].items()):
      cells = ", ".join(f"{float(lr):g}: {100 * np.mean(v):.2f}"
                        for lr, v in sorted(per_lr.items(),
                                            key=lambda kv: float(kv[0])))
      lines.append(f"| {label} | {cells} |")
    lines.append("")
  lines += ["Hosts and versions (cpu, jax, optax, flax, commit):", ""]
  lines += [f"- {', '.join(map(str, p))}" for p in results["provenance"]]
  return "\n".join(lines) + "\n"


def plot_deltas(results: dict, path: str) -> None:
  """The paired test delta of each final seed, per method and optimizer."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  opts = list(results["optimizers"])
  fig, axes = plt.subplots(1, len(opts), figsize=(5.5 * len(opts), 4),
                           squeeze=False)
  for ax, opt in zip(axes[0], opts, strict=True):
    rows = [r for r in results["optimizers"][opt]["rows"]
            if "delta_test" in r]
    for i, r in enumerate(rows):
      d = r["delta_test"]
      ys = 100 * np.array(list(d["per_seed"].values()))
      ax.scatter(np.full(len(ys), i) + np.linspace(-0.15, 0.15, len(ys)), ys,
                 s=14, alpha=0.7)
      ax.errorbar(i + 0.25, 100 * d["mean"],
                  yerr=None if d["ci95"] is None else 100 * d["ci95"],
                  fmt="o", color="black", capsize=4)
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_xlim(-0.6, max(len(rows), 1) - 0.4)
    ax.set_xticks(range(len(rows)), [
        f"{r['method']}, lr {r['lr']}"
        + (" (rerun)" if r["phase"] == "rerun" else "") for r in rows],
                  rotation=20, ha="right")
    if not rows:
      ax.text(0.5, 0.5, "no final seeds yet", ha="center",
              transform=ax.transAxes)
    base_lr = results["optimizers"][opt]["baseline_lr"]
    at = "" if base_lr is None else f" at lr {base_lr}"
    ax.set_title(f"{opt}: test accuracy minus the baseline's{at}")
    ax.set_ylabel("paired delta per seed (points)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def report(out: str, results_dir: str, config: Config,
           phases: Sequence[str] = ("primary", "secondary"),
           rerun: Sequence[str] = ()) -> dict:
  """results.json, results.md and paired_deltas.png from DIR's records."""
  results = summarize(load_records(out, config), config, phases, rerun)
  os.makedirs(results_dir, exist_ok=True)
  with open(os.path.join(results_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(results_dir, "results.md"), "w") as f:
    f.write(markdown(results))
  if any("delta_test" in r for res in results["optimizers"].values()
         for r in res["rows"]):
    plot_deltas(results, os.path.join(results_dir, "paired_deltas.png"))
  return results


# -------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                 help="the directory of the four IDX files "
                 "(default %(default)s)")
  p.add_argument("--out", default="fashion_mnist_out",
                 help="where the run records go (default %(default)s)")
  p.add_argument("--phases", default="primary,secondary",
                 help="primary, primary,secondary (the protocol), or with "
                 "swap, each method at the other's rate (default "
                 "%(default)s)")
  p.add_argument("--rerun", default="",
                 help="optimizers (sgd, adamw) whose primary runs to train "
                 "again on this host (outside the protocol; default none)")
  p.add_argument("--quick", action="store_true",
                 help="a smoke test: 2,048 training images, 1 epoch, "
                 "narrow layers, 1 tuning and 3 final seeds")
  p.add_argument("--report", action="store_true",
                 help="write the report from the records; train nothing")
  p.add_argument("--results", default=None,
                 help="where --report writes (default: --out)")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict | int:
  args = parse_args(argv)
  config = QUICK if args.quick else Config()
  phases = tuple(args.phases.split(","))
  if not set(phases) <= {"primary", "secondary", "swap"}:
    raise SystemExit(f"--phases={args.phases!r}: expected phases among "
                     "primary, secondary and swap.")
  rerun = tuple(args.rerun.split(",")) if args.rerun else ()
  if not set(rerun) <= set(OPTIMIZERS):
    raise SystemExit(f"--rerun={args.rerun!r}: expected optimizers among "
                     f"{', '.join(OPTIMIZERS)}.")
  if args.report:
    return report(args.out, args.results or args.out, config, phases, rerun)
  data = load_fashion_mnist(args.data_dir, config.val_size)
  return work(args.out, data, config, phases, rerun=rerun)


if __name__ == "__main__":
  main()
