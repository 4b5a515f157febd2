"""Tests of optax_cdg.spectral_gain."""

from absl.testing import parameterized
import jax
import numpy as np
import pytest

from _reference import metric_matrix
import optax_cdg


class SpectralGainTest(parameterized.TestCase):

  @parameterized.product(n=(1, 2, 3, 7, 64, 127),
                         metric=("sobolev", "sobolev_mean", "reweighted"),
                         scale=("unit", "grid"))
  def test_periodic_gains_are_the_inverse_eigenvalues(self, n, metric, scale):
    lam = 0.01 if metric != "reweighted" else 3.0
    a = metric_matrix((n,), lam, metric, "periodic", scale)
    # A circulant matrix's eigenvalues are the DFT of its first column.
    eig = np.real(np.fft.rfft(a[:, 0]))
    gain = optax_cdg.spectral_gain(n, lam, metric=metric, scale=scale)
    assert gain.shape == (n // 2 + 1,)
    np.testing.assert_allclose(gain, 1.0 / eig, rtol=1e-9)

  @parameterized.product(n=(1, 2, 3, 7, 64),
                         metric=("sobolev", "sobolev_mean", "reweighted"))
  def test_neumann_gains_are_the_inverse_eigenvalues(self, n, metric):
    lam = 0.01 if metric != "reweighted" else 3.0
    a = metric_matrix((n,), lam, metric, "neumann")
    k, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    dct = np.cos(np.pi * k * (2 * j + 1) / (2 * n))  # DCT-II basis, rows
    eig = np.einsum("kj,ji,ki->k", dct, a, dct) / np.sum(dct**2, axis=1)
    gain = optax_cdg.spectral_gain(n, lam, metric=metric, boundary="neumann",
                                   scale="unit")
    np.testing.assert_allclose(gain, 1.0 / eig, rtol=1e-9)

  def test_several_axes_layout(self):
    gain = optax_cdg.spectral_gain((3, 3, 8), 0.01, scale="unit")
    assert gain.shape == (3, 3, 5)
    assert gain[0, 0, 0] == 1.0
    gain = optax_cdg.spectral_gain((3, 4), 0.01, boundary="neumann",
                                   scale="unit")
    assert gain.shape == (3, 4)

  def test_mean_gain_is_one_and_table(self):
    for metric in ("sobolev", "sobolev_mean", "reweighted", "l2"):
      g = optax_cdg.spectral_gain(16, 0.5, metric=metric, scale="unit")
      assert g[0] == 1.0
    np.testing.assert_array_equal(
        optax_cdg.spectral_gain(16, 0.5, metric="reweighted",
                                scale="unit")[1:], 2.0)
    np.testing.assert_array_equal(
        optax_cdg.spectral_gain(16, 0.5, metric="l2", scale="unit"), 1.0)

  def test_unit_scale_is_width_invariant(self):
    # With "unit" scale the first harmonic gets the same gain at every width.
    g = [optax_cdg.spectral_gain(n, 0.01, scale="unit")[1]
         for n in (64, 256, 512)]
    np.testing.assert_allclose(g, 1.0 / (1.0 + 0.01 * (2 * np.pi) ** 2),
                               rtol=1e-3)

  def test_concrete_is_numpy_traced_is_jax(self):
    assert isinstance(optax_cdg.spectral_gain(8, 0.1, scale="unit"), np.ndarray)
    traced = jax.jit(lambda s: optax_cdg.spectral_gain(8, s, scale="unit"))(0.1)
    np.testing.assert_allclose(
        traced, optax_cdg.spectral_gain(8, 0.1, scale="unit"), rtol=1e-6)
    bad = jax.jit(lambda s: optax_cdg.spectral_gain(8, s, scale="unit"))(-0.1)
    assert np.all(np.isnan(bad))

  @parameterized.named_parameters(
      ("sizes_negative", dict(sizes=-1), ValueError, "sizes"),
      ("sizes_type", dict(sizes="8"), TypeError, "sizes"),
      ("metric", dict(metric="H1"), ValueError, "metric='H1'"),
      ("boundary", dict(boundary="zero"), ValueError, "boundary='zero'"),
      ("scale", dict(scale=None), ValueError, "scale=None"),
      ("smoothing", dict(smoothing=-2), ValueError, "smoothing=-2"),
      ("smoothing_bool", dict(smoothing=True), TypeError,
       "smoothing must be a real number; got the bool True"),
  )
  def test_bad_argument(self, kwargs, error, message):
    kwargs = dict(dict(sizes=8, smoothing=0.1), **kwargs)
    with pytest.raises(error, match=message):
      optax_cdg.spectral_gain(kwargs.pop("sizes"), kwargs.pop("smoothing"),
                              **kwargs)
