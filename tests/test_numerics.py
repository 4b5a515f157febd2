"""Numerics: non-finite values stay in their fiber, extreme smoothing stays
finite, float16 near its maximum, bit-identical repeated calls."""

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from _bounds import elementwise_bound
from _bounds import overflow_threshold
from _reference import apply_deflated
import optax_cdg

METRICS = ("sobolev", "sobolev_mean", "reweighted", "l2")
BOUNDARIES = ("periodic", "neumann")
# direction -> (kernel shape, axes of one fiber); the spatial fibers are
# blocks over both spatial axes.
DIRECTIONS = {"output": ((3, 3, 4, 64), (3,)), "input": ((3, 3, 7, 5), (2,)),
              "spatial": ((5, 4, 4, 6), (0, 1))}


def _random(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _fiber_mask(shape, axes, index):
  """True on the fiber (block, for several axes) through `index`."""
  mask = np.zeros(shape, bool)
  mask[tuple(slice(None) if i in axes else j for i, j in enumerate(index))] = (
      True)
  return mask


def _lam(metric):
  return {"reweighted": 3.0, "l2": 1.0}.get(metric, 0.01)


class NonFiniteTest(parameterized.TestCase):
  """A NaN or Inf in one fiber reaches no other fiber and no other leaf."""

  def _check(self, tx, direction):
    shape, axes = DIRECTIONS[direction]
    clean = {"a": {"kernel": _random(shape, 1)},
             "b": {"kernel": _random((3, 3, 6, 16), 2),
                   "bias": _random((16,), 3)}}
    index = (1, 2, 3, 4) if direction != "input" else (1, 2, 3, 2)
    update = jax.jit(tx.update)
    state = tx.init(clean)
    want, _ = update(clean, state)
    mask = _fiber_mask(shape, axes, index)
    for bad in (np.nan, np.inf, -np.inf):
      poisoned = jax.tree.map(np.copy, clean)
      poisoned["a"]["kernel"][index] = bad
      got, _ = update(poisoned, state)
      a, a_clean = np.asarray(got["a"]["kernel"]), np.asarray(
          want["a"]["kernel"])
      assert not np.isfinite(a[index])
      np.testing.assert_array_equal(a[~mask], a_clean[~mask])
      chex.assert_trees_all_equal(got["b"], want["b"])

  # "l2" is the identity: nothing to mix.
  @parameterized.product(metric=METRICS[:3], boundary=BOUNDARIES,
                         direction=tuple(DIRECTIONS))
  def test_stays_in_its_fiber(self, metric, boundary, direction):
    self._check(optax_cdg.channel_directed(
        _lam(metric), metric=metric, direction=direction, boundary=boundary),
                direction)

  @parameterized.product(metric=METRICS[:3],
                         smoothing=("schedule", "injected"))
  def test_traced_smoothing_too(self, metric, smoothing):
    kw = dict(metric=metric, boundary="neumann", direction="output")
    if smoothing == "injected":
      tx = optax.inject_hyperparams(
          optax_cdg.channel_directed,
          static_args=("metric", "direction", "boundary"))(_lam(metric), **kw)
    else:
      tx = optax_cdg.channel_directed(optax.constant_schedule(_lam(metric)),
                                      **kw)
    self._check(tx, "output")

  @parameterized.product(
      metric=METRICS[:3],
      boundary_shape_axes=(("periodic", (6, 5, 4, 3), (0, 2)),
                           ("neumann", (6, 5, 4, 3), (0, 2)),
                           ("periodic", (6, 5, 4, 3), (1, 2, 3)),
                           ("neumann", (2, 600), (1,))))
  def test_metric_gradient_several_axes(self, metric, boundary_shape_axes):
    boundary, shape, axes = boundary_shape_axes
    x = _random(shape, 4)
    index = tuple(min(i, n - 1) for i, n in zip((1, 2, 3, 0), shape,
                                                strict=False))
    y = x.copy()
    y[index] = np.nan
    op = jax.jit(lambda g: optax_cdg.metric_gradient(
        g, _lam(metric), metric=metric, axes=axes, boundary=boundary,
        scale="unit"))
    out, ref = np.asarray(op(y)), np.asarray(op(x))
    mask = _fiber_mask(shape, axes, index)
    assert np.isnan(out[index])
    np.testing.assert_array_equal(out[~mask], ref[~mask])


class ExtremeSmoothingTest(parameterized.TestCase):

  def _check_extreme(self, metric, boundary, scale, traced):
    x = _random((3, 2, 251), 5)  # a prime length: Bluestein's FFT
    def f(g, s):
      return optax_cdg.metric_gradient(
          g, s, metric=metric, boundary=boundary, scale=scale)
    if traced:
      f = jax.jit(f)
    for lam in 10.0 ** np.arange(-9, 13, 3):
      out = np.asarray(f(jnp.asarray(x), lam), np.float64)
      assert np.all(np.isfinite(out)), lam
      lam_used = float(np.float32(lam)) if traced else lam
      ref = apply_deflated(x, (-1,), (251,), lam_used, metric, boundary, scale)
      bound = elementwise_bound(x, ref, (-1,), (251,), lam_used, metric,
                                boundary, scale, np.float32)
      assert np.all(np.abs(out - ref) <= bound), lam

  @parameterized.product(metric=("sobolev", "sobolev_mean", "reweighted"),
                         boundary=BOUNDARIES, scale=("unit", "grid"))
  def test_finite_and_accurate_from_1e_minus_9_to_1e12(self, metric, boundary,
                                                        scale):
    self._check_extreme(metric, boundary, scale, traced=False)

  @parameterized.parameters("sobolev", "sobolev_mean", "reweighted")
  def test_traced_from_1e_minus_9_to_1e12(self, metric):
    self._check_extreme(metric, "neumann", "grid", traced=True)

  @parameterized.product(metric=("sobolev", "sobolev_mean", "reweighted"),
                         boundary=BOUNDARIES, scale=("unit", "grid"))
  def test_infinite_smoothing_tends_to_the_channel_mean(self, metric, boundary,
                                                         scale):
    """Every non-constant frequency is damped by at least lam mu_1."""
    x = _random((4, 3, 64), 6) + 2.0
    mean = np.mean(x, -1, keepdims=True, dtype=np.float64)
    for lam in (1e6, 1e9, 1e12):
      out = np.asarray(optax_cdg.metric_gradient(
          jnp.asarray(x), lam, metric=metric, boundary=boundary, scale=scale),
                       np.float64)
      gain = optax_cdg.spectral_gain(64, lam, metric=metric, boundary=boundary,
                                     scale=scale)
      # |out - mean| <= (largest gain off the mean) ||x - mean|| + rounding.
      dev = np.linalg.norm(x - mean, axis=-1, keepdims=True)
      tol = gain[1:].max() * dev + 1e-6 * np.abs(x).max()
      assert np.all(np.abs(out - mean) <= tol), lam

  def test_zero_smoothing_sobolev_is_the_identity(self):
    x = _random((3, 600), 7)
    for boundary in BOUNDARIES:
      out = optax_cdg.metric_gradient(jnp.asarray(x), 0.0, boundary=boundary,
                                      scale="unit")
      np.testing.assert_allclose(out, x, rtol=0, atol=2e-6 * np.abs(x).max())


class HalfPrecisionRangeTest(parameterized.TestCase):
  """float16 near its maximum (65504) is computed in float32, not overflowed."""

  @parameterized.product(metric=METRICS[:3], boundary=BOUNDARIES, n=(7, 600))
  def test_near_the_top_of_float16(self, metric, boundary, n):
    rng = np.random.default_rng(n)
    x16 = jnp.asarray(rng.uniform(-6.5e4, 6.5e4, (3, n)), jnp.float16)
    x16 = x16.at[0].set(jnp.float16(65504.0))  # a constant maximal fiber
    # "sobolev_mean" at 1e-3 and "reweighted" at 0.9 amplify: some of their
    # exact results exceed 65504.
    lam = {"sobolev_mean": 1e-3, "reweighted": 0.9, "l2": 1.0}.get(metric,
                                                                   0.01)
    out = jax.jit(lambda g: optax_cdg.metric_gradient(
        g, lam, metric=metric, boundary=boundary, scale="unit"))(x16)
    assert out.dtype == jnp.float16
    x = np.asarray(x16, np.float64)
    ref = apply_deflated(x, (-1,), (n,), lam, metric, boundary)
    bound = elementwise_bound(x, ref, (-1,), (n,), lam, metric, boundary,
                              "unit", jnp.float16)
    out = np.asarray(out, np.float64)
    before_cast = elementwise_bound(x, ref, (-1,), (n,), lam, metric,
                                    boundary, "unit", jnp.float16, cast=False)
    representable = np.abs(ref) + before_cast < overflow_threshold(jnp.float16)
    # "sobolev" averages (a non-negative kernel with rows summing to 1): its
    # exact results are always representable.
    if metric == "sobolev":
      assert representable.all()
    assert np.all(np.isfinite(out[representable]))
    assert np.all(np.abs(out - ref)[representable] <= bound[representable])
    np.testing.assert_array_equal(out[0], 65504.0)  # the mean is kept exactly
    # Where it overflows, the exact value is (about) beyond the range too.
    assert np.all(~np.isfinite(out) <= (np.abs(ref) + before_cast >= 65504.0))


class RepeatabilityTest(parameterized.TestCase):

  @parameterized.parameters(("sobolev", "periodic", "output"),
                            ("sobolev", "neumann", "spatial"),
                            ("sobolev_mean", "neumann", "output"),
                            ("reweighted", "periodic", "output"))
  def test_repeated_jitted_calls_are_bit_identical(self, metric, boundary,
                                                   direction):
    grads = {"c": {"kernel": _random((3, 3, 16, 127), 8)},
             "d": {"kernel": _random((3, 3, 8, 64), 9).astype(jnp.bfloat16)}}
    tx = optax_cdg.channel_directed(
        optax.linear_schedule(1e-3, 1e-1, 10), metric=metric,
        direction=direction, boundary=boundary)
    update = jax.jit(tx.update)
    state = tx.init(grads)
    first, _ = update(grads, state)
    def bits(t):
      return jax.tree.map(lambda a: np.asarray(a).tobytes(), t)
    for _ in range(3):
      again, _ = update(grads, state)
      assert bits(again) == bits(first)
    # A fresh trace and compilation (a new function) gives the same bits too.
    again, _ = jax.jit(lambda g, s: tx.update(g, s))(grads, state)
    assert bits(again) == bits(first)
