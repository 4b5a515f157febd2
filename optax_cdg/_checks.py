"""Argument checks: every public argument of the package is checked here.

Each argument is checked once, where it enters (the factory or the public
function); everything below works with checked values. Errors name the
parameter, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The string options, in one table: name -> allowed values. `direction` is
# listed for its hints; its allowed values are the selection module's.
OPTIONS: dict[str, tuple[str, ...]] = {
    "metric": ("sobolev", "sobolev_mean", "reweighted", "l2"),
    "boundary": ("periodic", "neumann"),
    "scale": ("unit", "grid"),
    "method": ("auto", "fft", "closed"),
    "direction": ("output", "input", "spatial"),
}
# Other names users write for an option (the paper's, lower-cased), for the
# hint in the error only: an alias is never accepted silently.
_ALIASES: dict[str, dict[str, str]] = {
    "metric": {"h1": "sobolev", "h^1": "sobolev", "h~1": "sobolev_mean",
               "h~0": "reweighted", "h0": "l2", "euclidean": "l2"},
    "boundary": {"circular": "periodic", "wrap": "periodic",
                 "reflect": "neumann", "symmetric": "neumann"},
    "method": {"rfft": "fft", "dct": "fft"},
}

# Methods of optax_cdg 0.1, named in their own error.
_REMOVED_METHODS = ("matmul", "blocked")

# Smoothing values that define an SPD metric: ">= 0" or "> 0" per metric.
_POSITIVE = ("sobolev_mean", "reweighted")


def _suggestion(name: str, value: str, allowed: Sequence[str]) -> str | None:
  low = value.strip().lower()
  if low in allowed:
    return low
  alias = _ALIASES.get(name, {}).get(low.replace(" ", ""))
  if alias in allowed:
    return alias
  close = difflib.get_close_matches(low, allowed, n=1, cutoff=0.6)
  return close[0] if close else None


def check_option(name: str, value: Any,
                 allowed: Sequence[str] | None = None) -> str:
  """Returns `value` if it is one of the allowed strings, else raises.

  Args:
    name: the parameter's name, a key of `OPTIONS` unless `allowed` is given.
    value: the value passed.
    allowed: the allowed values, if not `OPTIONS[name]`.

  Raises:
    ValueError: naming the parameter, the value, the allowed values and, for
      a misspelt or aliased string, the likely one.
  """
  allowed = tuple(OPTIONS[name] if allowed is None else allowed)
  if isinstance(value, str) and value in allowed:
    return value
  msg = (f"{name}={value!r} is not supported; expected one of "
         f"{', '.join(repr(a) for a in allowed)}.")
  if isinstance(value, str):
    hint = _suggestion(name, value, allowed)
    if hint is not None:
      msg += f" Did you mean {hint!r}?"
  raise ValueError(msg)


def check_method(method: Any, metric: str) -> str:
  """`method` for `metric` (both checked)."""
  if method in _REMOVED_METHODS:
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
        "'fft'."
    )
  return method


def _real_part(value: Any, name: str) -> Any:
  """A complex scalar with a zero imaginary part as its real part.

  `optax.inject_hyperparams` casts numeric hyperparameters to the widest
  dtype of the params, so one complex leaf makes `smoothing` complex.
  """
  imag = np.imag(value)
  if np.any(imag != 0):
    raise ValueError(
        f"{name}={value!r} must be real; it has a non-zero imaginary part.")
  return np.real(value)


def _traced_scalar(value: jax.Array, name: str) -> jax.Array:
  """A traced smoothing value as a real scalar of the default float dtype."""
  dtype = value.dtype
  real = (jnp.issubdtype(dtype, jnp.floating)
          or jnp.issubdtype(dtype, jnp.integer))
  if jnp.shape(value) != () or not (
      real or jnp.issubdtype(dtype, jnp.complexfloating)):
    raise TypeError(
        f"{name} must be a real scalar; got a traced value of shape "
        f"{jnp.shape(value)} and dtype {dtype}."
    )
  # The default float: float64 under jax_enable_x64, so that float64
  # gradients keep full precision with a traced smoothing too.
  out_dtype = jnp.result_type(float)
  if real:
    return jnp.asarray(value, out_dtype)
  # Complex (Optax's cast): a non-zero imaginary part cannot raise under a
  # trace, so it poisons the value like any other rejected one.
  return jnp.where(jnp.imag(value) == 0,
                   jnp.real(value).astype(out_dtype), jnp.nan)


def scalar(value: Any, name: str = "smoothing") -> float | jax.Array:
  """A Python float for a concrete real scalar, a jax scalar for a tracer.

  A complex scalar whose imaginary part is zero counts as real.

  Raises:
    TypeError: for anything that is not a (real) scalar.
    ValueError: for a concrete complex scalar with a non-zero imaginary part.
  """
  if value is None:
    raise TypeError(
        f"{name}=None is not a number: pass a float (the transform's default "
        "is optax_cdg.DEFAULT_SMOOTHING = 0.1) or a schedule, a callable of "
        "the step count.")
  if isinstance(value, bool) or isinstance(value, (str, bytes)):
    raise TypeError(
        f"{name}={value!r} must be a real number (or a schedule), "
        f"not {type(value).__name__}."
    )
  if isinstance(value, numbers.Real):
    return float(value)
  if isinstance(value, jax.core.Tracer):
    return _traced_scalar(value, name)
  try:
    arr = np.asarray(value)
  except Exception as e:  # pylint: disable=broad-except
    raise TypeError(
        f"{name}={value!r} must be a real number (or a schedule)."
    ) from e
  if arr.shape == () and np.issubdtype(arr.dtype, np.complexfloating):
    arr = _real_part(arr, name)
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


def is_concrete(lam: float | jax.Array) -> bool:
  """Whether a value returned by `scalar` is known at trace time."""
  return isinstance(lam, float)


def smoothing_valid(lam, metric: str):
  """Whether `lam` defines an SPD metric (a bool, or a traced bool)."""
  xp = np if is_concrete(lam) else jnp
  positive = lam > 0 if metric in _POSITIVE else lam >= 0
  return xp.isfinite(lam) & positive


def check_smoothing(value: Any, metric: str,
                    name: str = "smoothing") -> float | jax.Array:
  """The smoothing value, checked for `metric`: see `scalar`.

  A concrete value the metric rejects raises a ValueError; a traced one is
  returned as it is (the gains turn NaN instead, since it cannot raise).
  """
  lam = scalar(value, name)
  if not is_concrete(lam) or smoothing_valid(lam, metric):
    return lam
  need = "> 0" if metric in _POSITIVE else ">= 0"
  # LSGD's sigma has no metric argument to blame.
  where = f" for metric={metric!r}" if name == "smoothing" else ""
  raise ValueError(
      f"{name}={lam!r} is not valid{where}: it must be a finite number "
      f"{need}."
  )


def sizes(value: int | Sequence[int]) -> tuple[int, ...]:
  """Axis lengths: an int or a non-empty sequence of non-negative ints."""
  if isinstance(value, numbers.Integral) and not isinstance(value, bool):
    value = (int(value),)
  if isinstance(value, (str, bytes)):
    raise TypeError(f"sizes={value!r} must be an int or a sequence of ints.")
  try:
    items = tuple(value)  # type: ignore[arg-type]
  except TypeError as e:
    raise TypeError(
        f"sizes={value!r} must be an int or a sequence of ints."
    ) from e
  # No silent int(): a length of 2.5, "8" or True is a mistake.
  if any(isinstance(s, bool) or not isinstance(s, numbers.Integral)
         for s in items):
    raise TypeError(f"sizes={value!r} must be an int or a sequence of ints.")
  out = tuple(int(s) for s in items)
  if not out or any(s < 0 for s in out):
    raise ValueError(
        f"sizes={out!r} must be one or more non-negative axis lengths."
    )
  return out


def axes(value: int | Sequence[int], ndim: int,
         name: str = "axes") -> tuple[int, ...]:
  """Sorted non-negative axes, validated against `ndim`."""
  if isinstance(value, numbers.Integral) and not isinstance(value, bool):
    value = (value,)
  try:
    items = tuple(value)  # type: ignore[arg-type]
  except TypeError as e:
    raise TypeError(
        f"{name}={value!r} must be an int or a tuple of ints.") from e
  if not items:
    raise ValueError(f"{name}=() must name at least one axis.")
  out = []
  for a in items:
    if isinstance(a, bool) or not isinstance(a, numbers.Integral):
      raise TypeError(f"{name}={items!r} must contain ints; got {a!r}.")
    if not -ndim <= a < ndim:
      raise ValueError(
          f"{name}={items!r}: axis {a} is out of range for an array with "
          f"{ndim} dimensions (allowed: {-ndim} .. {ndim - 1})."
      )
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{name}={items!r} names the same axis twice.")
  return tuple(sorted(out))


def float_array(grad: Any, name: str = "grad") -> jax.Array:
  """`grad` as an array (if it is not one), which must be real floating."""
  if not hasattr(grad, "dtype") or not hasattr(grad, "shape"):
    grad = jnp.asarray(grad)
  if not jnp.issubdtype(grad.dtype, jnp.floating):
    raise TypeError(
        f"{name} must be a real floating-point array; got dtype {grad.dtype}."
    )
  return grad
