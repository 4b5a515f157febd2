"""JAX's transformations through the operator, each against float64 truth.

The public functions are `f(x, lam)`, linear in `x` with a symmetric matrix
`L(lam)` per fiber and smooth in `lam`. Each case applies one transformation
to `f` and states what it must give in terms of the float64 reference
`ref(x, lam) = L(lam) x` (tests/_reference.py): exactly for the derivatives
in `x` (linear algebra), by central differences of `ref` in float64 for those
in `lam`. Shared by tests/test_transformations.py (one device) and
tests/multidevice/test_transformations.py (sharded kernels).
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import _reference
import optax_cdg

LAM = 0.3
H = 1e-4  # the float64 central-difference step in `lam`


class Case(NamedTuple):
  run: Callable  # (f, x, lam, t) -> arrays
  want: Callable  # (ref, x, lam, t) -> float64 arrays of the same structure


def _d(ref, x, lam, order=1):
  """d^order ref / d lam^order by float64 central differences."""
  if order == 1:
    return (ref(x, lam + H) - ref(x, lam - H)) / (2 * H)
  return (ref(x, lam + 10 * H) - 2 * ref(x, lam) + ref(x, lam - 10 * H)) / (
      10 * H) ** 2


def _q(f):
  """A scalar loss in `lam`: <t, f(x, lam)>."""
  return lambda x, lam, t: jnp.sum(f(x, lam) * t)


def _dense(ref, x, lam):
  """L(lam) as an array of shape x.shape * 2 (a Jacobian's layout)."""
  eye = np.eye(x.size).reshape((x.size,) + x.shape)
  columns = np.stack([ref(e, lam).reshape(-1) for e in eye], axis=1)
  return columns.reshape(x.shape + x.shape)


def _square(ref, x, lam):
  """L(lam)^T L(lam) in a Jacobian's layout (L is symmetric)."""
  m = _dense(ref, x, lam).reshape(x.size, x.size)
  return (m @ m).reshape(x.shape + x.shape)


# In the updates `x`, at a fixed `lam` (L symmetric: L^T t = L t).
IN_UPDATES = {
    "jit": Case(lambda f, x, lam, t: jax.jit(f)(x, lam),
                lambda ref, x, lam, t: ref(x, lam)),
    "vmap": Case(
        lambda f, x, lam, t: jax.vmap(f, (0, None))(
            jax.tree.map(lambda a, b: jnp.stack([a, b]), x, t), lam),
        lambda ref, x, lam, t: np.stack([ref(x, lam), ref(t, lam)])),
    "grad": Case(lambda f, x, lam, t: jax.grad(_q(f))(x, lam, t),
                 lambda ref, x, lam, t: ref(t, lam)),
    "vjp": Case(lambda f, x, lam, t: jax.vjp(lambda y: f(y, lam), x)[1](t)[0],
                lambda ref, x, lam, t: ref(t, lam)),
    "jvp": Case(lambda f, x, lam, t: jax.jvp(lambda y: f(y, lam), (x,), (t,)),
                lambda ref, x, lam, t: (ref(x, lam), ref(t, lam))),
    "jacfwd": Case(lambda f, x, lam, t: jax.jacfwd(f)(x, lam),
                   lambda ref, x, lam, t: _dense(ref, x, lam)),
    "jacrev": Case(lambda f, x, lam, t: jax.jacrev(f)(x, lam),
                   lambda ref, x, lam, t: _dense(ref, x, lam)),
    "hessian": Case(
        lambda f, x, lam, t: jax.hessian(
            lambda y: 0.5 * jnp.sum(f(y, lam) ** 2))(x),
        lambda ref, x, lam, t: _square(ref, x, lam)),
    "linearize": Case(
        lambda f, x, lam, t: jax.linearize(lambda y: f(y, lam), x)[1](t),
        lambda ref, x, lam, t: ref(t, lam)),
    "linear_transpose": Case(
        lambda f, x, lam, t: jax.linear_transpose(
            lambda y: f(y, lam), x)(t)[0],
        lambda ref, x, lam, t: ref(t, lam)),
    "scan": Case(
        lambda f, x, lam, t: jax.lax.scan(
            lambda c, _: (f(c, lam), None), x, None, length=2)[0],
        lambda ref, x, lam, t: ref(ref(x, lam), lam)),
    "checkpoint": Case(
        lambda f, x, lam, t: jax.grad(jax.checkpoint(
            lambda y: 0.5 * jnp.sum(f(y, lam) ** 2)))(x),
        lambda ref, x, lam, t: ref(ref(x, lam), lam)),
}

# In the smoothing `lam` (a traced scalar), at a fixed `x`.
IN_SMOOTHING = {
    "jit": Case(lambda f, x, lam, t: jax.jit(f)(x, jnp.float32(lam)),
                lambda ref, x, lam, t: ref(x, lam)),
    "vmap": Case(
        lambda f, x, lam, t: jax.vmap(f, (None, 0))(
            x, jnp.asarray([lam, 2 * lam])),
        lambda ref, x, lam, t: np.stack([ref(x, lam), ref(x, 2 * lam)])),
    "grad": Case(lambda f, x, lam, t: jax.grad(_q(f), 1)(x, lam, t),
                 lambda ref, x, lam, t: np.sum(_d(ref, x, lam) * t)),
    "vjp": Case(
        lambda f, x, lam, t: jax.vjp(lambda s: f(x, s), lam)[1](t)[0],
        lambda ref, x, lam, t: np.sum(_d(ref, x, lam) * t)),
    "jvp": Case(
        lambda f, x, lam, t: jax.jvp(lambda s: f(x, s), (lam,), (1.0,))[1],
        lambda ref, x, lam, t: _d(ref, x, lam)),
    "jacfwd": Case(lambda f, x, lam, t: jax.jacfwd(f, 1)(x, lam),
                   lambda ref, x, lam, t: _d(ref, x, lam)),
    "jacrev": Case(lambda f, x, lam, t: jax.jacrev(f, 1)(x, lam),
                   lambda ref, x, lam, t: _d(ref, x, lam)),
    "hessian": Case(lambda f, x, lam, t: jax.hessian(_q(f), 1)(x, lam, t),
                    lambda ref, x, lam, t: np.sum(_d(ref, x, lam, 2) * t)),
    "linearize": Case(
        lambda f, x, lam, t: jax.linearize(lambda s: f(x, s), lam)[1](1.0),
        lambda ref, x, lam, t: _d(ref, x, lam)),
    "scan": Case(
        lambda f, x, lam, t: jax.lax.scan(
            lambda c, s: (c, f(x, s)), 0.0, jnp.asarray([lam, 2 * lam]))[1],
        lambda ref, x, lam, t: np.stack([ref(x, lam), ref(x, 2 * lam)])),
    "checkpoint": Case(
        lambda f, x, lam, t: jax.grad(jax.checkpoint(_q(f)), 1)(x, lam, t),
        lambda ref, x, lam, t: np.sum(_d(ref, x, lam) * t)),
}


def channel_directed(x, lam):
  """The transform's update of one conv kernel (the output axis)."""
  tx = optax_cdg.channel_directed(lam)
  return tx.update({"kernel": x}, tx.init({"kernel": x}))[0]["kernel"]


def metric_gradient(x, lam):
  return optax_cdg.metric_gradient(x, lam)


def laplacian_smoothing(x, lam):
  tx = optax_cdg.laplacian_smoothing(lam)
  return tx.update({"w": x}, optax.EmptyState())[0]["w"]


def _fibers_ref(x, lam):
  """The defaults: sobolev, periodic, grid scale along the last axis."""
  n = x.shape[-1]
  return _reference.apply_dense(
      x, (-1,), _reference.metric_matrix((n,), lam, "sobolev", "periodic",
                                         "grid"))


def _lsgd_ref(x, lam):
  """LSGD: one periodic Sobolev fiber through the whole leaf, OIHW order."""
  perm = optax_cdg._lsgd.torch_layout_permutation(x.ndim)  # pylint: disable=protected-access
  flat = np.transpose(np.asarray(x, np.float64), perm).reshape(-1)
  a = _reference.metric_matrix((flat.size,), lam, "sobolev", "periodic",
                               "grid")
  out = np.linalg.solve(a, flat).reshape([x.shape[p] for p in perm])
  return np.transpose(out, np.argsort(perm))


FUNCTIONS = {
    "channel_directed": (channel_directed, _fibers_ref),
    "metric_gradient": (metric_gradient, _fibers_ref),
    "laplacian_smoothing": (laplacian_smoothing, _lsgd_ref),
}


def case(wrt: str, transformation: str) -> Case:
  return (IN_UPDATES if wrt == "updates" else IN_SMOOTHING)[transformation]


def check(function: str, wrt: str, transformation: str, x, t, got=None,
          atol: float = 2e-5) -> None:
  """Runs one case (or takes its result `got`) against its float64 truth."""
  f, ref = FUNCTIONS[function]
  c = case(wrt, transformation)
  if got is None:
    got = c.run(f, x, LAM, t)
  want = c.want(lambda a, s: ref(np.asarray(a, np.float64), s),
                np.asarray(x, np.float64), LAM, np.asarray(t, np.float64))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    w = np.asarray(w, np.float64)
    assert np.shape(g) == w.shape, (np.shape(g), w.shape)
    scale = max(1.0, float(np.abs(w).max()))
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=0,
                               atol=atol * scale)
