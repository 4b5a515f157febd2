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


def compute_dtype(dtype: Any) -> Any:
  """float32 for half precision (XLA's FFT rejects it), else the dtype."""
  return jnp.promote_types(dtype, jnp.float32)


def even_extension(x: jax.Array, axes: Sequence[int]) -> jax.Array:
  """`[x, reversed x]` along each axis: its DFT is `x`'s DCT-II.

  On it the Laplacian with a reflecting (Neumann) boundary is periodic, so
  the rfft that serves the periodic boundary serves this one too.
  """
  for a in axes:
    x = jnp.concatenate([x, jnp.flip(x, a)], axis=a)
  return x


def metric_gradient(
    grad: jax.Array,
    smoothing: Any = _gains.DEFAULT_SMOOTHING,
    *,
    metric: _checks.Metric = "sobolev",
    axes: int | Sequence[int] = (-1,),
    boundary: _checks.Boundary = "periodic",
    scale: _checks.Scale = _gains.DEFAULT_SCALE,
    method: _checks.Method = "auto",
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
      the transform's, `_gains.DEFAULT_SMOOTHING`. "sobolev" needs
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
  _checks.check_options(metric=metric, boundary=boundary, scale=scale,
                        method=method)
  return apply(grad, _checks.check_smoothing(smoothing, metric), metric=metric,
               axes=axes, boundary=boundary, scale=scale, method=method)


def apply(grad: Any, lam: float | jax.Array, *, metric: str,
          axes: int | Sequence[int], boundary: str, scale: str,
          method: str) -> jax.Array:
  """`metric_gradient` for checked options and smoothing `lam`.

  Fiber-local on every device, however `grad` is sharded: a mesh axis that
  splits the fibers is moved to another axis while they are transformed.
  """
  grad = grad if hasattr(grad, "dtype") else jnp.asarray(grad)
  if not jnp.issubdtype(grad.dtype, jnp.floating):
    raise TypeError(
        f"grad must be a real floating-point array; got dtype {grad.dtype}.")
  axes = _checks.axes(axes, grad.shape)
  sizes = tuple(grad.shape[a] for a in axes)
  if metric == "l2" or grad.size == 0 or all(n == 1 for n in sizes):
    return grad
  closed = method == "closed" or (method == "auto" and metric == "reweighted")
  op = Operator(closed, axes, sizes, metric, boundary, scale,
                compute_dtype(grad.dtype),
                lam if isinstance(lam, float) else None)
  lam = jnp.asarray(lam, jnp.result_type(float))
  sharding = _sharding.explicit_sharding(grad)
  if sharding is None:  # automatic sharding, or one device
    return _sharding.fiberwise_p.bind(grad, lam, op=op, order=0)
  if not any(sharding.spec):  # replicated: every device computes it all
    return op(grad, *op.multipliers(lam))
  return _sharding.shard_mapped(op, grad, lam, sharding)


@dataclasses.dataclass(frozen=True)
class Operator:
  """`A^{-1}` on every fiber along `axes`: linear in the array and in the
  multipliers of its eigenspaces.

  `multipliers(lam)` are the spectral gains, or for the closed form the
  multipliers of the fiber's mean and of the rest. `op(x, *multipliers)` is
  linear in each, so its derivative in `lam` is `op(x, *d multipliers / d
  lam)`. It acts on each fiber alone and is self-adjoint. Hashable by value:
  a static argument of the sharded application. A frozen dataclass rather
  than a NamedTuple: jax < 0.9.2 takes a weak reference to every callable
  parameter of a primitive.
  """

  closed: bool  # mean + (x - mean) / lam instead of the transform
  axes: tuple[int, ...]  # sorted, non-negative
  sizes: tuple[int, ...]
  metric: str
  boundary: str
  scale: str
  dtype: Any  # the compute dtype
  smoothing: float | None = None  # a number: the multipliers are constants

  def shifted(self, k: int) -> Operator:
    """The same operator on an array with `k` more leading (batch) axes."""
    return dataclasses.replace(self, axes=tuple(a + k for a in self.axes))

  def multipliers(self, lam: jax.Array,
                  order: int = 0) -> tuple[ArrayLike, ...]:
    """The multipliers for `lam`, or their `order`-th derivative in `lam`."""
    # The multipliers computed from `lam` (they do not depend on the axes).
    op = dataclasses.replace(self, axes=(), smoothing=None)
    if self.smoothing is not None and order == 0:
      # jax's Config stub lacks the options it sets as attributes.
      device = jax.config.jax_default_device  # type: ignore[attr-defined]
      return _constants(op, self.smoothing, np.dtype(jnp.result_type(float)),
                        device)
    if order:
      return jax.jvp(lambda lam: op.multipliers(lam, order - 1), (lam,),
                     (jnp.ones_like(lam),))[1]
    if self.closed:
      return jnp.ones((), self.dtype), (1.0 / lam).astype(self.dtype)
    return (_gains.gain(self.sizes, lam, self.metric, self.boundary,
                        self.scale, extended=self.boundary == "neumann")
            .astype(self.dtype),)

  def __call__(self, grad: jax.Array, *multipliers: ArrayLike) -> jax.Array:
    x = grad.astype(self.dtype)
    if self.closed:
      mean = jnp.mean(x, axis=self.axes, keepdims=True)
      mean_gain, rest_gain = (jnp.asarray(m) for m in multipliers)
      return (mean_gain * mean + rest_gain * (x - mean)).astype(grad.dtype)

    def transform(x, gains):
      ext = even_extension(x, self.axes) if self.boundary == "neumann" else x
      # The gains along `axes`, broadcast along the others.
      gains = jnp.expand_dims(gains, [a for a in range(x.ndim)
                                      if a not in self.axes])
      y = jnp.fft.irfftn(jnp.fft.rfftn(ext, axes=self.axes) * gains,
                         s=[ext.shape[a] for a in self.axes], axes=self.axes)
      for a, n in zip(self.axes, self.sizes, strict=True):  # Neumann: 1st half
        y = jax.lax.slice_in_dim(y, 0, n, axis=a)
      return y.astype(grad.dtype)

    if x.ndim < 3 or self.axes != (x.ndim - 1,):
      return transform(x, *multipliers)
    # XLA's CPU convolutions write the gradient of a (*spatial, in, out)
    # kernel as (in, *spatial, out) in memory: on that view the FFT needs no
    # transposing copy (ResNet-18's CPU step: 1.030 -> 1.006 times the plain
    # step, BENCHMARKS.md). Fibers are independent, so the result is the
    # same; other backends keep the logical order until measured.
    return jax.lax.platform_dependent(
        x, *multipliers, default=transform,
        cpu=lambda x, gains: jnp.moveaxis(
            transform(jnp.moveaxis(x, -2, 0), gains), 0, -2))


@functools.lru_cache(maxsize=1024)
def _constants(op: Operator, smoothing: float, lam_dtype: np.dtype,
               device: Any) -> tuple[np.ndarray, ...]:
  """The multipliers of a number, as constants of the program.

  Computed once, by the compiled function that computes a traced
  smoothing's in the program: the same XLA kernel on the same backend, so a
  number and a traced smoothing give the same bits, while the step computes
  nothing for a number (computing them in the step cost the ResNet-18 CPU
  step 3 %). In a thread of its own, outside the caller's trace, mesh and
  manual axes (a shard_map body, other processes' devices), with the
  caller's precision and default device, which a thread does not inherit.
  """
  lam = np.asarray(smoothing, lam_dtype)

  def compute() -> tuple[np.ndarray, ...]:
    with jax.enable_x64(lam_dtype == np.float64), jax.default_device(device):
      return tuple(map(np.asarray, jax.jit(op.multipliers)(lam)))

  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(compute).result()
