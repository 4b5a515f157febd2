"""Tests of the example scripts' loaders, checkpoints and training steps."""

import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import _extras

# examples/ is on the path (pyproject's pythonpath), as for a script there.
import cifar10
import common
import optax_cdg
import quickstart
import quickstart_nnx

TINY_RESNET = common.ResNet(blocks_per_stage=1, widths=(4, 8, 8))
TINY_CNN = common.SmallCNN(widths=(2, 4))


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
    state = common.create_state(TINY_RESNET, tx,
                                np.zeros((1, 32, 32, 3), np.float32), 0)
    new, loss = cifar10.train_step(
        state, jnp.asarray(data["train"].x), jnp.asarray(data["train"].y),
        np.arange(4), jax.random.key(0))
    self.assertTrue(np.isfinite(float(loss)))
    self.assertEqual(int(new.step), 1)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.params,
                           state.params)
    self.assertTrue(all(jax.tree.leaves(changed)))
    self.assertTrue(any(jax.tree.leaves(jax.tree.map(
        lambda a, b: bool(jnp.any(a != b)), new.batch_stats,
        state.batch_stats))))


def _synthetic_cifar(test, n=16):
  d = _tmpdir(test)
  cifar10.write_synthetic(d, n)
  return d, cifar10.load_cifar10(d)


class Cifar10CheckpointTest(absltest.TestCase):

  def test_resumed_run_equals_uninterrupted_run(self):
    _, data = _synthetic_cifar(self)
    tx = cifar10.make_tx(8, cdg=True, kernels=optax_cdg.linen_conv_kernels(
        TINY_RESNET, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)))
    kw = dict(batch_size=4, seed=0, log=lambda _: None)
    whole_dir, cut_dir = _tmpdir(self), _tmpdir(self)
    whole = cifar10.run(TINY_RESNET, tx, data, epochs=2, run_dir=whole_dir,
                        **kw)
    # The same run interrupted after its first epoch (same tx, so the same
    # schedule), then resumed from the checkpoint.
    cifar10.run(TINY_RESNET, tx, data, epochs=1, run_dir=cut_dir, **kw)
    with pytest.raises(FileExistsError, match="--resume"):
      cifar10.run(TINY_RESNET, tx, data, epochs=2, run_dir=cut_dir, **kw)
    resumed = cifar10.run(TINY_RESNET, tx, data, epochs=2, run_dir=cut_dir,
                          resume=True, **kw)
    self.assertEqual(resumed["epochs_trained_now"], 1)
    self.assertEqual(int(resumed["state"].step), 8)
    chex.assert_trees_all_equal(
        common.variables_of(resumed["state"]),
        common.variables_of(whole["state"]))
    chex.assert_trees_all_equal(resumed["state"].opt_state,
                                whole["state"].opt_state)
    self.assertEqual(resumed["test_curve"], whole["test_curve"])
    self.assertEqual(resumed["train_loss"], whole["train_loss"])
    logs = [cifar10.read_log(os.path.join(d, "log.jsonl"))
            for d in (whole_dir, cut_dir)]
    for log in logs:
      self.assertEqual([r["epoch"] for r in log], [1, 2])
    self.assertEqual([r["train_loss"] for r in logs[0]],
                     [r["train_loss"] for r in logs[1]])

  def test_main_workdir_and_resume(self):
    data_args = ["--synthetic", "8", "--depth", "8", "--width", "2",
                 "--batch-size", "4", "--runs", "cdg"]
    work = os.path.join(_tmpdir(self), "work")
    out = os.path.join(work, "results.json")
    first = cifar10.main(data_args + ["--epochs", "1", "--workdir", work,
                                      "--out", out])
    log = cifar10.read_log(os.path.join(work, "cdg", "log.jsonl"))
    self.assertEqual(len(log), 1)
    self.assertEqual(set(log[0]), {"epoch", "train_loss", "test_acc",
                                   "seconds", "images_per_second"})
    self.assertEqual(log[0]["test_acc"], first["runs"]["cdg"]["test_acc"])
    with open(out) as f:
      self.assertEqual(json.load(f)["runs"]["cdg"]["train_loss"],
                       [log[0]["train_loss"]])
    # Resuming a finished run trains nothing and reports its log.
    again = cifar10.main(data_args + ["--epochs", "1", "--workdir", work,
                                      "--resume"])
    self.assertEqual(again["runs"]["cdg"]["epochs_trained_now"], 0)
    self.assertEqual(again["runs"]["cdg"]["test_curve"],
                     [log[0]["test_acc"]])
    with pytest.raises(SystemExit):  # other settings than the saved ones
      cifar10.main(data_args + ["--epochs", "2", "--workdir", work,
                                "--resume"])
    with pytest.raises(SystemExit):
      cifar10.main(data_args + ["--epochs", "1", "--resume"])


class CommonTest(absltest.TestCase):

  def test_hyperparams_reuse_one_compiled_step(self):
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
    x = np.zeros((2, 8, 8, 1), np.float32)
    y = np.zeros(2, np.int32)
    state = common.create_state(TINY_CNN, tx, x, 0)
    compiles = []

    def on_event(event, duration, **kwargs):
      del duration, kwargs
      if event == "/jax/core/compile/backend_compile_duration":
        compiles.append(event)

    common.train_step(state, x, y)  # compiled here, before listening
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
      other = state.replace(opt_state=common.set_hyperparams(
          state.opt_state, {"learning_rate": 0.25}))
      stepped, _ = common.train_step(other, x, y)
    finally:
      jax.monitoring.unregister_event_duration_listener(on_event)
    self.assertEqual(compiles, [])
    self.assertEqual(
        float(stepped.opt_state.hyperparams["learning_rate"]), 0.25)
    with pytest.raises(ValueError, match="momentum"):
      common.set_hyperparams(other.opt_state, {"momentum": 0.9})
    with pytest.raises(TypeError, match="inject_hyperparams"):
      common.set_hyperparams(optax.sgd(0.1).init({"w": jnp.ones(2)}),
                             {"learning_rate": 0.1})


def test_quickstart_runs_at_tiny_size(capsys):
  _extras.require("mlxtend")
  _extras.require("tqdm")
  results = quickstart.main(["--epochs", "1", "--train-size", "64",
                             "--batch-size", "32", "--no-progress"])
  assert set(results) == {"baseline", "cdg"}
  for runs in results.values():
    assert len(runs) == 1 and 0.0 <= runs[0].test_acc <= 1.0
  out = capsys.readouterr().out
  assert out.index("Compiling both training steps") < out.index(
      "test accuracy")
  assert "One seed cannot show a difference" in out


def test_quickstart_reports_the_spread_over_seeds():
  line = quickstart.spread("CDG - baseline", [0.2, -0.1, 0.3], "points")
  assert line.startswith("CDG - baseline: +0.13 points (sd 0.21 over 3 ")
  assert line.endswith("within noise")
  assert quickstart.spread("d", [1.0, 1.1, 0.9], "s").endswith(
      "beyond two standard errors")


def test_quickstart_nnx_runs_at_tiny_size(capsys):
  _extras.require("mlxtend")
  results = quickstart_nnx.main(["--epochs", "1", "--train-size", "64",
                                 "--batch-size", "32", "--widths", "4,8",
                                 "--no-progress"])
  assert set(results) == {"baseline", "cdg"}
  for r in results.values():
    assert 0.0 <= r["test_acc"] <= 1.0
    assert len(r["train_loss"]) == 1 and np.isfinite(r["train_loss"][0])
  assert "test accuracy" in capsys.readouterr().out
