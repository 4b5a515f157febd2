"""Spectral gains of the channel-directed metrics.

Every metric in this package is a function of the discrete Laplacian along the
direction axes, so it is diagonal in the Laplacian's eigenbasis (the DFT for a
periodic boundary, the orthonormal DCT-II for a Neumann boundary). Its inverse,
which maps the Euclidean gradient to the gradient in the metric, is therefore a
gain per frequency. This module computes those gains (in float64 numpy for a
concrete smoothing value, in jax for a traced one, from one formula).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import jax
import jax.numpy as jnp
import numpy as np

from optax_cdg import _checks

# Chosen by the rule fixed in docs/evidence.md before any test number was
# read (MNIST-1D, CNN widths 32/64/128, AdamW and SGD-momentum, 5 paired
# seeds): "sobolev" with scale="grid" at 0.1 damps the top channel frequency
# by 1 / (1 + 4 * 0.1) = 0.71 at every width, where the former default
# ("unit", 1e-4) damped it more the wider the layer (0.13 at 128 channels).
# Every public function shares them, so one number means one operator.
DEFAULT_SMOOTHING: Final = 0.1
DEFAULT_SCALE: Final = "grid"


def eigenvalues(sizes: Sequence[int], boundary: str, scale: str,
                extended: bool = False) -> np.ndarray:
  """`mu`, the eigenvalues of `-Laplacian` summed over axes of `sizes`.

  Along an axis of length `n`: periodic `c 4 sin^2(pi k / n)`, Neumann
  `c 4 sin^2(pi k / (2 n))`, with `c = n^2` for the "unit" scale and `1` for
  the "grid" scale. Float64, in the layout of the transform: the last axis
  in rfft layout for a periodic boundary; for a Neumann boundary, `extended`
  gives them on the even extension of length `2 n` (periodic there, rfft
  layout again), which is how the operator applies the DCT-II's diagonal.
  """
  mu = np.zeros((), np.float64)
  for i, n in enumerate(sizes):
    last = i == len(sizes) - 1
    period = n if boundary == "periodic" else 2 * n
    count = (period // 2 + 1 if last else period) if (
        boundary == "periodic" or extended) else n
    c = float(n) ** 2 if scale == "unit" else 1.0
    k = np.arange(count, dtype=np.float64)
    mu = mu[..., None] + c * 4.0 * np.sin(np.pi * k / period) ** 2
  return mu


def gain(sizes: Sequence[int], lam: float | jax.Array, metric: str,
         boundary: str, scale: str, extended: bool = False) -> Any:
  """`spectral_gain` for checked arguments (`extended`: see `eigenvalues`).

  Float64 numpy for a number `lam`, a jax array of `lam`'s dtype for a traced
  one. A NaN `lam` (an invalid traced one) makes every gain NaN: `lam / lam`
  is the mean's gain, 1.
  """
  xp: Any = np if isinstance(lam, float) else jnp
  mu = xp.asarray(eigenvalues(sizes, boundary, scale, extended),
                  np.float64 if xp is np else jnp.result_type(lam))
  zero = mu == 0.0  # the constant (mean) mode only
  with np.errstate(divide="ignore", invalid="ignore"):
    if metric == "sobolev":
      return 1.0 / (1.0 + lam * mu)
    if metric == "sobolev_mean":
      return xp.where(zero, lam / lam, 1.0 / xp.where(zero, 1.0, lam * mu))
    if metric == "reweighted":
      return xp.where(zero, lam / lam, 1.0 / lam)
    return xp.ones_like(mu)


def spectral_gain(
    sizes: int | Sequence[int],
    smoothing: Any = DEFAULT_SMOOTHING,
    *,
    metric: str = "sobolev",
    boundary: str = "periodic",
    scale: str = DEFAULT_SCALE,
) -> np.ndarray | jax.Array:
  r"""The gain of every frequency of a channel-directed metric.

  The metric `A` is a function of the discrete Laplacian along the axes of the
  given `sizes`; its inverse is diagonal in the Laplacian's eigenbasis, with

  ================  ========  ======================
  metric            gain_0    gain_k, k != 0
  ================  ========  ======================
  "l2"              1         1
  "sobolev"         1         1 / (1 + lam mu_k)
  "sobolev_mean"    1         1 / (lam mu_k)
  "reweighted"      1         1 / lam
  ================  ========  ======================

  where `lam` is `smoothing` and `mu_k` the eigenvalue of `-Laplacian` (summed
  over the axes for several axes).

  Args:
    sizes: the length of the direction axis, or the lengths of several axes.
    smoothing: `lam`, a number or a (possibly traced) scalar; the default is
      the transform's, `DEFAULT_SMOOTHING`.
    metric: "sobolev", "sobolev_mean", "reweighted" or "l2".
    boundary: "periodic" (DFT) or "neumann" (DCT-II).
    scale: "grid" (spacing 1, `c(N) = 1`; the default, as for the
      transform) or "unit" (the axis is the unit interval, `c(N) = N^2`).

  Returns:
    The gains, of shape `sizes` with the last axis in rfft layout
    (`N // 2 + 1`) for a periodic boundary. A float64 numpy array for a
    concrete `smoothing`, a jax array of the default float dtype (float32, or
    float64 under `jax_enable_x64`) for a traced one.

  Examples:
    >>> import optax_cdg
    >>> optax_cdg.spectral_gain(8).round(4).tolist()  # the defaults
    [1.0, 0.9447, 0.8333, 0.7455, 0.7143]
    >>> optax_cdg.spectral_gain(8, 0.01, scale="unit").round(4).tolist()
    [1.0, 0.7273, 0.4386, 0.314, 0.2809]
    >>> optax_cdg.spectral_gain(8, 0.5, metric="reweighted").tolist()
    [1.0, 2.0, 2.0, 2.0, 2.0]

  References:
    Lao et al., `Channel-Directed Gradients for Optimization of Convolutional
    Neural Networks <https://arxiv.org/abs/2008.10766>`_, 2020.

    Sundaramoorthi et al., `Sobolev Active Contours
    <https://doi.org/10.1007/s11263-006-0635-2>`_, IJCV 2007.
  """
  _checks.check_options(metric=metric, boundary=boundary, scale=scale)
  lengths = _checks.ints(sizes, f"sizes={sizes!r}")
  if not lengths or min(lengths) < 0:
    raise ValueError(
        f"sizes={sizes!r} must be one or more non-negative axis lengths.")
  return gain(lengths, _checks.check_smoothing(smoothing, metric), metric,
              boundary, scale)
