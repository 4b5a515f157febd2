"""The partition rule for shardings that are not a NamedSharding.

XLA hands custom_partitioning its own shardings when JAX runs without the
Shardy partitioner. The rule keeps such a sharding when every device holds
whole fibers, and otherwise refuses it with a clear error: it never gathers
the kernel. A stand-in exposes what the rule reads of a sharding.
"""

import types

import jax.numpy as jnp
import pytest

from optax_cdg import _apply
from optax_cdg import _operator

SHAPE = (3, 3, 16, 32)
OP = _operator.Operator(False, (3,), (32,), "sobolev", "periodic", "grid",
                        jnp.float32)


class UnnamedSharding:
  """A sharding that is not a NamedSharding: only its shard shape is known."""

  def __init__(self, shard_shape):
    self._shard_shape = shard_shape

  def shard_shape(self, shape):
    del shape
    return self._shard_shape


def _partition(sharding):
  arg = types.SimpleNamespace(shape=SHAPE, sharding=sharding)
  return _apply._partition(OP, None, (arg,), None)


def test_kept_when_fibers_are_whole():
  sharding = UnnamedSharding((3, 3, 4, 32))  # the input axis split 4 ways
  _, lower, result, args = _partition(sharding)
  assert result is sharding and args == (sharding,)
  assert lower is OP


def test_refused_when_fibers_are_split():
  with pytest.raises(ValueError, match="NamedSharding") as info:
    _partition(UnnamedSharding((3, 3, 16, 8)))  # the output axis split
  assert "(3, 3, 16, 32)" in str(info.value)
  assert "transform axes (3,)" in str(info.value)
