"""Tests of the example scripts' loaders, statistics and training steps."""

import dataclasses
import json
import os
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_cdg

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "examples"))

import cifar10  # pylint: disable=g-import-not-at-top,wrong-import-position
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import reproduce  # pylint: disable=g-import-not-at-top,wrong-import-position

TINY_RESNET = common.ResNet(blocks_per_stage=1, widths=(4, 8, 8))


def _pattern(label: int, n: int) -> np.ndarray:
  """A record whose pixel (channel c, row i, column j) is (c*64+i+j+n)%256."""
  c, i, j = np.meshgrid(np.arange(3), np.arange(32), np.arange(32),
                        indexing="ij")
  image = ((c * 64 + i + j + n) % 256).astype(np.uint8)  # CHW, as stored
  return np.concatenate([[np.uint8(label)], image.reshape(-1)])


def _tmpdir(test) -> str:
  d = tempfile.TemporaryDirectory()
  test.addCleanup(d.cleanup)
  return d.name


class Cifar10LoaderTest(parameterized.TestCase):

  def test_reads_records_as_hwc(self):
    path = os.path.join(_tmpdir(self), "b.bin")
    labels = [3, 0, 9]
    with open(path, "wb") as f:
      for n, label in enumerate(labels):
        f.write(_pattern(label, n).tobytes())
    x, y = cifar10.read_records(path)
    self.assertEqual(x.shape, (3, 32, 32, 3))
    self.assertEqual(x.dtype, np.uint8)
    np.testing.assert_array_equal(y, labels)
    self.assertEqual(y.dtype, np.int32)
    for n in range(3):
      for c, i, j in ((0, 0, 0), (1, 5, 7), (2, 31, 1), (2, 3, 30)):
        self.assertEqual(int(x[n, i, j, c]), (c * 64 + i + j + n) % 256)

  def test_synthetic_round_trip(self):
    d = _tmpdir(self)
    cifar10.write_synthetic(d, 12, seed=1)
    for name in cifar10.TRAIN_FILES + (cifar10.TEST_FILE,):
      size = os.path.getsize(os.path.join(d, name))
      self.assertEqual(size % 3073, 0)
    data = cifar10.load_cifar10(d)
    self.assertEqual(data["train"].x.shape, (12, 32, 32, 3))
    self.assertEqual(data["test"].x.shape, (2, 32, 32, 3))
    self.assertTrue(np.all((data["train"].y >= 0) & (data["train"].y < 10)))

  def test_errors(self):
    d = _tmpdir(self)
    with pytest.raises(FileNotFoundError, match="data_batch_1.bin"):
      cifar10.load_cifar10(d)
    path = os.path.join(d, "bad.bin")
    np.zeros(3072, np.uint8).tofile(path)
    with pytest.raises(ValueError, match="3072 bytes.*3073-byte"):
      cifar10.read_records(path)
    rec = _pattern(10, 0)
    rec.tofile(path)
    with pytest.raises(ValueError, match="label 10"):
      cifar10.read_records(path)
    with pytest.raises(ValueError, match="--synthetic=3"):
      cifar10.write_synthetic(d, 3)

  def test_augment_crops_and_flips(self):
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3)),
                    jnp.float32)
    out = np.asarray(cifar10.augment(jax.random.key(3), x, pad=2))
    self.assertEqual(out.shape, x.shape)
    padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
    for n in range(6):
      windows = [w for r in range(5) for c in range(5)
                 for w in (padded[n, r:r + 8, c:c + 8],
                           padded[n, r:r + 8, c:c + 8][:, ::-1])]
      self.assertTrue(any(np.array_equal(out[n], w) for w in windows))

  def test_one_training_step(self):
    d = _tmpdir(self)
    cifar10.write_synthetic(d, 10)
    data = cifar10.load_cifar10(d)
    kernels = optax_cdg.linen_conv_kernels(
        TINY_RESNET, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    tx = cifar10.make_tx(100, cdg=True, kernels=kernels)
    v = common.init_variables(TINY_RESNET, np.zeros((1, 32, 32, 3),
                                                    np.float32), 0)
    step = cifar10.make_step(TINY_RESNET, tx)
    params, stats, _, loss = step(
        v["params"], v["batch_stats"], tx.init(v["params"]),
        jnp.asarray(data["train"].x), jnp.asarray(data["train"].y),
        np.arange(4), jax.random.key(0), 0)
    self.assertTrue(np.isfinite(float(loss)))
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params,
                           v["params"])
    self.assertTrue(all(jax.tree.leaves(changed)))
    self.assertTrue(any(jax.tree.leaves(jax.tree.map(
        lambda a, b: bool(jnp.any(a != b)), stats, v["batch_stats"]))))


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


class CommonTest(absltest.TestCase):

  def test_hyperparams_reuse_one_compiled_step(self):
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
    step = common.train_step(TINY_RESNET, tx)
    self.assertIs(common.train_step(TINY_RESNET, tx), step)
    state = common.set_hyperparams(tx.init({"w": jnp.ones(2)}),
                                   {"learning_rate": 0.25})
    self.assertEqual(float(state.hyperparams["learning_rate"]), 0.25)
    with pytest.raises(ValueError, match="momentum"):
      common.set_hyperparams(state, {"momentum": 0.9})
    with pytest.raises(TypeError, match="inject_hyperparams"):
      common.set_hyperparams(optax.sgd(0.1).init({"w": jnp.ones(2)}),
                             {"learning_rate": 0.1})


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
