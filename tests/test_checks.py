"""Tests of the argument checks (optax_cdg/_checks.py), through the public
API."""

from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_cdg


class OptionHintTest(parameterized.TestCase):

  def test_direction_and_every_entry_point(self):
    for call in (lambda: optax_cdg.channel_directed(direction="Output"),
                 lambda: optax_cdg.channel_directed(metric="Sobolev"),
                 lambda: optax_cdg.spectral_gain(8, 0.1, metric="H1",
                                                 scale="unit"),
                 lambda: optax_cdg.channel_spectrum({}, boundary="Periodic")):
      with pytest.raises(ValueError, match="is not supported; expected one "
                         "of '[a-z_]+', "):
        call()

  @parameterized.parameters("qr", "xyz", None, 3)
  def test_no_hint_when_nothing_is_close(self, value):
    with pytest.raises(ValueError) as info:
      optax_cdg.metric_gradient(jnp.ones((2, 8)), 0.1, method=value,
                                scale="unit")
    assert "Did you mean" not in str(info.value)
    assert f"method={value!r} is not supported" in str(info.value)


class SmoothingTypeTest(parameterized.TestCase):

  def test_a_schedule_is_offered_only_where_it_is_taken(self):
    schedule = optax.constant_schedule(0.1)
    for call, name in (
        (lambda: optax_cdg.metric_gradient(jnp.ones((2, 8)), schedule),
         "smoothing"),
        (lambda: optax_cdg.spectral_gain(8, schedule), "smoothing"),
        (lambda: optax_cdg.laplacian_smoothing(schedule), "sigma")):
      with pytest.raises(TypeError, match=f"^{name} must be a real number; "
                         "got the callable constant_schedule"):
        call()
    with pytest.raises(TypeError, match="^smoothing must be a real number or "
                       "a schedule; got the str '0.1'.$"):
      optax_cdg.channel_directed("0.1")
    with pytest.raises(TypeError, match="^smoothing must be a real number or "
                       "a schedule; got the str '0.1'.$"):
      optax_cdg.cdg_sgd(0.1, smoothing="0.1")


class ComplexSmoothingTest(parameterized.TestCase):
  """optax.inject_hyperparams casts smoothing to the params' widest dtype."""

  def _params(self):
    rng = np.random.default_rng(0)
    return {"conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 4, 16)),
                                           jnp.float32)},
            "phase": jnp.ones((3,), jnp.complex64)}

  def test_inject_hyperparams_with_a_complex_leaf(self):
    params = self._params()
    tx = optax.inject_hyperparams(optax_cdg.channel_directed)(smoothing=1e-3)
    state = tx.init(params)
    # Newer optax casts to the widest dtype itself; older releases (the
    # floors) keep float32, so cast as they would to test the same input.
    state.hyperparams["smoothing"] = jnp.asarray(
        state.hyperparams["smoothing"], jnp.complex64)
    grads = jax.tree.map(jnp.ones_like, params)
    grads["conv"]["kernel"] = params["conv"]["kernel"]
    out, _ = jax.jit(tx.update)(grads, state)
    plain = optax_cdg.channel_directed(1e-3)
    ref, _ = plain.update(grads, plain.init(params))
    np.testing.assert_allclose(out["conv"]["kernel"], ref["conv"]["kernel"],
                               rtol=1e-6, atol=1e-6)
    assert out["phase"] is grads["phase"] or np.array_equal(out["phase"],
                                                            grads["phase"])

  def test_concrete_complex(self):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16)),
                    jnp.float32)
    np.testing.assert_array_equal(
        optax_cdg.metric_gradient(x, np.complex64(0.01), scale="unit"),
        optax_cdg.metric_gradient(x, np.float32(0.01), scale="unit"))
    np.testing.assert_array_equal(
        optax_cdg.metric_gradient(x, 0.01 + 0j, scale="unit"),
        optax_cdg.metric_gradient(x, 0.01, scale="unit"))
    with pytest.raises(ValueError, match="non-zero imaginary part"):
      optax_cdg.metric_gradient(x, 0.01 + 1e-3j, scale="unit")
    with pytest.raises(ValueError, match="smoothing=.* imaginary"):
      optax_cdg.channel_directed(jnp.asarray(0.1 + 0.5j))

  @parameterized.parameters("sobolev", "sobolev_mean", "reweighted")
  def test_traced_complex(self, metric):
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 16)),
                    jnp.float32)
    lam = 0.02 if metric != "reweighted" else 3.0
    f = jax.jit(lambda g, s: optax_cdg.metric_gradient(g, s, metric=metric,
                                                       scale="unit"))
    np.testing.assert_allclose(f(x, jnp.complex64(lam)),
                               f(x, jnp.float32(lam)), rtol=0, atol=0)
    # A non-zero imaginary part cannot raise under a trace: loud NaN.
    assert np.all(np.isnan(f(x, jnp.complex64(lam + 0.1j))))
