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
  python examples/cifar10.py --data-dir DIR --workdir runs/c10   # checkpointed
  python examples/cifar10.py --data-dir DIR --workdir runs/c10 --resume

--workdir saves an Orbax checkpoint of each run's train state (Flax's
TrainState: parameters, BatchNorm statistics, optimizer state, step) after
every epoch and appends the epoch's loss, test accuracy and speed to
WORKDIR/<run>/log.jsonl; --resume continues from the latest checkpoint, with
the same batch order and augmentation as an uninterrupted run.

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
import orbax.checkpoint as ocp

import common
import optax_cdg

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
                                 .astype(int)), strict=True):
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
  schedule = optax.cosine_decay_schedule(lr, total_steps)
  if cdg:
    return optax_cdg.cdg_sgd(schedule, momentum, weight_decay=weight_decay,
                             smoothing=smoothing, metric=metric,
                             kernels=kernels)
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(schedule, momentum))


@jax.jit
def train_step(state: common.TrainState, images: jax.Array, labels: jax.Array,
               idx: jax.Array, key: jax.Array
               ) -> tuple[common.TrainState, jax.Array]:
  """`common.train_step` on a batch given by indices into device-resident
  data, gathered, augmented and normalized inside the jitted step. The
  augmentation draws from `key` folded with `state.step`, so a resumed run
  augments exactly as an uninterrupted one."""
  x = normalize(augment(jax.random.fold_in(key, state.step), images[idx]))
  return common.train_step(state, x, labels[idx])


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
  """The batch order of one epoch, a function of (seed, epoch) alone."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def read_log(path: str) -> list[dict[str, Any]]:
  """The per-epoch records of a JSON-lines log (empty if there is none)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_log(path: str, records: list[dict[str, Any]]) -> None:
  """Replaces the log with `records`, one JSON object per line, atomically."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  os.replace(tmp, path)


def run(model: nn.Module, tx: optax.GradientTransformation,
        data: dict[str, common.Split], *, epochs: int, batch_size: int,
        seed: int, name: str = "", run_dir: str | None = None,
        resume: bool = False, log=print) -> dict[str, Any]:
  """Trains and returns test accuracy per epoch and the throughput.

  With `run_dir`, every epoch ends with an Orbax checkpoint of the train
  state in `run_dir/checkpoints/<epoch>` and a line in `run_dir/log.jsonl`
  (epoch, train loss, test accuracy, seconds, images/s). With `resume`, the
  run continues from the latest checkpoint; without it, an existing
  checkpoint is an error rather than silently overwritten.
  """
  train = data["train"]
  n = len(train.x)
  steps = n // batch_size
  if steps < 1:
    raise ValueError(f"--batch-size={batch_size} exceeds the {n} training "
                     "images.")
  images = jax.device_put(train.x)
  labels = jax.device_put(train.y)
  test = common.Split(np.asarray(normalize(data["test"].x)), data["test"].y)
  state = common.create_state(model, tx, np.zeros((1, 32, 32, 3), np.float32),
                              seed)
  key = jax.random.key(seed)

  manager, history, log_path = None, [], None
  if run_dir is not None:
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(run_dir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=2))
    log_path = os.path.join(run_dir, "log.jsonl")
    latest = manager.latest_step()
    if latest is not None and not resume:
      raise FileExistsError(
          f"{run_dir} already holds a checkpoint (epoch {latest}): pass "
          "--resume to continue it, or another --workdir.")
    if latest is not None:
      state = manager.restore(latest, args=ocp.args.StandardRestore(state))
      # A crash between the log and the checkpoint leaves the log ahead.
      history = [r for r in read_log(log_path) if r["epoch"] <= latest]
      log(f"{name:8s} resumed from epoch {latest} ({run_dir})")
  first_epoch = int(state.step) // steps

  compile_start = time.perf_counter()
  # Compile outside the timed region (the state is discarded).
  jax.block_until_ready(train_step(state, images, labels,
                                   np.arange(batch_size), key))
  compile_seconds = time.perf_counter() - compile_start

  train_seconds, trained = 0.0, 0
  for epoch in range(first_epoch, epochs):
    order = epoch_order(n, seed, epoch)
    start = time.perf_counter()
    epoch_loss = []
    for i in range(steps):
      state, loss = train_step(state, images, labels,
                               order[i * batch_size:(i + 1) * batch_size], key)
      epoch_loss.append(loss)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    train_seconds += seconds
    trained += 1
    record = {"epoch": epoch + 1,
              "train_loss": float(np.mean(jax.device_get(epoch_loss))),
              "test_acc": common.accuracy(model, common.variables_of(state),
                                          test),
              "seconds": seconds,
              "images_per_second": steps * batch_size / seconds}
    history.append(record)
    if manager is not None:
      write_log(log_path, history)
      manager.save(epoch + 1, args=ocp.args.StandardSave(state))
    log(f"{name:8s} epoch {epoch + 1:3d}/{epochs}  loss "
        f"{record['train_loss']:.4f}  test acc {record['test_acc']:.4f}  "
        f"{record['images_per_second']:8.0f} images/s")
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  if not history:
    raise ValueError(f"--epochs={epochs}: nothing to train or report.")
  return {"test_acc": history[-1]["test_acc"],
          "test_curve": [r["test_acc"] for r in history],
          "train_loss": [r["train_loss"] for r in history],
          "images_per_second": (trained * steps * batch_size / train_seconds
                                if trained else None),
          "train_seconds": train_seconds, "compile_seconds": compile_seconds,
          "epochs_trained_now": trained, "state": state}


# The settings a resumed run must share with the run it continues.
RESUME_KEYS = ("data_dir", "synthetic", "epochs", "batch_size", "lr",
               "smoothing", "metric", "depth", "width", "seed")


def check_config(workdir: str, config: dict[str, Any], resume: bool) -> None:
  """Writes `workdir/config.json`, or with `resume` checks that it matches."""
  path = os.path.join(workdir, "config.json")
  if resume and os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    diff = {k: (saved.get(k), config[k]) for k in config
            if saved.get(k) != config[k]}
    if diff:
      raise ValueError(
          f"--resume: {workdir} was started with other settings "
          + ", ".join(f"--{k.replace('_', '-')}={a!r} (now {b!r})"
                      for k, (a, b) in diff.items())
          + "; a resumed run must use the same ones.")
    return
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(config, f, indent=1)


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
  p.add_argument("--width", type=int, default=16,
                 help="channels of the first stage; the next two have 2x and "
                 "4x (default %(default)s)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workdir",
                 help="checkpoint every epoch (Orbax) to WORKDIR/<run>/"
                 "checkpoints and log it to WORKDIR/<run>/log.jsonl")
  p.add_argument("--resume", action="store_true",
                 help="continue the runs in --workdir from their latest "
                 "checkpoints (same settings required)")
  p.add_argument("--out", help="write the results as JSON to this file")
  args = p.parse_args(argv)

  if (args.data_dir is None) == (args.synthetic is None):
    p.error("give exactly one of --data-dir and --synthetic N")
  if args.depth < 8 or (args.depth - 2) % 6:
    p.error(f"--depth={args.depth}: must be 6n+2 with n >= 1 (8, 14, 20, ...)")
  if args.resume and args.workdir is None:
    p.error("--resume needs --workdir (where the checkpoints are)")
  runs = [r.strip() for r in args.runs.split(",") if r.strip()]
  if not runs or any(r not in ("baseline", "cdg") for r in runs):
    p.error(f"--runs={args.runs!r}: expected baseline, cdg or both")
  for name in ("epochs", "batch_size", "width"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
  if args.workdir is not None:
    config = {k: getattr(args, k) for k in RESUME_KEYS}
    if config["data_dir"] is not None:
      config["data_dir"] = os.path.abspath(config["data_dir"])
    try:
      check_config(args.workdir, config, args.resume)
    except ValueError as e:
      p.error(str(e))

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
  model = common.ResNet(blocks_per_stage=(args.depth - 2) // 6,
                        widths=(args.width, 2 * args.width, 4 * args.width))
  kernels = optax_cdg.linen_conv_kernels(
      model, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  total_steps = args.epochs * (len(data["train"].x) // args.batch_size)
  results = {"device": f"{device.platform} {device.device_kind}",
             "jax": jax.__version__, "depth": args.depth,
             "width": args.width, "epochs": args.epochs,
             "batch_size": args.batch_size, "synthetic": args.synthetic,
             "runs": {}}
  for name in runs:
    tx = make_tx(total_steps, cdg=name == "cdg", kernels=kernels,
                 smoothing=args.smoothing, metric=args.metric, lr=args.lr)
    r = run(model, tx, data, epochs=args.epochs, batch_size=args.batch_size,
            seed=args.seed, name=name, resume=args.resume,
            run_dir=(None if args.workdir is None
                     else os.path.join(args.workdir, name)))
    del r["state"]
    results["runs"][name] = r
    speed = ("no epoch left to train" if r["images_per_second"] is None
             else f"{r['images_per_second']:.0f} images/s on "
             f"{results['device']} (compile {r['compile_seconds']:.1f} s)")
    print(f"{name}: test accuracy {r['test_acc']:.4f}, {speed}")
  if "cdg" in runs:
    print(f"CDG: {args.metric}, smoothing {args.smoothing}, output channels")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  main()
