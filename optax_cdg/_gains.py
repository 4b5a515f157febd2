"""Spectral gains of the channel-directed metrics.

Every metric in this package is a function of the discrete Laplacian along the
direction axes, so it is diagonal in the Laplacian's eigenbasis (the DFT for a
periodic boundary, the orthonormal DCT-II for a Neumann boundary). Its inverse,
which maps the Euclidean gradient to the gradient in the metric, is therefore a
gain per frequency. This module computes those gains and validates the
arguments shared by the whole package.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

METRICS = ("sobolev", "sobolev_mean", "reweighted", "l2")
BOUNDARIES = ("periodic", "neumann")
SCALES = ("unit", "grid")


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
  """Returns `value` if it is one of `allowed`, else raises a ValueError."""
  if not isinstance(value, str) or value not in allowed:
    raise ValueError(
        f"{name}={value!r} is not supported; expected one of "
        f"{', '.join(repr(a) for a in allowed)}."
    )
  return value


def concrete_scalar(value: Any, name: str = "smoothing") -> float | None:
  """Returns a Python float for a concrete real scalar, None for a tracer.

  Raises a TypeError for anything that is not a real scalar.
  """
  if isinstance(value, bool) or isinstance(value, (str, bytes)):
    raise TypeError(
        f"{name}={value!r} must be a real number (or a schedule), "
        f"not {type(value).__name__}."
    )
  if isinstance(value, numbers.Real):
    return float(value)
  if isinstance(value, jax.core.Tracer):
    real = jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(
        value.dtype, jnp.integer)
    if jnp.shape(value) != () or not real:
      raise TypeError(
          f"{name} must be a real scalar; got a traced value of shape "
          f"{jnp.shape(value)} and dtype {value.dtype}."
      )
    return None
  try:
    arr = np.asarray(value)
  except Exception as e:  # pylint: disable=broad-except
    raise TypeError(
        f"{name}={value!r} must be a real number (or a schedule)."
    ) from e
  if arr.shape != () or not (
      np.issubdtype(arr.dtype, np.floating)
      or np.issubdtype(arr.dtype, np.integer)
      or arr.dtype == jnp.bfloat16
  ):
    raise TypeError(
        f"{name}={value!r} must be a real scalar; got shape {arr.shape} and "
        f"dtype {arr.dtype}."
    )
  return float(arr)


def smoothing_is_valid(value: float, metric: str) -> bool:
  """Whether a concrete smoothing value defines an SPD metric."""
  if not np.isfinite(value):
    return False
  if metric in ("sobolev_mean", "reweighted"):
    return value > 0
  return value >= 0


def check_smoothing(value: Any, metric: str, name: str = "smoothing") -> None:
  """Raises a ValueError for a concrete smoothing value the metric rejects."""
  lam = concrete_scalar(value, name)
  if lam is None or smoothing_is_valid(lam, metric):
    return
  need = "> 0" if metric in ("sobolev_mean", "reweighted") else ">= 0"
  # LSGD's sigma has no metric argument to blame.
  where = f" for metric={metric!r}" if name == "smoothing" else ""
  raise ValueError(
      f"{name}={lam!r} is not valid{where}: it must be a finite number "
      f"{need}."
  )


def laplacian_eigenvalues(
    n: int, *, boundary: str = "periodic", scale: str = "unit",
    half: bool = False,
) -> np.ndarray:
  r"""Eigenvalues `mu_k` of `-Laplacian` along one axis of length `n`.

  periodic: `c(n) 4 sin^2(pi k / n)`; Neumann: `c(n) 4 sin^2(pi k / (2 n))`,
  with `c(n) = n^2` for the "unit" scale and `1` for the "grid" scale.

  Args:
    n: the axis length.
    boundary: "periodic" (DFT eigenbasis) or "neumann" (DCT-II eigenbasis).
    scale: "unit" or "grid".
    half: for a periodic boundary, return only `k = 0 .. n // 2` (the rfft
      layout).

  Returns:
    A float64 numpy array of eigenvalues in frequency order.
  """
  check_choice("boundary", boundary, BOUNDARIES)
  check_choice("scale", scale, SCALES)
  c = float(n) ** 2 if scale == "unit" else 1.0
  if boundary == "periodic":
    k = np.arange(n // 2 + 1 if half else n, dtype=np.float64)
    return c * 4.0 * np.sin(np.pi * k / n) ** 2
  k = np.arange(n, dtype=np.float64)
  return c * 4.0 * np.sin(np.pi * k / (2.0 * n)) ** 2


def _normalize_sizes(sizes: int | Sequence[int]) -> tuple[int, ...]:
  if isinstance(sizes, numbers.Integral) and not isinstance(sizes, bool):
    sizes = (int(sizes),)
  if isinstance(sizes, (str, bytes)):
    raise TypeError(f"sizes={sizes!r} must be an int or a sequence of ints.")
  try:
    items = tuple(sizes)  # type: ignore[arg-type]
  except TypeError as e:
    raise TypeError(
        f"sizes={sizes!r} must be an int or a sequence of ints."
    ) from e
  # No silent int(): a length of 2.5, "8" or True is a mistake.
  if any(isinstance(s, bool) or not isinstance(s, numbers.Integral)
         for s in items):
    raise TypeError(f"sizes={sizes!r} must be an int or a sequence of ints.")
  sizes = tuple(int(s) for s in items)
  if not sizes or any(s < 0 for s in sizes):
    raise ValueError(
        f"sizes={sizes!r} must be one or more non-negative axis lengths."
    )
  return sizes


def summed_eigenvalues(
    sizes: Sequence[int], boundary: str, scale: str
) -> np.ndarray:
  """`mu` of the Laplacian summed over several axes, in the transform layout.

  For a periodic boundary the last axis is in rfft layout (`n // 2 + 1`
  frequencies), as produced by `jnp.fft.rfftn`.
  """
  mu = np.zeros((), np.float64)
  last = len(sizes) - 1
  for i, n in enumerate(sizes):
    m = laplacian_eigenvalues(
        n, boundary=boundary, scale=scale, half=(i == last)
    )
    mu = mu[..., None] + m
  return mu


def gain_from_eigenvalues(mu: np.ndarray, smoothing: Any, metric: str):
  """The gain `1 / (eigenvalue of the metric)` at each Laplacian eigenvalue.

  With a concrete smoothing value this is a float64 numpy array. With a traced
  value it is a jax array of the default float dtype (float32, or float64
  under `jax_enable_x64`), and any value the metric rejects (negative,
  zero where it must be positive, not finite) turns every gain into NaN:
  a traced argument cannot raise, so the error must be loud instead.
  """
  check_choice("metric", metric, METRICS)
  zero = mu == 0.0  # the constant (mean) mode only; never exactly zero else
  lam = concrete_scalar(smoothing)
  if lam is not None:
    check_smoothing(lam, metric)
    with np.errstate(divide="ignore"):
      if metric == "sobolev":
        return 1.0 / (1.0 + lam * mu)
      if metric == "sobolev_mean":
        return np.where(zero, 1.0, 1.0 / np.where(zero, 1.0, lam * mu))
      if metric == "reweighted":
        return np.where(zero, 1.0, 1.0 / lam)
      return np.ones_like(mu)
  # The default float: float64 under jax_enable_x64, so that float64
  # gradients keep full precision with a traced smoothing too.
  lam = jnp.asarray(smoothing, jnp.result_type(float))
  mu = jnp.asarray(mu, lam.dtype)
  if metric == "sobolev":
    gain = 1.0 / (1.0 + lam * mu)
  elif metric == "sobolev_mean":
    gain = jnp.where(zero, 1.0, 1.0 / jnp.where(zero, 1.0, lam * mu))
  elif metric == "reweighted":
    gain = jnp.where(zero, 1.0, 1.0 / lam)
  else:
    gain = jnp.ones_like(mu)
  valid = jnp.isfinite(lam) & (
      lam > 0 if metric in ("sobolev_mean", "reweighted") else lam >= 0
  )
  return jnp.where(valid, gain, jnp.nan)


def spectral_gain(
    sizes: int | Sequence[int],
    smoothing: Any,
    *,
    metric: str = "sobolev",
    boundary: str = "periodic",
    scale: str = "unit",
):
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
    smoothing: `lam`, a number or a (possibly traced) scalar.
    metric: "sobolev", "sobolev_mean", "reweighted" or "l2".
    boundary: "periodic" (DFT) or "neumann" (DCT-II).
    scale: "unit" (the axis is the unit interval, `c(N) = N^2`) or "grid"
      (spacing 1, `c(N) = 1`).

  Returns:
    The gains, of shape `sizes` with the last axis in rfft layout
    (`N // 2 + 1`) for a periodic boundary. A float64 numpy array for a
    concrete `smoothing`, a jax array of the default float dtype (float32, or
    float64 under `jax_enable_x64`) for a traced one.

  References:
    Lao et al., `Channel-Directed Gradients for Optimization of Convolutional
    Neural Networks <https://arxiv.org/abs/2008.10766>`_, 2020.

    Sundaramoorthi et al., `Sobolev Active Contours
    <https://doi.org/10.1007/s11263-006-0635-2>`_, IJCV 2007.
  """
  sizes = _normalize_sizes(sizes)
  check_choice("metric", metric, METRICS)
  check_choice("boundary", boundary, BOUNDARIES)
  check_choice("scale", scale, SCALES)
  return gain_from_eigenvalues(
      summed_eigenvalues(sizes, boundary, scale), smoothing, metric
  )
