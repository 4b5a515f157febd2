"""Tests of optax_cdg.channel_directed inside Optax and Flax pipelines."""

import functools
import warnings

from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _models import as_pure
from _models import LINEN_MIXED_CONVS
from _models import LINEN_MIXED_INPUT
from _models import LinenCNN
from _models import LinenMixed
from _models import NNX_MIXED_CONVS
from _models import NNXMixed
import _reference
from _task import toy_task
import optax_cdg

STATIC = ("metric", "direction", "boundary", "scale", "kernels")


@functools.cache
def _cnn():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8, 8, 1)),
                  jnp.float32)
  variables = LinenCNN().init(jax.random.key(0), x)
  return x, variables


@functools.cache
def _mixed_params():
  return jax.eval_shape(LinenMixed().init, jax.random.key(0),
                        LINEN_MIXED_INPUT)["params"]


def _random_like(tree, seed=1):
  keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(tree)))
  keys = jax.tree.unflatten(jax.tree.structure(tree), list(keys))
  return jax.tree.map(lambda k, p: jax.random.normal(k, p.shape, p.dtype),
                      keys, tree)


def _expected(grads, selected, lam=0.01, **kwargs):
  """Reference: metric_gradient on the selected leaves (path -> axes)."""
  kwargs.setdefault("scale", "unit")

  def one(path, g):
    names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    if names in selected:
      return optax_cdg.metric_gradient(g, lam, axes=selected[names], **kwargs)
    return g
  return jax.tree_util.tree_map_with_path(one, grads)


class UpdateTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(direction=("output", "input", "spatial"),
                         metric=("sobolev", "sobolev_mean", "reweighted"))
  def test_only_conv_kernels_change(self, direction, metric):
    _, variables = _cnn()
    grads = _random_like(variables["params"])
    lam = 2.0 if metric == "reweighted" else 0.01
    tx = optax_cdg.channel_directed(lam, metric=metric, direction=direction,
                                    scale="unit")
    state = tx.init(variables["params"])
    assert isinstance(state, optax.EmptyState)
    out, _ = self.variant(tx.update)(grads, state)
    axes = {"output": (3,), "input": (2,), "spatial": (0, 1)}[direction]
    selected = {("Conv_0", "kernel"): axes, ("Conv_1", "kernel"): axes}
    want = _expected(grads, selected, lam, metric=metric)
    chex.assert_trees_all_close(out, want, atol=1e-6)
    # Conv_0 has one input channel: its input fibers have length 1.
    changed = ("Conv_1",) if direction == "input" else ("Conv_0", "Conv_1")
    for name in changed:
      assert not np.allclose(out[name]["kernel"], grads[name]["kernel"])
      np.testing.assert_array_equal(out[name]["bias"], grads[name]["bias"])
    chex.assert_trees_all_equal(out["BatchNorm_0"], grads["BatchNorm_0"])
    chex.assert_trees_all_equal(out["Dense_0"], grads["Dense_0"])

  def test_untouched_leaves_are_the_same_objects(self):
    _, variables = _cnn()
    grads = _random_like(variables["params"])
    out, _ = optax_cdg.channel_directed().update(grads, optax.EmptyState())
    assert out["Dense_0"]["kernel"] is grads["Dense_0"]["kernel"]
    assert out["BatchNorm_0"]["scale"] is grads["BatchNorm_0"]["scale"]
    assert out["Conv_0"]["bias"] is grads["Conv_0"]["bias"]

  def test_does_not_mutate_its_inputs(self):
    _, variables = _cnn()
    grads = _random_like(variables["params"])
    copy = jax.tree.map(np.array, grads)
    kernels = {"Conv_0": {"kernel": True, "bias": False}}
    kernels_copy = dict(kernels)
    tx = optax_cdg.channel_directed(kernels=lambda u: optax_cdg.conv_kernels(u))
    tx.update(grads, tx.init(grads))
    chex.assert_trees_all_equal(grads, copy)
    assert kernels == kernels_copy

  def test_exact_helper_on_mixed_model(self):
    params = _mixed_params()
    grads = _random_like(params)
    sel = optax_cdg.linen_conv_kernels(LinenMixed(), LINEN_MIXED_INPUT)
    tx = optax_cdg.channel_directed(0.01, kernels=sel, scale="unit")
    out, _ = jax.jit(tx.update)(grads, tx.init(params))
    # Output axis per kernel: -1, or -2 for ConvTranspose(transpose_kernel).
    selected = {}
    for path, (axis, _) in LINEN_MIXED_CONVS.items():
      ndim = len(functools.reduce(lambda t, k: t[k], path, params).shape)
      selected[path] = (axis % ndim,)
    chex.assert_trees_all_close(out, _expected(grads, selected), atol=1e-6)
    np.testing.assert_array_equal(out["proj"]["kernel"],
                                  grads["proj"]["kernel"])

  def test_spatial_skips_the_stacked_axis(self):
    grads = _random_like(_mixed_params())
    sel = optax_cdg.linen_conv_kernels(LinenMixed(), LINEN_MIXED_INPUT)
    tx = optax_cdg.channel_directed(0.01, direction="spatial", kernels=sel,
                                    scale="unit")
    out, _ = tx.update(grads, tx.init(grads))
    g = grads["Scan_ScanBlock_0"]["conv"]["kernel"]  # (layers, 3, in, out)
    want = optax_cdg.metric_gradient(g, 0.01, axes=(1,), scale="unit")
    np.testing.assert_allclose(out["Scan_ScanBlock_0"]["conv"]["kernel"],
                               want, atol=1e-6)

  def test_explicit_prefix_tree_and_axes(self):
    grads = {"a": {"kernel": jnp.ones((3, 3, 4, 8)) * jnp.arange(8.0)},
             "b": {"kernel": jnp.ones((3, 4, 8)) * jnp.arange(8.0)},
             "c": jnp.arange(8.0)}
    tx = optax_cdg.channel_directed(
        0.01, kernels={"a": {"kernel": -2}, "b": True, "c": None}, scale="unit")
    out, _ = tx.update(grads, optax.EmptyState())
    np.testing.assert_allclose(
        out["a"]["kernel"],
        optax_cdg.metric_gradient(grads["a"]["kernel"], 0.01, axes=-2,
                                  scale="unit"))
    np.testing.assert_allclose(
        out["b"]["kernel"],
        optax_cdg.metric_gradient(grads["b"]["kernel"], 0.01, scale="unit"))
    assert out["c"] is grads["c"]

  def test_none_and_masked_leaves_pass_through(self):
    grads = {"conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": None},
             "m": optax.MaskedNode()}
    out, _ = optax_cdg.channel_directed().update(grads, optax.EmptyState())
    assert out["conv"]["bias"] is None
    assert isinstance(out["m"], optax.MaskedNode)

  @parameterized.parameters("auto", "fft")
  def test_method_is_forwarded(self, method):
    grads = {"a": {"kernel": _random_like(jnp.ones((3, 3, 4, 32)))},
             "b": {"kernel": _random_like(jnp.ones((1, 1, 8, 16)))}}
    tx = optax_cdg.channel_directed(0.01, method=method, scale="unit")
    out, _ = jax.jit(tx.update)(grads, tx.init(grads))
    want = jax.tree.map(
        lambda g: optax_cdg.metric_gradient(g, 0.01, method="fft",
                                            scale="unit"), grads)
    chex.assert_trees_all_close(out, want, atol=1e-6)

  def test_empty_tree(self):
    tx = optax_cdg.channel_directed()
    assert tx.update({}, tx.init({}))[0] == {}


class DefaultTest(parameterized.TestCase):
  """The default damps the top output-channel frequency the same at every
  width: the evidence (docs/evidence.md) chose a width-independent damping."""

  def test_default_is_grid_scale_sobolev(self):
    self.assertEqual((optax_cdg.DEFAULT_SMOOTHING, optax_cdg.DEFAULT_SCALE),
                     (0.1, "grid"))
    g = _random_like(jnp.ones((3, 3, 4, 24)))
    out, _ = optax_cdg.channel_directed().update(
        {"conv": {"kernel": g}}, optax.EmptyState())
    want = _reference.apply_dense(
        g, (-1,), _reference.metric_matrix((24,), 0.1, "sobolev",
                                           scale="grid"))
    np.testing.assert_allclose(out["conv"]["kernel"], want, atol=1e-6)

  @parameterized.parameters(8, 32, 128, 512)
  def test_top_gain_does_not_depend_on_width(self, n):
    # The highest frequency, (-1)^k across the channels, is an eigenvector.
    g = {"conv": {"kernel": jnp.ones((3, 1, n)) * (-1.0) ** jnp.arange(n)}}
    out, _ = optax_cdg.channel_directed().update(g, optax.EmptyState())
    np.testing.assert_allclose(out["conv"]["kernel"] / g["conv"]["kernel"],
                               1 / (1 + 4 * 0.1), rtol=1e-5)


class ComposeTest(parameterized.TestCase):

  def _grads(self):
    _, variables = _cnn()
    return variables["params"], _random_like(variables["params"])

  def test_chain_equals_manual(self):
    params, grads = self._grads()
    tx = optax.chain(optax_cdg.channel_directed(0.01), optax.sgd(0.1, 0.9))
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    manual, _ = optax_cdg.channel_directed(0.01).update(grads,
                                                        optax.EmptyState())
    chex.assert_trees_all_close(out, jax.tree.map(lambda g: -0.1 * g,
                                                  manual), atol=1e-6)

  def test_masked(self):
    params, grads = self._grads()
    mask = jax.tree_util.tree_map_with_path(
        lambda p, _: p[0].key == "Conv_0", params)
    tx = optax.masked(optax_cdg.channel_directed(0.01), mask)
    out, _ = jax.jit(tx.update)(grads, tx.init(params))
    assert not np.allclose(out["Conv_0"]["kernel"], grads["Conv_0"]["kernel"])
    np.testing.assert_array_equal(out["Conv_1"]["kernel"],
                                  grads["Conv_1"]["kernel"])

  def test_partition(self):
    params, grads = self._grads()
    labels = jax.tree_util.tree_map_with_path(
        lambda p, _: "cdg" if p[0].key.startswith("Conv") else "plain", params)
    tx = optax.partition(
        {"cdg": optax.chain(optax_cdg.channel_directed(0.01),
                            optax.sgd(1.0)),
         "plain": optax.sgd(1.0)}, labels)
    out, _ = jax.jit(tx.update)(grads, tx.init(params))
    manual, _ = optax_cdg.channel_directed(0.01).update(grads,
                                                        optax.EmptyState())
    chex.assert_trees_all_close(out, jax.tree.map(jnp.negative, manual),
                                atol=1e-6)

  def test_multi_steps(self):
    params, grads = self._grads()
    tx = optax.MultiSteps(optax.chain(optax_cdg.channel_directed(0.01),
                                      optax.sgd(1.0)), every_k_schedule=2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    out1, state = update(grads, state, params)
    chex.assert_trees_all_equal(out1, jax.tree.map(jnp.zeros_like, grads))
    out2, state = update(grads, state, params)
    manual, _ = optax_cdg.channel_directed(0.01).update(grads,
                                                        optax.EmptyState())
    chex.assert_trees_all_close(out2, jax.tree.map(jnp.negative, manual),
                                atol=1e-6)

  @parameterized.parameters(jnp.float32, jnp.bfloat16)
  def test_inject_hyperparams(self, dtype):
    params, grads = self._grads()
    tx = optax.inject_hyperparams(optax_cdg.channel_directed,
                                  static_args=STATIC,
                                  hyperparam_dtype=dtype)(smoothing=0.02)
    state = tx.init(params)
    out, state = jax.jit(tx.update)(grads, state)
    lam = float(jnp.asarray(0.02, dtype))
    manual, _ = optax_cdg.channel_directed(lam).update(grads,
                                                       optax.EmptyState())
    chex.assert_trees_all_close(out, manual, atol=1e-6)
    # The hyperparameter can be changed between steps without recompiling.
    state.hyperparams["smoothing"] = jnp.asarray(0.5, dtype)
    out, _ = jax.jit(tx.update)(grads, state)
    manual, _ = optax_cdg.channel_directed(0.5).update(grads,
                                                       optax.EmptyState())
    chex.assert_trees_all_close(out, manual, atol=1e-6)

  def test_schedule(self):
    params, grads = self._grads()
    schedule = optax.linear_schedule(0.0, 0.1, transition_steps=4)
    tx = optax_cdg.channel_directed(schedule)
    state = tx.init(params)
    assert isinstance(state, optax_cdg.ChannelDirectedState)
    update = jax.jit(tx.update)
    for step in range(3):
      out, state = update(grads, state)
      manual, _ = optax_cdg.channel_directed(float(schedule(step))).update(
          grads, optax.EmptyState())
      chex.assert_trees_all_close(out, manual, atol=1e-6)
      assert int(state.count) == step + 1

  def test_abstract_init(self):
    params, _ = self._grads()
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype),
                            params)
    for smoothing in (0.01, optax.constant_schedule(0.01)):
      tx = optax.chain(optax_cdg.channel_directed(smoothing), optax.adam(1e-3))
      shapes = jax.eval_shape(tx.init, abstract)
      chex.assert_trees_all_equal_shapes_and_dtypes(shapes, tx.init(params))
      tx.init(abstract)  # directly, with no arrays at all

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(jnp.bfloat16, jnp.float16)
  def test_half_precision_updates(self, dtype):
    params, grads = self._grads()
    grads = jax.tree.map(lambda g: g.astype(dtype), grads)
    tx = optax_cdg.channel_directed(0.01, scale="unit")
    out, _ = self.variant(tx.update)(grads, tx.init(params))
    chex.assert_trees_all_equal_dtypes(out, grads)
    chex.assert_trees_all_equal_shapes(out, grads)
    want = optax_cdg.metric_gradient(
        grads["Conv_1"]["kernel"].astype(jnp.float32), 0.01,
        scale="unit").astype(dtype)
    np.testing.assert_array_equal(np.asarray(out["Conv_1"]["kernel"],
                                             np.float32),
                                  np.asarray(want, np.float32))

  def test_nnx_optimizer(self):
    model = NNXMixed(nnx.Rngs(0))
    x = jnp.ones((2, 6, 6, 3))
    before = nnx.clone(model)
    tx = optax.chain(
        optax_cdg.channel_directed(0.01,
                                   kernels=optax_cdg.nnx_conv_kernels(model),
                                   scale="unit"),
        optax.sgd(1.0))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
      grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
      opt.update(model, grads)
      return grads

    step(model, opt)
    g = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(before)
    g = as_pure(nnx.state(g, nnx.Param))
    old = as_pure(nnx.state(before, nnx.Param))
    new = as_pure(nnx.state(model, nnx.Param))
    step_taken = jax.tree.map(lambda a, b: a - b, old, new)
    for path, (axis, _) in NNX_MIXED_CONVS.items():
      gk = g[path[0]]["kernel"]
      want = optax_cdg.metric_gradient(gk, 0.01, axes=(axis % gk.ndim,),
                                       scale="unit")
      np.testing.assert_allclose(step_taken[path[0]]["kernel"], want,
                                 atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(step_taken["proj"]["kernel"],
                               g["proj"]["kernel"], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(step_taken["attn"]["query"]["kernel"],
                               g["attn"]["query"]["kernel"], atol=1e-5,
                               rtol=1e-4)


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_training_loss_falls(optimizer):
  x, y = toy_task()
  model = LinenCNN()
  variables = model.init(jax.random.key(0), x)
  base = {"sgd_momentum": optax.sgd(0.1, momentum=0.9),
          "adam": optax.adam(1e-2)}[optimizer]
  tx = optax.chain(optax_cdg.channel_directed(1e-3), base)
  params, stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)

  def loss_fn(params, stats):
    logits, new = model.apply({"params": params, "batch_stats": stats}, x,
                              train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, new["batch_stats"]

  @jax.jit
  def step(params, stats, opt_state):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params,
                                                                      stats)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  losses = []
  for _ in range(60):
    params, stats, opt_state, loss = step(params, stats, opt_state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses


class BadInputTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("metric", dict(metric="sobolev2"), ValueError, "metric='sobolev2'"),
      ("direction", dict(direction="depth"), ValueError,
       "direction='depth'.*'output', 'input', 'spatial'"),
      ("boundary", dict(boundary="zero"), ValueError, "boundary='zero'"),
      ("scale", dict(scale=2), ValueError, "scale=2"),
      ("smoothing_negative", dict(smoothing=-0.1), ValueError,
       "smoothing=-0.1"),
      ("smoothing_zero_mean", dict(smoothing=0, metric="sobolev_mean"),
       ValueError, "smoothing=0 is not valid for metric='sobolev_mean'"),
      ("smoothing_zero_rew", dict(smoothing=0.0, metric="reweighted"),
       ValueError, "reweighted"),
      ("smoothing_inf", dict(smoothing=float("inf")), ValueError, "finite"),
      ("smoothing_type", dict(smoothing="big"), TypeError, "real number"),
      ("smoothing_vector", dict(smoothing=jnp.ones(3)), TypeError,
       "real number"),
      ("kernels_string", dict(kernels="conv"), TypeError,
       r"kernels is the str 'conv', not a selection of conv kernels; "
       r"expected None \(to guess them\)"),
      ("kernels_value", dict(kernels={"a": "conv"}), TypeError,
       "kernels gives the str 'conv' for a; expected True, False, None, an "
       "output axis or a KernelSpec.$"),
      ("method", dict(method="svd"), ValueError, "method='svd'.*'auto'"),
      ("method_metric", dict(method="closed"), ValueError,
       "method='closed' is not available for metric='sobolev'"),
  )
  def test_build_time(self, kwargs, error, message):
    with pytest.raises(error, match=message):
      optax_cdg.channel_directed(**kwargs)

  def test_spec_tree_mismatch(self):
    tx = optax_cdg.channel_directed(kernels={"conv": {"kernel": True}})
    with pytest.raises(ValueError, match="kernels does not match the "
                       "updates: .* They differ: "):
      tx.update({"other": {"kernel": jnp.ones((3, 3, 2, 2))}},
                optax.EmptyState())

  def test_selected_non_float_leaf(self):
    tx = optax_cdg.channel_directed(kernels={"k": True})
    with pytest.raises(TypeError, match="selects k, which has dtype int32"):
      tx.update({"k": jnp.ones((3, 2, 2), jnp.int32)}, optax.EmptyState())

  def test_selected_axis_out_of_range(self):
    tx = optax_cdg.channel_directed(kernels={"k": 3})
    with pytest.raises(ValueError, match="output axis 3 at k"):
      tx.update({"k": jnp.ones((3, 2, 2))}, optax.EmptyState())

  def test_bias_selected_through_a_prefix(self):
    tx = optax_cdg.channel_directed(kernels={"conv": True})
    grads = {"conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones(4)}}
    with pytest.raises(ValueError, match="conv/bias of shape"):
      tx.update(grads, optax.EmptyState())

  def test_schedule_value_checked_eagerly(self):
    tx = optax_cdg.channel_directed(lambda count: -1.0 + 0.0 * count)
    grads = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}}
    with pytest.raises(ValueError, match="smoothing=-1.0"):
      tx.update(grads, tx.init(grads))
    out, _ = jax.jit(tx.update)(grads, tx.init(grads))
    assert np.all(np.isnan(out["conv"]["kernel"]))


class NoSilentNoOpTest(parameterized.TestCase):
  """The four ways the old main trained with CDG silently off."""

  def _dense_only(self):
    return {"Dense_0": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones(8)},
            "Dense_1": {"kernel": jnp.ones((8, 2))}}

  @parameterized.named_parameters(
      ("dense_only", None, "Dense_0/bias"),
      ("haiku_names", None, "conv2_d/w"),
      ("explicit_tree", {"conv2_d": False}, "the kernels dict"),
      ("callable", lambda u: jax.tree.map(lambda _: False, u),
       "kernels=<lambda>"),
  )
  def test_warns_once_at_trace_time(self, kernels, message):
    grads = ({"conv2_d": {"w": jnp.ones((3, 3, 2, 8)), "b": jnp.ones(8)}}
             if message != "Dense_0/bias" else self._dense_only())
    tx = optax_cdg.channel_directed(kernels=kernels)
    update = jax.jit(tx.update)
    with pytest.warns(optax_cdg.NoKernelsSelectedWarning,
                      match=message) as record:
      out, _ = update(grads, tx.init(grads))
      update(grads, tx.init(grads))  # cached: not traced, not warned again
    assert len(record) == 1
    text = str(record[0].message)
    assert len(text) <= 300, len(text)
    assert "KernelSpec(output_axis=0, input_axis=1)" in text
    # A callable here was called with the updates, never with a step count
    # (inject_hyperparams would have called it first): no such hint.
    assert "static_args" not in text
    chex.assert_trees_all_equal(out, grads)

  def test_can_be_made_an_error(self):
    grads = self._dense_only()
    tx = optax_cdg.channel_directed()
    with warnings.catch_warnings():
      warnings.simplefilter("error", optax_cdg.NoKernelsSelectedWarning)
      with pytest.raises(optax_cdg.NoKernelsSelectedWarning,
                         match="changed nothing"):
        tx.update(grads, tx.init(grads))

  def test_no_warning_when_something_is_selected_or_nothing_could_be(self):
    _, variables = _cnn()
    grads = _random_like(variables["params"])
    tx = optax_cdg.channel_directed()
    with warnings.catch_warnings():
      warnings.simplefilter("error", optax_cdg.NoKernelsSelectedWarning)
      tx.update(grads, tx.init(grads))
      tx.update({}, tx.init({}))
      tx.update({"a": None, "b": optax.MaskedNode()}, optax.EmptyState())

  def test_callable_kernels_through_inject_hyperparams_names_static_args(self):
    _, variables = _cnn()
    grads = _random_like(variables["params"])
    # The old main returned the gradients unchanged here.
    tx = optax.inject_hyperparams(optax_cdg.channel_directed)(
        smoothing=1e-2, kernels=lambda u: optax_cdg.conv_kernels(u))
    with pytest.raises(TypeError, match=r'static_args=\("kernels",\)'):
      tx.init(variables["params"])
    # With static_args it works, and equals the plain transform.
    tx = optax.inject_hyperparams(optax_cdg.channel_directed,
                                  static_args=("kernels",))(
        smoothing=1e-2, kernels=lambda u: optax_cdg.conv_kernels(u))
    out, _ = jax.jit(tx.update)(grads, tx.init(variables["params"]))
    want, _ = optax_cdg.channel_directed(1e-2).update(grads,
                                                      optax.EmptyState())
    chex.assert_trees_all_close(out, want, atol=1e-6)
    assert not np.allclose(out["Conv_1"]["kernel"], grads["Conv_1"]["kernel"])

  def test_helper_through_inject_hyperparams_names_static_args(self):
    model = NNXMixed(nnx.Rngs(0))
    params = as_pure(nnx.state(model, nnx.Param))
    tx = optax.inject_hyperparams(optax_cdg.channel_directed)(
        smoothing=1e-2, kernels=optax_cdg.nnx_conv_kernels(model))
    # The old main blamed the tree ("none of the 5 conv kernels recorded").
    with pytest.raises(TypeError, match=r"nnx model NNXMixed was called with "
                       r"Array\(0, dtype=int32\).*static_args"):
      tx.init(params)

  def test_array_kernels_value_names_static_args(self):
    # What a callable that computes with its argument returns for a count.
    with pytest.raises(TypeError, match="static_args"):
      optax_cdg.channel_directed(kernels=jnp.asarray(False))


class AnyLayoutTest(parameterized.TestCase):
  """OIHW (Equinox, PyTorch ports) and other layouts, against the reference."""

  @parameterized.product(direction=("output", "input", "spatial"),
                         stacked=(0, 1))
  def test_oihw_matches_dense_reference(self, direction, stacked):
    shape = (2,) * stacked + (12, 5, 3, 4)
    g = jnp.asarray(np.random.default_rng(3).standard_normal(shape),
                    jnp.float32)
    spec = optax_cdg.KernelSpec(output_axis=stacked, num_stacked_axes=stacked,
                                input_axis=stacked + 1)
    tx = optax_cdg.channel_directed(2e-2, direction=direction,
                                    kernels={"w": spec}, scale="unit")
    out, _ = jax.jit(tx.update)({"w": g}, optax.EmptyState())
    axes = {"output": (stacked,), "input": (stacked + 1,),
            "spatial": (stacked + 2, stacked + 3)}[direction]
    sizes = [shape[a] for a in axes]
    want = _reference.apply_dense(
        g, axes, _reference.metric_matrix(sizes, 2e-2, "sobolev"))
    np.testing.assert_allclose(out["w"], want, rtol=1e-5, atol=1e-5)

  def test_int_output_axis_zero(self):
    # The old main refused it ("must be one of the last two axes").
    g = jnp.asarray(np.random.default_rng(4).standard_normal((8, 4, 3, 3)),
                    jnp.float32)
    out, _ = optax_cdg.channel_directed(1e-2, kernels=0, scale="unit").update(
        g, optax.EmptyState())
    np.testing.assert_allclose(
        out, optax_cdg.metric_gradient(g, 1e-2, axes=(0,),
                                       scale="unit"), rtol=1e-6)
