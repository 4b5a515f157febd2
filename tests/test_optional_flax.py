"""Flax is an extra: the linen and nnx helpers name it when it is missing."""

import sys

import jax.numpy as jnp
import pytest

import optax_cdg


@pytest.fixture
def without_flax(monkeypatch):
  """Makes `import flax` (and its submodules) fail, as if not installed."""
  for name in [m for m in sys.modules if m == "flax" or m.startswith("flax.")]:
    monkeypatch.delitem(sys.modules, name)
  for name in ("flax", "flax.linen", "flax.nnx"):
    monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.usefixtures("without_flax")
@pytest.mark.parametrize("helper", ["linen_conv_kernels", "nnx_conv_kernels"])
def test_helper_names_the_extra(helper):
  with pytest.raises(ImportError, match=r'pip install "optax_cdg\[flax\]"'):
    getattr(optax_cdg, helper)(object())


@pytest.mark.usefixtures("without_flax")
def test_plain_pytrees_need_no_flax():
  grads = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}}
  tx = optax_cdg.channel_directed(kernels=None)
  out, _ = tx.update(grads, tx.init(grads))
  assert out["conv"]["kernel"].shape == (3, 3, 2, 4)
