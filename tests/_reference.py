"""Dense float64 references, built from the definitions in cdg-math.md.

Nothing here uses an FFT or a DCT: the metrics are assembled as explicit
matrices from difference operators and solved with numpy.linalg.
"""

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
  sizes = tuple(sizes)
  total = np.zeros((int(np.prod(sizes)),) * 2)
  for a, n in enumerate(sizes):
    d = difference(n, boundary)
    c = float(n) ** 2 if scale == "unit" else 1.0
    la = c * d.T @ d
    left = np.eye(int(np.prod(sizes[:a])))
    right = np.eye(int(np.prod(sizes[a + 1:])))
    total += np.kron(np.kron(left, la), right)
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
