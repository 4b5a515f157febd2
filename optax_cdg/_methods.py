"""Exact ways to apply `A^{-1}` along the direction, and the rule that picks one.

The operator `K = A^{-1}` along one axis of length `N` is a fixed symmetric
`N x N` matrix (a circulant for a periodic boundary, Toeplitz plus Hankel for
a Neumann boundary). Besides the spectral transform (`rfft`/DCT-II), it can be
applied exactly as

- "matmul": `x @ K` with `K` precomputed in float64 at trace time;
- "blocked": the fiber cut into chunks of `b` values. `K` restricted to one
  chunk's rows and another chunk's columns has rank `R` (2 for "sobolev", 3
  for "sobolev_mean", 1 for "reweighted"): the Green's function of a constant
  coefficient difference operator is a sum of exponentials or a polynomial,
  whose span is the same on every chunk. So, with `U` an orthonormal basis of
  that span (`b x R`), `K = I_P (x) B + (I_P (x) U) S (I_P (x) U)^T` and

      y_p = x_p B + (sum_q (x_q U) S_qp) U^T,

  skinny matmuls (`2 (b + R)` flops per value) and a small mix of the chunk
  summaries (`2 P R^2 / b` flops per value). Every factor is orthonormal or a block
  of `K`, so the float32 error is that of a matmul; the factorization itself
  is checked in float64 to 1e-9 of `max |K|` when it is built.
- "closed": the reweighted metric's `mean + (x - mean) / lam`.

All matrices are numpy float64 arrays, computed once per
`(sizes, smoothing, metric, boundary, scale)` and cached, so under `jax.jit`
they are constants of the compiled program.

Every method, the spectral one ("fft") included, is a `Solver` in `SOLVERS`:
how it builds its operands and how it applies them. `choose` is the one place
where "auto" becomes a method (from `cost`, the table of docs/performance.md,
and the measured crossovers); `Operator.__call__` the one place where a
method is applied.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_cdg import _checks
from optax_cdg import _gains

# CPU rule, from the crossovers in BENCHMARKS.md (2-core AMD EPYC, XLA:CPU).
CPU_MATMUL_MAX = 64          # dense x @ K up to this many points per fiber
# GPU/TPU rule (not measured here; see BENCHMARKS.md): a dense matmul is
# memory-bound on tensor cores / the MXU up to about this size.
ACCELERATOR_MATMUL_MAX = 128
# A matmul needs K, which a traced smoothing value forces us to build at run
# time in O(N^3): only worth it for small N.
TRACED_MATMUL_MAX = 64
# Chunk sizes for "blocked", best first, for N <= 256 and above (measured,
# BENCHMARKS.md): the chunk dot costs 2 (b + R) flops per value, the mix of
# the chunk summaries 2 P R^2 / b, so longer fibers want longer chunks.
BLOCK_SIZES = ((16, 32, 8, 64), (32, 16, 64, 8))
# "auto" builds nothing at trace time larger than this (float64 bytes): the
# Neumann blocked form builds the dense N x N operator, so it stops at
# N = 2048 (3 x 32 MiB); the periodic one stops earlier, where its mix costs
# more than its chunk products.
BUILD_BUDGET = 128 * 2**20
# Gram eigenvalues (relative to the largest) dropped from the chunk coupling,
# and the float64 error allowed in the factorization, relative to max |K|:
# far below float32's 6e-8.
_RANK_TOL = 1e-13
_FACTOR_TOL = 1e-9
# The rank of the chunk coupling in exact arithmetic: exponentials r^{+-t}
# ("sobolev"), polynomials 1, t, t^2 ("sobolev_mean"), the mean
# ("reweighted").
_RANK = {"sobolev": 2, "sobolev_mean": 3, "reweighted": 1, "l2": 0}


def block_size(n: int) -> int | None:
  """The chunk size for "blocked" along an axis of length `n`, or None."""
  for b in BLOCK_SIZES[n > 256]:
    if n % b == 0 and n // b >= 2:
      return b
  return None


class Cost(NamedTuple):
  """What one method costs on `M` fibers of `N` values (`E = M N`).

  Bytes are those of the float64 arrays built at trace time (`build`, freed
  after tracing) and of the constants kept in the program (`constants`, in
  the compute dtype, 4 bytes a value for float32); `flops` are per value of
  the gradient. The run's temporaries are a few arrays of the gradient's
  size for every method (the FFT's spectrum is complex, `E / 2` of them).
  """

  build_bytes: int
  constant_bytes: int
  flops: float


def cost(method: str, sizes: Sequence[int], metric: str, boundary: str,
         block: int | None = None) -> Cost:
  """The cost table of docs/performance.md, per method (no timing)."""
  n = math.prod(sizes)
  if method == "closed":
    return Cost(0, 4, 4.0)
  if method == "fft":
    # The gain, and ~5 log2 N flops per value for a real FFT pair.
    return Cost(8 * n, 4 * n, 5.0 * math.log2(max(n, 2)))
  if method == "matmul":
    return Cost(3 * 8 * n * n, 4 * n * n, 2.0 * n)
  b = block_size(n) if block is None else block
  r, p = _RANK[metric], n // b
  # Periodic: one chunk row of the circulant, `b x N`, and its copies;
  # Neumann: the dense `N x N` operator (three arrays of it at once).
  build = 4 * 8 * b * n if boundary == "periodic" else 3 * 8 * n * n
  build += 8 * (p * r) ** 2
  return Cost(build, 4 * (b * b + b * r + (p * r) ** 2),
              2.0 * (b + r) + 2.0 * p * r * r / b)


def choose(
    method: str,
    metric: str,
    sizes: Sequence[int],
    lam: float | None,
    *,
    boundary: str,
    scale: str,
    last_axis: bool,
    backend: str,
) -> str:
  """The method to use: `method` itself unless it is "auto".

  The "auto" rule: "closed" for "reweighted"/"l2"; else a dense matmul up to
  `CPU_MATMUL_MAX` points per fiber on CPU (`ACCELERATOR_MATMUL_MAX` on
  GPU/TPU; `TRACED_MATMUL_MAX` when `lam` is traced); else "blocked" along
  one last axis whose length splits into chunks, while its trace-time arrays
  fit in `BUILD_BUDGET` bytes and the mix of the chunk summaries costs at
  most twice the chunk products (`P R^2 <= 2 b (b + R)`: beyond that the FFT
  is as fast, BENCHMARKS.md); else "fft", whose constants are `O(N)` and
  work `O(N log N)` at every size.

  Args:
    method: "auto" or a method.
    metric: the metric.
    sizes: the lengths of the direction axes.
    lam: the smoothing value, or None when it is traced.
    boundary: the boundary.
    scale: the scale.
    last_axis: whether the direction is the array's last axis alone.
    backend: `jax.default_backend()`.
  """
  if method != "auto":
    return method
  if metric in ("reweighted", "l2"):
    return "closed"
  n = math.prod(sizes)
  if lam is None:
    return "matmul" if n <= TRACED_MATMUL_MAX else "fft"
  dense_max = CPU_MATMUL_MAX if backend == "cpu" else ACCELERATOR_MATMUL_MAX
  if n <= dense_max:
    return "matmul"
  b = block_size(n)
  if len(sizes) == 1 and last_axis and b is not None:
    c = cost("blocked", sizes, metric, boundary, b)
    mix_flops = c.flops - 2.0 * (b + _RANK[metric])
    if (c.build_bytes <= BUILD_BUDGET
        and mix_flops <= 2.0 * 2.0 * (b + _RANK[metric])):
      try:
        blocked_factors(n, lam, metric, boundary, scale, b)
      except ValueError:  # no low-rank structure: not expected, but exact
        return "fft"
      return "blocked"
  return "fft"


# ---------------------------------------------------------------------------
# Dense operators in float64.


def _dct_matrix(n: int) -> np.ndarray:
  """The orthonormal DCT-II matrix `C` (`coef = C @ x`)."""
  k = np.arange(n)[:, None]
  t = np.arange(n)[None, :]
  c = np.cos(np.pi * k * (2 * t + 1) / (2 * n)) * np.sqrt(2.0 / n)
  c[0] /= np.sqrt(2.0)
  return c


def _circulant(first: np.ndarray) -> np.ndarray:
  n = first.shape[0]
  idx = (np.arange(n)[:, None] - np.arange(n)[None, :]) % n
  return first[idx]


def _operator_1d(n: int, lam: float, metric: str, boundary: str,
                 scale: str) -> np.ndarray:
  if boundary == "periodic":
    gain = _gains.gain((n,), lam, metric, boundary, scale)
    return _circulant(np.fft.irfft(gain, n=n))
  # Neumann is periodic on the even extension of length 2n (DCT-II vectors are
  # its cosines), with the eigenvalues c(n) 4 sin^2(pi k / 2n) of this axis:
  # K[i, j] = c[(i - j) mod 2n] + c[(i + j + 1) mod 2n].
  c = float(n) ** 2 if scale == "unit" else 1.0
  mu = c * 4.0 * np.sin(np.pi * np.arange(n + 1) / (2.0 * n)) ** 2
  first = np.fft.irfft(_gains.gain_from_eigenvalues(mu, lam, metric),
                       n=2 * n)
  i = np.arange(n)[:, None]
  j = np.arange(n)[None, :]
  return first[(i - j) % (2 * n)] + first[(i + j + 1) % (2 * n)]


def _operator_nd(sizes: tuple[int, ...], lam: float, metric: str,
                 boundary: str, scale: str) -> np.ndarray:
  total = math.prod(sizes)
  eye = np.eye(total).reshape((total,) + sizes)
  axes = tuple(range(1, len(sizes) + 1))
  gain = _gains.gain(sizes, lam, metric, boundary, scale)
  if boundary == "periodic":
    out = np.fft.irfftn(np.fft.rfftn(eye, axes=axes) * gain, s=sizes,
                        axes=axes)
  else:
    coef = eye
    for a, n in zip(axes, sizes):
      coef = np.moveaxis(np.tensordot(coef, _dct_matrix(n), ([a], [1])), -1, a)
    coef = coef * gain
    out = coef
    for a, n in zip(axes, sizes):
      out = np.moveaxis(np.tensordot(out, _dct_matrix(n), ([a], [0])), -1, a)
  return out.reshape(total, total)


@functools.lru_cache(maxsize=64)
def dense_operator(sizes: tuple[int, ...], lam: float, metric: str,
                   boundary: str, scale: str) -> np.ndarray:
  """`K = A^{-1}` on fibers flattened in C order, float64, symmetric.

  Built from the exact spectral gains in float64 (FFT of the gain for one
  axis, the transform of the identity for several), not by inverting `A`.
  """
  if len(sizes) == 1:
    k = _operator_1d(sizes[0], lam, metric, boundary, scale)
  else:
    k = _operator_nd(sizes, lam, metric, boundary, scale)
  k = 0.5 * (k + k.T)
  k.setflags(write=False)
  return k


@functools.lru_cache(maxsize=64)
def eigenbasis(sizes: tuple[int, ...], boundary: str, scale: str):
  """An orthonormal real eigenbasis `Phi` of the Laplacian and its `mu`.

  `K = Phi diag(gain(mu)) Phi^T` for every metric; used to build `K` at run
  time when the smoothing value is traced.
  """
  bases, mus = [], []
  for n in sizes:
    if boundary == "periodic":
      k = np.arange(n)
      cols = []
      for f in range(n):
        if f == 0:
          cols.append(np.ones(n) / np.sqrt(n))
        elif 2 * f < n:
          cols.append(np.cos(2 * np.pi * f * k / n) * np.sqrt(2.0 / n))
        elif 2 * f == n:
          cols.append(np.cos(np.pi * k) / np.sqrt(n))
        else:
          cols.append(np.sin(2 * np.pi * (n - f) * k / n) * np.sqrt(2.0 / n))
      bases.append(np.stack(cols, 1))
      mus.append(_gains.laplacian_eigenvalues(n, boundary=boundary,
                                              scale=scale))
    else:
      bases.append(_dct_matrix(n).T)
      mus.append(_gains.laplacian_eigenvalues(n, boundary=boundary,
                                              scale=scale))
  phi = bases[0]
  mu = mus[0]
  for b, m in zip(bases[1:], mus[1:]):
    phi = np.kron(phi, b)
    mu = (mu[:, None] + m[None, :]).reshape(-1)
  phi.setflags(write=False)
  mu.setflags(write=False)
  return phi, mu


# ---------------------------------------------------------------------------
# The blocked factorization.


class Blocked:
  """`B` (b x b), `U` (b x R) and the mix `S` (P R x P R) of one operator."""

  def __init__(self, diag, basis, mix):
    self.diag, self.basis, self.mix = diag, basis, mix
    self.b, self.rank = basis.shape


def _orthonormal(a: np.ndarray) -> np.ndarray:
  """Orthonormal columns spanning those of a tall, thin `a`.

  Gram-Schmidt done twice, with numpy's own loops rather than LAPACK: a
  multithreaded BLAS on a busy machine can take 100 ms instead of 1 ms here.
  """
  q = a / np.maximum(np.sqrt(np.einsum("ij,ij->j", a, a)), 1e-300)
  for j in range(q.shape[1]):
    v = q[:, j]
    for _ in range(2):
      v = v - np.einsum("ij,j->i", q[:, :j], np.einsum("ij,i->j", q[:, :j], v))
    q[:, j] = v / max(np.sqrt(np.einsum("i,i->", v, v)), 1e-300)
  return q


@functools.lru_cache(maxsize=128)
def blocked_factors(n: int, lam: float, metric: str, boundary: str,
                    scale: str, b: int) -> Blocked:
  """The blocked factorization of the 1-D operator, checked in float64."""
  if n % b or n // b < 2:
    raise ValueError(
        f"method='blocked' needs an axis length divisible into chunks of "
        f"{b}; got {n}."
    )
  p = n // b
  if boundary == "periodic":
    # A circulant's chunk rows are shifts of the first one: it is enough.
    first = np.fft.irfft(_gains.gain((n,), lam, metric, boundary, scale),
                         n=n)
    k = first[(np.arange(b)[:, None] - np.arange(n)[None, :]) % n]
    rest = k.reshape(1, b, p, b).copy()
  else:
    # Not the cached dense_operator: only the factors are kept (a Neumann
    # operator of N = 3072 would hold 72 MB in the cache).
    k = _operator_1d(n, lam, metric, boundary, scale)
    k = 0.5 * (k + k.T)
    rest = k.reshape(p, b, p, b).copy()
  diag = k[:b, :b].copy()
  # The coupling, chunk row by chunk row, without the shared diagonal block.
  rest[np.arange(len(rest)), :, np.arange(len(rest)), :] -= diag
  # K is symmetric, so the span of the b-vectors along the last axis is also
  # the span along the chunk-row axis: the leading eigenvectors of the Gram
  # matrix (the gaps are wide, 1 : 1e-3 against 1e-16; the check below is
  # the guard), with einsum's own loops rather than a multithreaded BLAS.
  tall = rest.reshape(-1, b)
  w, v = np.linalg.eigh(np.einsum("it,iu->tu", tall, tall))
  # At least the rank the Green's function has (a weak direction, as in a
  # strongly smoothed "sobolev_mean", can sink below the Gram noise).
  r = min(b, max(int(np.sum(w > _RANK_TOL * w[-1])), _RANK[metric]))
  basis = v[:, b - r:]
  if r:
    # The Gram matrix squares the conditioning (a direction 1e-8 below the
    # leading one is lost); one two-sided step with `tall` itself restores
    # float64 accuracy.
    basis = _orthonormal(np.einsum(
        "it,iu->tu", tall, _orthonormal(np.einsum("it,tu->iu", tall, basis))))
  basis = np.ascontiguousarray(basis)
  scale_k = np.abs(k).max()
  proj = np.einsum("it,tu->iu", tall, basis)        # [q, s, p] x u
  err = np.abs(tall - np.einsum("iu,tu->it", proj, basis)).max()
  if err > _FACTOR_TOL * scale_k:
    raise ValueError(
        f"method='blocked': the operator of length {n} has no low-rank chunk "
        f"structure at chunk size {b} (relative error {err / scale_k:.1e}); "
        "use 'fft' or 'matmul'."
    )
  mix = np.einsum("sr,qspu->qrpu", basis, proj.reshape(len(rest), b, p, r))
  if boundary == "periodic":
    shift = (np.arange(p)[None, :] - np.arange(p)[:, None]) % p   # [q, p]
    mix = mix[0].transpose(1, 0, 2)[shift].transpose(0, 2, 1, 3)
  mix = np.ascontiguousarray(mix.reshape(p * r, p * r))
  for a in (diag, basis, mix):
    a.setflags(write=False)
  return Blocked(diag, basis, mix)


# ---------------------------------------------------------------------------
# The solvers: how each method builds its operands and applies them.

_HIGHEST = jax.lax.Precision.HIGHEST  # float32-exact on GPU/TPU too


def _dot(a, b):
  return jnp.dot(a, b, precision=_HIGHEST)


@dataclasses.dataclass(frozen=True)
class Operator:
  """`A^{-1}` on every fiber along `axes`: what a solver needs to know.

  Its constant operands (gains, the matrix `K`, the blocked factors or `lam`)
  are passed separately as arrays, so that the sharded application can hand
  them to every device. Hashable by value: it is a static argument of the
  sharded application, and an identity-hashed closure could be confused with
  a dead one whose id was reused. A frozen dataclass rather than a NamedTuple:
  jax < 0.9.2 takes a weak reference to every callable parameter, which no
  tuple allows.
  """

  method: str  # a key of SOLVERS
  axes: tuple[int, ...]  # sorted, non-negative
  sizes: tuple[int, ...]
  metric: str
  boundary: str
  scale: str
  dtype: Any  # the compute dtype
  block: int | None = None  # "blocked" only: the chunk size (None: the rule)

  def shifted(self, k: int) -> "Operator":
    """The same operator on an array with `k` more leading (batch) axes."""
    return dataclasses.replace(self, axes=tuple(a + k for a in self.axes))

  def operands(self, lam: float | jax.Array, ndim: int) -> tuple[Any, ...]:
    """The constant operands for an array of `ndim` dimensions."""
    return SOLVERS[self.method].operands(self, lam, ndim)

  def __call__(self, grad: jax.Array, *operands: jax.Array) -> jax.Array:
    x = grad.astype(self.dtype)
    return SOLVERS[self.method].apply(self, x, *operands).astype(grad.dtype)


class Solver(NamedTuple):
  """One method: `operands(op, lam, ndim)` and `apply(op, x, *operands)`."""

  operands: Callable[..., tuple[Any, ...]]
  apply: Callable[..., jax.Array]


def _fft_operands(op: Operator, lam, ndim: int):
  gain = _gains.gain(op.sizes, lam, op.metric, op.boundary, op.scale)
  shape = [1] * ndim
  for a, n in zip(op.axes, gain.shape):
    shape[a] = n
  if isinstance(gain, np.ndarray):
    # A trace-time constant: computed in float64 once, rounded once.
    return (np.asarray(gain, op.dtype).reshape(shape),)
  return (jnp.asarray(gain, op.dtype).reshape(shape),)


def _fft_apply(op: Operator, x, gain):
  if op.boundary == "periodic":
    spec = jnp.fft.rfftn(x, axes=op.axes)
    return jnp.fft.irfftn(spec * gain, s=op.sizes, axes=op.axes)
  coef = jax.scipy.fft.dctn(x, type=2, axes=op.axes, norm="ortho")
  return jax.scipy.fft.idctn(coef * gain, type=2, axes=op.axes, norm="ortho")


def _matmul_operands(op: Operator, lam, ndim: int):
  """`K`: a float64-built constant, or built from a traced `lam`."""
  del ndim
  if _checks.is_concrete(lam):
    return (np.asarray(dense_operator(op.sizes, lam, op.metric, op.boundary,
                                      op.scale), op.dtype),)
  phi, mu = eigenbasis(op.sizes, op.boundary, op.scale)
  gain = _gains.gain_from_eigenvalues(mu, lam, op.metric)
  phi = np.asarray(phi, op.dtype)
  return (_dot(phi * gain.astype(op.dtype), phi.T),)


def _matmul_apply(op: Operator, x, k):
  """`k` (symmetric) applied along the sorted `axes` of `x`, fiber by fiber."""
  axes = op.axes
  first, last = axes[0], axes[-1]
  if axes != tuple(range(first, last + 1)):
    dest = tuple(range(x.ndim - len(axes), x.ndim))
    inner = dataclasses.replace(op, axes=dest)
    return jnp.moveaxis(_matmul_apply(inner, jnp.moveaxis(x, axes, dest), k),
                        dest, axes)
  shape = x.shape
  n = math.prod(shape[first:last + 1])
  pre, post = math.prod(shape[:first]), math.prod(shape[last + 1:])
  if post == 1:
    out = _dot(x.reshape(pre, n), k)
  elif pre == 1:
    out = _dot(k, x.reshape(n, post))
  else:
    out = jnp.einsum("apb,pq->aqb", x.reshape(pre, n, post), k,
                     precision=_HIGHEST)
  return out.reshape(shape)


def _blocked_operands(op: Operator, lam, ndim: int):
  """The blocked factors `B`, `U`, `S` of `K` along one axis, as arrays."""
  del ndim
  if len(op.axes) != 1:
    raise ValueError(
        f"method='blocked' works along one axis; got axes={op.axes}. Use "
        "method='auto', 'fft' or 'matmul'.")
  if not _checks.is_concrete(lam):
    raise ValueError(
        "method='blocked' needs a concrete smoothing value (a number known "
        "at trace time); got a traced value. Use method='auto', 'fft' or "
        "'matmul'."
    )
  (n,) = op.sizes
  b = block_size(n) if op.block is None else op.block
  if b is None:
    raise ValueError(
        f"method='blocked' needs an axis length that is a multiple of 8, 16, "
        f"32 or 64 (at least two chunks); got {n}. Use method='auto', "
        "'fft' or 'matmul'."
    )
  f = blocked_factors(n, lam, op.metric, op.boundary, op.scale, b)
  return tuple(np.asarray(a, op.dtype) for a in (f.diag, f.basis, f.mix))


def _blocked_apply(op: Operator, x, diag, basis, mix):
  """`y_p = x_p B + (sum_q (x_q U) S_qp) U^T` along the one axis."""
  (axis,) = op.axes
  if axis != x.ndim - 1:
    last = dataclasses.replace(op, axes=(x.ndim - 1,))
    return jnp.moveaxis(_blocked_apply(last, jnp.moveaxis(x, axis, -1), diag,
                                       basis, mix), -1, axis)
  n, b = x.shape[-1], diag.shape[0]
  rows = x.size // b
  xs = x.reshape(rows, b)
  # Two dots reading x (not one dot into [x B | x U] and a slice): as fast,
  # and one loop fusion fewer to compile per kernel.
  p, r = n // b, basis.shape[1]
  z = _dot(xs, basis).reshape(rows // p, p * r)       # chunk summaries
  w = _dot(z, mix).reshape(rows, r)
  y = _dot(xs, diag)
  for i in range(r):
    y = y + w[:, i:i + 1] * basis[:, i]
  return y.reshape(x.shape)


def _closed_operands(op: Operator, lam, ndim: int):
  del ndim
  if _checks.is_concrete(lam):
    return (jnp.asarray(lam, op.dtype),)
  # A traced lam cannot raise: a rejected value poisons the result instead.
  lam = jnp.asarray(lam, op.dtype)
  return (jnp.where(jnp.isfinite(lam) & (lam > 0), lam, jnp.nan),)


def _closed_apply(op: Operator, x, lam):
  """The reweighted metric in closed form: `mean + (x - mean) / lam`."""
  mean = jnp.mean(x, axis=op.axes, keepdims=True)
  return mean + (x - mean) / lam


SOLVERS: dict[str, Solver] = {
    "fft": Solver(_fft_operands, _fft_apply),
    "matmul": Solver(_matmul_operands, _matmul_apply),
    "blocked": Solver(_blocked_operands, _blocked_apply),
    "closed": Solver(_closed_operands, _closed_apply),
}
