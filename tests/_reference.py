"""Dense float64 references, built from the definitions in docs/math.md.

Nothing here uses an FFT or a DCT: the metrics are assembled as explicit
matrices from difference operators and solved with numpy.linalg.
"""

import functools

import numpy as np


def difference(n: int, boundary: str) -> np.ndarray:
  """Forward differences of a fiber of length n (rows: edges)."""
  if boundary == "periodic":
    if n == 1:
      return np.zeros((1, 1))
    d = -np.eye(n)
    for i in range(n):
      d[i, (i + 1) % n] += 1.0
    return d
  d = np.zeros((max(n - 1, 0), n))
  for i in range(n - 1):
    d[i, i], d[i, i + 1] = -1.0, 1.0
  return d


def laplacian(sizes, boundary: str, scale: str) -> np.ndarray:
  """Sum over axes of c(N_a) D_a^T D_a, on fibers flattened in C order."""
  return _laplacian(tuple(int(n) for n in sizes), boundary, scale)


@functools.lru_cache(maxsize=16)
def _laplacian(sizes, boundary, scale):
  total = np.zeros((int(np.prod(sizes)),) * 2)
  for a, n in enumerate(sizes):
    d = difference(n, boundary)
    c = float(n) ** 2 if scale == "unit" else 1.0
    la = c * d.T @ d
    left = np.eye(int(np.prod(sizes[:a])))
    right = np.eye(int(np.prod(sizes[a + 1:])))
    total += np.kron(np.kron(left, la), right)
  total.flags.writeable = False  # cached: shared by every caller
  return total


def metric_matrix(sizes, lam, metric, boundary="periodic", scale="unit"):
  """The SPD matrix A of the inner product <h, q>_A = h^T A q on one fiber."""
  m = int(np.prod(sizes))
  eye = np.eye(m)
  mean_proj = np.ones((m, m)) / m  # N avg(h) avg(q) = h^T P q
  lap = laplacian(sizes, boundary, scale)
  if metric == "l2":
    return eye
  if metric == "sobolev":
    return eye + lam * lap
  if metric == "sobolev_mean":
    return mean_proj + lam * lap
  if metric == "reweighted":
    return mean_proj + lam * (eye - mean_proj)
  raise ValueError(metric)


def apply_dense(x, axes, a_matrix):
  """A^{-1} applied fiber by fiber along `axes` of x, in float64."""
  x = np.asarray(x, np.float64)
  axes = sorted(a % x.ndim for a in axes)
  rest = [i for i in range(x.ndim) if i not in axes]
  moved = np.transpose(x, rest + axes)
  flat = moved.reshape(-1, int(np.prod([x.shape[a] for a in axes])))
  solved = np.linalg.solve(a_matrix, flat.T).T.reshape(moved.shape)
  return np.transpose(solved, np.argsort(rest + axes))


def deviation_matrix(sizes, lam, metric, boundary="periodic", scale="unit"):
  """B = A - P, the metric on mean-free fibers, built without forming A.

  Every metric above is P + B with B 1 = 0: A keeps the constant fiber
  (eigenvalue 1) and acts as B on fibers of zero mean. Forming P + lam L in
  float64 loses lam L when lam is tiny (P's entries are 1/m), so extreme
  smoothing needs B on its own.
  """
  m = int(np.prod(sizes))
  dev = np.eye(m) - np.ones((m, m)) / m  # I - P
  lap = laplacian(sizes, boundary, scale)
  if metric == "l2":
    return dev
  if metric == "sobolev":
    return dev + lam * lap
  if metric == "sobolev_mean":
    return lam * lap
  if metric == "reweighted":
    return lam * dev
  raise ValueError(metric)


def apply_deflated(x, axes, sizes, lam, metric, boundary="periodic",
                   scale="unit"):
  """A^{-1} x fiber by fiber in float64, well conditioned for any lam.

  A^{-1} x = mean(x) + B^{-1} (x - mean(x)), where on mean-free fibers B acts
  as B + ||B|| P does; that matrix is invertible, with the condition number of
  B on mean-free fibers (at most the Laplacian's, ~ (2 N / pi)^2), whereas a
  plain solve of A = I + 1e12 L or P + 1e-9 L is singular or inaccurate in
  float64.
  """
  x = np.asarray(x, np.float64)
  b = deviation_matrix(sizes, lam, metric, boundary, scale)
  m = b.shape[0]
  norm = np.abs(b).sum(axis=1).max() or 1.0  # B = 0 for fibers of length 1
  shifted = b + norm * np.ones((m, m)) / m
  axes = tuple(sorted(a % x.ndim for a in axes))
  mean = np.mean(x, axis=axes, keepdims=True)
  dev = apply_dense(x - mean, axes, shifted)
  return mean + (dev - np.mean(dev, axis=axes, keepdims=True))
