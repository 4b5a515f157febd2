"""Diagnostics: how the energy of conv kernels spreads over channel
frequencies."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_cdg import _checks
from optax_cdg import _operator
from optax_cdg import _selection


def _fiber_energy(x: jax.Array, axis: int, boundary: str,
                  normalize: bool) -> jax.Array:
  x = jnp.moveaxis(x.astype(_operator.compute_dtype(x.dtype)), axis, -1)
  n = x.shape[-1]
  if boundary == "neumann":  # the DCT-II's coefficients, from the DFT
    x = _operator.even_extension(x, (-1,))
  power = jnp.abs(jnp.fft.rfft(x.reshape(-1, x.shape[-1]), axis=-1)) ** 2
  # One-sided: every bin but 0 and (for an even length) the last stands for
  # a pair of conjugate frequencies. The even extension holds the fiber
  # twice, and its last bin is 0.
  k = np.arange(power.shape[-1])
  weight = np.where((k == 0) | (2 * k == x.shape[-1]), 1.0, 2.0)
  energy = jnp.mean(power, axis=0) * (weight / x.shape[-1]).astype(power.dtype)
  if boundary == "neumann":
    energy = energy[:n] / 2
  if normalize:
    total = jnp.sum(energy)
    energy = jnp.where(total > 0, energy / jnp.where(total > 0, total, 1.0),
                       0.0)
  return energy


def channel_spectrum(
    tree: Any,
    kernels: Any = None,
    *,
    boundary: _checks.Boundary = "periodic",
    normalize: bool = False,
) -> Any:
  r"""The energy per frequency along the output-channel axis of each kernel.

  For every selected kernel `W` (selected exactly as
  :func:`channel_directed` selects it: same `kernels` argument, same output
  axis, so `ConvTranspose(transpose_kernel=True)` specs use axis -2), let `N`
  be the length of its output axis and `f` run over its `M` fibers along that
  axis (one per spatial tap, input channel and stacked layer). Then

  - `boundary="periodic"`: with `F = rfft(f)`, for `k = 0 .. N // 2`,
    `E_k = (w_k / N) * mean_f |F_k|^2`, where `w_k = 1` for `k = 0` and, for
    even `N`, `k = N / 2`, and `w_k = 2` otherwise (each of those bins stands
    for the frequencies `k` and `N - k`);
  - `boundary="neumann"`: with `C = dct(f)` (orthonormal DCT-II), for
    `k = 0 .. N - 1`, `E_k = mean_f C_k^2`.

  Either way `sum_k E_k = mean_f sum_n f_n^2 = ||W||^2 / M` (Parseval), and
  since :func:`metric_gradient` multiplies frequency `k` by `gain_k`, it
  multiplies `E_k` by `gain_k^2` (:func:`spectral_gain`, same boundary).
  `E_0` is the energy of the channel mean; a kernel that varies smoothly
  across output channels has its energy in the low `k`.

  Args:
    tree: a tree of arrays (parameters, updates, or differences of them).
    kernels: which leaves, as for :func:`channel_directed`: None (the
      :func:`conv_kernels` guess), a spec tree, or a callable such as
      :func:`linen_conv_kernels` returns.
    boundary: "periodic" (rfft bins) or "neumann" (DCT-II bins).
    normalize: divide each spectrum by its total, so that it sums to 1 (an
      all-zero kernel gives all zeros).

  Returns:
    A tree of the structure of `tree` with, at each selected kernel, a 1-D
    array of `N // 2 + 1` (periodic) or `N` (Neumann) energies, in float32
    (float64 for float64 kernels), and None at every other leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_cdg
    >>> # 8 output channels alternating +1, -1: all energy at frequency 4.
    >>> w = jnp.ones((3, 3, 2, 8)) * (-1.0) ** jnp.arange(8)
    >>> tree = {"conv": {"kernel": w, "bias": jnp.zeros(8)}}
    >>> spectrum = optax_cdg.channel_spectrum(tree, normalize=True)
    >>> spectrum["conv"]["kernel"].round(6).tolist(), spectrum["conv"]["bias"]
    ([0.0, 0.0, 0.0, 0.0, 1.0], None)
    >>> # CDG multiplies each E_k by gain_k ** 2:
    >>> smoothed = optax_cdg.metric_gradient(w, 1e-2, scale="unit")
    >>> ratio = (optax_cdg.channel_spectrum(smoothed, True)[4]
    ...          / optax_cdg.channel_spectrum(w, True)[4])
    >>> round(float(ratio), 4), round(float(
    ...     optax_cdg.spectral_gain(8, 1e-2, scale="unit")[4] ** 2), 4)
    (0.0789, 0.0789)
  """
  _checks.check_options(boundary=boundary)
  if not isinstance(normalize, bool):
    raise TypeError(f"normalize={normalize!r} must be a bool.")
  _selection.check_kernels(kernels)
  # Along the output channels: each selected kernel has one axis.
  return _selection.map_selected(
      lambda x, axes: _fiber_energy(x, axes[0], boundary, normalize),
      tree, kernels, "output", rest=lambda x: None)
