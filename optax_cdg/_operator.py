"""The operator `A^{-1}` along some axes of an array: its multipliers in the
Laplacian's eigenbasis and its evaluation, with nothing of the transformations,
devices or shardings it runs under (`_apply` adds those)."""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
from typing import Any, Final

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

from optax_cdg import _gains

# The longest stencil offered for "sobolev" along one axis: 2 * 16 + 1 taps
# (the default, grid scale 0.1, needs 15).
MAX_STENCIL_HALF_WIDTH: Final = 16
# A stencil drops generator entries whose absolute sum is below this share
# of the whole: far below float32 rounding (2^-24).
STENCIL_TAIL: Final = 2.0**-26


def compute_dtype(dtype: Any) -> Any:
  """float32 for half precision (XLA's FFT rejects it), else the dtype."""
  return jnp.promote_types(dtype, jnp.float32)


@functools.lru_cache(maxsize=1024)
def stencil_extent(size: int, lam: float, boundary: str,
                   scale: str) -> tuple[int, int] | None:
  """`(lo, hi)` such that "sobolev"'s `A^{-1}` along an axis of `size` is the
  circular stencil of offsets `-lo .. hi` to float32 rounding, or None when
  that takes more than `2 * MAX_STENCIL_HALF_WIDTH + 1` taps.

  `A^{-1}` is circulant on the period `P` (`size`, or `2 size` on the even
  extension for a Neumann boundary) with a positive, even generator `g`
  that decays geometrically (docs/math.md); the stencil keeps the offsets
  `|k| <= K` for the smallest `K` whose dropped entries sum to at most
  `STENCIL_TAIL` of `g`'s sum. Where `2 K + 1 >= P` it keeps the whole
  period (`P` taps), and is exact.
  """
  period = size if boundary == "periodic" else 2 * size
  gains = _gains.gain((size,), lam, "sobolev", boundary, scale,
                      extended=boundary == "neumann")
  g = np.abs(np.fft.irfft(gains, period))
  distance = np.minimum(np.arange(period), period - np.arange(period))
  order = np.argsort(distance, kind="stable")
  kept = np.cumsum(g[order])
  tail = kept[-1] - kept  # what is dropped beyond each entry
  enough = np.nonzero(tail <= STENCIL_TAIL * kept[-1])[0][0]
  half = int(distance[order][enough])
  extent = ((period - 1) // 2, period // 2) if 2 * half + 1 >= period else (
      half, half)
  return extent if sum(extent) <= 2 * MAX_STENCIL_HALF_WIDTH else None


def even_extension(x: jax.Array, axes: Sequence[int]) -> jax.Array:
  """`[x, reversed x]` along each axis: its DFT is `x`'s DCT-II.

  On it the Laplacian with a reflecting (Neumann) boundary is periodic, so
  the rfft that serves the periodic boundary serves this one too.
  """
  for a in axes:
    x = jnp.concatenate([x, jnp.flip(x, a)], axis=a)
  return x


@dataclasses.dataclass(frozen=True)
class Operator:
  """`A^{-1}` on every fiber along `axes`: linear in the array and in the
  multipliers of its eigenspaces.

  `multipliers(lam)` are the spectral gains, for the closed form the
  multipliers of the fiber's mean and of the rest, or for the stencil its
  taps. `op(x, *multipliers)` is
  linear in each, so its derivative in `lam` is `op(x, *d multipliers / d
  lam)`. It acts on each fiber alone and is self-adjoint. Hashable by value:
  a static parameter of the application's primitive. A frozen dataclass
  rather than a NamedTuple: jax < 0.9.2 takes a weak reference to every
  callable parameter of a primitive.
  """

  # "fft": the transform; "closed": mean + (x - mean) / lam; "stencil":
  # the circular stencil of offsets -lo .. hi along one axis.
  method: str
  axes: tuple[int, ...]  # sorted, non-negative
  sizes: tuple[int, ...]
  metric: str
  boundary: str
  scale: str
  dtype: Any  # the compute dtype
  extent: tuple[int, int] = (0, 0)  # the stencil's (lo, hi)

  def shifted(self, k: int) -> Operator:
    """The same operator on an array with `k` more leading (batch) axes."""
    return dataclasses.replace(self, axes=tuple(a + k for a in self.axes))

  def multipliers(self, lam: jax.Array,
                  order: int = 0) -> tuple[ArrayLike, ...]:
    """The multipliers for `lam`, or their `order`-th derivative in `lam`."""
    if order:
      return jax.jvp(lambda lam: self.multipliers(lam, order - 1), (lam,),
                     (jnp.ones_like(lam),))[1]
    if self.method == "closed":
      return jnp.ones((), self.dtype), (1.0 / lam).astype(self.dtype)
    gains = _gains.gain(self.sizes, lam, self.metric, self.boundary,
                        self.scale, extended=self.boundary == "neumann")
    if self.method == "fft":
      return (gains.astype(self.dtype),)
    # The taps: the generator of the circulant, at offsets -lo .. hi.
    period = (2 if self.boundary == "neumann" else 1) * self.sizes[0]
    generator = jnp.fft.irfft(gains, period)
    lo, hi = self.extent
    return (generator[np.arange(-lo, hi + 1) % period].astype(self.dtype),)

  def __call__(self, grad: jax.Array, *multipliers: ArrayLike) -> jax.Array:
    x = grad.astype(self.dtype)
    if self.method == "stencil":
      return self._stencil(x, *multipliers).astype(grad.dtype)
    if self.method == "closed":
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

  def _stencil(self, x: jax.Array, taps: ArrayLike) -> jax.Array:
    """`sum_k taps_k x[i - k]` along the axis, on the circle (periodic) or
    the even extension (Neumann): one pad and a slice per tap, which XLA
    fuses into one pass over the array."""
    (axis,), (size,), (lo, hi) = self.axes, self.sizes, self.extent
    pad = [(0, 0)] * x.ndim
    pad[axis] = (hi, lo)
    padded = jnp.pad(x, pad, mode="wrap" if self.boundary == "periodic"
                     else "symmetric")
    taps = jnp.asarray(taps)

    def term(k):  # taps_k x[i - k], for every i
      return taps[k + lo] * jax.lax.slice_in_dim(padded, hi - k,
                                                 hi - k + size, axis=axis)

    out = term(-lo)
    for k in range(-lo + 1, hi + 1):
      out = out + term(k)
    return out
