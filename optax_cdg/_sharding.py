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
from typing import TYPE_CHECKING

import jax
from jax._src import dispatch  # the registry named where it is used
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend import core as jax_core
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

if TYPE_CHECKING:
  from optax_cdg._operator import Operator


def plan_moves(
    sharding: NamedSharding, shape: Sequence[int], axes: Sequence[int],
) -> tuple[P, list[tuple[tuple[str, ...], int, int | None]]]:
  """Where each mesh axis sharding a transform axis goes while it runs.

  Returns the spec inside the computation (transform axes unsharded) and the
  moves `(mesh axes, transform axis, destination axis or None)`; None means no
  axis can take them and the transform axis is gathered.
  """
  mesh_shape, spec = sharding.mesh.shape, sharding.spec
  # The mesh axes of each array axis, as tuples (empty: not sharded).
  inner: list[tuple[str, ...]] = [
      () if e is None else e if isinstance(e, tuple) else (e,)
      for e in (*spec, *[None] * (len(shape) - len(spec)))]

  def split(i):  # how many shards axis i is in
    return math.prod(mesh_shape[n] for n in inner[i])

  moves = []
  for a in axes:
    names = inner[a]
    if not names:
      continue
    free = [i for i in range(len(shape))
            if i not in axes and shape[i] % (split(a) * split(i)) == 0]
    # Prefer an unsharded axis, then the one with the most room.
    dest = max(free, key=lambda i: (not inner[i], shape[i] // split(i)),
               default=None)
    inner[a] = ()
    if dest is not None:
      inner[dest] += names
    moves.append((names, a, dest))
  return P(*inner), moves


def explicit_sharding(x: jax.Array) -> NamedSharding | None:
  """The sharding of an explicitly sharded array, or None.

  On a mesh whose axes are all explicit, a replicated array has a spec that
  is all None.
  """
  sharding = jax.typeof(x).sharding
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or getattr(mesh, "empty", True) or not (
      any(sharding.spec) or mesh.are_all_axes_explicit):
    return None  # automatic sharding: invisible while tracing
  return sharding


def shard_mapped(op: Operator, x: jax.Array, lam: jax.Array,
                 sharding: NamedSharding) -> jax.Array:
  """`op` on an explicitly sharded `x`, shard by shard (`shard_map`)."""
  _, moves = plan_moves(sharding, x.shape, op.axes)

  def body(xl, lam):
    for names, a, dest in moves:
      xl = (jax.lax.all_gather(xl, names, axis=a, tiled=True) if dest is None
            else jax.lax.all_to_all(xl, names, dest, a, tiled=True))
    y = op(xl, *op.multipliers(lam))
    for names, a, dest in reversed(moves):
      if dest is None:  # each device keeps its own slice
        chunk = y.shape[a] // jax.lax.axis_size(names)
        y = jax.lax.dynamic_slice_in_dim(
            y, jax.lax.axis_index(names) * chunk, chunk, axis=a)
      else:
        y = jax.lax.all_to_all(y, names, a, dest, tiled=True)
    return y

  spec = sharding.spec
  return jax.shard_map(body, mesh=sharding.mesh, in_specs=(spec, P()),
                       check_vma=False, out_specs=spec)(x, lam)


def _partition(op, mesh, arg_shapes, result_shape):
  del result_shape
  x = arg_shapes[0]
  if isinstance(x.sharding, NamedSharding):
    inner = NamedSharding(x.sharding.mesh,
                          plan_moves(x.sharding, x.shape, op.axes)[0])
  elif all(x.sharding.shard_shape(x.shape)[a] == x.shape[a] for a in op.axes):
    inner = x.sharding  # fibers whole on each device: run it where it lies
  else:
    raise ValueError(
        f"optax_cdg cannot move the fibers of an array of shape {x.shape} "
        f"split along its transform axes {op.axes} by a "
        f"{type(x.sharding).__name__}; shard it with a NamedSharding, or "
        "leave the transform axes unsplit.")
  replicated = tuple(NamedSharding(mesh, P()) for _ in arg_shapes[1:])
  return mesh, op, inner, (inner, *replicated)


def _rule(op, mesh, arg_types, result_types):
  del op, mesh, result_types
  names = [" ".join(f"a{j}_{i}" for i in range(len(t.shape)))
           for j, t in enumerate(arg_types)]
  return ", ".join(names) + " -> " + names[0]


_partitioned = custom_partitioning(lambda op, x, *m: op(x, *m),
                                   static_argnums=(0,))
_partitioned.def_partition(
    partition=_partition, sharding_rule=_rule,
    # The result keeps the input's sharding.
    infer_sharding_from_operands=(
        lambda op, mesh, args, result: args[0].sharding))


# `fiberwise_p.bind(x, lam, op=op, order=k)` is `op(x, *d^k multipliers /
# d lam^k)`: a primitive, so that every transformation has a rule. It is
# linear and self-adjoint in `x` (its transpose is itself) and its
# derivative in `lam` is the same primitive one order up, so derivatives of
# any order, forward or reverse, stay partitioned. It lowers through
# custom_partitioning, which has no rules of its own.
fiberwise_p = jax_core.Primitive("cdg_fiberwise")
fiberwise_p.def_abstract_eval(lambda x, lam, **_: x)


def _bind_partitioned(x, lam, *, op, order):
  return _partitioned(op, x, *op.multipliers(lam, order))


# Lowering custom_partitioning needs the device assignment, which jit gives
# only to primitives in this registry (as JAX does for custom_partitioning).
dispatch.prim_requires_devices_during_lowering.add(fiberwise_p)
fiberwise_p.def_impl(
    jax.jit(_bind_partitioned, static_argnames=("op", "order")))
mlir.register_lowering(fiberwise_p, mlir.lower_fun(_bind_partitioned,
                                                   multiple_results=False))
ad.defjvp(
    fiberwise_p,
    lambda tx, x, lam, *, op, order: fiberwise_p.bind(
        tx, lam, op=op, order=order),
    lambda tlam, x, lam, *, op, order: (fiberwise_p.bind(
        x, lam, op=op, order=order + 1) * tlam).astype(x.dtype))


def _transpose(ct, x, lam, *, op, order):
  if ad.is_undefined_primal(lam):
    raise NotImplementedError("optax_cdg's operator is linear in the array, "
                              "not in the smoothing.")
  if type(ct) is ad.Zero:
    return ad.Zero(x.aval), None
  return fiberwise_p.bind(ct, lam, op=op, order=order), None


def _batch(args, dims, *, op, order):
  x, lam = args
  x_dim, lam_dim = dims
  if lam_dim is None:
    x = jnp.moveaxis(x, x_dim, 0)
    return fiberwise_p.bind(x, lam, op=op.shifted(1), order=order), 0
  # A batched smoothing: one partitioned call per value, in a loop, since
  # the multipliers then differ along the batch.
  lam = jnp.moveaxis(lam, lam_dim, 0)
  xs = batching.bdim_at_front(x, x_dim, lam.shape[0])
  return jax.lax.map(lambda a: fiberwise_p.bind(*a, op=op, order=order),
                     (xs, lam)), 0


ad.primitive_transposes[fiberwise_p] = _transpose
batching.primitive_batchers[fiberwise_p] = _batch
