"""Fiber-local application of the operator to sharded arrays.

The operator acts on every fiber along its axes independently, so it needs no
communication unless a mesh axis shards the transform axes themselves. XLA
does not know that about its FFT: under SPMD it all-gathers the array first,
and on CPU some layouts crash inside the FFT thunk. This module runs the
per-shard computation explicitly:

- explicit sharding (`jax.typeof(x).sharding` names mesh axes): `shard_map`
  over the array's own spec;
- otherwise (automatic sharding: plain `jit`, shardings invisible while
  tracing): the primitive `fiberwise_p`, lowered through
  `custom_partitioning`, which sees the shardings XLA chose and lowers the
  same per-shard computation. On one device JAX inlines it, so the same path
  runs on every host, whatever its device count. The primitive carries the
  rules of a linear operator (JVP, transpose, batching), which
  custom_partitioning lacks, so every transformation stays partitioned.

When a mesh axis shards a transform axis, it is moved onto another axis with
an all-to-all, the fibers are transformed whole, and moved back. A kernel with
no other axis divisible by that mesh axis size is all-gathered along the
transform axis instead (each device then keeps its own slice).
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Protocol

import jax
from jax._src import dispatch  # the registry named where it is used
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend import core as jax_core
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike


class FiberFn(Protocol):
  """What this module needs of the operator (`_operator.Operator`).

  `fn(x, *fn.gains(lam))` acts on each fiber along `fn.axes` (sorted,
  non-negative) alone, linear and self-adjoint in `x`. It hashes and compares
  by value: it is a static argument of custom_partitioning and a parameter
  of the primitive, both cached on it.
  """

  @property
  def axes(self) -> tuple[int, ...]: ...

  def __call__(self, x: jax.Array, /, *gains: ArrayLike) -> jax.Array: ...

  def gains(self, lam: jax.Array,
            order: int = 0) -> tuple[ArrayLike, ...]:
    """The gains for `lam`, or their `order`-th derivative in `lam`."""

  def shifted(self, k: int) -> FiberFn:
    """The same operator on an array with `k` more leading axes."""


_SpecEntries = list[tuple[str, ...]]


def _entries(spec, ndim: int) -> _SpecEntries:
  out = []
  for e in tuple(spec) + (None,) * (ndim - len(tuple(spec))):
    out.append(() if e is None
               else tuple(e) if isinstance(e, tuple) else (e,))
  return out


def _to_spec(entries: _SpecEntries) -> P:
  return P(*[(e if len(e) > 1 else e[0]) if e else None for e in entries])


def plan_moves(
    entries: _SpecEntries, shape: Sequence[int], axes: Sequence[int],
    mesh_shape: dict[str, int],
) -> tuple[_SpecEntries, list[tuple[tuple[str, ...], int, int | None]]]:
  """Where each mesh axis sharding a transform axis goes while it runs.

  Returns the spec inside the computation (transform axes unsharded) and the
  moves `(mesh axes, transform axis, destination axis or None)`; None means no
  axis can take them and the transform axis is gathered.
  """
  inner = list(entries)
  moves = []
  for a in axes:
    names = inner[a]
    if not names:
      continue
    inner[a] = ()
    size = math.prod(mesh_shape[n] for n in names)

    def room(i):  # how many ways axis i could still be split
      return shape[i] // math.prod(mesh_shape[n] for n in inner[i])

    # Prefer an unsharded axis, then the one with the most room.
    free = [i for i in range(len(shape)) if i not in axes
            and shape[i] % (size * math.prod(mesh_shape[n]
                                             for n in inner[i])) == 0]
    dest = max(free, key=lambda i: (not inner[i], room(i))) if free else None
    if dest is not None:
      inner[dest] = inner[dest] + names
    moves.append((names, a, dest))
  return inner, moves


def _explicit_entries(x: jax.Array) -> tuple[_SpecEntries, object] | None:
  """The spec entries and mesh of an explicitly sharded array, or None.

  On a mesh whose axes are all explicit, a replicated array has entries that
  are all empty.
  """
  sharding = jax.typeof(x).sharding
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or getattr(mesh, "empty", True):
    return None
  entries = _entries(sharding.spec, x.ndim)
  types = tuple(getattr(mesh, "axis_types", ()))
  if not any(entries) and not (
      types and all(t == AxisType.Explicit for t in types)):
    return None  # automatic sharding: invisible while tracing
  return entries, mesh


def _shard_map_path(fn: FiberFn, x, lam, entries, mesh):
  _, moves = plan_moves(entries, x.shape, fn.axes, dict(mesh.shape))

  def body(xl, lam):
    for names, a, dest in moves:
      if dest is None:
        xl = jax.lax.all_gather(xl, names, axis=a, tiled=True)
      else:
        xl = jax.lax.all_to_all(xl, names, split_axis=dest, concat_axis=a,
                                tiled=True)
    y = fn(xl, *fn.gains(lam))
    for names, a, dest in reversed(moves):
      if dest is None:
        chunk = y.shape[a] // math.prod(mesh.shape[n] for n in names)
        y = jax.lax.dynamic_slice_in_dim(
            y, jax.lax.axis_index(names) * chunk, chunk, axis=a)
      else:
        y = jax.lax.all_to_all(y, names, split_axis=a, concat_axis=dest,
                               tiled=True)
    return y

  spec = _to_spec(entries)
  return jax.shard_map(body, mesh=mesh, in_specs=(spec, P()), check_vma=False,
                       out_specs=spec)(x, lam)


def _partition(fn, mesh, arg_shapes, result_shape):
  del result_shape
  x = arg_shapes[0]
  if isinstance(x.sharding, NamedSharding):
    spec, _ = plan_moves(_entries(x.sharding.spec, len(x.shape)), x.shape,
                         fn.axes, dict(x.sharding.mesh.shape))
    inner = NamedSharding(x.sharding.mesh, _to_spec(spec))
  elif all(x.sharding.shard_shape(x.shape)[a] == x.shape[a] for a in fn.axes):
    inner = x.sharding  # fibers whole on each device: run it where it lies
  else:
    raise ValueError(
        f"optax_cdg cannot move the fibers of an array of shape {x.shape} "
        f"split along its transform axes {fn.axes} by a "
        f"{type(x.sharding).__name__}; shard it with a NamedSharding, or "
        "leave the transform axes unsplit.")
  gains = tuple(NamedSharding(mesh, P()) for _ in arg_shapes[1:])
  return mesh, fn, inner, (inner, *gains)


def _rule(fn, mesh, arg_types, result_types):
  del fn, mesh, result_types
  names = [" ".join(f"a{j}_{i}" for i in range(len(t.shape)))
           for j, t in enumerate(arg_types)]
  return ", ".join(names) + " -> " + names[0]


def _call(fn, x, *gains):
  return fn(x, *gains)


_partitioned = custom_partitioning(_call, static_argnums=(0,))
_partitioned.def_partition(
    partition=_partition, sharding_rule=_rule,
    # The result keeps the input's sharding.
    infer_sharding_from_operands=(
        lambda fn, mesh, args, result: args[0].sharding))


# `fiberwise_p.bind(x, lam, fn=fn, order=k)` is `fn(x, *d^k gains / d lam^k)`:
# a primitive, so that every transformation has a rule. It is linear and
# self-adjoint in `x` (its transpose is itself) and its derivative in `lam`
# is the same primitive one order up, so derivatives of any order, forward
# or reverse, stay partitioned. It lowers through custom_partitioning, which
# has no rules of its own.
fiberwise_p = jax_core.Primitive("cdg_fiberwise")
fiberwise_p.def_abstract_eval(lambda x, lam, **_: x)


def _bind_partitioned(x, lam, *, fn, order):
  return _partitioned(fn, x, *fn.gains(lam, order))


# Lowering custom_partitioning needs the device assignment, which jit gives
# only to primitives in this registry (as JAX does for custom_partitioning).
dispatch.prim_requires_devices_during_lowering.add(fiberwise_p)
fiberwise_p.def_impl(
    jax.jit(_bind_partitioned, static_argnames=("fn", "order")))
mlir.register_lowering(fiberwise_p, mlir.lower_fun(_bind_partitioned,
                                                   multiple_results=False))
ad.defjvp(
    fiberwise_p,
    lambda tx, x, lam, *, fn, order: fiberwise_p.bind(
        tx, lam, fn=fn, order=order),
    lambda tlam, x, lam, *, fn, order: (fiberwise_p.bind(
        x, lam, fn=fn, order=order + 1) * tlam).astype(x.dtype))


def _transpose(ct, x, lam, *, fn, order):
  if ad.is_undefined_primal(lam):
    raise NotImplementedError(
        "optax_cdg's operator is linear in the array, not in the smoothing: "
        "it has no transpose in the smoothing.")
  if type(ct) is ad.Zero:
    return ad.Zero(x.aval), None
  return fiberwise_p.bind(ct, lam, fn=fn, order=order), None


def _batch(args, dims, *, fn, order):
  x, lam = args
  x_dim, lam_dim = dims
  if lam_dim is None:
    x = jnp.moveaxis(x, x_dim, 0)
    return fiberwise_p.bind(x, lam, fn=fn.shifted(1), order=order), 0
  # A batched smoothing: one partitioned call per value, in a loop, since
  # the gains then differ along the batch.
  lam = jnp.moveaxis(lam, lam_dim, 0)
  if x_dim is None:
    return jax.lax.map(
        lambda lam: fiberwise_p.bind(x, lam, fn=fn, order=order), lam), 0
  return jax.lax.map(lambda xl: fiberwise_p.bind(*xl, fn=fn, order=order),
                     (jnp.moveaxis(x, x_dim, 0), lam)), 0


ad.primitive_transposes[fiberwise_p] = _transpose
batching.primitive_batchers[fiberwise_p] = _batch


def apply_fiberwise(fn: FiberFn, x: jax.Array, lam) -> jax.Array:
  """`fn(x, *fn.gains(lam))` for a `fn` that acts on each fiber alone.

  `lam` is a Python float or a traced scalar; the gains are replicated on
  every device.
  """
  explicit = _explicit_entries(x)
  if explicit is None:
    return fiberwise_p.bind(x, lam, fn=fn, order=0)
  if not any(explicit[0]):  # replicated: every device computes it all
    return fn(x, *fn.gains(lam))
  return _shard_map_path(fn, x, lam, *explicit)
