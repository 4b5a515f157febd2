"""Every JAX transformation through the update, on sharded kernels.

The matrix of tests/test_transformations.py on 8 virtual CPU devices, with
the kernel sharded along its input axis, its output axis (the transform
axis) or both, under automatic and explicit meshes: the same float64 truth,
and no all-gather in the compiled computation wherever the result keeps the
kernel's shape (a Jacobian's reshapes are XLA's to lay out).
"""

import re

import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import _transformations as tr

SHAPE = (1, 4, 2, 8)  # axis 1 can take the 4 shards of the output axis
SPECS = {"input": P(None, None, "a"), "output": P(None, None, None, "b"),
         "output_and_input": P(None, None, "a", "b")}
# Results that keep the kernel's shape, checked for gathers.
KEEP_SHAPE = {("updates", k) for k in ("jit", "grad", "vjp", "jvp",
                                       "linearize", "linear_transpose",
                                       "scan", "checkpoint")}
KEEP_SHAPE |= {("smoothing", k) for k in ("jit", "jvp", "jacfwd",
                                          "linearize")}


def _arrays(mode, spec):
  mesh = jax.make_mesh((2, 4), ("a", "b"),
                       axis_types=({"auto": AxisType.Auto,
                                    "explicit": AxisType.Explicit}[mode],) * 2)
  rng = np.random.default_rng(0)
  x, t = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
  sharding = NamedSharding(mesh, spec)
  return mesh, jax.device_put(x, sharding), jax.device_put(t, sharding)


MATRIX = ([("updates", k) for k in sorted(tr.IN_UPDATES)]
          + [("smoothing", k) for k in sorted(tr.IN_SMOOTHING)])


def _jax_itself_fails(mesh, x, t, wrt, transformation):
  """The error of the same case on `lam * x`, or None: JAX's own limits."""
  with jax.set_mesh(mesh):
    try:
      tr.case(wrt, transformation).run(lambda y, s: s * y, x, tr.LAM, t)
    except Exception as e:  # noqa: BLE001 (any error JAX raises)
      return e
  return None


def _check(mode, spec, wrt, transformation):
  mesh, x, t = _arrays(mode, SPECS[spec])
  try:
    _check_on(mesh, x, t, wrt, transformation)
  except Exception:
    error = _jax_itself_fails(mesh, x, t, wrt, transformation)
    if error is None:
      raise
    pytest.skip(f"jax {jax.__version__} itself cannot do this on an "
                f"{mode} mesh: {type(error).__name__}: {str(error)[:200]}")


def _check_on(mesh, x, t, wrt, transformation):
  with jax.set_mesh(mesh):
    if (wrt, transformation) not in KEEP_SHAPE:
      tr.check("channel_directed", wrt, transformation, x, t)
      return
    run = tr.case(wrt, transformation).run
    f = jax.jit(lambda x, t: run(tr.channel_directed, x, tr.LAM, t))
    compiled = f.lower(x, t).compile()
    tr.check("channel_directed", wrt, transformation, x, t, got=compiled(x, t))
  assert not re.search(r"\ball-gather(-start)?\(", compiled.as_text())


# The kernel split along both channel axes: the fibers move (all-to-all).
@pytest.mark.parametrize("mode", ["auto", "explicit"])
@pytest.mark.parametrize("wrt,transformation", MATRIX)
def test_split_along_both_channel_axes(mode, wrt, transformation):
  _check(mode, "output_and_input", wrt, transformation)


# The other splits, in the slow run (about 2 minutes on 2 cores).
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["auto", "explicit"])
@pytest.mark.parametrize("spec", ["input", "output"])
@pytest.mark.parametrize("wrt,transformation", MATRIX)
def test_split_along_one_axis(mode, spec, wrt, transformation):
  _check(mode, spec, wrt, transformation)
