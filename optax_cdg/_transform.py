"""The channel-directed gradient transformation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_cdg import _checks
from optax_cdg import _operator
from optax_cdg import _selection

# From the seeded, learning-rate-tuned comparison in README.md ("Default
# smoothing"): no smoothing beat the baseline there, and 1e-4 is the "sobolev"
# value that did the least harm for both SGD and AdamW while still damping the
# high channel frequencies of wide layers.
DEFAULT_SMOOTHING = 1e-4


class ChannelDirectedState(NamedTuple):
  """The step count, kept only when `smoothing` is a schedule."""

  count: jax.Array


def map_selected(
    fn: Callable[[jax.Array, tuple[int, ...]], Any],
    updates: Any,
    spec_tree: Any,
    direction: str,
) -> Any:
  """Applies `fn(leaf, axes)` to every leaf a `kernels` spec tree selects.

  `spec_tree` is a prefix of `updates`; every other leaf is returned as the
  very same object.
  """
  specs, treedef = jax.tree_util.tree_flatten_with_path(
      spec_tree, is_leaf=_selection.is_spec_leaf
  )
  try:
    subtrees = treedef.flatten_up_to(updates)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "kernels: the spec tree must be a prefix of the updates tree (same "
        "containers and keys, with None/False/True/axis values at or above "
        f"the leaves); they differ: {e}"
    ) from e

  out = []
  for (path, spec), sub in zip(specs, subtrees):
    if spec is None or (isinstance(spec, (bool, np.bool_)) and not spec):
      out.append(sub)
      continue

    def one(p, x, path=path, spec=spec):
      if _selection.is_passthrough(x):
        return x
      return fn(x, _selection.resolve_spec(spec, path + p, x, direction))

    out.append(jax.tree_util.tree_map_with_path(
        one, sub, is_leaf=_selection.is_passthrough))
  return treedef.unflatten(out)


def resolve_kernels(kernels: Any, updates: Any) -> Any:
  """The spec tree for `updates` from a `kernels` argument."""
  if kernels is None:
    return _selection.conv_kernels(updates)
  if callable(kernels):
    return kernels(updates)
  return kernels


def check_kernels(kernels: Any) -> None:
  """Build-time check of a `kernels` argument that is a tree."""
  if kernels is None or callable(kernels):
    return
  for path, spec in jax.tree_util.tree_flatten_with_path(
      kernels, is_leaf=_selection.is_spec_leaf)[0]:
    if not _selection.is_spec_leaf(spec):
      raise TypeError(
          f"kernels: the value at {_selection.format_path(path)} is "
          f"{spec!r}; expected None, False, True, an output axis (int) or an "
          "optax_cdg.KernelSpec (or pass a callable or None)."
      )


def channel_directed(
    smoothing: float | optax.Schedule = DEFAULT_SMOOTHING,
    *,
    metric: str = "sobolev",
    direction: str = "output",
    boundary: str = "periodic",
    scale: str = "unit",
    kernels: Any = None,
    method: str = "auto",
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
      The default, `DEFAULT_SMOOTHING = 1e-4`, did the least harm among the
      "sobolev" values of a seeded comparison in which no smoothing improved
      test accuracy (README, "Default smoothing").
      "sobolev" needs `lam >= 0`, "sobolev_mean" and "reweighted" `lam > 0`.
      A traced value (`optax.inject_hyperparams`, a schedule under jit) that
      the metric rejects makes the selected updates NaN, since it cannot raise.
    metric: "sobolev", "sobolev_mean", "reweighted" or "l2".
    direction: "output" (the paper's method: the output-channel axis), "input"
      (the other of the last two axes) or "spatial" (all axes before them,
      Laplacians summed).
    boundary: "periodic" (FFT) or "neumann" (DCT-II).
    scale: "unit" (the channel axis is the unit interval: one `lam` means the
      same relative smoothing at every width) or "grid" (spacing 1).
    kernels: which leaves to transform. None: :func:`conv_kernels`, a guess
      from names and shapes. A tree, a prefix of the updates, of None/False
      (leave alone), True (a Flax conv kernel), an output axis (-1 or -2) or a
      :class:`KernelSpec`. Or a callable `updates -> such a tree`, such as
      :func:`linen_conv_kernels` and :func:`nnx_conv_kernels` return.
    method: how `A^{-1}` is applied, all exact: "auto" (the fastest for the
      backend, the axis length and the metric), "fft", "matmul", "blocked" or
      "closed" (see :func:`metric_gradient`).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; its state is
    `optax.EmptyState()` for a number and a :class:`ChannelDirectedState`
    (the step count) for a schedule. `update` never needs `params`.

  References:
    Lao et al., `Channel-Directed Gradients for Optimization of Convolutional
    Neural Networks <https://arxiv.org/abs/2008.10766>`_, 2020.

    Sundaramoorthi et al., `Sobolev Active Contours
    <https://doi.org/10.1007/s11263-006-0635-2>`_, IJCV 2007.
  """
  _checks.check_option("metric", metric)
  _checks.check_option("direction", direction, _selection.DIRECTIONS)
  _checks.check_option("boundary", boundary)
  _checks.check_option("scale", scale)
  _checks.check_method(method, metric)
  is_schedule = callable(smoothing)
  if not is_schedule:
    smoothing = _checks.check_smoothing(smoothing, metric)
  check_kernels(kernels)

  def init_fn(params):
    del params
    if is_schedule:
      return ChannelDirectedState(count=jnp.zeros([], jnp.int32))
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    if is_schedule:
      lam = _checks.check_smoothing(smoothing(state.count), metric)
      state = ChannelDirectedState(count=optax.safe_increment(state.count))
    else:
      lam = smoothing

    def transform(x, axes):
      return _operator.apply(
          x, lam, metric=metric, axes=axes, boundary=boundary, scale=scale,
          method=method)

    spec = resolve_kernels(kernels, updates)
    return map_selected(transform, updates, spec, direction), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
