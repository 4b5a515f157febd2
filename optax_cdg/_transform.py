"""The channel-directed gradient transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_cdg import _apply
from optax_cdg import _checks
from optax_cdg import _gains
from optax_cdg import _selection


class ChannelDirectedState(NamedTuple):
  """The step count, kept only when `smoothing` is a schedule.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_cdg
    >>> tx = optax_cdg.channel_directed(optax.linear_schedule(0.0, 1e-2, 10))
    >>> grads = {"conv": {"kernel": jnp.ones((3, 3, 2, 8))}}
    >>> state = tx.init(grads)
    >>> _, state = tx.update(grads, state)
    >>> state
    ChannelDirectedState(count=Array(1, dtype=int32))
  """

  # Optax's name for the step count; it shadows tuple.count, as in Optax.
  count: jax.Array  # type: ignore[assignment]


def channel_directed(
    smoothing: optax.ScalarOrSchedule = _gains.DEFAULT_SMOOTHING,
    *,
    metric: _checks.Metric = "sobolev",
    direction: _checks.Direction = "output",
    boundary: _checks.Boundary = "periodic",
    scale: _checks.Scale = _gains.DEFAULT_SCALE,
    kernels: Any = None,
    method: _checks.Method = "auto",
) -> optax.GradientTransformationExtraArgs:
  r"""Replaces conv-kernel gradients by their gradient in a channel metric.

  For every selected conv kernel `G` (Flax layout `(*spatial, in/groups,
  out)`), each fiber `f` along the direction (by default the output-channel
  axis) is replaced by `A^{-1} f`, the gradient of the same loss in the metric
  `<h, q>_A = sum over fibers of h^T A q` (see :func:`metric_gradient`):

  - "sobolev": `A = I + lam L` (`L` the discrete Laplacian along the
    direction), which smooths the update across channels and keeps its mean;
  - "sobolev_mean": `A = P + lam L`, `P` the projector onto the fiber mean;
  - "reweighted": `A = P + lam (I - P)`, the deviations from the channel mean
    scaled by `1 / lam`;
  - "l2": `A = I`.

  `A` is symmetric positive definite, so the result is still a descent
  direction. It is applied before any optimizer sees the gradient::

    tx = optax.chain(optax_cdg.channel_directed(), optax.sgd(0.1, 0.9))

  Every leaf that is not selected comes back as the very same object.

  Args:
    smoothing: `lam`, a number or a schedule (a callable of the step count).
      The defaults, `DEFAULT_SMOOTHING = 0.1` with `DEFAULT_SCALE = "grid"`,
      damp the highest channel frequency by `1 / (1 + 4 lam) = 0.71` at every
      width; they were chosen on validation accuracy by a rule fixed in
      advance, over CNNs of 32 to 128 channels (docs/evidence.md).
      "sobolev" needs `lam >= 0`, "sobolev_mean" and "reweighted" `lam > 0`.
      A traced value (`optax.inject_hyperparams`, a schedule under jit) that
      the metric rejects makes the selected updates NaN, since it cannot raise.
    metric: "sobolev", "sobolev_mean", "reweighted" or "l2".
    direction: "output" (the paper's method: the output-channel axis), "input"
      (the input-channel axis) or "spatial" (every axis that is neither a
      channel nor a stacked axis, Laplacians summed), as the kernel's spec
      lays them out (:class:`KernelSpec`).
    boundary: "periodic" (FFT) or "neumann" (DCT-II).
    scale: "grid" (spacing 1: one `lam` damps each channel frequency the same
      at every width) or "unit" (the channel axis is the unit interval, so
      the Laplacian is `N^2` times larger and the damping grows with the
      width `N`).
    kernels: which leaves to transform. None: :func:`conv_kernels`, a guess
      from names and shapes (exact for Equinox convs). A tree, a prefix of the
      updates, of None/False (leave alone), True (a Flax conv kernel), an
      output axis or a :class:`KernelSpec` (any layout, OIHW included). Or a
      callable `updates -> such a tree`, such as :func:`linen_conv_kernels`
      and :func:`nnx_conv_kernels` return; through
      `optax.inject_hyperparams` a callable needs
      `static_args=("kernels",)`, or it is called with the step count (an
      error names the fix). When an update selects no leaf at all, a
      :class:`NoKernelsSelectedWarning` is issued at trace time (make it an
      error with `warnings.filterwarnings("error", category=...)`).
    method: how `A^{-1}` is applied, all exact: "auto" (the closed form for
      "reweighted", the FFT otherwise), "fft", "closed" or "stencil" (see
      :func:`metric_gradient`).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; its state is
    `optax.EmptyState()` for a number and a :class:`ChannelDirectedState`
    (the step count) for a schedule. `update` never needs `params`.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_cdg
    >>> params = {"conv": {"kernel": jnp.zeros((3, 3, 1, 16)),
    ...                    "bias": jnp.zeros(16)}}
    >>> tx = optax.chain(optax_cdg.channel_directed(), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> # The highest channel frequency: +1, -1, +1, ... across the channels.
    >>> grads = jax.tree.map(
    ...     lambda p: jnp.ones_like(p) * (-1.0) ** jnp.arange(16), params)
    >>> updates, state = tx.update(grads, state)
    >>> # The default damps that frequency by 1 / (1 + 4 * 0.1) at any width;
    >>> # the bias is left as it is.
    >>> float(jnp.abs(updates["conv"]["kernel"]).max() / 0.1).__round__(3)
    0.714
    >>> bool(jnp.all(updates["conv"]["bias"] == -0.1 * grads["conv"]["bias"]))
    True

  References:
    Lao et al., `Channel-Directed Gradients for Optimization of Convolutional
    Neural Networks <https://arxiv.org/abs/2008.10766>`_, 2020.

    Sundaramoorthi et al., `Sobolev Active Contours
    <https://doi.org/10.1007/s11263-006-0635-2>`_, IJCV 2007.
  """
  _checks.check_options(metric=metric, direction=direction,
                        boundary=boundary, scale=scale, method=method)
  is_schedule = callable(smoothing)
  if not is_schedule:
    smoothing = _checks.check_smoothing(
        smoothing, metric, expected="a real number or a schedule")
  _selection.check_kernels(kernels)

  def init_fn(params):
    del params
    return (ChannelDirectedState(count=jnp.zeros([], jnp.int32))
            if is_schedule else optax.EmptyState())

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    lam = smoothing
    if is_schedule:
      lam = _checks.check_smoothing(smoothing(state.count), metric)
      state = ChannelDirectedState(count=optax.safe_increment(state.count))
    selected = []

    def smooth(x, axes):
      selected.append(axes)
      return _apply.apply(x, lam, metric=metric, axes=axes,
                             boundary=boundary, scale=scale, method=method)

    out = _selection.map_selected(smooth, updates, kernels, direction)
    if not selected:  # at trace time: never an identity that looks like work
      _selection.warn_nothing_selected(updates, kernels)
    return out, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
