"""channel_directed on sharded updates: exact, fiber-local, no gathers.

Runs on 8 virtual CPU devices (see tests/test_multidevice.py). Each case
checks the result against the unsharded computation, the output sharding
against the input's, and the collectives in the compiled update.
"""

import re

from absl.testing import parameterized
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_cdg

assert jax.device_count() == 8, "run with 8 virtual CPU devices"

_COLLECTIVES = re.compile(
    r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
    r"(-start)?\(")

SHAPE = (2, 2, 16, 32)  # (H, W, in, out)
# name -> (spec, collectives allowed for the output direction)
CASES = {
    "replicated": (P(), set()),
    "input_axis": (P(None, None, "a"), set()),
    "spatial_axis": (P("a"), set()),
    "two_mesh_axes_one_dim": (P(None, None, ("a", "b")), set()),
    "two_dims": (P("a", None, "b"), set()),
    "output_axis": (P(None, None, None, "b"), {"all-to-all"}),
    "output_and_input": (P(None, None, "a", "b"), {"all-to-all"}),
    "output_two_mesh_axes": (P(None, None, None, ("a", "b")), {"all-to-all"}),
}


def collectives(compiled) -> set[str]:
  return {m.group(1) for m in _COLLECTIVES.finditer(compiled.as_text())}


def _grads():
  rng = np.random.default_rng(0)
  return {"conv": {"kernel": jnp.asarray(rng.standard_normal(SHAPE),
                                         jnp.float32),
                   "bias": jnp.asarray(rng.standard_normal(SHAPE[-1]),
                                       jnp.float32)}}


def _mesh(mode):
  """The 2 x 4 mesh ("a", "b") in sharding mode "auto" or "explicit"."""
  axis_type = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}[mode]
  return jax.make_mesh((2, 4), ("a", "b"), axis_types=(axis_type,) * 2)


class ShardedUpdateTest(parameterized.TestCase):

  @parameterized.product(case=sorted(CASES),
                         mode=("auto", "explicit"),
                         metric=("sobolev", "reweighted"),
                         boundary=("periodic", "neumann"))
  def test_output_direction(self, case, mode, metric, boundary):
    spec, allowed = CASES[case]
    lam = 2.0 if metric == "reweighted" else 1e-3
    tx = optax_cdg.channel_directed(lam, metric=metric, boundary=boundary)
    grads = _grads()
    want, _ = tx.update(grads, tx.init(grads))
    mesh = _mesh(mode)
    with jax.set_mesh(mesh):
      sharded = {"conv": {
          "kernel": jax.device_put(grads["conv"]["kernel"],
                                   NamedSharding(mesh, spec)),
          "bias": jax.device_put(grads["conv"]["bias"],
                                 NamedSharding(mesh, P()))}}
      update = jax.jit(lambda g: tx.update(g, optax.EmptyState())[0])
      compiled = update.lower(sharded).compile()
      out = update(sharded)
    np.testing.assert_allclose(out["conv"]["kernel"], want["conv"]["kernel"],
                               rtol=0, atol=1e-6)
    kernel_in = sharded["conv"]["kernel"].sharding
    assert out["conv"]["kernel"].sharding.is_equivalent_to(kernel_in, 4)
    found = collectives(compiled)
    assert found <= allowed, f"{case}: {found}"
    if allowed:
      assert "all-gather" not in found

  @parameterized.product(
      case=("input_axis", "output_axis", "output_and_input"),
      mode=("auto", "explicit"),
      method_boundary=(("fft", "periodic"), ("fft", "neumann"),
                       ("closed", "periodic")))
  def test_every_method(self, case, mode, method_boundary):
    method, boundary = method_boundary
    spec, allowed = CASES[case]
    metric = "reweighted" if method == "closed" else "sobolev"
    tx = optax_cdg.channel_directed(1e-3 if method != "closed" else 2.0,
                                    metric=metric, boundary=boundary,
                                    method=method)
    grads = _grads()
    want, _ = tx.update(grads, tx.init(grads))
    mesh = _mesh(mode)
    with jax.set_mesh(mesh):
      sharded = jax.tree.map(lambda x: jax.device_put(
          x, NamedSharding(mesh, spec if x.ndim == 4 else P())), grads)
      update = jax.jit(lambda g: tx.update(g, optax.EmptyState())[0])
      out = update(sharded)
      found = collectives(update.lower(sharded).compile())
    np.testing.assert_allclose(out["conv"]["kernel"], want["conv"]["kernel"],
                               rtol=0, atol=1e-6)
    assert found <= allowed, f"{case}: {found}"

  @parameterized.parameters("auto", "explicit")
  def test_kernel_too_small_to_split_is_gathered(self, mode):
    # (1, 1, 2, 8) with the output axis split 4 ways: no other axis can take
    # the 4 shards, so the fibers are gathered (the documented fallback).
    g = jnp.arange(16.0).reshape(1, 1, 2, 8) ** 2
    want = optax_cdg.metric_gradient(g, 1e-2, scale="unit")
    mesh = _mesh(mode)
    with jax.set_mesh(mesh):
      gs = jax.device_put(g, NamedSharding(mesh, P(None, None, None, "b")))
      f = jax.jit(lambda x: optax_cdg.metric_gradient(x, 1e-2, scale="unit"))
      out = f(gs)
      found = collectives(f.lower(gs).compile())
    np.testing.assert_allclose(out, want, atol=1e-6)
    assert out.sharding.is_equivalent_to(gs.sharding, 4)
    assert "all-gather" in found or "all-reduce" in found

  @parameterized.product(direction=("input", "spatial"),
                         mode=("auto", "explicit"))
  def test_other_directions(self, direction, mode):
    tx = optax_cdg.channel_directed(1e-2, direction=direction)
    grads = _grads()
    want, _ = tx.update(grads, tx.init(grads))
    mesh = _mesh(mode)
    # Shard the output axis: for these directions it is a batch axis.
    with jax.set_mesh(mesh):
      sharded = jax.tree.map(
          lambda x: jax.device_put(x, NamedSharding(
              mesh, P(*([None] * (x.ndim - 1) + ["b"])))), grads)
      update = jax.jit(lambda g: tx.update(g, optax.EmptyState())[0])
      out = update(sharded)
      found = collectives(update.lower(sharded).compile())
    chex_close = np.testing.assert_allclose
    chex_close(out["conv"]["kernel"], want["conv"]["kernel"], atol=1e-6)
    assert not found, found

  @parameterized.product(
      case=("input_axis", "output_axis", "output_and_input",
            "output_two_mesh_axes"),
      mode=("auto", "explicit"),
      method=("auto", "fft"))
  def test_nan_stays_in_its_fiber(self, case, mode, method):
    # The all-to-all moves fibers between devices; a NaN must still reach
    # no other fiber and no other leaf.
    spec, _ = CASES[case]
    tx = optax_cdg.channel_directed(1e-3, method=method)
    grads = _grads()
    clean, _ = tx.update(grads, tx.init(grads))
    grads["conv"]["kernel"] = grads["conv"]["kernel"].at[1, 0, 5, 7].set(
        jnp.nan)
    mesh = _mesh(mode)
    with jax.set_mesh(mesh):
      sharded = jax.tree.map(lambda x: jax.device_put(
          x, NamedSharding(mesh, spec if x.ndim == 4 else P())), grads)
      out = jax.jit(lambda g: tx.update(g, optax.EmptyState())[0])(sharded)
    kernel = np.asarray(out["conv"]["kernel"])
    assert np.isnan(kernel[1, 0, 5]).all()
    others = np.ones(SHAPE[:-1], bool)
    others[1, 0, 5] = False
    np.testing.assert_allclose(kernel[others],
                               np.asarray(clean["conv"]["kernel"])[others],
                               rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out["conv"]["bias"], grads["conv"]["bias"])

  def test_grad_and_vmap_on_many_devices(self):
    x = _grads()["conv"]["kernel"]
    mesh = _mesh("auto")
    with jax.set_mesh(mesh):
      xs = jax.device_put(x, NamedSharding(mesh, P(None, None, "a", "b")))
      def f(z):
        return optax_cdg.metric_gradient(z, 1e-3, scale="unit")
      g = jax.jit(jax.grad(lambda z: jnp.sum(f(z) * x)))(xs)
      v = jax.jit(jax.vmap(f))(xs)
    # Self-adjoint: the gradient of <x, A^{-1} z> is A^{-1} x.
    np.testing.assert_allclose(g, f(x), atol=1e-5)
    np.testing.assert_allclose(v, f(x), atol=1e-6)

  def test_traced_smoothing_on_many_devices(self):
    tx = optax.inject_hyperparams(
        optax_cdg.channel_directed,
        static_args=("metric", "direction", "boundary", "scale",
                     "kernels"))(smoothing=1e-3)
    grads = _grads()
    state = tx.init(grads)
    mesh = _mesh("explicit")
    with jax.set_mesh(mesh):
      sharded = jax.tree.map(
          lambda x: jax.device_put(x, NamedSharding(mesh, P())), grads)
      sharded["conv"]["kernel"] = jax.device_put(
          grads["conv"]["kernel"],
          NamedSharding(mesh, P(None, None, "a", "b")))
      out, _ = jax.jit(tx.update)(sharded, state)
    want, _ = optax_cdg.channel_directed(1e-3).update(grads,
                                                      optax.EmptyState())
    np.testing.assert_allclose(out["conv"]["kernel"], want["conv"]["kernel"],
                               atol=1e-6)


@pytest.mark.parametrize("mode", ["auto", "explicit"])
def test_training_step_keeps_param_shardings(mode):
  """An FSDP-style step: sharded params and momentum stay sharded."""
  mesh = _mesh(mode)
  tx = optax.chain(optax_cdg.channel_directed(1e-3),
                   optax.sgd(0.1, momentum=0.9))
  params = _grads()
  specs = {"conv": {"kernel": P(None, None, "a", "b"), "bias": P("b")}}
  with jax.set_mesh(mesh):
    params = jax.tree.map(lambda x, s: jax.device_put(
        x, NamedSharding(mesh, s)), params, specs)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
      grads = jax.tree.map(lambda p: p * 0.5, params)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    new, state = step(params, state)
    found = collectives(step.lower(params, state).compile())
  assert new["conv"]["kernel"].sharding.is_equivalent_to(
      params["conv"]["kernel"].sharding, 4)
  assert "all-gather" not in found, found
