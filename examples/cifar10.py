"""ResNet-20 on CIFAR-10, with and without channel-directed gradients.

Reads the official BINARY distribution of CIFAR-10 (cifar-10-binary.tar.gz,
extracted) from --data-dir: data_batch_1.bin .. data_batch_5.bin and
test_batch.bin, each a sequence of 3,073-byte records (1 label byte, then
3,072 bytes of the 32x32 image, channel-major: 1,024 red, 1,024 green, 1,024
blue, rows top to bottom). Nothing is ever unpickled and nothing is
downloaded.

Recipe (paper-style): SGD, learning rate 0.1 with cosine decay to 0, momentum
0.9, weight decay 5e-4, batch 128, random 32x32 crops of the 4-pixel
zero-padded image and random horizontal flips; the two runs share the seed,
so the same initialization and batch order. Augmentation runs on the device,
inside the jitted step.

  python examples/cifar10.py --data-dir ~/data/cifar-10-batches-bin
  python examples/cifar10.py --synthetic 20000 --epochs 2   # throughput only

--synthetic N writes N random records in the same binary format (plus N // 5
test records) to a temporary directory and trains on them: the accuracy is
meaningless, the throughput (images/s, printed with the device) is not.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_cdg
import common

TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
IMAGE_SHAPE = (3, 32, 32)  # as stored: channel, row, column
RECORD_BYTES = 1 + int(np.prod(IMAGE_SHAPE))
MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


def read_records(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Images (n, 32, 32, 3) uint8, HWC, and labels (n,) int32 of one file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path} does not exist: --data-dir must hold the extracted binary "
        f"CIFAR-10 files {', '.join(TRAIN_FILES)} and {TEST_FILE} (or use "
        "--synthetic N).")
  raw = np.fromfile(path, dtype=np.uint8)
  if raw.size == 0 or raw.size % RECORD_BYTES:
    raise ValueError(
        f"{path} holds {raw.size} bytes, which is not a positive multiple of "
        f"the {RECORD_BYTES}-byte CIFAR-10 record (1 label byte + 3072 image "
        "bytes): is it the binary version?")
  raw = raw.reshape(-1, RECORD_BYTES)
  labels = raw[:, 0].astype(np.int32)
  if labels.max() > 9:
    raise ValueError(f"{path} has label {labels.max()}; CIFAR-10 labels are "
                     "0 .. 9.")
  images = raw[:, 1:].reshape((-1,) + IMAGE_SHAPE).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels


def load_cifar10(data_dir: str) -> dict[str, common.Split]:
  """The train (all five batches) and test splits, images uint8 NHWC."""
  parts = [read_records(os.path.join(data_dir, f)) for f in TRAIN_FILES]
  test = read_records(os.path.join(data_dir, TEST_FILE))
  return {
      "train": common.Split(np.concatenate([p[0] for p in parts]),
                            np.concatenate([p[1] for p in parts])),
      "test": common.Split(*test),
  }


def write_synthetic(data_dir: str, n: int, seed: int = 0) -> None:
  """Writes n random training records (over the five batch files) and
  max(1, n // 5) test records in the binary CIFAR-10 format."""
  if n < len(TRAIN_FILES):
    raise ValueError(f"--synthetic={n}: need at least {len(TRAIN_FILES)} "
                     "records (one per training file).")
  rng = np.random.default_rng(seed)

  def write(path, count):
    rec = rng.integers(0, 256, (count, RECORD_BYTES), dtype=np.uint8)
    rec[:, 0] = rng.integers(0, 10, count)
    rec.tofile(path)

  for name, count in zip(TRAIN_FILES,
                         np.diff(np.linspace(0, n, len(TRAIN_FILES) + 1)
                                 .astype(int))):
    write(os.path.join(data_dir, name), int(count))
  write(os.path.join(data_dir, TEST_FILE), max(1, n // 5))


def normalize(x: jax.Array) -> jax.Array:
  """uint8 HWC images -> float32, standardized per channel."""
  return (x.astype(jnp.float32) / 255.0 - MEAN) / STD


def augment(key: jax.Array, x: jax.Array, pad: int = 4) -> jax.Array:
  """A random crop of the zero-padded image and a random horizontal flip."""
  n, h, w, _ = x.shape
  k_row, k_col, k_flip = jax.random.split(key, 3)
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  rows = jax.random.randint(k_row, (n,), 0, 2 * pad + 1)
  cols = jax.random.randint(k_col, (n,), 0, 2 * pad + 1)
  crop = jax.vmap(lambda img, r, c: jax.lax.dynamic_slice(
      img, (r, c, 0), (h, w, img.shape[-1])))(padded, rows, cols)
  flip = jax.random.bernoulli(k_flip, 0.5, (n,))
  return jnp.where(flip[:, None, None, None], crop[:, :, ::-1], crop)


def make_tx(total_steps: int, *, cdg: bool, kernels: Any = None,
            smoothing: float = optax_cdg.DEFAULT_SMOOTHING,
            metric: str = "sobolev", lr: float = 0.1,
            momentum: float = 0.9, weight_decay: float = 5e-4
            ) -> optax.GradientTransformation:
  """SGD with cosine decay and coupled weight decay, CDG first if `cdg`."""
  parts = [optax.add_decayed_weights(weight_decay),
           optax.sgd(optax.cosine_decay_schedule(lr, total_steps), momentum)]
  if cdg:
    parts.insert(0, optax_cdg.channel_directed(smoothing, metric=metric,
                                               kernels=kernels))
  return optax.chain(*parts)


def make_step(model: nn.Module, tx: optax.GradientTransformation):
  """A jitted step on a batch given by indices into device-resident data:
  gathers, augments, normalizes and applies `common.train_step`."""
  inner = common.train_step(model, tx)

  @jax.jit
  def step(params, stats, opt_state, images, labels, idx, key, count):
    x = normalize(augment(jax.random.fold_in(key, count), images[idx]))
    return inner(params, stats, opt_state, x, labels[idx])

  return step


def run(model: nn.Module, tx: optax.GradientTransformation,
        data: dict[str, common.Split], *, epochs: int, batch_size: int,
        seed: int, name: str = "", log=print) -> dict[str, Any]:
  """Trains and returns test accuracy per epoch and the throughput."""
  train = data["train"]
  n = len(train.x)
  steps = n // batch_size
  if steps < 1:
    raise ValueError(f"--batch-size={batch_size} exceeds the {n} training "
                     "images.")
  images = jax.device_put(train.x)
  labels = jax.device_put(train.y)
  test = common.Split(np.asarray(normalize(data["test"].x)), data["test"].y)
  variables = common.init_variables(model, np.zeros((1, 32, 32, 3),
                                                    np.float32), seed)
  params, stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  step = make_step(model, tx)
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)

  compile_start = time.perf_counter()
  # Compile outside the timed region (the state is discarded).
  jax.block_until_ready(step(params, stats, opt_state, images, labels,
                             np.arange(batch_size), key, 0))
  compile_seconds = time.perf_counter() - compile_start

  train_seconds, curve, losses = 0.0, [], []
  for epoch in range(epochs):
    order = rng.permutation(n)
    start = time.perf_counter()
    epoch_loss = []
    for i in range(steps):
      params, stats, opt_state, loss = step(
          params, stats, opt_state, images, labels,
          order[i * batch_size:(i + 1) * batch_size], key,
          epoch * steps + i)
      epoch_loss.append(loss)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    train_seconds += seconds
    losses.append(float(np.mean(jax.device_get(epoch_loss))))
    curve.append(common.accuracy(model, {"params": params,
                                         "batch_stats": stats}, test))
    log(f"{name:8s} epoch {epoch + 1:3d}/{epochs}  loss {losses[-1]:.4f}  "
        f"test acc {curve[-1]:.4f}  {steps * batch_size / seconds:8.0f} "
        "images/s")
  return {"test_acc": curve[-1], "test_curve": curve, "train_loss": losses,
          "images_per_second": epochs * steps * batch_size / train_seconds,
          "train_seconds": train_seconds, "compile_seconds": compile_seconds}


def main(argv=None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--data-dir", help="directory of the binary CIFAR-10 files")
  p.add_argument("--synthetic", type=int, metavar="N",
                 help="write and use N random records instead of --data-dir")
  p.add_argument("--epochs", type=int, default=200)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--lr", type=float, default=0.1)
  p.add_argument("--smoothing", type=float,
                 default=optax_cdg.DEFAULT_SMOOTHING,
                 help="CDG smoothing (default %(default)s)")
  p.add_argument("--metric", default="sobolev",
                 choices=("sobolev", "sobolev_mean", "reweighted"))
  p.add_argument("--runs", default="baseline,cdg",
                 help="comma-separated: baseline, cdg (default %(default)s)")
  p.add_argument("--depth", type=int, default=20,
                 help="ResNet depth 6n+2 (default %(default)s)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", help="write the results as JSON to this file")
  args = p.parse_args(argv)

  if (args.data_dir is None) == (args.synthetic is None):
    p.error("give exactly one of --data-dir and --synthetic N")
  if args.depth < 8 or (args.depth - 2) % 6:
    p.error(f"--depth={args.depth}: must be 6n+2 with n >= 1 (8, 14, 20, ...)")
  runs = [r.strip() for r in args.runs.split(",") if r.strip()]
  if not runs or any(r not in ("baseline", "cdg") for r in runs):
    p.error(f"--runs={args.runs!r}: expected baseline, cdg or both")
  for name in ("epochs", "batch_size"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")

  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir
    if args.synthetic is not None:
      write_synthetic(tmp, args.synthetic, seed=args.seed)
      data_dir = tmp
      print(f"synthetic data: {args.synthetic} random records in {tmp} "
            "(accuracy is meaningless; throughput is not)")
    data = load_cifar10(data_dir)

  device = jax.devices()[0]
  print(f"device: {device.platform} {device.device_kind} "
        f"(jax {jax.__version__}); train {len(data['train'].x)}, test "
        f"{len(data['test'].x)}")
  model = common.ResNet(blocks_per_stage=(args.depth - 2) // 6)
  kernels = optax_cdg.linen_conv_kernels(
      model, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  total_steps = args.epochs * (len(data["train"].x) // args.batch_size)
  results = {"device": f"{device.platform} {device.device_kind}",
             "jax": jax.__version__, "depth": args.depth,
             "epochs": args.epochs, "batch_size": args.batch_size,
             "synthetic": args.synthetic, "runs": {}}
  for name in runs:
    tx = make_tx(total_steps, cdg=name == "cdg", kernels=kernels,
                 smoothing=args.smoothing, metric=args.metric, lr=args.lr)
    r = run(model, tx, data, epochs=args.epochs, batch_size=args.batch_size,
            seed=args.seed, name=name)
    results["runs"][name] = r
    print(f"{name}: test accuracy {r['test_acc']:.4f}, "
          f"{r['images_per_second']:.0f} images/s on {results['device']} "
          f"(compile {r['compile_seconds']:.1f} s)")
  if "cdg" in runs:
    print(f"CDG: {args.metric}, smoothing {args.smoothing}, output channels")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  main()
