"""Tests of examples/fashion_mnist.py: the IDX reader on files written here,
the plan's rules on made-up records, and a tiny end-to-end study (no
dataset needed)."""

import dataclasses
import gzip
import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

import _extras

# examples/ is on the path (pyproject's pythonpath), as for a script there.
import fashion_mnist as fm


def _tmpdir(test) -> str:
  d = tempfile.TemporaryDirectory()
  test.addCleanup(d.cleanup)
  return d.name


def _write_dataset(directory: str, train: int = 40, test: int = 16,
                   size: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
  """A learnable toy Fashion-MNIST: each class brightens its own rows."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in (("train", train), ("test", test)):
    y = rng.integers(0, 10, n).astype(np.uint8)
    x = rng.integers(0, 40, (n, size, size)).astype(np.uint8)
    x[np.arange(n), y % size] += 200
    images, labels = fm.FILES[split]
    fm.write_idx(os.path.join(directory, images), x)
    fm.write_idx(os.path.join(directory, labels), y)
    arrays[split] = (x, y)
  return arrays


class IdxTest(parameterized.TestCase):

  def test_round_trip(self):
    path = os.path.join(_tmpdir(self), "a.gz")
    x = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    fm.write_idx(path, x)
    np.testing.assert_array_equal(fm.read_idx(path), x)
    fm.write_idx(path, x[:, 0, 0])
    np.testing.assert_array_equal(fm.read_idx(path), x[:, 0, 0])

  def test_reads_the_published_header(self):
    # The IDX header written byte by byte, as the format describes it.
    path = os.path.join(_tmpdir(self), "labels.gz")
    with gzip.open(path, "wb") as f:
      f.write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 0, 9]))
    np.testing.assert_array_equal(fm.read_idx(path), [7, 0, 9])

  @parameterized.named_parameters(
      ("not_idx", bytes([1, 0, 8, 1, 0, 0, 0, 1, 5]), "two zero bytes"),
      ("float_type", bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 5]), "type 0x0d"),
      ("short_header", bytes([0, 0, 8, 3, 0, 0]), "inside its header"),
      ("short_data", bytes([0, 0, 8, 1, 0, 0, 0, 3, 5]), r"shape \(3,\)"),
  )
  def test_rejects(self, data, message):
    path = os.path.join(_tmpdir(self), "bad.gz")
    with gzip.open(path, "wb") as f:
      f.write(data)
    with self.assertRaisesRegex(ValueError, message):
      fm.read_idx(path)


class LoadTest(absltest.TestCase):

  def test_splits(self):
    d = _tmpdir(self)
    arrays = _write_dataset(d, train=40, test=16)
    data = fm.load_fashion_mnist(d, val=10)
    self.assertEqual([len(data[k].x) for k in ("train", "val", "test")],
                     [30, 10, 16])
    for split in data.values():
      self.assertEqual(split.x.dtype, np.float32)
      self.assertEqual(split.x.shape[1:], (8, 8, 1))
      self.assertTrue(0.0 <= split.x.min() and split.x.max() <= 1.0)
    # Train and validation partition the training file.
    x, y = arrays["train"]
    got = np.concatenate([data["train"].x, data["val"].x])[..., 0]
    want = x / np.float32(255.0)
    order = lambda a: np.lexsort(a.reshape(len(a), -1).T)  # noqa: E731
    np.testing.assert_array_equal(got[order(got)], want[order(want)])
    np.testing.assert_array_equal(
        np.sort(np.concatenate([data["train"].y, data["val"].y])), np.sort(y))
    np.testing.assert_array_equal(data["test"].y, arrays["test"][1])
    # The split is fixed by its seed.
    again = fm.load_fashion_mnist(d, val=10)
    np.testing.assert_array_equal(again["val"].y, data["val"].y)

  def test_missing_file_names_the_package(self):
    d = _tmpdir(self)
    _write_dataset(d)
    os.remove(os.path.join(d, "t10k-labels-idx1-ubyte.gz"))
    with self.assertRaisesRegex(FileNotFoundError,
                                r"t10k-labels.*apt-get install "
                                r"dataset-fashion-mnist.*--data-dir"):
      fm.load_fashion_mnist(d)

  def test_rejects_bad_labels_and_val(self):
    d = _tmpdir(self)
    _write_dataset(d)
    with self.assertRaisesRegex(ValueError, "val=40 must leave"):
      fm.load_fashion_mnist(d, val=40)
    fm.write_idx(os.path.join(d, "train-labels-idx1-ubyte.gz"),
                 np.full(40, 10, np.uint8))
    with self.assertRaisesRegex(ValueError, "label 10 is not a class"):
      fm.load_fashion_mnist(d, val=10)


CONFIG = fm.Config(tune_seeds=(0, 1), final_seeds=(10, 11, 12))


def _records(val: dict, config=CONFIG, test=None) -> list[dict]:
  """Made-up records: `val[(optimizer, method label, lr)]` for every seed."""
  out = []
  for (opt, label, lr), acc in val.items():
    for s in config.tune_seeds:
      out.append({"key": f"{opt} {label} lr={lr!r} seed={s}",
                  "val_acc": acc})
  for key, acc in (test or {}).items():
    out.append({"key": key, "val_acc": acc})
  return out


def _plan(val, phases=("primary",), rerun=()):
  planner = fm.Planner(CONFIG, _records(val))
  return planner, planner.plan(phases, rerun)


B, D = fm.BASELINE.label, fm.DEFAULT.label


class PlanTest(absltest.TestCase):

  def test_first_the_primary_tuning_runs(self):
    planner, runs = _plan({})
    self.assertTrue(planner.pending)
    self.assertLen(runs, 2 * 2 * 3 * 2)  # optimizers, methods, rates, seeds
    self.assertFalse(any(r.final for r in runs))
    self.assertEqual({r.method for r in runs}, {fm.BASELINE, fm.DEFAULT})

  def test_finals_at_the_chosen_rate(self):
    val = {("sgd", B, 0.05): 0.80, ("sgd", B, 0.1): 0.90, ("sgd", B, 0.2): 0.85}
    _, runs = _plan(val)
    finals = [r for r in runs if r.final]
    self.assertEqual([(r.optimizer, r.method, r.lr, r.seed) for r in finals],
                     [("sgd", fm.BASELINE, 0.1, s) for s in (10, 11, 12)])
    self.assertNotIn(0.4, {r.lr for r in runs if r.method == fm.BASELINE
                           and r.optimizer == "sgd"})

  def test_an_edge_choice_extends_the_grid_twice_at_most(self):
    val = {("sgd", B, lr): acc for lr, acc in
           ((0.05, 0.7), (0.1, 0.8), (0.2, 0.9))}
    _, runs = _plan(val)
    sgd = {r.lr for r in runs if r.method == fm.BASELINE
           and r.optimizer == "sgd"}
    self.assertEqual(sgd, {0.4})  # the next rate up, tuning seeds only
    val[("sgd", B, 0.4)] = 0.95
    val[("sgd", B, 0.8)] = 0.96
    _, runs = _plan(val)
    finals = {r.lr for r in runs if r.final}
    self.assertEqual(finals, {0.8})  # two extensions: no 1.6
    # At the low edge, halves.
    val = {("adamw", D, lr): acc for lr, acc in
           ((1e-3, 0.9), (2e-3, 0.8), (4e-3, 0.7))}
    _, runs = _plan(val)
    self.assertEqual({r.lr for r in runs if r.method == fm.DEFAULT
                      and r.optimizer == "adamw"}, {5e-4})

  def test_secondary_directions_and_smoothing(self):
    val = {(opt, label, lr): 0.9 if lr == grid[1] else 0.8
           for opt, grid in CONFIG.lr_grid for label in (B, D)
           for lr in grid}
    _, runs = _plan(val, ("primary", "secondary"))
    tuning = {(r.optimizer, r.method.label, r.lr) for r in runs
              if not r.final and r.phase == "secondary"}
    self.assertIn(("sgd", "cdg input 0.1", 0.05), tuning)
    self.assertIn(("adamw", "cdg spatial 0.1", 4e-3), tuning)
    # The sweep at the default's rate, 0.1 itself already tuned.
    self.assertIn(("sgd", "cdg output 0.3", 0.1), tuning)
    self.assertNotIn(("sgd", "cdg output 0.1", 0.1), tuning)
    # 0.3 wins on validation for SGD, nothing beats 0.1 for AdamW.
    for lam, acc in ((0.03, 0.85), (0.3, 0.95), (1.0, 0.9)):
      val[("sgd", f"cdg output {lam:g}", 0.1)] = acc
      val[("adamw", f"cdg output {lam:g}", 2e-3)] = 0.9  # a tie: the default
    _, runs = _plan(val, ("primary", "secondary"))
    chosen = {(r.optimizer, r.method.label, r.lr) for r in runs
              if r.final and r.method.direction == "output"
              and r.method.smoothing not in (None, 0.1)}
    self.assertEqual(chosen, {("sgd", "cdg output 0.3", 0.1)})


  def test_swap_runs_each_method_at_the_others_rate(self):
    val = {("sgd", B, 0.05): 0.8, ("sgd", B, 0.1): 0.9, ("sgd", B, 0.2): 0.8,
           ("sgd", D, 0.05): 0.8, ("sgd", D, 0.1): 0.8, ("sgd", D, 0.2): 0.9,
           ("sgd", D, 0.4): 0.8}
    val.update({("adamw", label, lr): 0.9 if lr == 2e-3 else 0.8
                for label in (B, D) for lr in (1e-3, 2e-3, 4e-3)})
    _, runs = _plan(val, ("primary", "swap"))
    swap = {(r.optimizer, r.method, r.lr) for r in runs if r.phase == "swap"}
    # SGD chose 0.1 and 0.2; AdamW chose the same rate: no swap there.
    self.assertEqual(swap, {("sgd", fm.BASELINE, 0.2),
                            ("sgd", fm.DEFAULT, 0.1)})
    self.assertTrue(all(r.final for r in runs if r.phase == "swap"))
    _, runs = _plan(val, ("primary", "secondary"))
    self.assertFalse(any(r.phase == "swap" for r in runs))


  def test_rerun_trains_the_primary_finals_again_under_their_own_keys(self):
    val = {("sgd", B, 0.05): 0.8, ("sgd", B, 0.1): 0.9, ("sgd", B, 0.2): 0.8,
           ("sgd", D, 0.05): 0.8, ("sgd", D, 0.1): 0.8, ("sgd", D, 0.2): 0.9,
           ("sgd", D, 0.4): 0.8}
    _, runs = _plan(val, ("primary",), rerun=("sgd",))
    rerun = [r for r in runs if r.phase == "rerun"]
    self.assertEqual(
        {(r.method, r.lr, r.seed, r.final) for r in rerun},
        {(fm.BASELINE, 0.1, s, True) for s in CONFIG.final_seeds}
        | {(fm.DEFAULT, 0.2, s, True) for s in CONFIG.final_seeds}
        | {(fm.DEFAULT, 0.2, s, False) for s in CONFIG.tune_seeds})
    self.assertEqual(rerun[0].key, "sgd baseline lr=0.1 seed=10 rerun")
    # The first runs are planned too: a rerun never stands in for them.
    keys = {r.key for r in runs}
    self.assertIn("sgd baseline lr=0.1 seed=10", keys)
    # AdamW has not chosen its rates: nothing to rerun yet.
    _, runs = _plan(val, ("primary",), rerun=("sgd", "adamw"))
    self.assertFalse(any(r.phase == "rerun" and r.optimizer == "adamw"
                         for r in runs))


def _final(opt, label, lr, seed, phase, test, val=0.5):
  smoothing = None if label == B else 0.1
  return {"key": f"{opt} {label} lr={lr!r} seed={seed}", "optimizer": opt,
          "method": label, "smoothing": smoothing, "direction": "output",
          "lr": lr, "seed": seed, "final": test is not None, "phase": phase,
          "val_acc": val, "test_acc": test, "seconds": 1.0, "cpu": "cpu",
          "jax": "j", "optax": "o", "flax": "f", "commit": "c"}


def _tuned(opt, choices):
  """Tuning records in which method `label` chooses `choices[label]`."""
  return [_final(opt, label, lr, s, "primary", None,
                 val=0.9 if lr == chosen else 0.8)
          for label, chosen in choices.items()
          for lr in (0.05, 0.1, 0.2, 0.4) for s in CONFIG.tune_seeds]


class SummarizeTest(absltest.TestCase):

  def test_deltas_to_the_chosen_baseline_and_at_the_same_rate(self):
    records = _tuned("sgd", {B: 0.1, D: 0.2})
    for s, (b1, b2, d1, d2) in zip(
        (10, 11, 12), ((0.80, 0.82, 0.81, 0.84), (0.70, 0.73, 0.72, 0.75),
                       (0.90, 0.91, 0.93, 0.92)), strict=True):
      records += [_final("sgd", B, 0.1, s, "primary", b1),
                  _final("sgd", B, 0.2, s, "swap", b2),
                  _final("sgd", D, 0.1, s, "swap", d1),
                  _final("sgd", D, 0.2, s, "primary", d2)]
    res = fm.summarize(records, CONFIG, ("primary",))["optimizers"]["sgd"]
    rows = {(r["method"], r["lr"]): r for r in res["rows"]}
    self.assertEqual([(r["method"], r["lr"], r["phase"]) for r in res["rows"]],
                     [(B, 0.1, "primary"), (D, 0.2, "primary"),
                      (B, 0.2, "swap"), (D, 0.1, "swap")])
    self.assertNotIn("delta_test", rows[(B, 0.1)])
    # The primary delta: the default at its rate minus the baseline at its.
    self.assertEqual(rows[(D, 0.2)]["delta_test"]["per_seed"],
                     {10: 0.84 - 0.80, 11: 0.75 - 0.70, 12: 0.92 - 0.90})
    # At one rate: against the baseline's swap runs at 0.2 ...
    self.assertEqual(rows[(D, 0.2)]["same_rate_delta_test"]["per_seed"],
                     {10: 0.84 - 0.82, 11: 0.75 - 0.73, 12: 0.92 - 0.91})
    # ... and at 0.1, where that is the baseline's own row: one delta.
    self.assertNotIn("same_rate_delta_test", rows[(D, 0.1)])
    self.assertAlmostEqual(rows[(D, 0.1)]["delta_test"]["mean"], 0.02)
    # The baseline at the other rate: what the rate alone changes.
    self.assertAlmostEqual(rows[(B, 0.2)]["delta_test"]["mean"],
                           (0.02 + 0.03 + 0.01) / 3)
    self.assertNotIn("same_rate_delta_test", rows[(B, 0.2)])
    self.assertIn("Against the baseline at the same rate",
                  fm.markdown(fm.summarize(records, CONFIG, ("primary",))))

  def test_another_direction_is_also_paired_with_the_default(self):
    records = _tuned("sgd", {B: 0.1, D: 0.2})
    inp = "cdg input 0.1"
    for s, (b, d, i) in zip((10, 11), ((0.80, 0.84, 0.79), (0.70, 0.75, 0.76)),
                            strict=True):
      records += [_final("sgd", B, 0.1, s, "primary", b),
                  _final("sgd", D, 0.2, s, "primary", d),
                  _final("sgd", inp, 0.4, s, "secondary", i)]
    results = fm.summarize(records, CONFIG, ("primary",))
    res = results["optimizers"]["sgd"]
    rows = {r["method"]: r for r in res["rows"]}
    self.assertEqual(res["default_lr"], 0.2)
    self.assertEqual(rows[inp]["delta_test"]["per_seed"],
                     {10: 0.79 - 0.80, 11: 0.76 - 0.70})
    self.assertEqual(rows[inp]["default_delta_test"]["per_seed"],
                     {10: 0.79 - 0.84, 11: 0.76 - 0.75})
    # Neither the baseline nor the default is paired with the default.
    self.assertNotIn("default_delta_test", rows[B])
    self.assertNotIn("default_delta_test", rows[D])
    self.assertIn("| cdg input 0.1 | secondary | 0.4 | -2.00 ± ",
                  fm.markdown(results))

  def test_reruns_pair_the_secondary_runs_on_one_host(self):
    records = _tuned("sgd", {B: 0.1, D: 0.2})
    inp = "cdg input 0.1"
    rows = ((0.80, 0.84, 0.79, 0.81, 0.83), (0.70, 0.75, 0.76, 0.72, 0.74))
    for s, (b, d, i, b2, d2) in zip((10, 11), rows, strict=True):
      records += [_final("sgd", B, 0.1, s, "primary", b),
                  _final("sgd", D, 0.2, s, "primary", d),
                  _final("sgd", inp, 0.4, s, "secondary", i)]
      for label, lr, acc in ((B, 0.1, b2), (D, 0.2, d2)):
        rec = _final("sgd", label, lr, s, "rerun", acc)
        rec["key"] += " rerun"
        records.append(rec)
    results = fm.summarize(records, CONFIG, ("primary",), ("sgd",))
    res = results["optimizers"]["sgd"]
    by = {(r["method"], r["phase"]): r for r in res["rows"]}
    self.assertEqual([(r["method"], r["phase"]) for r in res["rows"]],
                     [(B, "primary"), (D, "primary"), (inp, "secondary"),
                      (B, "rerun"), (D, "rerun")])
    # The first runs' rows are as without reruns.
    self.assertEqual(by[(D, "primary")]["delta_test"]["per_seed"],
                     {10: 0.84 - 0.80, 11: 0.75 - 0.70})
    # A rerun against its first run, and the primary delta on one host.
    self.assertEqual(by[(B, "rerun")]["host_delta_test"]["per_seed"],
                     {10: 0.81 - 0.80, 11: 0.72 - 0.70})
    self.assertNotIn("delta_test", by[(B, "rerun")])
    self.assertEqual(by[(D, "rerun")]["delta_test"]["per_seed"],
                     {10: 0.83 - 0.81, 11: 0.74 - 0.72})
    # The secondary row against the reruns.
    self.assertEqual(by[(inp, "secondary")]["rerun_delta_test"]["per_seed"],
                     {10: 0.79 - 0.81, 11: 0.76 - 0.72})
    self.assertEqual(
        by[(inp, "secondary")]["rerun_default_delta_test"]["per_seed"],
        {10: 0.79 - 0.83, 11: 0.76 - 0.74})
    self.assertNotIn("rerun_smoothing", res)  # no sweep recorded
    md = fm.markdown(results)
    self.assertIn("what the host changes (rerun)", md)
    self.assertIn("| cdg input 0.1 | secondary | 0.4 | -1.00 ± ",
                  md.split("Against the default's reruns")[1])

  def test_the_smoothing_chosen_with_the_defaults_reruns(self):
    records = _tuned("sgd", {B: 0.1, D: 0.2})
    for s in CONFIG.tune_seeds:
      for lam, acc in ((0.03, 0.85), (0.3, 0.92), (1.0, 0.8)):
        records.append(_final("sgd", f"cdg output {lam:g}", 0.2, s,
                              "secondary", None, val=acc))
      rec = _final("sgd", D, 0.2, s, "rerun", None, val=0.93)
      rec["key"] += " rerun"
      records.append(rec)
    res = fm.summarize(records, CONFIG, ("primary",),
                       ("sgd",))["optimizers"]["sgd"]
    # The first runs gave 0.1 a mean of 0.9 (0.3 wins); its reruns 0.93.
    self.assertEqual(res["rerun_smoothing"]["choice"], 0.1)
    self.assertAlmostEqual(res["rerun_smoothing"]["val"]["0.3"], 0.92)
    # The reruns stay out of the first runs' tuning table.
    self.assertEqual(res["tuning"][D]["0.2"], [0.9, 0.9])

  def test_a_mean_that_rounds_to_zero_has_no_sign_of_its_own(self):
    self.assertEqual(fm._pm({"mean": -2e-6, "ci95": 0.0013}, True),
                     "+0.00 ± 0.13")
    self.assertEqual(fm._pm({"mean": -0.0021, "ci95": None}, True), "-0.21")


class ClaimTest(absltest.TestCase):

  def test_claims_are_exclusive_until_their_process_ends(self):
    out = _tmpdir(self)
    self.assertTrue(fm.claim(out, "sgd baseline lr=0.1 seed=0"))
    self.assertFalse(fm.claim(out, "sgd baseline lr=0.1 seed=0"))
    # A claim left by a process that has ended is taken over.
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True, text=True, check=True)
    path = fm._claim_path(out, "adamw baseline lr=0.001 seed=1")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(ended.stdout.strip())
    self.assertTrue(fm.claim(out, "adamw baseline lr=0.001 seed=1"))


TINY = fm.Config(widths=(2, 2, 4), epochs=1, batch_size=8, val_size=8,
                 lr_grid=(("sgd", (0.05, 0.1, 0.2)),
                          ("adamw", (1e-3, 2e-3, 4e-3))),
                 max_extensions=0, tune_seeds=(0,), final_seeds=(10, 11))


def by_key(records):
  return {r["key"]: r for r in records}


def _parse(key):
  """(optimizer, method, lr, seed) of a run's key."""
  opt, rest = key.split(" ", 1)
  label, lr, seed = rest.rsplit(" ", 2)
  if label == "baseline":
    method = fm.BASELINE
  else:
    _, direction, lam = label.split(" ")
    method = fm.Method(float(lam), direction)
  return (opt, method, float(lr.split("=")[1]), int(seed.split("=")[1]))


class EndToEndTest(absltest.TestCase):

  def test_a_tiny_study_trains_resumes_and_reports(self):
    matplotlib = _extras.require("matplotlib")
    del matplotlib
    d, out = _tmpdir(self), _tmpdir(self)
    _write_dataset(d, train=40, test=16)
    data = fm.load_fashion_mnist(d, val=TINY.val_size)
    logs = []
    trained = fm.work(out, data, TINY, ("primary",), poll=0.0,
                      log=lambda *a, **k: logs.append(a))
    # 2 optimizers x 2 methods x (3 tuning rates + 2 final seeds).
    self.assertEqual(trained, 20)
    records = fm.load_records(out, TINY)
    self.assertLen(records, 20)
    self.assertEqual(sum(r["test_acc"] is not None for r in records), 8)
    self.assertEqual(fm.work(out, data, TINY, ("primary",), poll=0.0), 0)
    # Another config does not see these records.
    self.assertEqual(fm.load_records(out, dataclasses.replace(TINY,
                                                              epochs=2)), [])
    # A run is fixed by its seed: trained again, it gives the same record.
    key = next(r["key"] for r in records if r["final"])
    again = fm.train_run(fm.Run("primary", *_parse(key), final=True), data,
                         TINY)
    self.assertEqual(again["key"], key)
    for field in ("train_loss", "val_curve", "test_acc"):
      self.assertEqual(again[field], by_key(records)[key][field], field)

    results = fm.report(out, out, TINY, ("primary",))
    self.assertEqual(results["missing_runs"], 0)
    index = by_key(records)
    for opt, res in results["optimizers"].items():
      rows = {r["method"]: r for r in res["rows"]}
      self.assertEqual(set(rows), {B, D})
      lr_b, lr_d = rows[B]["lr"], rows[D]["lr"]
      for s in TINY.final_seeds:
        want = (index[f"{opt} {D} lr={lr_d!r} seed={s}"]["test_acc"]
                - index[f"{opt} {B} lr={lr_b!r} seed={s}"]["test_acc"])
        self.assertAlmostEqual(rows[D]["delta_test"]["per_seed"][s], want)
    with open(os.path.join(out, "results.json")) as f:
      self.assertEqual(json.load(f)["runs"], 20)
    for name in ("results.md", "paired_deltas.png"):
      self.assertTrue(os.path.exists(os.path.join(out, name)), name)

  def test_help(self):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, os.path.join(here, "examples", "fashion_mnist.py"),
         "--help"], capture_output=True, text=True, check=True)
    self.assertIn("--data-dir", done.stdout)


if __name__ == "__main__":
  absltest.main()


COMMITTED = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "examples", "results", "fashion_mnist")


class CommittedResultsTest(absltest.TestCase):

  def test_report_is_what_the_records_give(self):
    if not os.path.exists(os.path.join(COMMITTED, "runs.jsonl")):
      self.skipTest("no committed Fashion-MNIST records")
    with open(os.path.join(COMMITTED, "results.json")) as f:
      committed = json.load(f)
    records = fm.load_records(COMMITTED, fm.Config())
    self.assertLen(records, committed["runs"])
    again = json.loads(json.dumps(fm.summarize(
        records, fm.Config(), committed["phases"], committed["rerun"])))
    self.assertEqual(again, committed)
    with open(os.path.join(COMMITTED, "results.md")) as f:
      self.assertEqual(f.read(), fm.markdown(committed))
    # Every final seed's test accuracy is a record's, and every delta is
    # the difference of two records of the same seed.
    by = by_key(records)

    def key(opt, label, lr, seed, rerun):
      return f"{opt} {label} lr={lr!r} seed={seed}" + " rerun" * rerun

    for opt, res in committed["optimizers"].items():
      for row in res["rows"]:
        rerun = row["phase"] == "rerun"
        against = {  # which record each delta subtracts
            "delta_test": (B, res["baseline_lr"], rerun),
            "same_rate_delta_test": (B, row["lr"], False),
            "default_delta_test": (D, res["default_lr"], False),
            "host_delta_test": (row["method"], row["lr"], False),
            "rerun_delta_test": (B, res["baseline_lr"], True),
            "rerun_default_delta_test": (D, res["default_lr"], True)}
        for name, (label, lr, base_rerun) in against.items():
          for seed, delta in row.get(name, {}).get("per_seed", {}).items():
            mine = by[key(opt, row["method"], row["lr"], seed, rerun)]
            theirs = by[key(opt, label, lr, seed, base_rerun)]
            self.assertAlmostEqual(delta,
                                   mine["test_acc"] - theirs["test_acc"])
