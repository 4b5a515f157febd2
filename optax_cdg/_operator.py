"""The operator `A^{-1}` along some axes of an array: its multipliers in the
Laplacian's eigenbasis and its evaluation, with nothing of the transformations,
devices or shardings it runs under (`_apply` adds those)."""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from optax_cdg import _gains


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


@dataclasses.dataclass(frozen=True)
class Operator:
  """`A^{-1}` on every fiber along `axes`: linear in the array and in the
  multipliers of its eigenspaces.

  `multipliers(lam)` are the spectral gains, or for the closed form the
  multipliers of the fiber's mean and of the rest. `op(x, *multipliers)` is
  linear in each, so its derivative in `lam` is `op(x, *d multipliers / d
  lam)`. It acts on each fiber alone and is self-adjoint. Hashable by value:
  a static parameter of the application's primitive. A frozen dataclass
  rather than a NamedTuple: jax < 0.9.2 takes a weak reference to every
  callable parameter of a primitive.
  """

  closed: bool  # mean + (x - mean) / lam instead of the transform
  axes: tuple[int, ...]  # sorted, non-negative
  sizes: tuple[int, ...]
  metric: str
  boundary: str
  scale: str
  dtype: Any  # the compute dtype

  def shifted(self, k: int) -> Operator:
    """The same operator on an array with `k` more leading (batch) axes."""
    return dataclasses.replace(self, axes=tuple(a + k for a in self.axes))

  def multipliers(self, lam: jax.Array,
                  order: int = 0) -> tuple[ArrayLike, ...]:
    """The multipliers for `lam`, or their `order`-th derivative in `lam`."""
    if order:
      return jax.jvp(lambda lam: self.multipliers(lam, order - 1), (lam,),
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
