"""Tests of optax_cdg.channel_spectrum."""

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _models import LINEN_MIXED_CONVS
from _models import LINEN_MIXED_INPUT
from _models import LinenCNN
from _models import LinenMixed
import optax_cdg


def _random(shape, seed=0, dtype=np.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


class SpectrumTest(parameterized.TestCase):

  @parameterized.product(n=(7, 16), k=(0, 1, 3), boundary=("periodic",
                                                               "neumann"))
  def test_pure_cosine_fills_one_bin(self, n, k, boundary):
    c = np.arange(n)
    if boundary == "periodic":
      wave = np.cos(2 * np.pi * k * c / n)
    else:  # the k-th DCT-II basis vector
      wave = np.cos(np.pi * k * (c + 0.5) / n)
    amplitude = np.random.default_rng(1).standard_normal((3, 3, 5, 1))
    w = jnp.asarray(amplitude * wave, jnp.float32)
    e = np.asarray(optax_cdg.channel_spectrum(w, True, boundary=boundary))
    self.assertEqual(e.shape, (n // 2 + 1 if boundary == "periodic" else n,))
    total = float(jnp.sum(w ** 2)) / (3 * 3 * 5)
    np.testing.assert_allclose(e[k], total, rtol=1e-5)
    np.testing.assert_allclose(np.delete(e, k), 0.0, atol=1e-5 * total)

  @parameterized.product(n=(1, 5, 64), boundary=("periodic", "neumann"),
                         output_axis=(-1, -2))
  def test_parseval(self, n, boundary, output_axis):
    shape = (3, 2, 6, n) if output_axis == -1 else (3, 2, n, 6)
    w = _random(shape, seed=n)
    e = optax_cdg.channel_spectrum(
        {"w": w}, {"w": optax_cdg.KernelSpec(output_axis)},
        boundary=boundary)["w"]
    self.assertEqual(e.shape, (n // 2 + 1 if boundary == "periodic" else n,))
    np.testing.assert_allclose(float(jnp.sum(e)),
                               float(jnp.sum(w ** 2)) * n / w.size, rtol=1e-5)
    self.assertTrue(bool(jnp.all(e >= 0)))

  @parameterized.product(boundary=("periodic", "neumann"),
                         metric=("sobolev", "sobolev_mean"))
  def test_metric_gradient_scales_energy_by_squared_gain(self, boundary,
                                                         metric):
    g = _random((3, 3, 4, 32), seed=2)
    lam = 1e-3 if metric == "sobolev" else 0.05
    smoothed = optax_cdg.metric_gradient(g, lam, metric=metric,
                                         boundary=boundary, scale="unit")
    before = optax_cdg.channel_spectrum(g, True, boundary=boundary)
    after = optax_cdg.channel_spectrum(smoothed, True, boundary=boundary)
    gain = optax_cdg.spectral_gain(32, lam, metric=metric, boundary=boundary,
                                   scale="unit")
    np.testing.assert_allclose(after, gain ** 2 * before, rtol=2e-4,
                               atol=1e-6 * float(jnp.max(before)))

  def test_normalize(self):
    e = optax_cdg.channel_spectrum(_random((3, 3, 4, 10)), True,
                                   normalize=True)
    np.testing.assert_allclose(float(jnp.sum(e)), 1.0, rtol=1e-6)
    zero = optax_cdg.channel_spectrum(jnp.zeros((3, 3, 4, 10)), True,
                                      normalize=True)
    np.testing.assert_array_equal(zero, 0.0)

  def test_default_selection_and_unselected_leaves_are_none(self):
    shapes = jax.eval_shape(LinenCNN().init, jax.random.key(0),
                            jnp.zeros((2, 8, 8, 1)))["params"]
    params = jax.tree.map(lambda s: _random(s.shape), shapes)
    before = jax.tree.map(np.array, params)
    out = optax_cdg.channel_spectrum(params)
    self.assertEqual(out["Conv_0"]["kernel"].shape, (8 // 2 + 1,))
    self.assertEqual(out["Conv_1"]["kernel"].shape, (16 // 2 + 1,))
    self.assertIsNone(out["Conv_0"]["bias"])
    self.assertIsNone(out["Dense_0"]["kernel"])
    self.assertIsNone(out["BatchNorm_0"]["scale"])
    self.assertLen(jax.tree.leaves(out), 2)
    chex.assert_trees_all_equal(params, before)  # nothing mutated

  def test_exact_selection_follows_output_axis(self):
    params = jax.tree.map(
        lambda s: jnp.ones(s.shape, s.dtype),
        jax.eval_shape(LinenMixed().init, jax.random.key(0),
                       LINEN_MIXED_INPUT)["params"])
    out = optax_cdg.channel_spectrum(
        params, optax_cdg.linen_conv_kernels(LinenMixed(), LINEN_MIXED_INPUT))
    found = {tuple(str(getattr(k, "key", k)) for k in path): leaf.shape
             for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]}
    want = {}
    for path, (axis, _) in LINEN_MIXED_CONVS.items():
      leaf = params
      for name in path:
        leaf = leaf[name]
      want[path] = (leaf.shape[axis] // 2 + 1,)
    self.assertEqual(found, want)
    # The transposed kernel (3, 4, 16) is read along axis -2: a constant
    # kernel puts everything in bin 0 of its 4 output channels.
    e = out["ConvTranspose_0"]["kernel"]
    self.assertEqual(e.shape, (3,))
    np.testing.assert_allclose(e, [4.0, 0.0, 0.0], atol=1e-6)

  def test_masked_and_half_precision(self):
    tree = {"a": {"kernel": _random((3, 3, 2, 8), dtype=jnp.bfloat16)},
            "b": optax.MaskedNode()}
    out = optax_cdg.channel_spectrum(tree)
    self.assertEqual(out["a"]["kernel"].dtype, jnp.float32)
    self.assertIsNone(out["b"])

  def test_jit(self):
    w = _random((3, 3, 4, 12))
    chex.assert_trees_all_close(
        jax.jit(lambda t: optax_cdg.channel_spectrum(t, True))(w),
        optax_cdg.channel_spectrum(w, True), rtol=1e-6)

  def test_errors(self):
    w = _random((3, 3, 4, 8))
    with pytest.raises(ValueError, match="boundary='dft'"):
      optax_cdg.channel_spectrum(w, True, boundary="dft")
    with pytest.raises(TypeError, match="normalize=1"):
      optax_cdg.channel_spectrum(w, True, normalize=1)
    with pytest.raises(TypeError, match="kernels"):
      optax_cdg.channel_spectrum({"w": w}, {"w": "yes"})
    with pytest.raises(ValueError, match="does not match the updates"):
      optax_cdg.channel_spectrum({"w": w}, {"v": True})
    with pytest.raises(ValueError, match="output axis"):
      optax_cdg.channel_spectrum(w, 4)
    with pytest.raises(TypeError, match="floating"):
      optax_cdg.channel_spectrum(jnp.ones((3, 3, 2, 4), jnp.int32), True)
