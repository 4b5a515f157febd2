"""Edge trees: empty, None and masked leaves, non-float leaves, empty axes."""

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_cdg

NON_FLOAT = (jnp.int32, jnp.uint8, jnp.bool_, jnp.complex64)


def _kernel(shape, seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _transforms():
  return {"cdg": optax_cdg.channel_directed(0.01),
          "cdg_schedule": optax_cdg.channel_directed(
              optax.linear_schedule(0.0, 0.1, 10)),
          "cdg_explicit": optax_cdg.channel_directed(
              0.01, kernels=lambda u: jax.tree.map(
                  lambda x: None, u,
                  is_leaf=lambda x: x is None or isinstance(
                      x, optax.MaskedNode))),
          "lsgd": optax_cdg.laplacian_smoothing(0.5)}


class EmptyTreeTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(tree=({}, [], (), None, {"a": {}}, {"a": None},
                               {"a": optax.MaskedNode()}),
                         name=("cdg", "cdg_schedule", "cdg_explicit", "lsgd"))
  def test_empty_trees_come_back_unchanged(self, tree, name):
    tx = _transforms()[name]
    out, state = self.variant(tx.update)(tree, tx.init(tree))
    assert jax.tree.structure(out, is_leaf=lambda x: x is None) == (
        jax.tree.structure(tree, is_leaf=lambda x: x is None))
    out2, _ = self.variant(tx.update)(tree, state)  # and again from its state
    assert jax.tree.structure(out2) == jax.tree.structure(tree)


class PassThroughTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((None,), (True,), ({"kernel": True, "bias": True},))
  def test_none_and_masked_leaves(self, conv_spec):
    """None and MaskedNode pass through, even where a spec selects them."""
    grads = {"conv": {"kernel": _kernel((3, 3, 2, 8)), "bias": None},
             "masked": {"kernel": optax.MaskedNode()},
             "gone": None}
    kernels = None if conv_spec is None else {
        "conv": conv_spec, "masked": True, "gone": True}
    tx = optax_cdg.channel_directed(0.01, kernels=kernels, scale="unit")
    out, _ = self.variant(tx.update)(grads, tx.init(grads))
    assert out["conv"]["bias"] is None and out["gone"] is None
    assert isinstance(out["masked"]["kernel"], optax.MaskedNode)
    np.testing.assert_allclose(
        out["conv"]["kernel"],
        optax_cdg.metric_gradient(grads["conv"]["kernel"], 0.01,
                                  scale="unit"), atol=1e-6)

  def test_inside_optax_masked(self):
    """optax.masked hands the transform MaskedNode leaves: they stay masked."""
    grads = {"a": {"kernel": _kernel((3, 3, 2, 8), 1)},
             "b": {"kernel": _kernel((3, 3, 8, 4), 2)}}
    for kernels in (None, {"a": {"kernel": True}, "b": {"kernel": True}}):
      tx = optax.masked(optax_cdg.channel_directed(0.01, kernels=kernels,
                                                    scale="unit"),
                        {"a": {"kernel": True}, "b": {"kernel": False}})
      out, _ = jax.jit(tx.update)(grads, tx.init(grads))
      np.testing.assert_array_equal(out["b"]["kernel"], grads["b"]["kernel"])
      np.testing.assert_allclose(
          out["a"]["kernel"],
          optax_cdg.metric_gradient(grads["a"]["kernel"], 0.01,
                                    scale="unit"), atol=1e-6)


class NonFloatLeavesTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*NON_FLOAT)
  def test_not_selected_by_default(self, dtype):
    grads = {"conv": {"kernel": jnp.ones((3, 3, 2, 8), dtype)},
             "real": {"kernel": _kernel((3, 3, 2, 8))}}
    assert optax_cdg.conv_kernels(grads)["conv"]["kernel"] is False
    for tx in (optax_cdg.channel_directed(0.01),
               optax_cdg.laplacian_smoothing(0.5)):
      out, _ = self.variant(tx.update)(grads, tx.init(grads))
      assert out["conv"]["kernel"].dtype == dtype
      np.testing.assert_array_equal(out["conv"]["kernel"],
                                    grads["conv"]["kernel"])
      assert not np.array_equal(out["real"]["kernel"],
                                grads["real"]["kernel"])

  @parameterized.product(dtype=NON_FLOAT,
                         spec=(True, -2, optax_cdg.KernelSpec(-1, 1)),
                         jit=(False, True))
  def test_selecting_one_is_a_clear_error(self, dtype, spec, jit):
    grads = {"conv": {"kernel": jnp.ones((3, 3, 2, 8), dtype)}}
    tx = optax_cdg.channel_directed(0.01, kernels={"conv": {"kernel": spec}})
    update = jax.jit(tx.update) if jit else tx.update
    name = jnp.dtype(dtype).name
    with pytest.raises(TypeError, match=(
        f"kernels selects conv/kernel, which has dtype {name}; only real "
        "floating-point arrays can be transformed")):
      update(grads, tx.init(grads))

  @parameterized.parameters(*NON_FLOAT)
  def test_metric_gradient_rejects_them(self, dtype):
    with pytest.raises(TypeError, match=(
        f"grad must be a real floating-point array; got dtype "
        f"{jnp.dtype(dtype).name}")):
      optax_cdg.metric_gradient(jnp.ones((2, 8), dtype), 0.1, scale="unit")

  def test_python_scalars_are_left_alone(self):
    grads = {"kernel": 1.5, "conv": {"kernel": _kernel((3, 2, 4))}}
    out, _ = optax_cdg.channel_directed().update(grads, optax.EmptyState())
    assert out["kernel"] == 1.5
    tx = optax_cdg.channel_directed(kernels={"kernel": True, "conv": None})
    with pytest.raises(TypeError, match="kernels selects kernel, which is a "
                       "float, not an array"):
      tx.update(grads, optax.EmptyState())


class NumpySpecsTest(parameterized.TestCase):
  """Axis specs that are numpy integers, as array code produces them."""

  @parameterized.parameters(
      (np.int64(-2),), (np.int32(-1),),
      (optax_cdg.KernelSpec(np.int64(-1), np.int64(0)),))
  def test_numpy_integer_specs(self, spec):
    g = _kernel((3, 3, 4, 8))
    tx = optax_cdg.channel_directed(0.01, kernels={"k": spec}, scale="unit")
    out, _ = tx.update({"k": g}, tx.init({"k": g}))
    axis = int(spec.output_axis if isinstance(spec, optax_cdg.KernelSpec)
               else spec)
    np.testing.assert_array_equal(
        out["k"], optax_cdg.metric_gradient(g, 0.01, axes=axis, scale="unit"))


class DegenerateShapesTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(direction=("output", "input", "spatial"),
                         metric=("sobolev", "sobolev_mean", "reweighted"))
  def test_zero_size_and_unit_dimensions(self, direction, metric):
    shapes = ((3, 3, 0, 8), (3, 3, 4, 0), (0, 3, 4, 8), (0, 0, 0, 0),
              (3, 0, 4), (1, 1, 1, 1))
    grads = {f"c{i}": {"kernel": _kernel(s)} for i, s in enumerate(shapes)}
    tx = optax_cdg.channel_directed(2.0 if metric == "reweighted" else 0.01,
                                    metric=metric, direction=direction)
    out, _ = self.variant(tx.update)(grads, tx.init(grads))
    for name, g in grads.items():
      assert out[name]["kernel"].shape == g["kernel"].shape
      assert out[name]["kernel"].dtype == g["kernel"].dtype
      np.testing.assert_array_equal(out[name]["kernel"], g["kernel"])

  @chex.variants(with_jit=True)
  @parameterized.product(metric=("sobolev", "sobolev_mean", "reweighted"),
                         boundary=("periodic", "neumann"))
  def test_one_channel_is_left_as_it_is(self, metric, boundary):
    """A fiber of one value is its own mean: every metric keeps it."""
    grads = {"out1": {"kernel": _kernel((3, 3, 4, 1), 1)},
             "in1": {"kernel": _kernel((3, 3, 1, 6), 2)}}
    lam = 3.0 if metric == "reweighted" else 0.1
    for direction, name in (("output", "out1"), ("input", "in1")):
      tx = optax_cdg.channel_directed(lam, metric=metric, direction=direction,
                                      boundary=boundary)
      out, _ = self.variant(tx.update)(grads, tx.init(grads))
      np.testing.assert_array_equal(out[name]["kernel"],
                                    grads[name]["kernel"])

  def test_selected_leaf_with_too_few_dimensions(self):
    tx = optax_cdg.channel_directed(kernels={"w": True})
    with pytest.raises(ValueError, match="w of shape \\(8,\\) with "
                       "num_stacked_axes=0: it needs 2 channel axes"):
      tx.update({"w": jnp.ones(8)}, optax.EmptyState())
