"""The channel-directed metric gradient `A^{-1} g` of one array."""

from __future__ import annotations

from collections.abc import Sequence
import concurrent.futures
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

from optax_cdg import _checks
from optax_cdg import _gains
from optax_cdg import _sharding
from optax_cdg._gains import DEFAULT_SCALE
from optax_cdg._gains import DEFAULT_SMOOTHING


def compute_dtype(dtype: Any) -> Any:
  """float32 for half precision (XLA's FFT rejects it), else the dtype."""
  return jnp.promote_types(dtype, jnp.float32)


def metric_gradient(
    grad: jax.Array,
    smoothing: Any = DEFAULT_SMOOTHING,
    *,
    metric: str = "sobolev",
    axes: int | Sequence[int] = (-1,),
    boundary: str = "periodic",
    scale: str = DEFAULT_SCALE,
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

  The Neumann transform is the periodic one on the fiber's even extension
  `[f, reversed f]` (whose DFT is the DCT-II), so one rfft of length `2 N`
  serves both boundaries. Either way the work is `O(N log N)` per fiber and
  the memory a few arrays of the gradient's size.

  Half-precision inputs are computed in float32 and returned in their dtype.

  Args:
    grad: a real floating-point array.
    smoothing: `lam`, a number or a (possibly traced) scalar; the default is
      the transform's, `DEFAULT_SMOOTHING`. "sobolev" needs
      `lam >= 0` (0 is the identity); "sobolev_mean" and "reweighted" need
      `lam > 0` ("reweighted" is the identity at 1).
    metric: "sobolev", "sobolev_mean", "reweighted" or "l2".
    axes: the direction: one axis, or several (their Laplacians are summed).
    boundary: "periodic" (FFT) or "neumann" (DCT-II).
    scale: "grid" (`c(N) = 1`; the default, as for the transform) or "unit"
      (`c(N) = N^2`, the axis is the unit interval).
    method: "auto" (the default: the closed form for "reweighted", the
      transform otherwise), "fft" (the transform for every metric) or
      "closed" ("reweighted" and "l2" only). All agree to float32 rounding.

  Returns:
    An array of the shape and dtype of `grad`.

  Examples:
    A spike in one channel is spread to its neighbours, and the mean is kept:

    >>> import jax.numpy as jnp
    >>> import optax_cdg
    >>> g = jnp.array([[0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    >>> y = optax_cdg.metric_gradient(g, 0.01, scale="unit")
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
  _checks.check_options(metric=metric, boundary=boundary, scale=scale)
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
) -> jax.Array:
  """`metric_gradient` for checked options and a checked smoothing `lam`.

  `grad` and `axes` are checked here, where they enter.
  """
  grad = _checks.float_array(grad)
  axes = _checks.axes(axes, grad.ndim)
  sizes = tuple(grad.shape[a] for a in axes)
  if metric == "l2" or grad.size == 0 or all(n == 1 for n in sizes):
    return grad
  closed = method == "closed" or (method == "auto" and metric == "reweighted")
  op = Operator(closed, axes, sizes, metric, boundary, scale,
                compute_dtype(grad.dtype),
                lam if isinstance(lam, float) else None)
  # Fiber-local on every device, however the array is sharded.
  return _sharding.apply_fiberwise(
      op, grad, jnp.asarray(lam, jnp.result_type(float)))


@dataclasses.dataclass(frozen=True)
class Operator:
  """`A^{-1}` on every fiber along `axes`, bilinear in the array and gains.

  `gains(lam)` are the operator's linear parameters (the spectral gains, or
  for the closed form the gains of the mean and of the rest), and
  `op(x, *gains)` is linear in each, so the derivative with respect to `lam`
  is `op(x, *d gains / d lam)`. Hashable by value: it is a static argument
  of the sharded application. A frozen dataclass rather than a NamedTuple:
  jax < 0.9.2 takes a weak reference to every callable parameter.
  """

  closed: bool  # mean + (x - mean) / lam instead of the transform
  axes: tuple[int, ...]  # sorted, non-negative
  sizes: tuple[int, ...]
  metric: str
  boundary: str
  scale: str
  dtype: Any  # the compute dtype
  smoothing: float | None = None  # a number: the gains are constants

  def shifted(self, k: int) -> Operator:
    """The same operator on an array with `k` more leading (batch) axes."""
    return dataclasses.replace(self, axes=tuple(a + k for a in self.axes))

  def gains(self, lam: jax.Array,
            order: int = 0) -> tuple[ArrayLike, ...]:
    """The linear parameters for `lam`, or their `order`-th derivative."""
    if self.smoothing is not None and order == 0:
      return _constant_gains(dataclasses.replace(self, axes=()))
    return self.computed_gains(lam, order)

  def computed_gains(self, lam: jax.Array,
                     order: int = 0) -> tuple[jax.Array, ...]:
    """`gains` as computed in the program, from a traced `lam`."""
    def gains(lam):
      if self.closed:  # the gains of the mean and of the rest
        rest = jnp.where(_checks.smoothing_valid(lam, self.metric), 1.0 / lam,
                         jnp.nan)
        return jnp.ones((), self.dtype), rest.astype(self.dtype)
      return (_gains.gain(self.sizes, lam, self.metric, self.boundary,
                          self.scale, extended=self.boundary == "neumann")
              .astype(self.dtype),)

    for _ in range(order):
      gains = functools.partial(
          lambda f, lam: jax.jvp(f, (lam,), (jnp.ones_like(lam),))[1], gains)
    return gains(lam)

  def __call__(self, grad: jax.Array, *gains: ArrayLike) -> jax.Array:
    x = grad.astype(self.dtype)
    if self.closed:
      mean = jnp.mean(x, axis=self.axes, keepdims=True)
      mean_gain, rest_gain = (jnp.asarray(g) for g in gains)
      return (mean_gain * mean + rest_gain * (x - mean)).astype(grad.dtype)
    if x.ndim >= 3 and self.axes == (x.ndim - 1,):
      # XLA's CPU convolutions write the gradient of a (*spatial, in, out)
      # kernel as (in, *spatial, out) in memory: on that view the FFT needs
      # no transposing copy (ResNet-18's CPU step: 1.030 -> 1.006 times the
      # plain step, BENCHMARKS.md). Fibers are independent, so the result is
      # the same; other backends keep the logical order until measured.
      perm = (x.ndim - 2, *range(x.ndim - 2), x.ndim - 1)
      back = tuple(int(i) for i in np.argsort(perm))

      def on_the_view(x, *gains):
        view = jnp.transpose(x, perm)
        return jnp.transpose(self._fft(view, gains, grad.dtype), back)

      return jax.lax.platform_dependent(
          x, *gains, cpu=on_the_view,
          default=lambda x, *gains: self._fft(x, gains, grad.dtype))
    return self._fft(x, gains, grad.dtype)

  def _fft(self, x: jax.Array, gains: Sequence[ArrayLike], dtype: Any):
    """The transform along `axes` of `x` (in the compute dtype)."""
    if self.boundary == "neumann":
      # The DCT-II diagonalises the Laplacian with a reflecting boundary: it
      # is the DFT of the even extension [x, reversed x], where the operator
      # is periodic (docs/math.md).
      for a in self.axes:
        x = jnp.concatenate([x, jnp.flip(x, a)], axis=a)
    shape = [1] * x.ndim  # the gains along `axes`, broadcast elsewhere
    for a, n in zip(self.axes, jnp.shape(gains[0]), strict=True):
      shape[a] = n
    ext = tuple(x.shape[a] for a in self.axes)
    y = jnp.fft.irfftn(jnp.fft.rfftn(x, axes=self.axes)
                       * jnp.reshape(gains[0], shape), s=ext, axes=self.axes)
    for a, n in zip(self.axes, self.sizes, strict=True):  # Neumann: 1st half
      y = jax.lax.slice_in_dim(y, 0, n, axis=a)
    return y.astype(dtype)


def _constant_gains(op: Operator) -> tuple[np.ndarray, ...]:
  """The gains of a number, as constants of the program.

  Computed once, by the compiled function that computes a traced
  smoothing's gains in the program: the same XLA kernel on the same backend,
  so a number and a traced smoothing give the same bits, while the step
  computes nothing for a number (computing the gains in the step cost the
  ResNet-18 CPU step 3 %).
  """
  # The caller's precision and device, which a worker thread does not
  # inherit.
  # jax's Config stub lacks its options, which it sets as attributes.
  device = jax.config.jax_default_device  # type: ignore[attr-defined]
  return _gains_in_a_thread(op, np.dtype(jnp.result_type(float)), device)


@functools.lru_cache(maxsize=1024)
def _gains_in_a_thread(op: Operator, lam_dtype: np.dtype,
                       device: Any) -> tuple[np.ndarray, ...]:
  """`_constant_gains` in a thread of its own: outside the caller's trace,
  mesh and manual axes (a shard_map body, other processes' devices)."""
  lam = np.asarray(op.smoothing, lam_dtype)

  def compute() -> tuple[np.ndarray, ...]:
    with jax.enable_x64(lam_dtype == np.float64), jax.default_device(device):
      return tuple(np.asarray(g) for g in jax.jit(op.computed_gains)(lam))

  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(compute).result()
