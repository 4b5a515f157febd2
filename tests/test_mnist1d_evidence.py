"""Tests of examples/mnist1d_evidence.py at tiny sizes, and of its committed
report."""

import json
import os
import shutil
import tarfile
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _extras

# examples/ is on the path (pyproject's pythonpath), as for a script there.
import common
import mnist1d_evidence as m1d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "examples", "results")


def _data(n=120, seed=0):
  """A learnable toy task: one random template per class, plus noise."""
  rng = np.random.default_rng(seed)
  templates = rng.normal(size=(10, 40, 1))

  def split(k):
    y = rng.integers(0, 10, k).astype(np.int32)
    x = templates[y] + 0.3 * rng.normal(size=(k, 40, 1))
    return common.Split(x.astype(np.float32), y)

  return {"train": split(n), "val": split(50), "test": split(60)}


class MethodTest(parameterized.TestCase):

  @parameterized.parameters("baseline", "lsgd:0.5", "sobolev:unit:0.0001",
                            "sobolev:grid:0.1", "reweighted:unit:1.5",
                            "sobolev:unit:0.001:spatial")
  def test_spec_round_trip(self, spec):
    self.assertEqual(m1d.Method.parse(spec).spec, spec)

  @parameterized.parameters("sobolev", "sobolev:pixel:1", "lsgd", "x:unit:a")
  def test_bad_spec(self, spec):
    with self.assertRaisesRegex(ValueError, "method spec"):
      m1d.Method.parse(spec)

  def test_top_gain(self):
    # unit scale: 1 / (1 + 4 lam N^2); grid: 1 / (1 + 4 lam).
    self.assertAlmostEqual(m1d.FORMER_DEFAULT.top_gain(128),
                           1 / (1 + 4e-4 * 128 ** 2), places=5)
    grid = m1d.Method.parse("sobolev:grid:0.5")
    for n in (32, 512):
      self.assertAlmostEqual(grid.top_gain(n), 1 / 3, places=5)
    self.assertIsNone(m1d.Method("baseline").top_gain(32))


class ModelTest(absltest.TestCase):

  def test_conv1d_equals_lax_conv(self):
    x = jax.random.normal(jax.random.key(0), (3, 40, 2))
    conv = m1d.Conv1D(5, size=5, stride=2)
    params = conv.init(jax.random.key(1), x)["params"]
    params["bias"] = jnp.arange(5.0)
    got = conv.apply({"params": params}, x)
    want = jax.lax.conv_general_dilated(
        x, params["kernel"], (2,), ((2, 2),),
        dimension_numbers=("NWC", "WIO", "NWC")) + params["bias"]
    self.assertEqual(got.shape, (3, 20, 5))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def test_models_and_kernel_selection(self):
    import optax_cdg  # pylint: disable=g-import-not-at-top
    x = jnp.zeros((2, 40, 1))
    for name, n_conv in (("cnn", 3), ("resnet", 7)):
      model = m1d.make_model(name, 8)
      params = model.init(jax.random.key(0), x)["params"]
      self.assertEqual(model.apply({"params": params}, x).shape, (2, 10))
      sel = jax.tree.leaves(optax_cdg.conv_kernels(params))
      self.assertEqual(sum(bool(s) for s in sel), n_conv)
    with self.assertRaisesRegex(ValueError, "model='mlp'"):
      m1d.make_model("mlp", 8)


class TrainingTest(absltest.TestCase):

  def test_batch_indices_are_epochs_of_permutations(self):
    idx = m1d.batch_indices(30, 10, 7, seed=3)
    self.assertEqual(idx.shape, (7, 10))
    for e in range(2):  # each full epoch visits every example once
      np.testing.assert_array_equal(np.sort(idx[3 * e:3 * e + 3].ravel()),
                                    np.arange(30))
    np.testing.assert_array_equal(idx, m1d.batch_indices(30, 10, 7, seed=3))
    self.assertFalse(np.array_equal(idx, m1d.batch_indices(30, 10, 7, 4)))

  def test_vmapped_member_equals_a_single_run(self):
    data = _data()
    setting = m1d.Setting("cnn", 4, "adamw", 12, batch_size=20)
    model = m1d.make_model("cnn", 4)
    method = m1d.FORMER_DEFAULT
    together = m1d.train_members(model, method, setting, data,
                                 [(0.01, 0), (0.003, 1)], evals=3)
    alone = m1d.train_members(model, method, setting, data, [(0.003, 1)],
                              evals=3)
    a, b = together[1], alone[0]
    # vmap batches the convs, so XLA sums in another order: the same
    # arithmetic up to float32 reordering, which 12 steps carry forward (a
    # ReLU switching branch is a jump, so no smooth bound holds; see
    # tests/multiprocess/test_cross_process_training.py). The check must
    # see a change of what is computed: the other member (another rate and
    # seed) is asserted to differ by far more than the tolerance, and an
    # accuracy may differ by one prediction at a decision boundary.
    tol = 1e-3
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=tol)
    other = together[0]["train_loss"]
    self.assertGreater(np.max(np.abs(np.subtract(other, a["train_loss"]))
                              / np.abs(a["train_loss"])), 10 * tol)
    n_val, n_test = len(data["val"].y), len(data["test"].y)
    np.testing.assert_allclose(a["val_curve"], b["val_curve"],
                               atol=1 / n_val + 1e-9)
    self.assertLessEqual(abs(a["test_acc"] - b["test_acc"]),
                         1 / n_test + 1e-9)
    fast = together[0]["train_loss"]
    self.assertLess(np.mean(fast[-3:]), np.mean(fast[:3]))
    self.assertEqual(a["eval_steps"], [4, 8, 12])

  def test_a_killed_run_resumes_from_its_checkpoint(self):
    data = _data()
    setting = m1d.Setting("cnn", 4, "adamw", 12, batch_size=20)
    model = m1d.make_model("cnn", 4)
    members = [(0.01, 0), (0.003, 1)]
    want = m1d.train_members(model, m1d.DEFAULT, setting, data, members,
                             evals=3)
    real, calls = m1d._chunk_fn, []

    def dies_after(n):
      def chunk_fn(model, tx):
        chunk = real(model, tx)
        def run(*args):
          if len(calls) == n:
            raise KeyboardInterrupt
          calls.append(1)
          return chunk(*args)
        return run
      return chunk_fn

    with tempfile.TemporaryDirectory() as d:
      ckpt = os.path.join(d, "sub", "member.npz")
      with mock.patch.object(m1d, "_chunk_fn", dies_after(2)):
        with self.assertRaises(KeyboardInterrupt):
          m1d.train_members(model, m1d.DEFAULT, setting, data, members,
                            evals=3, checkpoint=ckpt)
      self.assertTrue(os.path.exists(ckpt))
      calls.clear()
      with mock.patch.object(m1d, "_chunk_fn", dies_after(99)):
        got = m1d.train_members(model, m1d.DEFAULT, setting, data, members,
                                evals=3, checkpoint=ckpt)
      self.assertLen(calls, 1)  # only the third chunk was trained again
      for g, w in zip(got, want, strict=True):
        g.pop("seconds"), w.pop("seconds")
        self.assertEqual(g, w)  # bit for bit
      self.assertFalse(os.path.exists(ckpt))  # removed once finished
      # A checkpoint of other members is not used.
      calls.clear()
      with mock.patch.object(m1d, "_chunk_fn", dies_after(2)):
        with self.assertRaises(KeyboardInterrupt):
          m1d.train_members(model, m1d.DEFAULT, setting, data, members,
                            evals=3, checkpoint=ckpt)
      calls.clear()
      with mock.patch.object(m1d, "_chunk_fn", dies_after(99)):
        other = m1d.train_members(model, m1d.DEFAULT, setting, data,
                                  members[:1], evals=3, checkpoint=ckpt)
      self.assertLen(calls, 3)
      fresh = m1d.train_members(model, m1d.DEFAULT, setting, data,
                                members[:1], evals=3)
      other[0].pop("seconds"), fresh[0].pop("seconds")
      self.assertEqual(other[0], fresh[0])

  def test_accuracy_in_batches_equals_all_at_once(self):
    data = _data()
    model = m1d.make_model("resnet", 4)
    x, y = data["train"].x, data["train"].y  # 120: the last batch is short
    params = jax.tree.map(lambda *a: jnp.stack(a), *[
        model.init(jax.random.key(s), x[:1])["params"] for s in (0, 1)])
    # Zero-initialised convs pushed off zero: the members then differ.
    params = jax.tree.map(lambda a: a + 0.3 * jnp.sign(a), params)
    got = m1d._accuracy_fn(model, batch=50)(params, x, y)
    logits = jax.vmap(lambda p: model.apply({"params": p}, x))(params)
    want = np.mean(np.argmax(np.asarray(logits), -1) == y, axis=-1)
    np.testing.assert_allclose(got, want, atol=1e-12)
    self.assertEqual(got.shape, (2,))
    # Compiled once per model and batch, not once per setting.
    self.assertIs(m1d._accuracy_fn(m1d.make_model("resnet", 4), batch=50),
                  m1d._accuracy_fn(model, batch=50))


def _rec(method, setting, lr, seed, val, test):
  return {"method": method, "setting": setting, "learning_rate": lr,
          "seed": seed, "val_acc": val, "test_acc": test,
          "val_curve": [val], "seconds": 1.0}


class ReportTest(absltest.TestCase):

  def test_mde80(self):
    from scipy import stats  # pylint: disable=g-import-not-at-top
    want = (stats.t.ppf(0.975, 4) + stats.t.ppf(0.8, 4)) * 0.01 / np.sqrt(5)
    self.assertAlmostEqual(m1d.mde80(0.01, 5), want)
    self.assertIsNone(m1d.mde80(0.01, 1))

  def test_cache_round_trip(self):
    with tempfile.TemporaryDirectory() as out:
      cache = m1d.Cache(out)
      s = m1d.Setting("cnn", 32, "sgd", 100)
      m = m1d.Method.parse("sobolev:grid:0.1")
      self.assertIsNone(cache.load(s, m, 0.01, 0))
      rec = _rec(m.spec, s.name, 0.01, 0, 0.5, 0.25)
      cache.save(s, m, rec)
      self.assertEqual(cache.load(s, m, 0.01, 0), rec)
      self.assertIsNone(cache.load(s, m, 0.03, 0))
      self.assertIsNone(cache.load(m1d.Setting("cnn", 64, "sgd", 100), m,
                                   0.01, 0))
      self.assertEqual(cache.all_records(), [rec])

  def test_cache_unpacks_its_archive(self):
    with tempfile.TemporaryDirectory() as d:
      packed, out = os.path.join(d, "packed"), os.path.join(d, "out")
      s = m1d.Setting("cnn", 32, "sgd", 100)
      m = m1d.Method("baseline")
      rec = _rec(m.spec, s.name, 0.01, 0, 0.5, 0.25)
      m1d.Cache(packed).save(s, m, rec)
      os.makedirs(out)
      with tarfile.open(os.path.join(out, "runs.tar.xz"), "w:xz") as tar:
        tar.add(os.path.join(packed, "runs"), "runs")
      self.assertEqual(m1d.Cache(out).all_records(), [rec])
      # Unpacked once: runs saved since are not overwritten by the archive.
      rec2 = _rec(m.spec, s.name, 0.03, 0, 0.6, 0.5)
      m1d.Cache(out).save(s, m, rec2)
      self.assertEqual(m1d.Cache(out).all_records(), [rec, rec2])

  def test_table_pairs_at_chosen_lr_and_rule(self):
    s = m1d.Setting("cnn", 32, "sgd", 100)
    lrs, seeds = (0.01, 0.1), (0, 1, 2)
    recs = []
    for seed in seeds:
      # Baseline: best on validation at 0.1.
      recs.append(_rec("baseline", s.name, 0.01, seed, 0.80, 0.99))
      recs.append(_rec("baseline", s.name, 0.1, seed, 0.90, 0.90 + seed / 100))
      # A: harmful on validation (-3, -4, -5 points) at its chosen lr 0.01.
      recs.append(_rec("sobolev:grid:0.1", s.name, 0.01, seed,
                       0.87 - seed / 100, 0.91 + seed / 100))
      recs.append(_rec("sobolev:grid:0.1", s.name, 0.1, seed, 0.5, 0.5))
      # B: +1 point on validation, noisy.
      recs.append(_rec("reweighted:unit:1.5", s.name, 0.1, seed,
                       0.91 + (seed - 1) / 50, 0.90))
      recs.append(_rec("reweighted:unit:1.5", s.name, 0.01, seed, 0.1, 0.1))
    methods = [m1d.Method.parse(x) for x in
               ("baseline", "sobolev:grid:0.1", "reweighted:unit:1.5",
                "sobolev:grid:0.5")]
    t = m1d.comparison_table(m1d._index(recs), s, methods, lrs, seeds)
    t["phase"] = "decisive"
    self.assertEqual(t["pending"], ["sobolev:grid:0.5"])
    rows = {r["method"]: r for r in t["rows"]}
    self.assertEqual(rows["baseline"]["learning_rate"], 0.1)
    a = rows["sobolev:grid:0.1"]
    self.assertEqual(a["learning_rate"], 0.01)
    np.testing.assert_allclose(a["delta_per_seed"], [0.01] * 3, atol=1e-12)
    np.testing.assert_allclose(a["val_delta_per_seed"],
                               [-0.03, -0.04, -0.05], atol=1e-12)
    stab = [{"width": 32, "optimizer": "adam", "steps": 10,
             "method": spec, "complete": True,
             "val_acc_by_lr": {"0.01": v, "0.05": v_high}}
            for spec, v, v_high in (
                ("baseline", 0.9, 0.9), ("sobolev:grid:0.1", 0.9, 0.9),
                ("reweighted:unit:1.5", 0.9, 0.1),
                ("sobolev:grid:0.5", 0.1, 0.1))]
    self.assertEqual([(c["method"], c["learning_rate"])
                      for c in m1d.collapses(stab)],
                     [("reweighted:unit:1.5", 0.05),
                      ("sobolev:grid:0.5", 0.01), ("sobolev:grid:0.5", 0.05)])
    # Above the usual rates (Adam 0.05) a collapse is reported, not ruled on.
    self.assertEqual([(c["method"], c["learning_rate"])
                      for c in m1d.collapses(stab, usual_only=True)],
                     [("sobolev:grid:0.5", 0.01)])
    rule = m1d.apply_rule(stab, [t], methods[1:])
    v = rule["candidates"]
    self.assertEqual(v["sobolev:grid:0.1"]["harm_cells"], [s.name])
    self.assertEqual(len(v["sobolev:grid:0.5"]["collapses"]), 1)
    self.assertEqual(v["reweighted:unit:1.5"]["collapses"], [])
    self.assertEqual(rule["eligible"], ["reweighted:unit:1.5"])
    self.assertEqual(rule["chosen"], "reweighted:unit:1.5")
    self.assertTrue(rule["partial"])  # grid:0.5 has no decisive cell

  def test_seed_collapses(self):
    s = m1d.Setting("cnn", 128, "adamw", 100)
    recs = []
    for seed, (b, m) in enumerate([(0.9, 0.1), (0.9, 0.9), (0.3, 0.1)]):
      recs += [_rec("baseline", s.name, 0.03, seed, b, b),
               _rec("sobolev:grid:0.1", s.name, 0.03, seed, m, m)]
    t = {"name": s.name, "phase": "decisive", "learning_rates": [0.03],
         "seeds": [0, 1, 2], "rows": [{"method": "baseline"},
                                      {"method": "sobolev:grid:0.1"}]}
    # Seed 2 does not count: the baseline does not train there either.
    self.assertEqual(m1d.seed_collapses(m1d._index(recs), [t]),
                     [{"cell": s.name, "phase": "decisive",
                       "learning_rate": 0.03, "method": "sobolev:grid:0.1",
                       "seeds": [0], "of": 3}])

  def test_width_series(self):
    def table(phase, model, w, opt, rows):
      return {"phase": phase, "setting": {"model": model, "width": w,
                                          "optimizer": opt},
              "rows": [{"method": m, "val_acc_mean": v, "delta_mean": d}
                       for m, v, d in rows]}
    former, default = m1d.FORMER_DEFAULT.spec, m1d.DEFAULT.spec
    cands = [default, "reweighted:unit:1.5"]
    results = {"tables": [
        table("decisive", "cnn", 64, "sgd", [
            ("baseline", 0.9, None), (former, 0.8, -0.01),
            (default, 0.85, 0.0), ("reweighted:unit:1.5", 0.95, 0.02)]),
        table("decisive", "cnn", 32, "sgd", [
            ("baseline", 0.9, None), (default, 0.91, 0.01)]),
        table("resnet", "resnet", 32, "sgd", [
            ("baseline", 0.98, None), (default, 0.97, -0.001),
            (former, 0.5, None)]),  # not finished: no delta yet
        table("sweep", "cnn", 64, "sgd", [(default, 0.99, 0.5)]),
        table("resnet", "resnet", 32, "adamw", [("baseline", 0.98, None)]),
    ]}
    got = m1d.width_series(results, cands)
    self.assertEqual(list(got), ["sgd"])  # adamw has no delta at all
    points = {k: [(w, r["method"]) for w, r in v]
              for k, v in got["sgd"].items()}
    self.assertEqual(points, {
        "best CDG (by validation)": [(32, default),
                                     (64, "reweighted:unit:1.5")],
        "former default": [(64, former)],
        "default": [(32, default), (64, default)],
        "former default, ResNet": [],
        "default, ResNet": [(32, default)]})

  def test_confirm_runs_more_seeds_at_the_chosen_rate(self):
    s = m1d.Setting("cnn", 32, "sgd", 100)
    base, default = m1d.Method("baseline"), m1d.DEFAULT
    placeholder = [m1d.Job("confirm", s, m, (0.01, 0.1), (0, 1))
                   for m in (base, default)]
    recs = [_rec("baseline", s.name, lr, seed, 0.9 if lr == 0.1 else 0.8, 0.9)
            for lr in (0.01, 0.1) for seed in (0, 1)]
    index = m1d._index(recs)
    # The default's decisive runs are missing: it waits, the baseline not.
    self.assertIsNone(m1d.resolve(placeholder[1], index, 4))
    got = m1d.resolve(placeholder[0], index, 4)
    self.assertEqual((got.lrs, got.seeds), ((0.1,), (0, 1, 2, 3)))
    recs += [_rec(default.spec, s.name, lr, seed, 0.85 if lr == 0.1 else 0.88,
                  0.9) for lr in (0.01, 0.1) for seed in (0, 1)]
    recs += [_rec("baseline", s.name, 0.1, seed, 0.9, 0.90)
             for seed in (2, 3)]
    recs += [_rec(default.spec, s.name, 0.01, seed, 0.88, 0.92)
             for seed in (2, 3)]
    index = m1d._index(recs)
    got = m1d.resolve(placeholder[1], index, 4)
    self.assertEqual((got.lrs, got.seeds), ((0.01,), (0, 1, 2, 3)))
    t = m1d.comparison_table(index, s, [base, default], (), got.seeds,
                             fixed_lr={base: 0.1, default: 0.01})
    row = {r["method"]: r for r in t["rows"]}[default.spec]
    self.assertEqual(row["learning_rate"], 0.01)
    np.testing.assert_allclose(row["delta_per_seed"], [0, 0, 0.02, 0.02],
                               atol=1e-12)
    self.assertEqual(row["collapsed_seeds"], [])
    # A collapsed baseline seed is counted and left out of the both-train
    # delta.
    recs.append(_rec("baseline", s.name, 0.1, 3, 0.1, 0.1))
    t = m1d.comparison_table(m1d._index(recs), s, [base, default], (),
                             got.seeds, fixed_lr={base: 0.1, default: 0.01})
    rows = {r["method"]: r for r in t["rows"]}
    self.assertEqual(rows["baseline"]["collapsed_seeds"], [3])
    self.assertEqual(rows[default.spec]["both_train_seeds"], 3)
    self.assertAlmostEqual(rows[default.spec]["delta_both_train_mean"],
                           0.02 / 3)
    # The rule reads decisive cells only: a confirm table changes nothing.
    self.assertEqual(m1d.apply_rule([], [dict(t, phase="confirm")],
                                    [default])["chosen"], None)

  def test_resnet_runs_the_baseline_and_both_defaults(self):
    jobs = m1d.plan(False, m1d.CANDIDATES, (32, 64), ["resnet"])
    self.assertEqual({j.setting.model for j in jobs}, {"resnet"})
    want = [m1d.Method("baseline"), m1d.DEFAULT, m1d.FORMER_DEFAULT]
    for w in (32, 64):
      for opt in ("adamw", "sgd"):
        got = [j.method for j in jobs
               if (j.setting.width, j.setting.optimizer) == (w, opt)]
        self.assertEqual(got, want)
    self.assertEqual(len(jobs), 2 * 2 * 3)


def test_make_data_then_run_from_file(tmp_path):
  """The GPU path at tiny size: arrays made into a .npz, then the decisive
  phase read from that file, reported and resumed from the cache. Needs the
  examples extra (the generator, matplotlib)."""
  _extras.require("mnist1d")
  _extras.require("matplotlib")
  npz = str(tmp_path / "arrays.npz")
  m1d.main(["--make-data", npz, "--val-size", "20", "--test-size", "30"])
  arrays = m1d.load_arrays(npz)
  assert arrays["x_train"].shape == (4000, 40)
  assert arrays["x_val"].shape == (20, 40)
  assert arrays["x_test"].shape == (30, 40)
  assert set(np.unique(arrays["y_test"])) == set(range(10))
  out = str(tmp_path / "out")
  argv = ["--data", npz, "--out", out, "--phases", "decisive", "--widths",
          "4", "--optimizers", "adamw", "--steps", "4", "--seeds", "2",
          "--candidates", "sobolev:grid:0.1", "--val-size", "20",
          "--test-size", "30"]
  results = m1d.main(argv)
  assert results["status"] == "complete"
  assert results["runs_finished"] == 3 * 3 * 2
  (table,) = results["tables"]
  assert table["setting"]["width"] == 4
  assert {r["method"] for r in table["rows"]} == {
      "baseline", m1d.FORMER_DEFAULT.spec, "sobolev:grid:0.1"}
  with open(os.path.join(out, "results.json")) as f:
    assert json.load(f)["runs_finished"] == 18
  assert os.path.getsize(os.path.join(out, "delta_vs_width.png")) > 0
  # Checkpoints are removed as their settings finish.
  assert not [f for _, _, fs in os.walk(os.path.join(out, "checkpoints"))
              for f in fs]
  again = m1d.main(argv + ["--report-only"])
  assert again["tables"] == json.loads(json.dumps(results["tables"]))
  with pytest.raises(ValueError, match="holds 20 validation"):
    m1d.load_mnist1d(npz, val=40, test=30)
  np.savez(str(tmp_path / "bad.npz"), x_train=np.zeros(2))
  with pytest.raises(ValueError, match="lacks"):
    m1d.load_arrays(str(tmp_path / "bad.npz"))
  with pytest.raises(ValueError, match="multiple of 10"):
    m1d.make_mnist1d(val=15)


@pytest.mark.parametrize("name", ["mnist1d", "mnist1d_quick"])
def test_committed_report_is_its_results_json(name):
  """`--from-results` rewrites results.md from results.json alone."""
  d = os.path.join(RESULTS, name)
  with open(os.path.join(d, "results.json")) as f:
    results = json.load(f)
  with open(os.path.join(d, "results.md")) as f:
    assert m1d.markdown(results) == f.read()


def test_committed_report_regenerates_from_the_archive(tmp_path):
  """The full sweep's 1,426 runs, packed in runs.tar.xz, give the committed
  report again (mechanism included)."""
  _extras.require("matplotlib")
  d = os.path.join(RESULTS, "mnist1d")
  shutil.copy(os.path.join(d, "runs.tar.xz"), tmp_path)
  results = m1d.main(["--report-only", "--out", str(tmp_path)])
  assert results["runs_finished"] == 1426
  with open(os.path.join(d, "results.md")) as f:
    assert (tmp_path / "results.md").read_text() == f.read()
  with open(os.path.join(d, "results.json")) as f:
    assert results["mechanism"] == json.load(f)["mechanism"]
