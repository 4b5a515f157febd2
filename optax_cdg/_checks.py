"""Argument checks, one per argument, called where the argument enters.

Errors name the parameter, the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
import difflib
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The string options, in one table.
OPTIONS: dict[str, tuple[str, ...]] = {
    "metric": ("sobolev", "sobolev_mean", "reweighted", "l2"),
    "boundary": ("periodic", "neumann"),
    "scale": ("unit", "grid"),
    "method": ("auto", "fft", "closed"),
    "direction": ("output", "input", "spatial"),
}
# Names users write for an option (the paper's, lower-cased): for the hint
# in the error only, never accepted silently.
_ALIASES = {"h1": "sobolev", "h^1": "sobolev", "h~1": "sobolev_mean",
            "h~0": "reweighted", "h0": "l2", "euclidean": "l2",
            "circular": "periodic", "wrap": "periodic", "reflect": "neumann",
            "symmetric": "neumann", "rfft": "fft", "dct": "fft"}
# Metrics whose smoothing must be > 0 (the others need >= 0).
_POSITIVE = ("sobolev_mean", "reweighted")


def check_option(name: str, value: Any) -> str:
  """`value` if it is one of `OPTIONS[name]`; else a ValueError with a hint."""
  allowed = OPTIONS[name]
  if isinstance(value, str) and value in allowed:
    return value
  msg = (f"{name}={value!r} is not supported; expected one of "
         f"{', '.join(repr(a) for a in allowed)}.")
  if isinstance(value, str):
    low = value.strip().lower()
    hint = low if low in allowed else _ALIASES.get(low.replace(" ", ""))
    if hint not in allowed:
      hint = next(iter(difflib.get_close_matches(low, allowed, 1, 0.6)), None)
    if hint is not None:
      msg += f" Did you mean {hint!r}?"
  raise ValueError(msg)


def check_options(**values: Any) -> None:
  """`check_option` for each keyword, in order."""
  for name, value in values.items():
    check_option(name, value)


def check_method(method: Any, metric: str) -> str:
  """`method` for `metric` (both checked)."""
  if method in ("matmul", "blocked"):  # the methods of optax_cdg 0.1
    raise ValueError(
        f"method={method!r} was removed in optax_cdg 0.2: it gave the same "
        "result as the FFT, and its speed did not reach the training step "
        "(BENCHMARKS.md). Expected one of 'auto', 'fft', 'closed'; 'auto' "
        "is the default.")
  check_option("method", method)
  if method == "closed" and metric not in ("reweighted", "l2"):
    raise ValueError(
        f"method='closed' is not available for metric={metric!r}: only "
        "'reweighted' (and 'l2') have a closed form here; use 'auto' or "
        "'fft'.")
  return method


def scalar(value: Any, name: str = "smoothing") -> float | jax.Array:
  """A Python float for a concrete real scalar, a jax scalar for a tracer.

  A complex scalar with a zero imaginary part counts as real:
  `optax.inject_hyperparams` casts hyperparameters to the params' widest
  dtype, so one complex leaf makes `smoothing` complex.
  """
  if value is None:
    raise TypeError(
        f"{name}=None is not a number: pass a float (the transform's default "
        "is optax_cdg.DEFAULT_SMOOTHING = 0.1) or a schedule, a callable of "
        "the step count.")
  if isinstance(value, (bool, str, bytes)):
    raise TypeError(f"{name}={value!r} must be a real number (or a "
                    f"schedule), not {type(value).__name__}.")
  if isinstance(value, numbers.Real):
    return float(value)
  tracer = isinstance(value, jax.core.Tracer)
  try:
    arr = value if tracer else np.asarray(value)
  except Exception as e:  # pylint: disable=broad-except
    raise TypeError(
        f"{name}={value!r} must be a real number (or a schedule).") from e
  complex_ = jnp.issubdtype(arr.dtype, jnp.complexfloating)
  if jnp.shape(arr) != () or not (
      complex_ or jnp.issubdtype(arr.dtype, jnp.floating)
      or jnp.issubdtype(arr.dtype, jnp.integer)):
    head = name if tracer else f"{name}={value!r}"
    got = "a traced value of shape" if tracer else "shape"
    raise TypeError(f"{head} must be a real scalar; got {got} "
                    f"{jnp.shape(arr)} and dtype {arr.dtype}.")
  if tracer:
    # The default float (float64 under jax_enable_x64). A non-zero imaginary
    # part cannot raise under a trace: it poisons the value instead.
    out = jnp.real(arr).astype(jnp.result_type(float))
    return jnp.where(jnp.imag(arr) == 0, out, jnp.nan) if complex_ else out
  if complex_ and np.imag(arr) != 0:
    raise ValueError(
        f"{name}={value!r} must be real; it has a non-zero imaginary part.")
  return float(np.real(arr))


def is_concrete(lam: float | jax.Array) -> bool:
  """Whether a value returned by `scalar` is known at trace time."""
  return isinstance(lam, float)


def smoothing_valid(lam, metric: str):
  """Whether `lam` defines an SPD metric (a bool, or a traced bool)."""
  xp = np if is_concrete(lam) else jnp
  return xp.isfinite(lam) & (lam > 0 if metric in _POSITIVE else lam >= 0)


def check_smoothing(value: Any, metric: str,
                    name: str = "smoothing") -> float | jax.Array:
  """`scalar(value)`, valid for `metric` when concrete.

  A traced value is returned as it is: the gains turn NaN instead, since it
  cannot raise.
  """
  lam = scalar(value, name)
  if not is_concrete(lam) or smoothing_valid(lam, metric):
    return lam
  need = "> 0" if metric in _POSITIVE else ">= 0"
  where = f" for metric={metric!r}" if name == "smoothing" else ""
  raise ValueError(f"{name}={lam!r} is not valid{where}: it must be a finite "
                   f"number {need}.")


def _ints(value: Any, name: str, what: str) -> tuple[int, ...]:
  """An int or a sequence of ints (no bools, no silent `int()`)."""
  if isinstance(value, numbers.Integral) and not isinstance(value, bool):
    return (int(value),)
  try:
    items = () if isinstance(value, (str, bytes)) else tuple(value)
  except TypeError:
    items = ()
  if not items and not isinstance(value, (tuple, list)):
    raise TypeError(f"{name}={value!r} must be an int or {what}.")
  for a in items:
    if isinstance(a, bool) or not isinstance(a, numbers.Integral):
      raise TypeError(f"{name}={value!r} must contain ints; got {a!r}.")
  return tuple(int(a) for a in items)


def sizes(value: int | Sequence[int]) -> tuple[int, ...]:
  """Axis lengths: an int or a non-empty sequence of non-negative ints."""
  out = _ints(value, "sizes", "a sequence of ints")
  if not out or any(s < 0 for s in out):
    raise ValueError(
        f"sizes={out!r} must be one or more non-negative axis lengths.")
  return out


def axes(value: int | Sequence[int], ndim: int) -> tuple[int, ...]:
  """Sorted non-negative axes of an array with `ndim` dimensions."""
  items = _ints(value, "axes", "a tuple of ints")
  if not items:
    raise ValueError("axes=() must name at least one axis.")
  for a in items:
    if not -ndim <= a < ndim:
      raise ValueError(
          f"axes={items!r}: axis {a} is out of range for an array with "
          f"{ndim} dimensions (allowed: {-ndim} .. {ndim - 1}).")
  out = sorted(a % ndim for a in items)
  if len(set(out)) != len(out):
    raise ValueError(f"axes={items!r} names the same axis twice.")
  return tuple(out)


def float_array(grad: Any, name: str = "grad") -> jax.Array:
  """`grad` as an array, which must be real floating point."""
  if not hasattr(grad, "dtype") or not hasattr(grad, "shape"):
    grad = jnp.asarray(grad)
  if not jnp.issubdtype(grad.dtype, jnp.floating):
    raise TypeError(
        f"{name} must be a real floating-point array; got dtype {grad.dtype}.")
  return grad
