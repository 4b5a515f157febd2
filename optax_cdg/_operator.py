"""The channel-directed metric gradient `A^{-1} g` of one array."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optax_cdg import _checks
from optax_cdg import _methods
from optax_cdg import _sharding


def compute_dtype(dtype: Any) -> Any:
  """float32 for half precision (XLA's FFT rejects it), else the dtype."""
  return jnp.promote_types(dtype, jnp.float32)


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
    the metric whose trace-time arrays stay within a fixed budget (the rule,
    the cost of each method and the measurements are in
    docs/performance.md); at every size it needs memory linear in the
    array and at most `O(N log N)` work per fiber;
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
    method: how `A^{-1}` is applied (above); every method gives the same
      result to float32 accuracy, and a forced one is used as it is.

  Returns:
    An array of the shape and dtype of `grad`.

  Examples:
    A spike in one channel is spread to its neighbours, and the mean is kept:

    >>> import jax.numpy as jnp
    >>> import optax_cdg
    >>> g = jnp.array([[0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    >>> y = optax_cdg.metric_gradient(g, 0.01)
    >>> [round(v, 3) for v in y[0].tolist()]
    [0.202, 0.652, 2.12, 0.652, 0.202, 0.067, 0.038, 0.067]
    >>> round(float(y.sum()), 5)
    4.0

    The "reweighted" metric scales the deviations from the mean by `1 / lam`:

    >>> optax_cdg.metric_gradient(g, 2.0, metric="reweighted").tolist()
    [[0.25, 0.25, 2.25, 0.25, 0.25, 0.25, 0.25, 0.25]]

  References:
    Lao et al., `Channel-Directed Gradients for Optimization of Convolutional
    Neural Networks <https://arxiv.org/abs/2008.10766>`_, 2020.

    Sundaramoorthi et al., `Sobolev Active Contours
    <https://doi.org/10.1007/s11263-006-0635-2>`_, IJCV 2007.
  """
  _checks.check_option("metric", metric)
  _checks.check_option("boundary", boundary)
  _checks.check_option("scale", scale)
  lam = _checks.check_smoothing(smoothing, metric)
  _checks.check_method(method, metric)
  return apply(grad, lam, metric=metric, axes=axes, boundary=boundary,
               scale=scale, method=method)


def apply(
    grad: jax.Array,
    lam: float | jax.Array,
    *,
    metric: str,
    axes: int | Sequence[int],
    boundary: str,
    scale: str,
    method: str,
    block: int | None = None,
) -> jax.Array:
  """`metric_gradient` for checked options and a checked smoothing `lam`.

  `grad` and `axes` are checked here, where they enter. `block` forces the
  chunk size of "blocked" (benchmarks; None: the rule).
  """
  grad = _checks.float_array(grad)
  axes = _checks.axes(axes, grad.ndim)
  sizes = tuple(grad.shape[a] for a in axes)
  if metric == "l2" or grad.size == 0 or all(n == 1 for n in sizes):
    return grad
  # The one place the method is chosen, and below the one it is applied.
  method = _methods.choose(
      method, metric, sizes, lam if _checks.is_concrete(lam) else None,
      boundary=boundary, scale=scale, last_axis=axes == (grad.ndim - 1,),
      backend=jax.default_backend())
  op = _methods.Operator(method, axes, sizes, metric, boundary, scale,
                         compute_dtype(grad.dtype), block)
  # Fiber-local on every device, however the array is sharded.
  return _sharding.apply_fiberwise(op, grad, axes, *op.operands(lam,
                                                                grad.ndim))
