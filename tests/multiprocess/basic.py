"""The harness's own worker: join, run one cross-process collective, report.

  basic.py [--steps N] [--fail-on P [--fail-step S]] [--hang-on P]

--fail-on P: process P raises after joining; --hang-on P: process P
never reaches the collective;
--steps N: run the collective N times, printing "step S sum X" each time;
--fail-step S: with --fail-on, raise at step S instead;
--no-fail-fast: see harness.initialize.
"""

import argparse
import os
import time

import harness

parser = argparse.ArgumentParser()
parser.add_argument("--fail-on", type=int, default=-1)
parser.add_argument("--hang-on", type=int, default=-1)
parser.add_argument("--steps", type=int, default=1)
parser.add_argument("--no-fail-fast", action="store_true",
                    help="let an uncaught exception run JAX's shutdown")
parser.add_argument("--fail-step", type=int, default=-1,
                    help="with --fail-on: raise at this step, not at joining")
args = parser.parse_args()

harness.initialize(fail_fast=not args.no_fail_fast)
# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

me = jax.process_index()
print(f"process {me} of {jax.process_count()} joined", flush=True)
if me == args.fail_on and args.fail_step < 0:
  raise RuntimeError(f"process {me} fails on purpose")
if me == args.hang_on:
  time.sleep(3600)

# Each device holds its global index; the sum crosses every process.
mesh = jax.make_mesh((jax.device_count(),), ("d",))
x = jax.make_array_from_callback(
    (jax.device_count(),), NamedSharding(mesh, P("d")),
    lambda idx: np.arange(jax.device_count(), dtype=np.float32)[idx])
total_fn = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))
for step in range(args.steps):
  if me == args.fail_on and step == args.fail_step:
    raise RuntimeError(f"process {me} fails on purpose at step {step}")
  total = total_fn(x)
  print(f"step {step} sum {float(total)}", flush=True)
  time.sleep(0.1)
harness.report({
    "process_index": me,
    "process_count": jax.process_count(),
    "device_count": jax.device_count(),
    "local_device_count": jax.local_device_count(),
    "device_processes": [d.process_index for d in mesh.devices.flat],
    "sum": float(total),
    # After a collective, so that gloo's listeners exist too.
    "listening": sorted(harness.listening_addresses(os.getpid())),
})
