"""A toy image task shared by the tests; needs no model library."""

import jax.numpy as jnp
import numpy as np


def toy_task(seed=0, n=64):
  """Images whose class is the position of a bright 3x3 patch."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 4, n)
  x = rng.normal(0, 0.3, (n, 8, 8, 1)).astype(np.float32)
  for i, c in enumerate(labels):
    r, col = divmod(int(c), 2)
    x[i, 4 * r:4 * r + 3, 4 * col:4 * col + 3, 0] += 1.5
  return jnp.asarray(x), jnp.asarray(labels)
