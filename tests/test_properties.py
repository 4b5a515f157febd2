"""Property-based tests (hypothesis) against dense float64 solves.

Random shapes (axis lengths 0 .. 600, odd, even and prime), random axes (one or
several, in any order and sign), every metric, boundary and scale, smoothing
from 1e-9 to 1e12, inputs in float16, bfloat16, float32 and (with x64 enabled)
float64, concrete or traced smoothing. Tolerances are derived in `_bounds.py`.

The default profile runs a bounded, derandomised number of examples; the
`slow` tests rerun the same properties with many more random examples.
"""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _bounds import elementwise_bound
from _bounds import fiber_bound
from _bounds import fibers
from _bounds import output_rounding
from _bounds import overflow_threshold
from _reference import apply_deflated
from _reference import apply_dense
from _reference import deviation_matrix
from _reference import metric_matrix
import optax_cdg

METRICS = ("sobolev", "sobolev_mean", "reweighted", "l2")
HALF = (jnp.float16, jnp.bfloat16)

FAST = hypothesis.settings(
    max_examples=25, deadline=None, derandomize=True, database=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
MANY = hypothesis.settings(
    max_examples=400, deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])


def _bounded_memory(check, every=50):
  """`check`, dropping JAX's compilation caches every `every` examples.

  Every new shape compiles new executables (an eager DCT-II costs about 50 MB
  of them); hundreds of random shapes would otherwise exhaust the memory.
  """
  calls = []

  def run(c):
    calls.append(None)
    if len(calls) % every == 0:
      jax.clear_caches()
    check(c)

  return run


# Lengths that exercise every FFT code path: tiny, powers of two, even
# composites, primes (Bluestein) up to the largest 600.
LENGTHS = st.one_of(
    st.integers(0, 9),
    st.sampled_from([16, 64, 97, 127, 128, 210, 251, 256, 509, 512, 599, 600]),
    st.integers(0, 600),
)


@st.composite
def smoothing(draw, metric):
  if metric == "sobolev" and draw(st.integers(0, 9)) == 0:
    return 0.0
  if metric == "reweighted" and draw(st.integers(0, 9)) == 0:
    return 1.0
  return 10.0 ** draw(st.floats(-9.0, 12.0))


@st.composite
def case(draw, dtypes):
  """Shape, axes, arguments and input of one metric_gradient call."""
  n_axes = draw(st.sampled_from([1, 1, 1, 2, 3]))
  if n_axes == 1:
    sizes = [draw(LENGTHS)]
  elif n_axes == 2:
    a = draw(st.integers(0, 30))
    sizes = [a, draw(st.integers(0, min(30, 600 // max(a, 1))))]
  else:
    sizes = [draw(st.integers(0, 8)) for _ in range(3)]
  other = draw(st.lists(st.integers(0, 3), max_size=3 - (n_axes > 1)))
  ndim = n_axes + len(other)
  positions = draw(st.permutations(range(ndim)))[:n_axes]
  shape = [0] * ndim
  for p, n in zip(positions, sizes, strict=False):
    shape[p] = n
  rest = iter(other)
  for i in range(ndim):
    if i not in positions:
      shape[i] = next(rest)
  axes = tuple(p - ndim if draw(st.booleans()) else p for p in positions)
  sizes = [shape[p] for p in sorted(positions)]  # the reference's fiber order
  metric = draw(st.sampled_from(METRICS))
  dtype = draw(st.sampled_from(dtypes))
  if np.dtype(dtype) in (np.float32, np.float64):
    amplitude = 10.0 ** draw(st.floats(-12.0, 12.0))
  else:
    amplitude = 10.0 ** draw(st.floats(-3.0, 3.0))
  return dict(
      shape=tuple(shape), axes=axes, sizes=tuple(sizes), metric=metric,
      boundary=draw(st.sampled_from(["periodic", "neumann"])),
      scale=draw(st.sampled_from(["unit", "grid"])),
      lam=draw(smoothing(metric)), dtype=dtype, amplitude=amplitude,
      kind=draw(st.sampled_from(["normal", "offset", "spike"])),
      seed=draw(st.integers(0, 2**32 - 1)), traced=draw(st.booleans()),
      method=draw(st.sampled_from(["auto", "stencil"]))
      if metric in ("sobolev", "l2") else "auto")


def _input(c):
  """The case's input, rounded to its dtype (built here: short reports)."""
  rng = np.random.default_rng(c["seed"])
  x = rng.standard_normal(c["shape"])
  if c["kind"] == "offset":  # a large mean on small deviations
    x = x * 1e-3 + 1.0
  elif c["kind"] == "spike" and x.size:
    x = np.zeros(c["shape"])
    x.reshape(-1)[rng.integers(x.size)] = 1.0
  return jnp.asarray(x * c["amplitude"], c["dtype"])


def _operator(c, x):
  kw = dict(metric=c["metric"], axes=c["axes"], boundary=c["boundary"],
            scale=c["scale"], method=c["method"])
  if c["traced"]:
    f = jax.jit(lambda g, s: optax_cdg.metric_gradient(g, s, **kw))
    return f(x, c["lam"])
  return optax_cdg.metric_gradient(x, c["lam"], **kw)


def _lam_used(c):
  # A traced Python float arrives as a float32 scalar (float64 under x64).
  if c["traced"] and np.dtype(c["dtype"]) != np.float64:
    return float(np.float32(c["lam"]))
  return c["lam"]


def _as_float64(a):
  return np.asarray(a.astype(jnp.float32) if a.dtype in HALF else a,
                    np.float64)


def check_case(c):
  """Agreement, symmetry, positivity and mean preservation of one case."""
  dtype = c["dtype"]
  x = _input(c)
  out = _operator(c, x)
  assert out.shape == x.shape and out.dtype == x.dtype
  if x.size == 0:
    return
  lam = _lam_used(c)
  args = (c["sizes"], lam, c["metric"], c["boundary"], c["scale"])
  xin = np.asarray(x, np.float64)  # exactly the rounded input
  ref = apply_deflated(xin, c["axes"], *args)
  bound = elementwise_bound(xin, ref, c["axes"], *args, dtype)
  before_cast = elementwise_bound(xin, ref, c["axes"], *args, dtype,
                                  cast=False)
  out64 = _as_float64(out)

  # Agreement, with overflow where the exact result is not representable.
  limit = overflow_threshold(dtype)
  fits = np.abs(ref) + before_cast < limit
  over = np.abs(ref) - before_cast >= limit
  err = np.abs(out64 - ref)
  bad = fits & ~(err <= bound)
  assert not bad.any(), (
      f"max error {err[fits].max():.3e}, worst ratio "
      f"{(err[fits] / bound[fits]).max():.3f}", c)
  assert np.array_equal(out64[over], np.sign(ref[over]) * np.inf)
  if not fits.all():
    return  # the properties below need finite results

  axes, m = c["axes"], int(np.prod(c["sizes"]))
  u, floor = output_rounding(dtype)
  # Per-fiber 2-norm bound on out - ref (rounding to dtype included).
  efib = (u * np.linalg.norm(fibers(ref, axes), axis=1)
          + (1 + u) * fiber_bound(xin, ref, axes, *args, dtype)
          + np.sqrt(m) * floor)
  xf, of = fibers(xin, axes), fibers(out64, axes)

  # Mean preservation: |mean(e_f)| <= ||e_f||_2 / sqrt(m).
  np.testing.assert_array_less(np.abs(of.mean(1) - xf.mean(1)),
                               efib / np.sqrt(m) + 1e-300)

  # Positivity: <f, A^{-1} f> > 0 wherever the exact value exceeds the error.
  q, q_ref = np.sum(xf * of, 1), np.sum(xf * fibers(ref, axes), 1)
  qerr = np.linalg.norm(xf, axis=1) * efib
  assert np.all(q_ref >= -qerr)
  assert np.all(q[q_ref > qerr] > 0)

  # Symmetry: <A^{-1} x, y> = <x, A^{-1} y> for a second input y.
  y = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape)
                  * np.abs(xin).max(), dtype)
  yin = np.asarray(y, np.float64)
  oy = _as_float64(_operator(c, y))
  ref_y = apply_deflated(yin, axes, *args)
  if np.all(np.isfinite(oy)) and np.all(
      np.abs(ref_y) + elementwise_bound(yin, ref_y, axes, *args, dtype,
                                        cast=False) < limit):
    efib_y = (u * np.linalg.norm(fibers(ref_y, axes), axis=1)
              + (1 + u) * fiber_bound(yin, ref_y, axes, *args, dtype)
              + np.sqrt(m) * floor)
    yf = fibers(yin, axes)
    lhs, rhs = np.sum(of * yf), np.sum(xf * fibers(oy, axes))
    tol = np.sum(efib * np.linalg.norm(yf, axis=1)
                 + efib_y * np.linalg.norm(xf, axis=1))
    assert abs(lhs - rhs) <= tol * (1 + 1e-12), (lhs, rhs, tol)

  # "sobolev" is an averaging operator (non-negative kernel, rows summing to
  # 1): it never amplifies, which keeps half-precision results finite.
  if c["metric"] in ("sobolev", "l2"):
    assert np.all(np.abs(of).max(1) <= np.abs(xf).max(1) + efib)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("boundary", ["periodic", "neumann"])
def test_deflated_reference_is_the_dense_one(metric, boundary):
  """apply_deflated solves the same A as metric_matrix, where both can."""
  x = np.random.default_rng(0).standard_normal((3, 4, 5))
  for sizes, axes in (((5,), (-1,)), ((4, 5), (1, 2)), ((3, 4, 5), (0, 1, 2))):
    lam = {"reweighted": 3.0, "l2": 1.0}.get(metric, 0.02)
    a = metric_matrix(sizes, lam, metric, boundary)
    m = a.shape[0]
    np.testing.assert_allclose(
        a, np.ones((m, m)) / m + deviation_matrix(sizes, lam, metric,
                                                  boundary), atol=1e-12)
    np.testing.assert_allclose(apply_deflated(x, axes, sizes, lam, metric,
                                              boundary),
                               apply_dense(x, axes, a), rtol=1e-10,
                               atol=1e-12)


@FAST
@hypothesis.given(case(dtypes=(jnp.float32, jnp.float16, jnp.bfloat16)))
def test_metric_gradient(c):
  check_case(c)


def test_metric_gradient_float64():
  with jax.enable_x64(True):
    # hypothesis.given inside the context: every example runs with x64.
    FAST(hypothesis.given(case(dtypes=(jnp.float64,)))(check_case))()


@pytest.mark.slow
def test_metric_gradient_many():
  MANY(hypothesis.given(case(dtypes=(jnp.float32, jnp.float16,
                                     jnp.bfloat16)))(
                                         _bounded_memory(check_case)))()


@pytest.mark.slow
def test_metric_gradient_float64_many():
  with jax.enable_x64(True):
    MANY(hypothesis.given(case(dtypes=(jnp.float64,)))(
        _bounded_memory(check_case)))()


# ---------------------------------------------------------------- transform


@st.composite
def tree_case(draw):
  """A small tree of conv kernels and other leaves, and the transform."""
  direction = draw(st.sampled_from(["output", "input", "spatial"]))
  metric = draw(st.sampled_from(METRICS))
  n_kernels = draw(st.integers(1, 3))
  dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]))
  shapes, specs, kernels = {}, {}, {}
  for i in range(n_kernels):
    spatial = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))
    out_axis = draw(st.sampled_from([-1, -1, -2]))
    channels = [draw(st.integers(1, 4)), draw(LENGTHS.filter(lambda n: n))]
    if out_axis == -2:
      channels.reverse()
    shape = tuple(spatial) + tuple(channels)
    shapes[f"conv{i}"] = {"kernel": shape, "bias": (channels[out_axis],)}
    kernels[f"conv{i}"] = {"kernel": out_axis, "bias": False}
    ndim = len(shape)
    specs[f"conv{i}"] = {
        "output": (out_axis % ndim,),
        "input": ((-3 - out_axis) % ndim,),
        "spatial": tuple(range(ndim - 2))}[direction]
  shapes["dense"] = {"kernel": (5, 3)}
  kernels["dense"] = None
  explicit = draw(st.booleans()) or any(
      v["kernel"] == -2 for k, v in kernels.items() if k != "dense")
  schedule = draw(st.booleans())
  return dict(shapes=shapes, seed=draw(st.integers(0, 2**32 - 1)),
              specs=specs, direction=direction, metric=metric,
              boundary=draw(st.sampled_from(["periodic", "neumann"])),
              scale=draw(st.sampled_from(["unit", "grid"])),
              lam=draw(smoothing(metric)), schedule=schedule,
              kernels=kernels if explicit else None, dtype=dtype,
              jit=draw(st.booleans()))


def check_tree_case(c):
  lam = c["lam"]
  smooth = optax.constant_schedule(lam) if c["schedule"] else lam
  tx = optax_cdg.channel_directed(
      smooth, metric=c["metric"], direction=c["direction"],
      boundary=c["boundary"], scale=c["scale"], kernels=c["kernels"])
  rng = np.random.default_rng(c["seed"])
  tree = jax.tree.map(
      lambda shape: jnp.asarray(rng.standard_normal(shape), c["dtype"]),
      c["shapes"], is_leaf=lambda x: isinstance(x, tuple))
  update = jax.jit(tx.update) if c["jit"] else tx.update
  out, _ = update(tree, tx.init(tree))
  if c["schedule"]:
    lam = float(np.float32(lam))  # the schedule's value is a float32 array
  for name, axes in c["specs"].items():
    g, o = tree[name]["kernel"], out[name]["kernel"]
    assert o.shape == g.shape and o.dtype == g.dtype
    gin = np.asarray(g.astype(jnp.float32), np.float64)
    sizes = tuple(g.shape[a] for a in axes)
    args = (sizes, lam, c["metric"], c["boundary"], c["scale"])
    ref = apply_deflated(gin, axes, *args)
    bound = elementwise_bound(gin, ref, axes, *args, c["dtype"])
    fits = np.abs(ref) + elementwise_bound(
        gin, ref, axes, *args, c["dtype"], cast=False) < overflow_threshold(
            c["dtype"])
    err = np.abs(_as_float64(o) - ref)
    assert np.all(err[fits] <= bound[fits]), (name, c)
    # Not selected: the very same object (eager) or the same bits (jit).
    np.testing.assert_array_equal(out[name]["bias"], tree[name]["bias"])
    if not c["jit"]:
      assert out[name]["bias"] is tree[name]["bias"]
  np.testing.assert_array_equal(out["dense"]["kernel"],
                                tree["dense"]["kernel"])


@FAST
@hypothesis.given(tree_case())
def test_channel_directed(c):
  check_tree_case(c)


@pytest.mark.slow
def test_channel_directed_many():
  MANY(hypothesis.given(tree_case())(_bounded_memory(check_tree_case)))()
