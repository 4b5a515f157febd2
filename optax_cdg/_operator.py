"""The channel-directed metric gradient `A^{-1} g` of one array."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_cdg import _gains
from optax_cdg import _methods
from optax_cdg import _sharding


def normalize_axes(
    axes: int | Sequence[int], ndim: int, name: str = "axes"
) -> tuple[int, ...]:
  """Sorted non-negative axes, validated against `ndim`."""
  if isinstance(axes, numbers.Integral) and not isinstance(axes, bool):
    axes = (axes,)
  try:
    axes = tuple(axes)  # type: ignore[arg-type]
  except TypeError as e:
    raise TypeError(f"{name}={axes!r} must be an int or a tuple of ints.") from e
  if not axes:
    raise ValueError(f"{name}=() must name at least one axis.")
  out = []
  for a in axes:
    if isinstance(a, bool) or not isinstance(a, numbers.Integral):
      raise TypeError(f"{name}={axes!r} must contain ints; got {a!r}.")
    if not -ndim <= a < ndim:
      raise ValueError(
          f"{name}={axes!r}: axis {a} is out of range for an array with "
          f"{ndim} dimensions (allowed: {-ndim} .. {ndim - 1})."
      )
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{name}={axes!r} names the same axis twice.")
  return tuple(sorted(out))


def compute_dtype(dtype: Any) -> Any:
  """float32 for half precision (XLA's FFT rejects it), else the dtype."""
  return jnp.promote_types(dtype, jnp.float32)


def _broadcast_gain(gain, axes: tuple[int, ...], ndim: int, dtype):
  shape = [1] * ndim
  for a, n in zip(axes, gain.shape):
    shape[a] = n
  if isinstance(gain, np.ndarray):
    # A trace-time constant: computed in float64 once, rounded once.
    return np.asarray(gain, dtype).reshape(shape)
  return jnp.asarray(gain, dtype).reshape(shape)


def _reweighted_lam(smoothing, dtype):
  lam = _gains.concrete_scalar(smoothing)
  if lam is not None:
    return jnp.asarray(lam, dtype)
  # A traced lam cannot raise: a rejected value poisons the result instead.
  lam = jnp.asarray(smoothing, dtype)
  return jnp.where(jnp.isfinite(lam) & (lam > 0), lam, jnp.nan)


@dataclasses.dataclass(frozen=True)
class _FiberOp:
  """`A^{-1}` on every fiber along `axes`, given its constant operands.

  The operands (the gains, the matrix `K`, the blocked factors or `lam`) are
  arrays, so that the sharded application can pass them to every device.
  Hashable by value: it is a static argument of the sharded application, and
  an identity-hashed closure could be confused with a dead one whose id was
  reused. A frozen dataclass rather than a NamedTuple: jax < 0.9.2 takes a
  weak reference to every callable parameter, which no tuple allows.
  """

  method: str  # "fft", "matmul", "blocked" or "closed"
  axes: tuple[int, ...]
  sizes: tuple[int, ...]
  boundary: str
  dtype: Any

  def shifted(self, k: int) -> "_FiberOp":
    """The same operator on an array with `k` more leading (batch) axes."""
    return dataclasses.replace(self, axes=tuple(a + k for a in self.axes))

  def __call__(self, grad: jax.Array, *operands: jax.Array) -> jax.Array:
    x = grad.astype(self.dtype)
    if self.method == "closed":
      # The reweighted metric in closed form: mean + (x - mean) / lam.
      (lam,) = operands
      mean = jnp.mean(x, axis=self.axes, keepdims=True)
      out = mean + (x - mean) / lam
    elif self.method == "matmul":
      out = _methods.apply_matmul(x, self.axes, *operands)
    elif self.method == "blocked":
      out = _methods.apply_blocked(x, self.axes[0], *operands)
    elif self.boundary == "periodic":
      (gain,) = operands
      spec = jnp.fft.rfftn(x, axes=self.axes)
      out = jnp.fft.irfftn(spec * gain, s=self.sizes, axes=self.axes)
    else:
      (gain,) = operands
      coef = jax.scipy.fft.dctn(x, type=2, axes=self.axes, norm="ortho")
      out = jax.scipy.fft.idctn(coef * gain, type=2, axes=self.axes,
                                norm="ortho")
    return out.astype(grad.dtype)


def metric_gradient(
    grad: jax.Array,
    smoothing: Any,
    *,
    metric: str = "sobolev",
    axes: int | Sequence[int] = (-1,),
    boundary: str = "periodic",
    scale: str = "unit",
    method: str = "auto",
) -> jax.Array:
  r"""The gradient in a channel-directed metric: `A^{-1} grad` along `axes`.

  Every 1-D slice of `grad` along `axes` (every block, for several axes) is a
  fiber `f`. The metric `<h, q>_A = sum over fibers of h^T A q` has
  `A` a function of the discrete Laplacian `L` along `axes`:

  - "sobolev" (H1): `A = I + lam L`;
  - "sobolev_mean" (H~1): `A = P + lam L`, with `P` the projector onto the
    fiber's mean;
  - "reweighted" (H~0): `A = P + lam (I - P)`;
  - "l2": `A = I`.

  The gradient of the same loss in that metric is `A^{-1} f` per fiber, which
  is computed exactly in the Laplacian's eigenbasis: `irfft(gain * rfft(f))`
  for a periodic boundary and `idct(gain * dct(f))` (orthonormal DCT-II) for a
  Neumann boundary, with the gains of :func:`optax_cdg.spectral_gain`. The
  "reweighted" metric needs no transform: `mean + (f - mean) / lam`.

  `A^{-1}` is also a fixed symmetric matrix `K` per axis length, so it can be
  applied exactly without a transform; `method` picks how (all agree to
  float32 accuracy):

  - "auto": the fastest exact method for the backend, the axis length and
    the metric (the rule and its measurements are in BENCHMARKS.md);
  - "fft": the spectral transform above;
  - "matmul": `x @ K` with `K` built in float64 at trace time (at run time,
    from the eigenbasis, when `smoothing` is traced);
  - "blocked": one axis cut into chunks of 8 to 64 values; `K` is a shared
    diagonal block plus a rank-`R` coupling of the chunks (`R` = 2 for
    "sobolev", 3 for "sobolev_mean"), so two skinny matmuls and a small mix.
    Needs a concrete `smoothing` and a length divisible into such chunks;
  - "closed": `mean + (f - mean) / lam`, for "reweighted" only.

  Half-precision inputs are computed in float32 and returned in their dtype.

  Args:
    grad: a real floating-point array.
    smoothing: `lam`, a number or a (possibly traced) scalar. "sobolev" needs
      `lam >= 0` (0 is the identity); "sobolev_mean" and "reweighted" need
      `lam > 0` ("reweighted" is the identity at 1).
    metric: "sobolev", "sobolev_mean", "reweighted" or "l2".
    axes: the direction: one axis, or several (their Laplacians are summed).
    boundary: "periodic" (FFT) or "neumann" (DCT-II).
    scale: "unit" (`c(N) = N^2`, the axis is the unit interval) or "grid"
      (`c(N) = 1`).

  Returns:
    An array of the shape and dtype of `grad`.

  References:
    Lao et al., `Channel-Directed Gradients for Optimization of Convolutional
    Neural Networks <https://arxiv.org/abs/2008.10766>`_, 2020.

    Sundaramoorthi et al., `Sobolev Active Contours
    <https://doi.org/10.1007/s11263-006-0635-2>`_, IJCV 2007.
  """
  _gains.check_choice("metric", metric, _gains.METRICS)
  _gains.check_choice("boundary", boundary, _gains.BOUNDARIES)
  _gains.check_choice("scale", scale, _gains.SCALES)
  _gains.check_smoothing(smoothing, metric)
  _methods.check_method(method, metric)
  if not hasattr(grad, "dtype") or not hasattr(grad, "shape"):
    grad = jnp.asarray(grad)
  if not jnp.issubdtype(grad.dtype, jnp.floating):
    raise TypeError(
        f"grad must be a real floating-point array; got dtype {grad.dtype}."
    )
  axes = normalize_axes(axes, grad.ndim)
  sizes = tuple(grad.shape[a] for a in axes)
  if metric == "l2" or grad.size == 0 or all(n == 1 for n in sizes):
    return grad

  dtype = compute_dtype(grad.dtype)
  method = _methods.choose(
      method, metric, sizes, _gains.concrete_scalar(smoothing),
      boundary=boundary, scale=scale, last_axis=axes == (grad.ndim - 1,),
      backend=jax.default_backend())
  if method == "closed":
    operands = (_reweighted_lam(smoothing, dtype),)
  elif method == "matmul":
    operands = (_methods.matmul_operand(sizes, smoothing, metric, boundary,
                                        scale, dtype),)
  elif method == "blocked":
    if len(axes) != 1:
      raise ValueError(
          f"method='blocked' works along one axis; got axes={axes}. Use "
          "method='auto', 'fft' or 'matmul'.")
    operands = _methods.blocked_operands(sizes[0], smoothing, metric,
                                         boundary, scale, dtype)
  else:
    gain = _gains.spectral_gain(
        sizes, smoothing, metric=metric, boundary=boundary, scale=scale
    )
    operands = (_broadcast_gain(gain, axes, grad.ndim, dtype),)
  fn = _FiberOp(method, axes, sizes, boundary, dtype)
  # Fiber-local on every device, however the array is sharded.
  return _sharding.apply_fiberwise(fn, grad, axes, *operands)
