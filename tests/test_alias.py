"""Tests of the optimizer aliases and of where CDG sits in a chain."""

import inspect
import typing

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_cdg
from optax_cdg import _checks


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {"conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 4, 16)),
                                         jnp.float32),
                   "bias": jnp.asarray(rng.standard_normal(16), jnp.float32)},
          "dense": {"kernel": jnp.asarray(rng.standard_normal((16, 3)),
                                          jnp.float32)}}


def _run(tx, steps=3):
  """The updates of `steps` steps on fixed params and varying gradients."""
  params = _tree(0)
  state = tx.init(params)
  out = []
  for t in range(steps):
    updates, state = tx.update(_tree(t + 1), state, params)
    out.append(updates)
  return out


WARMUP = optax.warmup_cosine_decay_schedule(0.0, 0.1, 2, 10)


class AliasTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("sgd", lambda: optax_cdg.cdg_sgd(0.1, smoothing=1e-2),
       lambda: optax.sgd(0.1)),
      ("sgd_momentum_decay_warmup",
       lambda: optax_cdg.cdg_sgd(WARMUP, 0.9, True, 5e-4, 1e-2),
       lambda: optax.chain(optax.add_decayed_weights(5e-4),
                           optax.sgd(WARMUP, 0.9, True))),
      ("adamw", lambda: optax_cdg.cdg_adamw(1e-3, smoothing=1e-2,
                                            weight_decay=1e-2),
       lambda: optax.adamw(1e-3, weight_decay=1e-2)),
      ("generic", lambda: optax_cdg.with_channel_directed(
          optax.lion(1e-4), smoothing=1e-2), lambda: optax.lion(1e-4)),
  )
  def test_equals_the_hand_written_chain(self, alias, optimizer):
    want = _run(optax.chain(optax_cdg.channel_directed(1e-2), optimizer()))
    chex.assert_trees_all_equal(_run(alias()), want)

  def test_cdg_options_are_forwarded(self):
    kwargs = dict(metric="reweighted", direction="input", boundary="neumann",
                  scale="grid", method="fft",
                  kernels={"conv": {"kernel": True, "bias": False},
                           "dense": False})
    want = _run(optax.chain(optax_cdg.channel_directed(2.0, **kwargs),
                            optax.sgd(0.1)))
    chex.assert_trees_all_equal(
        _run(optax_cdg.cdg_sgd(0.1, smoothing=2.0, **kwargs)), want)
    with pytest.raises(ValueError, match="metric='h1'"):
      optax_cdg.cdg_adamw(1e-3, metric="h1")
    with pytest.raises(TypeError, match="optimizer=.*called, not the function"):
      optax_cdg.with_channel_directed(optax.adam)

  @parameterized.parameters(optax_cdg.cdg_sgd, optax_cdg.cdg_adamw)
  def test_learning_rate_and_smoothing_injected(self, alias):
    params, grads = _tree(0), _tree(1)
    tx = optax.inject_hyperparams(alias)(learning_rate=0.1, smoothing=1e-2)
    state = tx.init(params)
    assert {"learning_rate", "smoothing"} <= set(state.hyperparams)
    update = jax.jit(tx.update)
    state.hyperparams["learning_rate"] = jnp.asarray(0.05)
    state.hyperparams["smoothing"] = jnp.asarray(0.5)
    out, _ = update(grads, state, params)
    want, _ = alias(0.05, smoothing=0.5).update(
        grads, alias(0.05, smoothing=0.5).init(params), params)
    # Adam's b2 = 0.999 injected as float32: 1 - b2 is off by 4e-5.
    chex.assert_trees_all_close(out, want, rtol=1e-4, atol=1e-7)
    # Smoothing really acts: a different value, a different update.
    assert not np.allclose(out["conv"]["kernel"], alias(0.05, smoothing=0.0)
                           .update(grads, alias(0.05).init(params),
                                   params)[0]["conv"]["kernel"])

  def test_smoothing_schedule_counts_its_own_steps(self):
    schedule = optax.linear_schedule(0.0, 0.1, 4)
    got = _run(optax_cdg.cdg_sgd(WARMUP, smoothing=schedule))
    for t, updates in enumerate(got):
      manual, _ = optax_cdg.channel_directed(float(schedule(t))).update(
          _tree(t + 1), optax.EmptyState())
      chex.assert_trees_all_close(
          updates, jax.tree.map(lambda g, t=t: -WARMUP(t) * g, manual),
          rtol=1e-6, atol=1e-8)


class PlacementTest(parameterized.TestCase):
  """CDG first: on the loss gradient, before clipping and any weight decay."""

  def test_weight_decay_is_never_smoothed(self):
    params = _tree(0)  # kernels that vary across output channels
    zeros = jax.tree.map(jnp.zeros_like, params)
    for tx in (optax_cdg.cdg_sgd(0.1, 0.9, weight_decay=1e-2,
                                 smoothing=1.0),
               optax_cdg.cdg_adamw(0.1, weight_decay=1e-2, smoothing=1.0)):
      updates, _ = tx.update(zeros, tx.init(params), params)
      chex.assert_trees_all_close(
          updates, jax.tree.map(lambda p: -0.1 * 1e-2 * p, params),
          rtol=1e-6)

  def test_clipping_after_cdg_bounds_what_the_optimizer_gets(self):
    # "reweighted" with smoothing < 1 multiplies non-mean parts by 1/lam.
    kernel = _tree(1)["conv"]["kernel"]
    grads = {"conv": {"kernel": 0.9 * kernel / jnp.linalg.norm(kernel)}}
    cdg = dict(smoothing=0.25, metric="reweighted")
    tx = optax_cdg.with_channel_directed(
        optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)), **cdg)
    updates, _ = tx.update(grads, tx.init(grads))
    norm = float(optax.tree.norm(updates))
    assert 0.999 < norm <= 1.0 + 1e-6, norm  # the clip was needed, and held
    # The other order lets the metric enlarge a clipped gradient.
    other = optax.chain(optax.clip_by_global_norm(1.0),
                        optax_cdg.channel_directed(**cdg), optax.sgd(1.0))
    updates, _ = other.update(grads, other.init(grads))
    assert float(optax.tree.norm(updates)) > 3.0

  def test_warmup_scales_the_channel_directed_gradient(self):
    got = _run(optax_cdg.cdg_sgd(WARMUP, smoothing=1e-2))
    for t, updates in enumerate(got):
      manual, _ = optax_cdg.channel_directed(1e-2).update(_tree(t + 1),
                                                          optax.EmptyState())
      chex.assert_trees_all_close(
          updates, jax.tree.map(lambda g, t=t: -WARMUP(t) * g, manual),
          rtol=1e-6, atol=1e-8)
    chex.assert_trees_all_equal(got[0], jax.tree.map(jnp.zeros_like,
                                                     got[0]))


class TypesTest(parameterized.TestCase):

  @parameterized.parameters(optax_cdg.channel_directed, optax_cdg.cdg_sgd,
                            optax_cdg.cdg_adamw,
                            optax_cdg.with_channel_directed)
  def test_signatures(self, fn):
    hints = typing.get_type_hints(fn)
    self.assertEqual(hints["smoothing"], optax.ScalarOrSchedule)
    self.assertEqual(hints["metric"], _checks.Metric)
    self.assertEqual(hints["direction"], _checks.Direction)
    params = inspect.signature(fn).parameters
    self.assertEqual(params["smoothing"].default,
                     optax_cdg.DEFAULT_SMOOTHING)
    self.assertEqual(params["scale"].default, optax_cdg.DEFAULT_SCALE)
