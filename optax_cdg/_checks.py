"""The checks of arguments that several public functions share.

Each raises at build or trace time and names the argument, the value and what
to pass instead.
"""

from __future__ import annotations

from collections.abc import Sequence
import numbers
import typing
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

Metric = Literal["sobolev", "sobolev_mean", "reweighted", "l2"]
Boundary = Literal["periodic", "neumann"]
Scale = Literal["unit", "grid"]
Method = Literal["auto", "fft", "closed", "stencil"]
Direction = Literal["output", "input", "spatial"]

# The string options, in one table, from the types that document them.
OPTIONS: dict[str, tuple[str, ...]] = {
    "metric": typing.get_args(Metric),
    "boundary": typing.get_args(Boundary),
    "scale": typing.get_args(Scale),
    "method": typing.get_args(Method),
    "direction": typing.get_args(Direction),
}


def check_options(**values: Any) -> None:
  """A ValueError for the first keyword that is not one of its `OPTIONS`."""
  for name, value in values.items():
    if not (isinstance(value, str) and value in OPTIONS[name]):
      raise ValueError(f"{name}={value!r} is not supported; expected one of "
                       f"{', '.join(map(repr, OPTIONS[name]))}.")
  # Which metrics each specialised method serves ("l2" needs none).
  serves = {"closed": ("reweighted", "a closed form"),
            "stencil": ("sobolev", "a short stencil")}
  if values.get("method") in serves and values["metric"] not in (
      serves[values["method"]][0], "l2"):
    metric, what = serves[values["method"]]
    raise ValueError(
        f"method={values['method']!r} is not available for "
        f"metric={values['metric']!r}: only {metric!r} and 'l2' have "
        f"{what}; use 'auto' or 'fft'.")


def describe(value: Any) -> str:
  """`value` as a user would name it: None, the str '0.1', an array of
  shape (3,) and dtype float32."""
  if value is None:
    return "None"
  if hasattr(value, "shape") and hasattr(value, "dtype"):
    kind = {"U": "str", "S": "bytes", "O": "object"}.get(
        np.dtype(value.dtype).kind, str(value.dtype))
    traced = "a traced array" if isinstance(value, jax.core.Tracer) else (
        "an array")
    return f"{traced} of shape {tuple(value.shape)} and dtype {kind}"
  if callable(value):
    name = getattr(value, "__qualname__", type(value).__name__)
    return f"the callable {name}"
  text = repr(value)
  text = text if len(text) <= 40 else text[:36] + " ..."
  return f"the {type(value).__name__} {text}"


def check_smoothing(value: Any, metric: str, name: str = "smoothing",
                    expected: str = "a real number") -> float | jax.Array:
  """`lam` for `metric`: a Python float, or for a traced value a jax scalar.

  `metric`'s `A` is positive definite for a finite `lam >= 0` ("sobolev",
  "l2") or `lam > 0` ("sobolev_mean", "reweighted"). A traced value cannot
  raise, so one that is invalid (or has an imaginary part) becomes NaN, which
  poisons every gain. A complex value with a zero imaginary part counts as
  real: `optax.inject_hyperparams` casts hyperparameters to the params'
  widest dtype, complex included. `expected` names what the caller takes, in
  the TypeError ("a real number or a schedule" where a schedule is allowed).
  """
  traced = isinstance(value, jax.core.Tracer)
  arr = value if traced else np.asarray(value)
  if np.ndim(arr) or not jnp.issubdtype(arr.dtype, jnp.number):
    raise TypeError(f"{name} must be {expected}; got {describe(value)}.")
  positive = metric in ("sobolev_mean", "reweighted")
  if traced:
    lam = jnp.real(arr).astype(jnp.result_type(float))
    valid = jnp.isfinite(lam) & (lam > 0 if positive else lam >= 0)
    return jnp.where(valid & (jnp.imag(arr) == 0), lam, jnp.nan)
  if np.iscomplexobj(arr) and np.imag(arr) != 0:
    raise ValueError(f"{name}={value!r} has a non-zero imaginary part; it "
                     "must be real.")
  number = float(np.real(arr))
  if not (np.isfinite(number) and (number > 0 if positive else number >= 0)):
    where = f" for metric={metric!r}" if name == "smoothing" else ""
    shown = value if type(value) in (int, float) else number
    raise ValueError(f"{name}={shown!r} is not valid{where}: it must be a "
                     f"finite number {'>' if positive else '>='} 0.")
  return number


def ints(value: Any, label: str) -> tuple[int, ...]:
  """An int or a sequence of ints, as a tuple (a bool is not an int here)."""
  items = (value,) if isinstance(value, numbers.Integral) else value
  if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or any(
      isinstance(a, bool) or not isinstance(a, numbers.Integral)
      for a in items):
    raise TypeError(f"{label} must be an int or a sequence of ints.")
  return tuple(int(a) for a in items)


def axes(value: Any, shape: Sequence[int],
         label: str | None = None) -> tuple[int, ...]:
  """Sorted, distinct, non-negative axes of an array of `shape`.

  `label` names them in errors; the default is `axes=<value>`.
  """
  label = f"axes={value!r}" if label is None else label
  items, ndim = ints(value, label), len(shape)
  if not items:
    raise ValueError(f"{label} must name at least one axis.")
  for a in items:
    if not -ndim <= a < ndim:
      raise ValueError(
          f"{label}: axis {a} is out of range for shape {tuple(shape)} "
          f"(allowed {-ndim} .. {ndim - 1}).")
  out = sorted(a % ndim for a in items)
  if len(set(out)) != len(out):
    raise ValueError(f"{label} names the same axis twice.")
  return tuple(out)

