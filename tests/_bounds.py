"""Rounding-error bounds for comparing the operator with a float64 reference.

Derivation (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed.,
section 24.1): a radix-2 FFT of length M computed in precision `eps` is
normwise backward stable, fft_computed(x) = fft(x + d) with
||d||_2 <= c eps log2(M) ||x||_2 and a small constant c; mixed-radix, Bluestein
and the FFT-based DCT-II behave the same way with other constants. Per fiber f
the operator computes irfft(gain * rfft(f)) (or idct(gain * dct(f))), so

  ||out_f - exact_f||_2 <= C eps (log2 M + 1) (gmax ||f||_2 + ||exact_f||_2)

where gmax is the largest gain (the first FFT's error is amplified by at most
gmax; multiplying by the rounded gain and the inverse FFT add errors relative to
the result). The same form covers "reweighted", mean + (f - mean) / lam: the
mean's summation error is amplified by at most gmax = max(1, 1 / lam).
The float64 reference (`_reference.apply_deflated`) adds C eps64 kappa (...),
kappa the condition number of the metric on mean-free fibers (<= gmax / gmin).

A half-precision result is the float32 result rounded once: each element gains
at most u |value| (u = eps / 2 of the output dtype), plus the spacing of
subnormals as an absolute floor.

C: over 2,500 random examples per dtype (the `case` strategy of
test_properties.py), the largest ratio of a fiber's measured error to this
bound with C = 1 was 0.34 in float32 and 0.76 in float64, where the float64
reference's own rounding dominates ("l2", returned exactly, reaches 0.73).
C = 4 leaves a margin of 5x or more, while a wrong gain, axis or boundary
misses the bound by orders of magnitude.
"""

import jax.numpy as jnp
import numpy as np

import optax_cdg

C = 4.0


def compute_dtype(dtype):
  return np.dtype(jnp.promote_types(dtype, jnp.float32))


def fibers(x, axes):
  """x as (number of fibers, fiber length), fibers along `axes`."""
  x = np.asarray(x, np.float64)
  axes = sorted(a % x.ndim for a in axes)
  rest = [i for i in range(x.ndim) if i not in axes]
  m = int(np.prod([x.shape[a] for a in axes]))
  return np.transpose(x, rest + axes).reshape(-1, m)


def gain_range(sizes, lam, metric, boundary, scale):
  """(gmax over all frequencies, condition number on mean-free fibers)."""
  g = np.asarray(optax_cdg.spectral_gain(sizes, lam, metric=metric,
                                         boundary=boundary, scale=scale))
  flat = g.reshape(-1)[1:]  # frequency 0, the mean, has gain 1
  if flat.size == 0:
    return 1.0, 1.0
  return max(1.0, float(flat.max())), float(flat.max() / flat.min())


def fiber_bound(x, ref, axes, sizes, lam, metric, boundary, scale, dtype):
  """Per-fiber bound on ||out_f - ref_f||_2 of the computation before the cast.

  Returns an array of shape (number of fibers,).
  """
  xf, rf = fibers(x, axes), fibers(ref, axes)
  m = xf.shape[1]
  gmax, kappa = gain_range(sizes, lam, metric, boundary, scale)
  size = gmax * np.linalg.norm(xf, axis=1) + np.linalg.norm(rf, axis=1)
  eps = np.finfo(compute_dtype(dtype)).eps
  eps64 = np.finfo(np.float64).eps
  logm = np.log2(max(m, 2)) + 1.0
  tiny = m * np.finfo(compute_dtype(dtype)).tiny  # flushed denormals
  return C * (eps * logm + eps64 * (kappa + logm)) * size + tiny


def output_rounding(dtype):
  """(u, absolute floor) of the final cast to `dtype`."""
  dtype = np.dtype(dtype)
  if dtype == compute_dtype(dtype):
    return 0.0, 0.0
  info = jnp.finfo(dtype)
  # The cast keeps subnormals: below the smallest normal the error is at
  # most half the subnormal spacing.
  return float(info.eps) / 2, float(info.smallest_subnormal)


def elementwise_bound(x, ref, axes, sizes, lam, metric, boundary, scale,
                      dtype, cast=True):
  """Bound on |out - ref| per element, in the layout of `ref`.

  With `cast=False`, the bound before the final cast to `dtype`: the float32
  value is below `overflow_threshold(dtype)`, so finite, if `|ref| + bound` is.
  """
  ref = np.asarray(ref, np.float64)
  per_fiber = fiber_bound(x, ref, axes, sizes, lam, metric, boundary, scale,
                          dtype)
  axes_s = sorted(a % ref.ndim for a in axes)
  rest = [i for i in range(ref.ndim) if i not in axes_s]
  rest_shape = [ref.shape[i] for i in rest]
  moved = np.broadcast_to(per_fiber.reshape(rest_shape + [1] * len(axes_s)),
                          rest_shape + [ref.shape[a] for a in axes_s])
  bound = np.transpose(moved, np.argsort(rest + axes_s))
  if not cast:
    return bound
  u, floor = output_rounding(dtype)
  return u * np.abs(ref) + (1 + u) * bound + floor


def overflow_threshold(dtype):
  """Magnitude from which rounding to `dtype` gives infinity."""
  info = jnp.finfo(dtype)
  return float(info.max) * (1 + float(info.eps) / 4)
