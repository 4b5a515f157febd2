"""Every JAX transformation through the update, on one device.

Each public function that applies the operator (the transform's update,
`metric_gradient`, `laplacian_smoothing`) under each transformation, with
respect to the updates and to the smoothing, against float64 truth
(tests/_transformations.py). tests/multidevice/test_transformations.py runs
the same matrix on sharded kernels. `jax.linear_transpose` in the smoothing
is not in the matrix: the operator is not linear in it.
"""

import jax
import numpy as np
import pytest

import _transformations as tr

X = np.random.default_rng(0).standard_normal((2, 2, 3, 8)).astype(np.float32)
T = np.random.default_rng(1).standard_normal(X.shape).astype(np.float32)


@pytest.mark.parametrize("function", sorted(tr.FUNCTIONS))
@pytest.mark.parametrize("transformation", sorted(tr.IN_UPDATES))
def test_in_the_updates(function, transformation):
  tr.check(function, "updates", transformation, X, T)


@pytest.mark.parametrize("function", sorted(tr.FUNCTIONS))
@pytest.mark.parametrize("transformation", sorted(tr.IN_SMOOTHING))
def test_in_the_smoothing(function, transformation):
  tr.check(function, "smoothing", transformation, X, T)


def test_transpose_in_the_smoothing_is_refused():
  # Not linear in the smoothing: the operator says so.
  with pytest.raises(NotImplementedError, match="not in the smoothing"):
    jax.linear_transpose(lambda s: tr.metric_gradient(X, s), 0.3)(X)
