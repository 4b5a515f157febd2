"""Optimizers with channel-directed gradients, in the style of Optax's aliases.

CDG goes first in each chain: before any optimizer state, clipping or weight
decay (docs/optimizers.md says why; tests/test_alias.py checks it).
"""

from __future__ import annotations

from typing import Any

import optax

from optax_cdg import _checks
from optax_cdg import _gains
from optax_cdg import _transform


def with_channel_directed(
    optimizer: optax.GradientTransformation,
    smoothing: optax.ScalarOrSchedule = _gains.DEFAULT_SMOOTHING,
    *,
    metric: _checks.Metric = "sobolev",
    direction: _checks.Direction = "output",
    boundary: _checks.Boundary = "periodic",
    scale: _checks.Scale = _gains.DEFAULT_SCALE,
    kernels: Any = None,
    method: _checks.Method = "auto",
) -> optax.GradientTransformationExtraArgs:
  """Puts channel-directed gradients in front of any optimizer.

  Returns `optax.chain(channel_directed(smoothing, ...), optimizer)`: the
  optimizer (its state, clipping, weight decay, schedules) sees the
  channel-directed gradient in place of the loss gradient.

  Args:
    optimizer: any Optax gradient transformation, for example
      `optax.lion(1e-4)` or `optax.chain(optax.clip_by_global_norm(1.0),
      optax.adamw(1e-3))`.
    smoothing: `lam` of :func:`channel_directed`, a number or a schedule.
    metric, direction, boundary, scale, kernels, method: as for
      :func:`channel_directed`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is the
    chain's `(cdg_state, optimizer_state)`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_cdg
    >>> params = {"conv": {"kernel": jnp.ones((3, 3, 2, 8))}}
    >>> tx = optax_cdg.with_channel_directed(optax.lion(1e-4), smoothing=0.5)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> updates["conv"]["kernel"].shape
    (3, 3, 2, 8)
  """
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(
        f"optimizer={optimizer!r} must be an optax.GradientTransformation, "
        "such as optax.adam(1e-3) (called, not the function optax.adam).")
  cdg = _transform.channel_directed(
      smoothing, metric=metric, direction=direction, boundary=boundary,
      scale=scale, kernels=kernels, method=method)
  return optax.chain(cdg, optimizer)


def cdg_sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    weight_decay: float | None = None,
    smoothing: optax.ScalarOrSchedule = _gains.DEFAULT_SMOOTHING,
    *,
    mask: Any = None,
    metric: _checks.Metric = "sobolev",
    direction: _checks.Direction = "output",
    boundary: _checks.Boundary = "periodic",
    scale: _checks.Scale = _gains.DEFAULT_SCALE,
    kernels: Any = None,
    method: _checks.Method = "auto",
) -> optax.GradientTransformationExtraArgs:
  r"""SGD (with momentum and weight decay) on channel-directed gradients.

  The paper's CDG-SGD. With `g` the loss gradient, `w` the parameters, `A`
  the metric of :func:`channel_directed` (on the selected conv kernels; the
  identity elsewhere), `beta` the momentum, `wd` the weight decay and `eta`
  the learning rate:

  .. math::

    d_t = A^{-1} g_t + wd \, w_t, \quad
    m_t = \beta m_{t-1} + d_t, \quad
    w_{t+1} = w_t - \eta_t m_t

  (with `nesterov=True` the step is `eta (d_t + beta m_t)`): the updates of
  `optax.chain(channel_directed(smoothing, ...),
  optax.add_decayed_weights(weight_decay, mask), optax.sgd(learning_rate,
  momentum, nesterov))`. The decay is added after CDG, never smoothed.

  Args:
    learning_rate: a number or a schedule (warmup goes here).
    momentum: the momentum decay `beta`, or None for none.
    nesterov: use Nesterov momentum.
    weight_decay: the coupled (L2) weight decay `wd`, or None for none. It
      needs `params` in `update`.
    smoothing: `lam` of :func:`channel_directed`, a number or a schedule.
    mask: which parameters are decayed, as for `optax.add_decayed_weights`.
    metric, direction, boundary, scale, kernels, method: as for
      :func:`channel_directed`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  References:
    Lao et al., `Channel-Directed Gradients for Optimization of Convolutional
    Neural Networks <https://arxiv.org/abs/2008.10766>`_, 2020.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_cdg
    >>> params = {"conv": {"kernel": jnp.ones((3, 3, 2, 8))}}
    >>> tx = optax.inject_hyperparams(optax_cdg.cdg_sgd)(
    ...     learning_rate=0.1, momentum=0.9, smoothing=0.5)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> # A gradient constant across channels keeps its value.
    >>> round(float(updates["conv"]["kernel"][0, 0, 0, 0]), 6)
    -0.1
    >>> sorted(state.hyperparams)
    ['learning_rate', 'momentum', 'smoothing']
  """
  optimizer = optax.sgd(learning_rate, momentum, nesterov)
  if weight_decay is not None:
    optimizer = optax.chain(optax.add_decayed_weights(weight_decay, mask),
                            optimizer)
  return with_channel_directed(
      optimizer, smoothing, metric=metric, direction=direction,
      boundary=boundary, scale=scale, kernels=kernels, method=method)


def cdg_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: float = 1e-4,
    mask: Any = None,
    smoothing: optax.ScalarOrSchedule = _gains.DEFAULT_SMOOTHING,
    *,
    nesterov: bool = False,
    metric: _checks.Metric = "sobolev",
    direction: _checks.Direction = "output",
    boundary: _checks.Boundary = "periodic",
    scale: _checks.Scale = _gains.DEFAULT_SCALE,
    kernels: Any = None,
    method: _checks.Method = "auto",
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW on channel-directed gradients.

  Adam's moments are built from `A^{-1} g` (:func:`channel_directed`), and
  the decoupled weight decay is added after them, unsmoothed:

  .. math::

    u_t = \mathrm{adam}(A^{-1} g_1, \dots, A^{-1} g_t) + wd \, w_t, \quad
    w_{t+1} = w_t - \eta_t u_t

  the updates of `optax.chain(channel_directed(smoothing, ...),
  optax.adamw(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay,
  mask, nesterov=nesterov))`.

  Args:
    learning_rate: a number or a schedule (warmup goes here).
    b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, nesterov: as for
      `optax.adamw` (`weight_decay` is decoupled).
    smoothing: `lam` of :func:`channel_directed`, a number or a schedule.
    metric, direction, boundary, scale, kernels, method: as for
      :func:`channel_directed`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  References:
    Lao et al., `Channel-Directed Gradients for Optimization of Convolutional
    Neural Networks <https://arxiv.org/abs/2008.10766>`_, 2020.

    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_cdg
    >>> params = {"conv": {"kernel": jnp.ones((3, 3, 2, 8))}}
    >>> tx = optax.inject_hyperparams(optax_cdg.cdg_adamw)(
    ...     learning_rate=optax.linear_schedule(0.0, 1e-3, 100),
    ...     smoothing=0.5)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> sorted(state.hyperparams)[:4]
    ['b1', 'b2', 'eps', 'eps_root']
    >>> sorted(state.hyperparams)[4:]
    ['learning_rate', 'smoothing', 'weight_decay']
  """
  return with_channel_directed(
      optax.adamw(learning_rate, b1, b2, eps, eps_root, mu_dtype,
                  weight_decay, mask, nesterov=nesterov),
      smoothing, metric=metric, direction=direction, boundary=boundary,
      scale=scale, kernels=kernels, method=method)
