"""Equinox models: their convs selected exactly, by class, in OIHW layout."""

import os
import subprocess
import sys
import warnings

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import _extras
import _reference
from _task import toy_task
import optax_cdg

eqx = _extras.require("equinox")  # a broken equinox errors, never skips

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Custom(eqx.Module):
  """Not a conv, with a leaf that the Flax name guess would take for one."""

  kernel: jax.Array


class EqxMixed(eqx.Module):
  conv1: eqx.nn.Conv1d
  conv2: eqx.nn.Conv2d
  grouped: eqx.nn.Conv2d
  conv3: eqx.nn.Conv3d
  generic: eqx.nn.Conv
  up: eqx.nn.ConvTranspose2d
  up1: eqx.nn.ConvTranspose1d
  stack: eqx.nn.Conv2d
  linear: eqx.nn.Linear
  attn: eqx.nn.MultiheadAttention
  norm: eqx.nn.LayerNorm
  custom: Custom

  def __init__(self, *, key):
    k = iter(jax.random.split(key, 12))
    self.conv1 = eqx.nn.Conv1d(3, 8, 3, key=next(k))
    self.conv2 = eqx.nn.Conv2d(3, 12, 3, key=next(k))
    self.grouped = eqx.nn.Conv2d(8, 16, 3, groups=4, key=next(k))
    self.conv3 = eqx.nn.Conv3d(2, 6, 2, key=next(k))
    self.generic = eqx.nn.Conv(2, 4, 10, (2, 2), key=next(k))
    self.up = eqx.nn.ConvTranspose2d(4, 10, 2, key=next(k))
    self.up1 = eqx.nn.ConvTranspose1d(4, 6, 3, use_bias=False, key=next(k))
    self.stack = eqx.filter_vmap(lambda kk: eqx.nn.Conv2d(5, 5, 3, key=kk))(
        jax.random.split(next(k), 2))
    self.linear = eqx.nn.Linear(8, 4, key=next(k))
    self.attn = eqx.nn.MultiheadAttention(2, 8, key=next(k))
    self.norm = eqx.nn.LayerNorm((8,))
    self.custom = Custom(jax.random.normal(next(k), (3, 3, 4, 8)))


# Field -> (output axis, stacked axes, input axis) of every selected weight.
EQX_MIXED_CONVS = {
    "conv1": (0, 0, 1), "conv2": (0, 0, 1), "grouped": (0, 0, 1),
    "conv3": (0, 0, 1), "generic": (0, 0, 1), "up": (0, 0, 1),
    "up1": (0, 0, 1), "stack": (1, 1, 2),
}


def _fill(abstract, seed):
  """Random arrays (numpy-made: no per-shape compilation) for array leaves."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype)
      if isinstance(x, jax.ShapeDtypeStruct) else x, abstract)


def _build(factory, *args, seed=0):
  """An Equinox model built abstractly, then filled with random arrays."""
  return _fill(eqx.filter_eval_shape(factory, *args, key=jax.random.key(0)),
               seed)


def _grads(model, seed=1):
  """Random gradients shaped like the model's arrays (None elsewhere)."""
  return _fill(eqx.filter_eval_shape(lambda m: eqx.filter(m, eqx.is_array),
                                     model), seed)


def _selected_weights(spec_tree):
  """{field: spec} of the Equinox modules whose weight a spec tree selects."""
  out = {}
  for path, spec in jax.tree_util.tree_flatten_with_path(
      spec_tree, is_leaf=lambda x: isinstance(x, optax_cdg.KernelSpec))[0]:
    if spec is not None and spec is not False:
      names = tuple(getattr(p, "name", str(p)) for p in path)
      assert names[-1] == "weight", names
      out[names[0]] = spec
  return out


class SelectionTest(parameterized.TestCase):

  def test_selects_exactly_the_convs_with_their_layout(self):
    model = _build(EqxMixed)
    for tree in (model, eqx.filter(model, eqx.is_array), _grads(model)):
      got = _selected_weights(optax_cdg.conv_kernels(tree))
      self.assertEqual(got, {name: optax_cdg.KernelSpec(*spec)
                             for name, spec in EQX_MIXED_CONVS.items()})

  @parameterized.parameters("output", "input", "spatial")
  def test_update_matches_dense_reference_and_leaves_the_rest(self,
                                                              direction):
    model = _build(EqxMixed)
    grads = _grads(model)
    tx = optax_cdg.channel_directed(3e-2, direction=direction, scale="unit")
    with warnings.catch_warnings():
      warnings.simplefilter("error", optax_cdg.NoKernelsSelectedWarning)
      out, _ = jax.jit(tx.update)(grads, tx.init(grads))
    for name, (o, _, i) in EQX_MIXED_CONVS.items():
      g = getattr(grads, name).weight
      axes = {"output": (o,), "input": (i,),
              "spatial": tuple(range(i + 1, g.ndim))}[direction]
      want = _reference.apply_dense(g, axes, _reference.metric_matrix(
          [g.shape[a] for a in axes], 3e-2, "sobolev"))
      np.testing.assert_allclose(getattr(out, name).weight, want,
                                 rtol=1e-5, atol=1e-5, err_msg=name)
      if getattr(grads, name).bias is not None:
        np.testing.assert_array_equal(getattr(out, name).bias,
                                      getattr(grads, name).bias)
    # Nothing else in the model is touched (bit-identical under jit).
    for name in ("linear", "attn", "norm", "custom"):
      chex.assert_trees_all_equal(getattr(out, name), getattr(grads, name))

  def test_output_axis_changes_the_channel_mean_not(self):
    # Along OIHW's axis 0 a "sobolev" update keeps each fiber's mean.
    conv = _build(eqx.nn.Conv2d, 3, 16, 3)
    grads = _grads(conv)
    out, _ = optax_cdg.channel_directed(1e-1).update(grads,
                                                     optax.EmptyState())
    assert not np.allclose(out.weight, grads.weight)
    np.testing.assert_allclose(out.weight.mean(0), grads.weight.mean(0),
                               atol=1e-6)

  def test_channel_spectrum_reads_the_oihw_output_axis(self):
    model = _build(EqxMixed)
    out = jax.jit(optax_cdg.channel_spectrum)(eqx.filter(model, eqx.is_array))
    for name, (o, _, _) in EQX_MIXED_CONVS.items():
      w = getattr(model, name).weight
      self.assertEqual(getattr(out, name).weight.shape,
                       (w.shape[o] // 2 + 1,))
      assert getattr(out, name).bias is None
    rest = jax.tree.leaves((out.linear, out.norm, out.custom),
                           is_leaf=lambda x: x is None)
    self.assertEqual(rest, [None] * 5)  # linear w, b; norm w, b; custom

  def test_a_model_without_convs_warns(self):
    mlp = _build(eqx.nn.MLP, 4, 2, 8, 2)
    grads = _grads(mlp)
    tx = optax_cdg.channel_directed()
    with pytest.warns(optax_cdg.NoKernelsSelectedWarning,
                      match="layers/0/weight"):
      out, _ = tx.update(grads, tx.init(grads))
    chex.assert_trees_all_equal(out, grads)


class _CNN(eqx.Module):
  conv1: eqx.nn.Conv2d
  conv2: eqx.nn.Conv2d
  head: eqx.nn.Linear

  def __init__(self, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.conv1 = eqx.nn.Conv2d(1, 8, 3, padding=1, key=k1)
    self.conv2 = eqx.nn.Conv2d(8, 16, 3, stride=2, padding=1, key=k2)
    self.head = eqx.nn.Linear(16, 4, key=k3)

  def __call__(self, x):
    h = jax.nn.relu(self.conv1(x))
    h = jax.nn.relu(self.conv2(h))
    return self.head(jnp.mean(h, axis=(1, 2)))


def test_training_with_filter_value_and_grad_and_adam():
  x, y = toy_task()
  x = jnp.transpose(x, (0, 3, 1, 2))  # Equinox convs are channels-first
  model = eqx.filter_jit(_CNN)(jax.random.key(0))  # one compilation
  tx = optax.chain(optax_cdg.channel_directed(1e-2, scale="unit"),
                   optax.adam(1e-2))
  opt_state = tx.init(eqx.filter(model, eqx.is_array))

  def loss_fn(model):
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @eqx.filter_jit
  def step(model, opt_state):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
    updates, opt_state = tx.update(grads, opt_state,
                                   eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, loss, grads

  with warnings.catch_warnings():
    warnings.simplefilter("error", optax_cdg.NoKernelsSelectedWarning)
    losses = []
    for i in range(60):
      new_model, opt_state, loss, grads = step(model, opt_state)
      if i == 0:  # Adam's first step is -lr g / (|g| + eps), on A^-1 g.
        for name, axis in (("conv1", 0), ("conv2", 0), ("head", None)):
          g = getattr(grads, name).weight
          if axis is not None:
            g = optax_cdg.metric_gradient(g, 1e-2, axes=(axis,), scale="unit")
          np.testing.assert_allclose(
              getattr(new_model, name).weight - getattr(model, name).weight,
              -1e-2 * g / (jnp.abs(g) + 1e-8), atol=2e-5, err_msg=name)
      model = new_model
      losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses


def test_quickstart_equinox_runs_as_a_script():
  _extras.require("mlxtend")
  script = os.path.join(ROOT, "examples", "quickstart_equinox.py")
  env = {**os.environ, "PYTHONPATH": ROOT}
  run = subprocess.run([sys.executable, script, "--help"], capture_output=True,
                       text=True, timeout=120, check=False, env=env)
  assert run.returncode == 0, run.stderr
  assert "--smoothing" in run.stdout
  run = subprocess.run(
      [sys.executable, script, "--train-size", "64", "--epochs", "1",
       "--batch-size", "32", "--widths", "4"], capture_output=True, text=True,
      timeout=300, check=False, env=env)
  assert run.returncode == 0, run.stderr
  lines = run.stdout.splitlines()
  for name in ("adamw", "cdg_adamw"):
    assert any(line.startswith(name + " ") and "test accuracy" in line
               for line in lines), run.stdout
