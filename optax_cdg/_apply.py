"""Applying the operator to arrays: `metric_gradient`, on any host and sharding.

The mathematics sits below (`_gains`, `_operator`); this module is where it
meets JAX's machinery, and the one module that uses JAX internals:

- a number's multipliers are computed once, outside the program, and enter
  it as constants;
- `fiberwise_p` is a primitive with the rules of a linear operator (JVP,
  transpose, batching), lowered through `custom_partitioning`, so that
  under automatic sharding (plain `jit`) every device transforms its own
  fibers: XLA does not know that the operator acts fiber by fiber, and under
  SPMD it would all-gather the array before an FFT. On one device JAX
  inlines it, so the same path runs on every host, whatever its device
  count;
- an explicitly sharded array (`jax.typeof(x).sharding` names mesh axes)
  runs under `shard_map` over its own spec.

When a mesh axis shards a transform axis, it is moved onto another axis with
an all-to-all, the fibers are transformed whole, and moved back. A kernel with
no other axis divisible by that mesh axis size is all-gathered along the
transform axis instead (each device then keeps its own slice).
"""

from __future__ import annotations

from collections.abc import Sequence
import concurrent.futures
import dataclasses
import functools
import importlib
import math
from typing import Any

import jax
from jax.experimental.custom_partitioning import custom_partitioning
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike
import numpy as np

from optax_cdg import _checks
from optax_cdg import _gains
from optax_cdg._operator import compute_dtype
from optax_cdg._operator import Operator
from optax_cdg._operator import stencil_extent

# The JAX internals this package uses, and why. Checked against jax 0.8.1 to
# 0.10.2; tests/test_apply.py names any that a release removes.
JAX_INTERNALS = {
    # Lowering custom_partitioning needs the device assignment, which jit
    # gives only to primitives in this registry (JAX adds its own
    # custom_partitioning primitive to it).
    "jax._src.dispatch.prim_requires_devices_during_lowering":
        "lowering the partitioned call inside a primitive",
    "jax.extend.core.Primitive": "the primitive `fiberwise_p`",
    "jax.interpreters.ad.defjvp": "its JVP rule",
    "jax.interpreters.ad.primitive_transposes": "its transpose rule",
    "jax.interpreters.ad.is_undefined_primal": "its transpose rule",
    "jax.interpreters.ad.Zero": "its transpose rule (a symbolic zero)",
    "jax.interpreters.batching.primitive_batchers": "its batching rule",
    "jax.interpreters.batching.bdim_at_front": "its batching rule",
    "jax.interpreters.mlir.register_lowering": "its lowering",
    "jax.interpreters.mlir.lower_fun": "its lowering",
    # A thread does not inherit the caller's default device (a config value
    # that jax.config's type stub does not declare).
    "jax.config.jax_default_device": "a number's multipliers, on the "
                                     "caller's default device",
}


def internal(path: str) -> Any:
  """The JAX internal named by its dotted `path`, or an ImportError naming
  it."""
  module, _, name = path.rpartition(".")
  try:
    obj = (jax.config if module == "jax.config"
           else importlib.import_module(module))
    return getattr(obj, name)
  except (ImportError, AttributeError) as e:
    raise ImportError(
        f"optax_cdg needs {path} ({JAX_INTERNALS[path]}), which jax "
        f"{jax.__version__} does not have; it was checked against jax 0.8.1 "
        "to 0.10.2.") from e


_PRIM_REQUIRES_DEVICES = internal(
    "jax._src.dispatch.prim_requires_devices_during_lowering")
_Primitive = internal("jax.extend.core.Primitive")
_defjvp = internal("jax.interpreters.ad.defjvp")
_transposes = internal("jax.interpreters.ad.primitive_transposes")
_is_undefined_primal = internal("jax.interpreters.ad.is_undefined_primal")
_Zero = internal("jax.interpreters.ad.Zero")
_batchers = internal("jax.interpreters.batching.primitive_batchers")
_bdim_at_front = internal("jax.interpreters.batching.bdim_at_front")
_register_lowering = internal("jax.interpreters.mlir.register_lowering")
_lower_fun = internal("jax.interpreters.mlir.lower_fun")


def metric_gradient(
    grad: jax.Array,
    smoothing: Any = _gains.DEFAULT_SMOOTHING,
    *,
    metric: _checks.Metric = "sobolev",
    axes: int | Sequence[int] = (-1,),
    boundary: _checks.Boundary = "periodic",
    scale: _checks.Scale = _gains.DEFAULT_SCALE,
    method: _checks.Method = "auto",
) -> jax.Array:
  r"""The gradient in a channel-directed metric: `A^{-1} grad` along `axes`.

  Every 1-D slice of `grad` along `axes` (every block, for several axes) is a
  fiber `f`. The metric `<h, q>_A = sum over fibers of h^T A q` has
  `A` a function of the discrete Laplacian `L` along `axes`:

  - "sobolev" (H1): `A = I + lam L`;
  - "sobolev_mean" (H~1): `A = P + lam L`, with `P` the projector onto the
    fiber's mean;
  - "reweighted" (H~0): `A = P + lam (I - P)`;
  - "l2": `A = I`.

  The gradient of the same loss in that metric is `A^{-1} f` per fiber, which
  is computed exactly in the Laplacian's eigenbasis: `irfft(gain * rfft(f))`
  for a periodic boundary and `idct(gain * dct(f))` (orthonormal DCT-II) for a
  Neumann boundary, with the gains of :func:`optax_cdg.spectral_gain`. The
  "reweighted" metric needs no transform: `mean + (f - mean) / lam`.

  The Neumann transform is the periodic one on the fiber's even extension
  `[f, reversed f]` (whose DFT is the DCT-II), so one rfft of length `2 N`
  serves both boundaries. Either way the work is `O(N log N)` per fiber and
  the memory a few arrays of the gradient's size.

  Half-precision inputs are computed in float32 and returned in their dtype.

  Args:
    grad: a real floating-point array.
    smoothing: `lam`, a number or a (possibly traced) scalar; the default is
      the transform's, `_gains.DEFAULT_SMOOTHING`. "sobolev" needs
      `lam >= 0` (0 is the identity); "sobolev_mean" and "reweighted" need
      `lam > 0` ("reweighted" is the identity at 1).
    metric: "sobolev", "sobolev_mean", "reweighted" or "l2".
    axes: the direction: one axis, or several (their Laplacians are summed).
    boundary: "periodic" (FFT) or "neumann" (DCT-II).
    scale: "grid" (`c(N) = 1`; the default, as for the transform) or "unit"
      (`c(N) = N^2`, the axis is the unit interval).
    method: "auto" (the default: the closed form for "reweighted", the
      transform otherwise), "fft" (the transform for every metric),
      "closed" ("reweighted" and "l2" only) or "stencil" ("sobolev" and
      "l2" only: along one axis, for a number `lam` and float32 work, the
      circular stencil of at most 33 taps that equals `A^{-1}` to float32
      rounding, one fused pass over the array with no FFT; the transform
      where no such stencil exists, for several axes, a traced `lam` or
      float64). All agree with the exact `A^{-1} grad` to rounding.

  Returns:
    An array of the shape and dtype of `grad`.

  Examples:
    A spike in one channel is spread to its neighbours, and the mean is kept:

    >>> import jax.numpy as jnp
    >>> import optax_cdg
    >>> g = jnp.array([[0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    >>> y = optax_cdg.metric_gradient(g, 0.01, scale="unit")
    >>> [round(v, 3) for v in y[0].tolist()]
    [0.202, 0.652, 2.12, 0.652, 0.202, 0.067, 0.038, 0.067]
    >>> round(float(y.sum()), 5)
    4.0

    The "reweighted" metric scales the deviations from the mean by `1 / lam`:

    >>> optax_cdg.metric_gradient(g, 2.0, metric="reweighted").tolist()
    [[0.25, 0.25, 2.25, 0.25, 0.25, 0.25, 0.25, 0.25]]

  References:
    Lao et al., `Channel-Directed Gradients for Optimization of Convolutional
    Neural Networks <https://arxiv.org/abs/2008.10766>`_, 2020.

    Sundaramoorthi et al., `Sobolev Active Contours
    <https://doi.org/10.1007/s11263-006-0635-2>`_, IJCV 2007.
  """
  _checks.check_options(metric=metric, boundary=boundary, scale=scale,
                        method=method)
  return apply(grad, _checks.check_smoothing(smoothing, metric), metric=metric,
               axes=axes, boundary=boundary, scale=scale, method=method)


def apply(grad: Any, lam: float | jax.Array, *, metric: str,
          axes: int | Sequence[int], boundary: str, scale: str,
          method: str) -> jax.Array:
  """`metric_gradient` for checked options and smoothing `lam`.

  Fiber-local on every device, however `grad` is sharded: a mesh axis that
  splits the fibers is moved to another axis while they are transformed.
  """
  grad = grad if hasattr(grad, "dtype") else jnp.asarray(grad)
  if not jnp.issubdtype(grad.dtype, jnp.floating):
    raise TypeError(
        f"grad must be a real floating-point array; got dtype {grad.dtype}.")
  axes = _checks.axes(axes, grad.shape)
  sizes = tuple(grad.shape[a] for a in axes)
  if metric == "l2" or grad.size == 0 or all(n == 1 for n in sizes):
    return grad
  dtype = compute_dtype(grad.dtype)
  extent = None
  # The stencil drops what is below float32 rounding: float32 work only.
  if (method == "stencil" and isinstance(lam, float) and len(sizes) == 1
      and metric == "sobolev" and dtype == jnp.float32):
    extent = stencil_extent(sizes[0], lam, boundary, scale)
  if method == "closed" or (method == "auto" and metric == "reweighted"):
    kind = "closed"
  else:
    kind = "fft" if extent is None else "stencil"
  op = Operator(kind, axes, sizes, metric, boundary, scale, dtype,
                extent or (0, 0))
  # A number's multipliers are constants of the program; a traced one's are
  # computed in it.
  fixed = lam if isinstance(lam, float) else None
  lam = jnp.asarray(lam, jnp.result_type(float))
  sharding = explicit_sharding(grad)
  if sharding is None:  # automatic sharding, or one device
    return fiberwise_p.bind(grad, lam, op=op, order=0, fixed=fixed)
  if not any(sharding.spec):  # replicated: every device computes it all
    return op(grad, *multipliers(op, lam, 0, fixed))
  return shard_mapped(op, grad, lam, fixed, sharding)


def multipliers(op: Operator, lam: jax.Array, order: int,
                fixed: float | None) -> tuple[ArrayLike, ...]:
  """`op.multipliers(lam, order)`, as constants where `lam` is the number
  `fixed`."""
  if fixed is None or order:
    return op.multipliers(lam, order)
  device = internal("jax.config.jax_default_device")
  # They do not depend on the axes: one entry serves every kernel shape.
  return _constants(dataclasses.replace(op, axes=()), fixed,
                    np.dtype(jnp.result_type(float)), device)


@functools.lru_cache(maxsize=1024)
def _constants(op: Operator, smoothing: float, lam_dtype: np.dtype,
               device: Any) -> tuple[np.ndarray, ...]:
  """The multipliers of a number, as constants of the program.

  Computed once, by the compiled function that computes a traced
  smoothing's in the program: the same XLA kernel on the same backend, so a
  number and a traced smoothing give the same bits, while the step computes
  nothing for a number (computing them in the step cost the ResNet-18 CPU
  step 3 %). In a thread of its own, outside the caller's trace, mesh and
  manual axes (a shard_map body, other processes' devices), with the
  caller's precision and default device, which a thread does not inherit.
  """
  lam = np.asarray(smoothing, lam_dtype)

  def compute() -> tuple[np.ndarray, ...]:
    with jax.enable_x64(lam_dtype == np.float64), jax.default_device(device):
      return tuple(map(np.asarray, jax.jit(op.multipliers)(lam)))

  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(compute).result()


# ------------------------------------------------------ explicit sharding


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
                 fixed: float | None, sharding: NamedSharding) -> jax.Array:
  """`op` on an explicitly sharded `x`, shard by shard (`shard_map`)."""
  _, moves = plan_moves(sharding, x.shape, op.axes)

  def body(xl, lam):
    for names, a, dest in moves:
      xl = (jax.lax.all_gather(xl, names, axis=a, tiled=True) if dest is None
            else jax.lax.all_to_all(xl, names, dest, a, tiled=True))
    y = op(xl, *multipliers(op, lam, 0, fixed))
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


# ---------------------------------------------------- automatic sharding


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


# `fiberwise_p.bind(x, lam, op=op, order=k, fixed=f)` is `op(x, *d^k
# multipliers / d lam^k)`, with the multipliers as constants where `lam` is
# the number `f` (k = 0): a primitive, so that every transformation has a
# rule. It is linear and self-adjoint in `x` (its transpose is itself) and
# its derivative in `lam` is the same primitive one order up, so derivatives
# of any order, forward or reverse, stay partitioned. It lowers through
# custom_partitioning, which has no rules of its own.
fiberwise_p = _Primitive("cdg_fiberwise")
fiberwise_p.def_abstract_eval(lambda x, lam, **_: x)


def _bind_partitioned(x, lam, *, op, order, fixed):
  return _partitioned(op, x, *multipliers(op, lam, order, fixed))


_PRIM_REQUIRES_DEVICES.add(fiberwise_p)
fiberwise_p.def_impl(
    jax.jit(_bind_partitioned, static_argnames=("op", "order", "fixed")))
_register_lowering(fiberwise_p, _lower_fun(_bind_partitioned,
                                           multiple_results=False))
_defjvp(
    fiberwise_p,
    lambda tx, x, lam, **params: fiberwise_p.bind(tx, lam, **params),
    lambda tlam, x, lam, *, op, order, fixed: (fiberwise_p.bind(
        x, lam, op=op, order=order + 1, fixed=fixed) * tlam).astype(x.dtype))


def _transpose(ct, x, lam, **params):
  if _is_undefined_primal(lam):
    raise NotImplementedError("optax_cdg's operator is linear in the array, "
                              "not in the smoothing.")
  if type(ct) is _Zero:
    return _Zero(x.aval), None
  return fiberwise_p.bind(ct, lam, **params), None


def _batch(args, dims, *, op, order, fixed):
  x, lam = args
  x_dim, lam_dim = dims
  if lam_dim is None:
    x = jnp.moveaxis(x, x_dim, 0)
    return fiberwise_p.bind(x, lam, op=op.shifted(1), order=order,
                            fixed=fixed), 0
  # A batched smoothing: one partitioned call per value, in a loop, since
  # the multipliers then differ along the batch.
  lam = jnp.moveaxis(lam, lam_dim, 0)
  xs = _bdim_at_front(x, x_dim, lam.shape[0])
  return jax.lax.map(
      lambda a: fiberwise_p.bind(*a, op=op, order=order, fixed=fixed),
      (xs, lam)), 0


_transposes[fiberwise_p] = _transpose
_batchers[fiberwise_p] = _batch
