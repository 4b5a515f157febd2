"""Tests of examples/reproduce.py: its statistics, run cache and a tiny
end-to-end run."""

import dataclasses
import json
import tempfile

from absl.testing import parameterized
import chex
import jax
import numpy as np
import pytest

# examples/ is on the path (pyproject's pythonpath), as for a script there.
import common
import reproduce


class StatisticsTest(parameterized.TestCase):

  def test_mean_ci95(self):
    mean, ci = reproduce.mean_ci95([1.0, 2.0, 3.0])
    self.assertAlmostEqual(mean, 2.0)
    self.assertAlmostEqual(ci, 4.302652729911275 / np.sqrt(3), places=9)
    self.assertEqual(reproduce.mean_ci95([0.5]), (0.5, None))
    self.assertEqual(reproduce.mean_ci95([0.5, 0.5])[1], 0.0)

  def test_select_lr_prefers_validation_and_first_on_ties(self):
    self.assertEqual(reproduce.select_lr({0.1: [0.5, 0.7], 0.3: [0.6, 0.7],
                                          1.0: [0.9, 0.1]}), 0.3)
    self.assertEqual(reproduce.select_lr({0.1: [0.6], 0.3: [0.6]}), 0.1)

  def test_summarize_pairs_each_method_at_its_own_lr(self):
    base = reproduce.Method("sgd", "baseline")
    cdg = reproduce.Method("sgd", "cdg", "sobolev", "output", 1e-3)
    grid = {"sgd": (0.1, 0.3)}

    def res(val, test):
      return common.RunResult(test_acc=test, val_acc=val, train_loss=[1.0],
                              val_curve=[val], seconds=1.0)

    runs = {
        base: {0.1: {0: res(0.9, 0.80), 1: res(0.9, 0.82)},
               0.3: {0: res(0.5, 0.99), 1: res(0.5, 0.99)}},
        cdg: {0.1: {0: res(0.1, 0.99), 1: res(0.1, 0.99)},
              0.3: {0: res(0.8, 0.81), 1: res(0.8, 0.85)}},
    }
    rows = reproduce.summarize([base, cdg], runs, grid, [0, 1])
    b, c = rows
    self.assertEqual((b["learning_rate"], c["learning_rate"]), (0.1, 0.3))
    self.assertAlmostEqual(b["test_acc_mean"], 0.81)
    self.assertIsNone(b["delta_vs_baseline_mean"])
    np.testing.assert_allclose(c["delta_per_seed"], [0.01, 0.03])
    self.assertAlmostEqual(c["delta_vs_baseline_mean"], 0.02)
    self.assertAlmostEqual(c["delta_vs_baseline_ci95"],
                           12.706204736174698 * 0.01, places=9)
    self.assertTrue(c["learning_rate_at_grid_edge"])
    self.assertIs(reproduce.best_cdg(rows, "sgd"), c)

  def test_run_cache_round_trip_and_keys(self):
    template = {"params": {"w": np.zeros((2, 3), np.float32),
                           "b": np.zeros(3, np.float32)},
                "batch_stats": {"mean": np.zeros(3, np.float32)}}
    mode = reproduce.MODES["quick"]
    m = reproduce.Method("sgd", "cdg", "sobolev", "output", 1e-3)
    result = common.RunResult(
        test_acc=0.5, val_acc=0.25, train_loss=[2.0, 1.5],
        val_curve=[0.125, 0.25], seconds=3.0,
        variables=jax.tree.map(lambda x: x + np.float32(0.1), template))
    with tempfile.TemporaryDirectory() as out:
      cache = reproduce.RunCache(out, "cnn", mode, template)
      self.assertIsNone(cache.load(m, 0.5, 0))
      cache.save(m, 0.5, 0, result)
      back = cache.load(m, 0.5, 0)
      self.assertEqual(back.val_curve, result.val_curve)
      self.assertEqual(back.test_acc, result.test_acc)
      chex.assert_trees_all_equal(back.variables, result.variables)
      # Another learning rate, seed, smoothing or setting is another run.
      self.assertIsNone(cache.load(m, 1.0, 0))
      self.assertIsNone(cache.load(m, 0.5, 1))
      self.assertIsNone(cache.load(
          reproduce.Method("sgd", "cdg", "sobolev", "output", 1e-2), 0.5, 0))
      other = reproduce.RunCache(out, "cnn", dataclasses.replace(
          mode, epochs=mode.epochs + 1), template)
      self.assertIsNone(other.load(m, 0.5, 0))
      wrong_model = reproduce.RunCache(out, "cnn", mode, {"w": np.zeros(1)})
      with self.assertRaisesRegex(ValueError, "another model"):
        wrong_model.load(m, 0.5, 0)



@pytest.mark.slow
def test_reproduce_end_to_end(tmp_path):
  out = tmp_path / "out"
  results = reproduce.main(["--quick", "--train-size", "64", "--epochs", "1",
                            "--seeds", "2", "--no-progress", "--out",
                            str(out)])
  with open(out / "results.json") as f:
    saved = json.load(f)
  assert saved["rows"] == json.loads(json.dumps(results["rows"]))
  keys = {"optimizer", "transform", "metric", "direction", "smoothing",
          "learning_rate", "seeds", "test_acc_mean", "test_acc_ci95",
          "delta_vs_baseline_mean", "delta_vs_baseline_ci95"}
  assert {"dataset", "train_size", "test_size", "rows"} <= set(saved)
  for row in saved["rows"]:
    assert keys <= set(row)
  kinds = {(r["transform"], r["direction"]) for r in saved["rows"]}
  assert {("baseline", None), ("cdg", "output"), ("cdg", "input"),
          ("cdg", "spatial"), ("lsgd", None)} <= kinds
  for name in ("accuracy_vs_smoothing", "direction_ablation",
               "learning_curves", "channel_spectrum"):
    assert (out / f"{name}.png").stat().st_size > 0
