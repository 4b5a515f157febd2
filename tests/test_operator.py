"""Tests of optax_cdg.metric_gradient against dense float64 solves."""

import functools

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _fresh
from _reference import apply_dense
from _reference import metric_matrix
import optax_cdg

METRICS = ("sobolev", "sobolev_mean", "reweighted", "l2")
BOUNDARIES = ("periodic", "neumann")
SIZES = (1, 2, 3, 7, 64, 127)
LAMBDA = {"sobolev": 3e-3, "sobolev_mean": 3e-3, "reweighted": 4.0, "l2": 1.0}


def _random(shape, seed=0, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _assert_matches(out, ref, rtol=2e-5):
  ref = np.asarray(ref)
  scale = max(np.abs(ref).max(), 1e-30)
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=0,
                             atol=rtol * scale)


class DenseReferenceTest(parameterized.TestCase):
  """Property 1 of docs/math.md: equals the dense float64 reference."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(
      n=SIZES, metric=METRICS, boundary=BOUNDARIES, scale=("unit", "grid"))
  def test_one_axis(self, n, metric, boundary, scale):
    lam = LAMBDA[metric] if scale == "unit" else LAMBDA[metric] * 100
    x = _random((2, 3, n), seed=n)
    f = self.variant(lambda g: optax_cdg.metric_gradient(
        g, lam, metric=metric, boundary=boundary, scale=scale))
    out = f(jnp.asarray(x))
    ref = apply_dense(x, (-1,), metric_matrix((n,), lam, metric, boundary,
                                              scale))
    _assert_matches(out, ref)

  @parameterized.product(
      shape_axes=[((5, 4, 3, 2), (0, 1)), ((3, 6, 7, 2), (0, 1, 2)),
                  ((4, 1, 3, 5), (0, 1)), ((6, 5, 4), (0, 2))],
      metric=METRICS, boundary=BOUNDARIES)
  def test_several_axes(self, shape_axes, metric, boundary):
    shape, axes = shape_axes
    lam = LAMBDA[metric]
    x = _random(shape, seed=len(axes))
    out = optax_cdg.metric_gradient(jnp.asarray(x), lam, metric=metric,
                                    axes=axes, boundary=boundary, scale="unit")
    sizes = [shape[a] for a in axes]
    ref = apply_dense(x, axes, metric_matrix(sizes, lam, metric, boundary))
    _assert_matches(out, ref)

  @parameterized.product(axis=(0, 1, -2), boundary=BOUNDARIES)
  def test_axis_other_than_last(self, axis, boundary):
    x = _random((7, 5, 3))
    out = optax_cdg.metric_gradient(jnp.asarray(x), 0.01, axes=axis,
                                    boundary=boundary, scale="unit")
    n = x.shape[axis]
    ref = apply_dense(x, (axis,), metric_matrix((n,), 0.01, "sobolev",
                                                boundary))
    _assert_matches(out, ref)

  def test_axis_order_is_irrelevant(self):
    x = jnp.asarray(_random((4, 5, 6)))
    a = optax_cdg.metric_gradient(x, 0.01, axes=(0, 1), scale="unit")
    b = optax_cdg.metric_gradient(x, 0.01, axes=(1, -3), scale="unit")
    np.testing.assert_array_equal(a, b)


class PropertiesTest(parameterized.TestCase):
  """Properties 2-5 and 7 of docs/math.md ("Properties the tests check")."""

  @parameterized.product(metric=METRICS, boundary=BOUNDARIES, n=(7, 64))
  def test_linear_self_adjoint_positive(self, metric, boundary, n):
    lam = LAMBDA[metric]
    def op(g):
      return np.asarray(optax_cdg.metric_gradient(
          jnp.asarray(g), lam, metric=metric, boundary=boundary,
          scale="unit"), np.float64)
    x, y = _random((3, n), 1), _random((3, n), 2)
    a, b = 1.7, -0.3
    lin = op(a * x + b * y)
    np.testing.assert_allclose(lin, a * op(x) + b * op(y), atol=2e-5 *
                               np.abs(lin).max())
    lhs, rhs = np.sum(op(x) * y), np.sum(x * op(y))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4)
    # Positive per fiber, also for the highest frequency alone.
    nyquist = np.cos(np.pi * np.arange(n))[None].astype(np.float32)
    for f in (x, y, nyquist):
      assert np.all(np.sum(f * op(f), axis=-1) > 0)

  @parameterized.product(metric=METRICS, boundary=BOUNDARIES,
                         lam=(1e-6, 1e-2, 10.0))
  def test_keeps_the_mean(self, metric, boundary, lam):
    x = _random((4, 33), 3) + 5.0
    out = optax_cdg.metric_gradient(jnp.asarray(x), lam, metric=metric,
                                    boundary=boundary, scale="unit")
    # Exact in exact arithmetic; in float32 the mean carries the rounding
    # error of the (possibly amplified, lam -> 0) deviations.
    tol = 1e-5 * np.abs(x).max() + 4e-7 * np.abs(np.asarray(out)).max()
    np.testing.assert_allclose(np.mean(out, -1), np.mean(x, -1), atol=tol)

  @parameterized.product(boundary=BOUNDARIES, scale=("unit", "grid"))
  def test_identity_values(self, boundary, scale):
    x = jnp.asarray(_random((3, 17)))
    for metric, lam in (("sobolev", 0.0), ("reweighted", 1.0), ("l2", 7.0)):
      out = optax_cdg.metric_gradient(x, lam, metric=metric,
                                      boundary=boundary, scale=scale)
      np.testing.assert_allclose(out, x, atol=2e-6)

  @parameterized.product(metric=METRICS, boundary=BOUNDARIES)
  def test_acts_fiber_by_fiber(self, metric, boundary):
    x = _random((5, 4, 9), 4)
    perm0, perm1 = np.random.default_rng(0).permutation(5), [3, 1, 0, 2]
    def op(g):
      return np.asarray(optax_cdg.metric_gradient(
          jnp.asarray(g), LAMBDA[metric], metric=metric, boundary=boundary,
          scale="unit"))
    np.testing.assert_allclose(op(x[perm0][:, perm1]), op(x)[perm0][:, perm1],
                               atol=1e-6)
    # A fiber's result depends on nothing but that fiber.
    y = x.copy()
    y[0, 0] = 100.0
    np.testing.assert_array_equal(op(y)[1:], op(x)[1:])

  def test_smoothing_damps_high_frequencies(self):
    n = 64
    k = np.arange(n)
    low = np.cos(2 * np.pi * k / n).astype(np.float32)
    high = np.cos(2 * np.pi * 20 * k / n).astype(np.float32)
    out_low = optax_cdg.metric_gradient(jnp.asarray(low), 1e-3, scale="unit")
    out_high = optax_cdg.metric_gradient(jnp.asarray(high), 1e-3, scale="unit")
    gain = optax_cdg.spectral_gain(n, 1e-3, scale="unit")
    np.testing.assert_allclose(out_low, gain[1] * low, atol=1e-6)
    np.testing.assert_allclose(out_high, gain[20] * high, atol=1e-6)
    assert gain[20] < gain[1] < 1.0

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(dtype=(jnp.bfloat16, jnp.float16),
                         metric=("sobolev", "reweighted"))
  def test_half_precision_is_computed_in_float32(self, dtype, metric):
    x32 = jnp.asarray(_random((3, 4, 16)))
    x = x32.astype(dtype)
    out = self.variant(lambda g: optax_cdg.metric_gradient(
        g, LAMBDA[metric], metric=metric, scale="unit"))(x)
    assert out.dtype == dtype and out.shape == x.shape
    # Exactly the float32 result of the rounded input, rounded once.
    ref = optax_cdg.metric_gradient(x.astype(jnp.float32), LAMBDA[metric],
                                    metric=metric, scale="unit").astype(dtype)
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(ref, np.float32))

  @parameterized.parameters((0,), (1,))
  def test_empty_and_single_channel(self, n):
    x = jnp.ones((3, 2, n))
    for metric in METRICS:
      out = optax_cdg.metric_gradient(x, LAMBDA[metric], metric=metric,
                                      scale="unit")
      assert out.shape == x.shape and out.dtype == x.dtype
      np.testing.assert_array_equal(out, x)

  def test_spatial_axes_with_zero_size(self):
    x = jnp.ones((0, 3, 2, 4))
    out = optax_cdg.metric_gradient(x, 0.1, axes=(0, 1), scale="unit")
    assert out.shape == x.shape


class TransformationsTest(parameterized.TestCase):

  def test_vmap_and_grad(self):
    x = jnp.asarray(_random((4, 3, 8)))
    def f(g):
      return optax_cdg.metric_gradient(g, 0.01, scale="unit")
    np.testing.assert_allclose(jax.vmap(f)(x), f(x), atol=1e-6)
    # The operator is self-adjoint: the gradient of <w, A^{-1} x> is A^{-1} w.
    w = jnp.asarray(_random((4, 3, 8), 9))
    g = jax.grad(lambda z: jnp.sum(w * f(z)))(x)
    np.testing.assert_allclose(g, f(w), atol=1e-5)

  def test_traced_smoothing(self):
    x = jnp.asarray(_random((2, 16)))
    for metric in ("sobolev", "sobolev_mean", "reweighted"):
      f = jax.jit(functools.partial(optax_cdg.metric_gradient, metric=metric,
                                    scale="unit"))
      np.testing.assert_allclose(
          f(x, jnp.asarray(0.02, jnp.bfloat16)),
          optax_cdg.metric_gradient(x, float(jnp.bfloat16(0.02)),
                                    metric=metric, scale="unit"),
          rtol=1e-5, atol=1e-6)

  @parameterized.product(metric=("sobolev", "sobolev_mean", "reweighted"),
                         lam=(-1.0, np.nan, np.inf))
  def test_rejected_traced_smoothing_is_loud(self, metric, lam):
    x = jnp.asarray(_random((2, 16)))
    f = jax.jit(lambda g, s: optax_cdg.metric_gradient(g, s, metric=metric,
                                                       scale="unit"))
    assert np.all(np.isnan(f(x, lam)))
    if metric != "sobolev":
      assert np.all(np.isnan(f(x, 0.0)))

  def test_float64(self):
    with jax.enable_x64(True):
      x = jnp.asarray(_random((2, 31), dtype=np.float64))
      out = optax_cdg.metric_gradient(x, 0.01, boundary="neumann", scale="unit")
      assert out.dtype == jnp.float64
      ref = apply_dense(x, (-1,), metric_matrix((31,), 0.01, "sobolev",
                                                "neumann"))
      np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)


class BadInputTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("metric", dict(metric="h1"), ValueError, "metric='h1'"),
      ("boundary", dict(boundary="dirichlet"), ValueError, "boundary="),
      ("scale", dict(scale="pixel"), ValueError, "scale='pixel'"),
      ("axes_range", dict(axes=(3,)), ValueError, "out of range"),
      ("axes_repeat", dict(axes=(1, -2)), ValueError, "same axis twice"),
      ("axes_empty", dict(axes=()), ValueError, "at least one axis"),
      ("axes_type", dict(axes=(0.5,)), TypeError, "sequence of ints"),
      ("negative", dict(smoothing=-1.0), ValueError, "smoothing=-1.0"),
      ("nan", dict(smoothing=float("nan")), ValueError, "finite"),
      ("zero_mean", dict(smoothing=0.0, metric="sobolev_mean"), ValueError,
       "> 0"),
      ("zero_rew", dict(smoothing=0.0, metric="reweighted"), ValueError,
       "> 0"),
      ("string", dict(smoothing="0.1"), TypeError, "real number"),
      ("vector", dict(smoothing=np.ones(2)), TypeError, "real number"),
  )
  def test_bad_argument(self, kwargs, error, message):
    kwargs = dict(kwargs)
    smoothing = kwargs.pop("smoothing", 0.1)
    with pytest.raises(error, match=message):
      optax_cdg.metric_gradient(jnp.ones((2, 3, 4)), smoothing, **kwargs)

  @parameterized.parameters(jnp.int32, jnp.bool_, jnp.complex64)
  def test_non_float_grad(self, dtype):
    with pytest.raises(TypeError, match="real floating-point"):
      optax_cdg.metric_gradient(jnp.ones((2, 4), dtype), 0.1, scale="unit")


class MethodTest(parameterized.TestCase):
  """Every `method=` against the dense reference; traced equals concrete."""

  @parameterized.product(
      method=("auto", "fft"),
      metric=("sobolev", "sobolev_mean", "reweighted"), boundary=BOUNDARIES,
      n=(32, 48))
  def test_one_axis(self, method, metric, boundary, n):
    lam = LAMBDA[metric]
    x = _random((3, n), seed=n)
    out = jax.jit(lambda g: optax_cdg.metric_gradient(
        g, lam, metric=metric, boundary=boundary, scale="unit",
        method=method))(x)
    ref = apply_dense(x, (-1,), metric_matrix((n,), lam, metric, boundary))
    _assert_matches(out, ref)

  @parameterized.product(metric=("sobolev", "sobolev_mean", "reweighted"),
                         boundary=BOUNDARIES, n=(7, 64, 300))
  def test_traced_smoothing_equals_concrete(self, metric, boundary, n):
    # One path for both: the gains are computed on the device from the same
    # smoothing, so a number and a traced scalar give the same bits.
    x = jnp.asarray(_random((5, n), seed=n))
    lam = LAMBDA[metric] * 100
    kw = dict(metric=metric, boundary=boundary, scale="unit")
    traced = jax.jit(lambda g, s: optax_cdg.metric_gradient(g, s, **kw))(x, lam)
    number = jax.jit(lambda g: optax_cdg.metric_gradient(g, lam, **kw))(x)
    eager = optax_cdg.metric_gradient(x, lam, **kw)
    np.testing.assert_array_equal(number, traced)
    np.testing.assert_array_equal(eager, traced)
    _assert_matches(traced, apply_dense(np.asarray(x), (-1,), metric_matrix(
        (n,), lam, metric, boundary)))

  def test_closed_form(self):
    x = _random((3, 10))
    out = optax_cdg.metric_gradient(jnp.asarray(x), 4.0, metric="reweighted",
                                    method="closed", scale="unit")
    ref = apply_dense(x, (-1,), metric_matrix((10,), 4.0, "reweighted"))
    _assert_matches(out, ref)

  @parameterized.named_parameters(
      ("unknown", dict(method="qr"), "method='qr' is not supported"),
      ("type", dict(method=None), "method=None is not supported"),
      ("closed_sobolev", dict(method="closed"),
       "method='closed' is not available for metric='sobolev'"),
  )
  def test_bad_method(self, kwargs, message):
    with pytest.raises(ValueError, match=message):
      optax_cdg.metric_gradient(jnp.ones((2, 3, 16)), 0.1, **kwargs)


class LayoutTest(parameterized.TestCase):
  """The FFT reads a CPU convolution's kernel gradient where it lies."""

  def test_no_transposing_copy_before_the_fft(self):
    if jax.default_backend() != "cpu":
      pytest.skip("the layout XLA gives a kernel gradient is the CPU's here")
    import re  # pylint: disable=g-import-not-at-top

    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    model = nn.Sequential([nn.Conv(8, (3, 3)), nn.relu, nn.Conv(16, (3, 3))])
    x = jnp.ones((4, 8, 8, 3))
    params = model.init(jax.random.key(0), x)["params"]
    tx = optax_cdg.channel_directed()

    def step(params):
      grads = jax.grad(lambda p: model.apply({"params": p}, x).sum())(params)
      out, _ = tx.update(grads, tx.init(params))
      # The control: an FFT on the logical layout of one kernel gradient.
      plain = jnp.fft.rfft(grads["layers_2"]["kernel"], axis=-1)
      return out, plain

    hlo = jax.jit(step).lower(params).compile().as_text()
    defs = dict(re.findall(r"^\s*(%[\w.-]+) = (.*)$", hlo, re.M))
    operands = re.findall(r"fft\((%[\w.-]+)\), fft_type=RFFT", hlo)
    copies = [op for op in operands
              if re.search(r"transpose|copy", op + defs[op].split("(")[0])]
    # XLA writes the gradient of (3, 3, in, out) as (in, 3, 3, out): the
    # control's FFT needs a transposing copy, CDG's two FFTs none.
    assert len(operands) == 3, operands
    assert len(copies) == 1, [defs[op][:120] for op in operands]


class BoundedCostTest(parameterized.TestCase):
  """Memory linear in the array at every size."""

  @pytest.mark.slow
  def test_one_axis_of_2_20_values_in_bounded_memory(self):
    out = _fresh.run("""
import numpy as np, jax, jax.numpy as jnp, optax_cdg
n = 2 ** 20
x = jax.block_until_ready(jax.random.normal(jax.random.key(0), (2, n)))
before = peak_mib()
f = jax.jit(lambda g: optax_cdg.metric_gradient(g, 1e-3, scale="unit"))
y = np.asarray(jax.block_until_ready(f(x)), np.float64)
grown = peak_mib() - before
fft = optax_cdg.metric_gradient(x, 1e-3, scale="unit", method="fft")
xs = np.asarray(x, np.float64)
ref = np.fft.irfft(np.fft.rfft(xs) * optax_cdg.spectral_gain(n, 1e-3,
                                                             scale="unit"), n=n)
scale = np.abs(ref).max()
report(grown=grown, vs_fft=float(np.abs(y - np.asarray(fft)).max() / scale),
       vs_ref=float(np.abs(y - ref).max() / scale))
""")
    # x is 8 MiB; the growth is the FFT's few arrays (measured ~40 MiB for
    # one fiber).
    assert out["grown"] < 256, out
    assert out["vs_fft"] <= 1e-6 and out["vs_ref"] <= 2e-6, out


# Widths where the default's stencil is the whole period (1 to 15), where it
# first is not (16, 17), and up to ResNet-50's 2,048 and beyond. Every width
# from 1 to 4,096 is checked in float64 below.
STENCIL_WIDTHS = (1, 2, 3, 5, 8, 15, 16, 17, 64, 127, 513, 2048, 4096)
# (scale, smoothing): the default; a wider stencil (Neumann: the FFT beyond
# width 16); "unit" at a small value (the FFT from width 127, where it would
# take more than 33 taps).
STENCIL_SMOOTHINGS = (("grid", 0.1), ("grid", 1.0), ("unit", 1e-4))


def _stencil_reference(x, lam, boundary, scale):
  """float64 `A^{-1} x` along the last axis, by FFT (no dense matrix: up to
  4,096 wide)."""
  n = x.shape[-1]
  c = float(n) ** 2 if scale == "unit" else 1.0
  x = np.asarray(x, np.float64)
  ext = x if boundary == "periodic" else np.concatenate([x, x[..., ::-1]], -1)
  p = ext.shape[-1]
  mu = c * 4 * np.sin(np.pi * np.arange(p // 2 + 1) / p) ** 2
  return np.fft.irfft(np.fft.rfft(ext) / (1 + lam * mu), p)[..., :n]


class StencilTest(parameterized.TestCase):
  """method="stencil": a short circular stencil where "sobolev"'s inverse
  decays within 33 taps, the FFT elsewhere; exact to float32 rounding."""

  @parameterized.product(n=STENCIL_WIDTHS, boundary=BOUNDARIES,
                         scale_lam=STENCIL_SMOOTHINGS)
  def test_matches_the_float64_inverse(self, n, boundary, scale_lam):
    scale, lam = scale_lam
    x = _random((2, 3, n), seed=n)
    out = optax_cdg.metric_gradient(jnp.asarray(x), lam, boundary=boundary,
                                    scale=scale, method="stencil")
    _assert_matches(out, _stencil_reference(x, lam, boundary, scale),
                    rtol=1e-6)

  @parameterized.product(boundary=BOUNDARIES, n=(16, 64, 300))
  def test_the_default_is_15_taps_with_no_fft(self, boundary, n):
    from optax_cdg import _operator  # pylint: disable=g-import-not-at-top
    assert _operator.stencil_extent(n, 0.1, boundary, "grid") == (7, 7)
    x = jnp.asarray(_random((3, 3, 8, n)))
    hlo = jax.jit(lambda g: optax_cdg.metric_gradient(
        g, boundary=boundary, method="stencil")).lower(x).as_text()
    assert "fft" not in hlo.lower()
    assert "fft" in jax.jit(lambda g: optax_cdg.metric_gradient(
        g, boundary=boundary)).lower(x).as_text().lower()

  @parameterized.parameters(*BOUNDARIES)
  def test_traced_number_and_fft_agree_to_rounding(self, boundary):
    # A traced smoothing takes the FFT: it agrees with the stencil of the
    # same number to float32 rounding of the largest element, as
    # optax.inject_hyperparams needs.
    x = jnp.asarray(_random((4, 4, 96), seed=5) * 3.0)
    kw = dict(boundary=boundary, method="stencil")
    number = jax.jit(lambda g: optax_cdg.metric_gradient(g, 0.1, **kw))(x)
    traced = jax.jit(lambda g, s: optax_cdg.metric_gradient(g, s, **kw))(
        x, 0.1)
    fft = optax_cdg.metric_gradient(x, 0.1, boundary=boundary, method="fft")
    np.testing.assert_array_equal(traced, fft)
    scale = float(jnp.abs(fft).max())
    np.testing.assert_allclose(number, fft, rtol=0,
                               atol=8 * np.finfo(np.float32).eps * scale)

  def test_falls_back_where_no_stencil_applies(self):
    x = jnp.asarray(_random((6, 5, 40)))
    for kw in (dict(axes=(0, 2)), dict(scale="unit", smoothing=1e-2),
               dict(smoothing=30.0)):
      kw = dict(dict(smoothing=0.1), **kw)
      lam = kw.pop("smoothing")
      np.testing.assert_array_equal(
          optax_cdg.metric_gradient(x, lam, method="stencil", **kw),
          optax_cdg.metric_gradient(x, lam, method="fft", **kw))
    x64 = np.asarray(x, np.float64)
    with jax.enable_x64(True):
      out = optax_cdg.metric_gradient(jnp.asarray(x64), 0.1, method="stencil")
      assert out.dtype == jnp.float64
      _assert_matches(out, _stencil_reference(x64, 0.1, "periodic", "grid"),
                      rtol=1e-13)

  @parameterized.parameters(*BOUNDARIES)
  def test_linear_self_adjoint_and_transformable(self, boundary):
    x, w = _random((3, 5, 24), 1), _random((3, 5, 24), 2)
    def op(g):
      return optax_cdg.metric_gradient(g, 0.1, boundary=boundary,
                                       method="stencil")
    # Self-adjoint: the gradient of <w, op(x)> in x is op(w).
    grad = jax.grad(lambda g: jnp.sum(jnp.asarray(w) * op(g)))(
        jnp.asarray(x))
    np.testing.assert_allclose(grad, op(jnp.asarray(w)), atol=1e-6)
    batched = jax.vmap(op)(jnp.asarray(x))
    np.testing.assert_allclose(batched, op(jnp.asarray(x)), atol=1e-6)
    for dtype in (jnp.bfloat16, jnp.float16):
      half = op(jnp.asarray(x, dtype))
      assert half.dtype == dtype
      np.testing.assert_allclose(np.asarray(half, np.float32),
                                 op(jnp.asarray(x, dtype).astype(jnp.float32)
                                    ).astype(dtype).astype(jnp.float32))

  def test_only_sobolev_has_one(self):
    for metric in ("sobolev_mean", "reweighted"):
      with pytest.raises(ValueError, match=f"method='stencil' is not "
                         f"available for metric='{metric}'"):
        optax_cdg.metric_gradient(jnp.ones((2, 8)), 1.5, metric=metric,
                                  method="stencil")
    x = jnp.asarray(_random((2, 8)))
    np.testing.assert_array_equal(
        optax_cdg.metric_gradient(x, 1.0, metric="l2", method="stencil"), x)

  @parameterized.product(boundary=BOUNDARIES, scale_lam=STENCIL_SMOOTHINGS)
  def test_every_width_to_4096_in_float64(self, boundary, scale_lam):
    # The stencil's extent at every width, checked in float64 numpy: its
    # taps (the generator, from the gains) on the padded fiber against
    # the spectral solve. What it drops is at most 2^-26 of the largest
    # input value; the float32 evaluation is the same sum, tested above at
    # sampled widths.
    from optax_cdg import _operator  # pylint: disable=g-import-not-at-top
    scale, lam = scale_lam
    rng = np.random.default_rng(0)
    for n in range(1, 4097):
      extent = _operator.stencil_extent(n, lam, boundary, scale)
      if extent is None:
        continue
      lo, hi = extent
      x = rng.standard_normal((2, n))
      ref = _stencil_reference(x, lam, boundary, scale)
      period = n if boundary == "periodic" else 2 * n
      c = float(n) ** 2 if scale == "unit" else 1.0
      mu = c * 4 * np.sin(np.pi * np.arange(period // 2 + 1) / period) ** 2
      g = np.fft.irfft(1 / (1 + lam * mu), period)
      mode = "wrap" if boundary == "periodic" else "symmetric"
      padded = np.pad(x, [(0, 0), (hi, lo)], mode=mode)
      out = sum(g[k % period] * padded[:, hi - k:hi - k + n]
                for k in range(-lo, hi + 1))
      err = np.abs(out - ref).max()
      assert err <= 2.0**-26 * np.abs(x).max() + 1e-13, (n, extent, err)
