"""Fiber-local application of the operator to sharded arrays.

The operator acts on every fiber along its axes independently, so it needs no
communication unless a mesh axis shards the transform axes themselves. XLA
does not know that about its FFT: under SPMD it all-gathers the array first,
and on CPU some layouts crash inside the FFT thunk. This module runs the
per-shard computation explicitly:

- explicit sharding (`jax.typeof(x).sharding` names mesh axes): `shard_map`
  over the array's own spec;
- otherwise (automatic sharding: plain `jit`, shardings invisible while
  tracing): `custom_partitioning`, which sees the shardings XLA chose and
  lowers the same per-shard computation. On one device JAX inlines it, so
  the same path runs on every host, whatever its device count.

When a mesh axis shards a transform axis, it is moved onto another axis with
an all-to-all, the fibers are transformed whole, and moved back. A kernel with
no other axis divisible by that mesh axis size is all-gathered along the
transform axis instead (each device then keeps its own slice).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# fn(x, *gains) -> array of x's shape, acting on each fiber along `fn.axes`
# (sorted, non-negative), linear in x and in the gains, self-adjoint in x;
# `fn.gains(lam)` gives the gains. It must hash and compare by value (a frozen
# dataclass, say): it is a static argument of custom_partitioning, which
# caches on it. Its method `shifted(k)` returns the same operator for an array
# with k more leading axes (used by vmap).
FiberFn = Callable[..., jax.Array]

_SpecEntries = list[tuple[str, ...]]


def _entries(spec, ndim: int) -> _SpecEntries:
  out = []
  for e in tuple(spec) + (None,) * (ndim - len(tuple(spec))):
    out.append(() if e is None else (tuple(e) if isinstance(e, tuple) else (e,)))
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
  try:
    sharding = jax.typeof(x).sharding
  except Exception:  # pylint: disable=broad-except
    return None
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or getattr(mesh, "empty", True):
    return None
  entries = _entries(sharding.spec, x.ndim)
  types = tuple(getattr(mesh, "axis_types", ()))
  if not any(entries) and not (
      types and all(t == AxisType.Explicit for t in types)):
    return None  # automatic sharding: invisible while tracing
  return entries, mesh


def _shard_map_path(fn: FiberFn, x, consts, entries, mesh):
  _, moves = plan_moves(entries, x.shape, fn.axes, dict(mesh.shape))

  def body(xl, *cs):
    for names, a, dest in moves:
      if dest is None:
        xl = jax.lax.all_gather(xl, names, axis=a, tiled=True)
      else:
        xl = jax.lax.all_to_all(xl, names, split_axis=dest, concat_axis=a,
                                tiled=True)
    y = fn(xl, *cs)
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
  return jax.shard_map(body, mesh=mesh, in_specs=(spec,) + (P(),) * len(consts),
                       out_specs=spec)(x, *consts)


def _partition(fn, mesh, arg_shapes, result_shape):
  del result_shape
  x = arg_shapes[0]
  # Transform axes unsharded; replicated if the sharding is not named.
  inner = NamedSharding(mesh, P())
  if isinstance(x.sharding, NamedSharding):
    spec, _ = plan_moves(_entries(x.sharding.spec, len(x.shape)), x.shape,
                         fn.axes, dict(x.sharding.mesh.shape))
    inner = NamedSharding(x.sharding.mesh, _to_spec(spec))
  consts = (NamedSharding(mesh, P()),) * (len(arg_shapes) - 1)
  return mesh, fn, inner, (inner,) + consts


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
    infer_sharding_from_operands=lambda fn, mesh, args, result: args[0].sharding)


def _auto_path(fn: FiberFn, x, lam, gains=None):
  """`custom_partitioning`, made differentiable and batchable.

  custom_partitioning has no JVP or batching rule. The operator is linear in
  `x` and self-adjoint, so its VJP in `x` is itself; it is linear in its
  gains too, so its derivative in a traced `lam` is the same operator with
  the gains' derivative. A vmapped call is the same fiber-local computation
  on an array with one more leading axis (`gains` given, `lam` None).
  """

  @jax.custom_batching.custom_vmap
  def run(x, *gains):
    return _partitioned(fn, x, *gains)

  @run.def_vmap
  def _run_batched(axis_size, in_batched, x, *gains):
    del axis_size
    if any(in_batched[1:]):
      # A batched smoothing: still fiber-local, but outside the partitioner.
      in_axes = tuple(0 if b else None for b in in_batched)
      return jax.vmap(fn, in_axes=in_axes)(x, *gains), True
    if not in_batched[0]:
      return run(x, *gains), False
    return _auto_path(fn.shifted(1), x, None, gains), True

  if lam is None or isinstance(lam, float):
    gains = fn.gains(lam) if gains is None else gains

    @jax.custom_vjp
    def op(x):
      return run(x, *gains)

    op.defvjp(lambda x: (op(x), None), lambda _, ct: (op(ct),))
    return op(x)

  @jax.custom_vjp
  def op_lam(x, lam):
    return run(x, *fn.gains(lam))

  def fwd(x, lam):
    keep = x.value if lam.perturbed else None
    return op_lam(x.value, lam.value), (lam.value, keep)

  def bwd(res, ct):
    lam, x = res
    ct_x = run(ct, *fn.gains(lam))
    if x is None:
      return ct_x, jnp.zeros_like(lam)
    _, d_gains = jax.jvp(fn.gains, (lam,), (jnp.ones_like(lam),))
    return ct_x, jnp.sum(ct * run(x, *d_gains)).astype(lam.dtype)

  op_lam.defvjp(fwd, bwd, symbolic_zeros=True)
  return op_lam(x, lam)


def apply_fiberwise(fn: FiberFn, x: jax.Array, lam) -> jax.Array:
  """`fn(x, *fn.gains(lam))` for a `fn` that acts on each fiber alone.

  `lam` is a Python float or a traced scalar; the gains are replicated on
  every device.
  """
  explicit = _explicit_entries(x)
  if explicit is None:
    return _auto_path(fn, x, lam)
  if not any(explicit[0]):  # replicated: every device computes it all
    return fn(x, *fn.gains(lam))
  return _shard_map_path(fn, x, fn.gains(lam), *explicit)
