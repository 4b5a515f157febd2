"""Worker: the sharded channel_directed update across processes, checked.

Joins the job, then for each sharding mode, method and kernel sharding on a
2 x 4 mesh ("a", "b") over all processes' devices: places a tree of conv
gradients with that sharding (each process supplies only its addressable
shards), compiles and runs the update, and compares every addressable shard
of the result with the same update computed by this process alone on one of
its devices. Reports, per case, the largest difference, whether the result
kept its input's sharding, and the collectives of the compiled program with
the bytes they move (see hlo.py).

  sharded_update.py [--tree small|resnet18] [--methods auto,closed]
"""

import argparse

import harness

parser = argparse.ArgumentParser()
parser.add_argument("--tree", choices=["small", "resnet18"], default="small")
parser.add_argument("--methods", default="auto,closed")
parser.add_argument("--modes", default="auto,explicit")
args = parser.parse_args()

harness.initialize()
# pylint: disable=g-import-not-at-top,wrong-import-position
import hlo
import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import optax_cdg

SMALL = {"conv1": (3, 3, 8, 16), "conv2": (3, 3, 16, 32),
         "conv3": (1, 1, 32, 64)}
# ResNet-18's conv kernels (HWIO) without the stem, as benchmarks/sharding.py.
RESNET18 = ([(3, 3, 64, 64)] * 4 + [(3, 3, 64, 128), (1, 1, 64, 128)]
            + [(3, 3, 128, 128)] * 3 + [(3, 3, 128, 256), (1, 1, 128, 256)]
            + [(3, 3, 256, 256)] * 3 + [(3, 3, 256, 512), (1, 1, 256, 512)]
            + [(3, 3, 512, 512)] * 3)

# name -> (kernel spec, whether a mesh axis splits the transform axis).
CASES = {
    "replicated": (P(), False),
    "input a": (P(None, None, "a"), False),
    "input a+b": (P(None, None, ("a", "b")), False),
    "output a": (P(None, None, None, "a"), True),
    "output b": (P(None, None, None, "b"), True),
    "output a+b": (P(None, None, None, ("a", "b")), True),
    "input a, output b": (P(None, None, "a", "b"), True),
    "input b, output a": (P(None, None, "b", "a"), True),
}


def host_tree():
  rng = np.random.default_rng(0)
  shapes = (SMALL if args.tree == "small"
            else {f"conv{i}": s for i, s in enumerate(RESNET18)})
  tree = {}
  for name, shape in shapes.items():
    tree[name] = {"kernel": rng.standard_normal(shape).astype(np.float32)}
    if args.tree == "small":
      tree[name]["bias"] = rng.standard_normal(shape[-1]).astype(np.float32)
  return tree


def place(tree, mesh, spec):
  """Global arrays; this process provides only its own shards."""
  def one(x):
    s = NamedSharding(mesh, spec if x.ndim == 4 else P())
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(one, tree)


def main():
  tree = host_tree()
  local = jax.local_devices()[0]
  records = []
  for method in args.methods.split(","):
    tx = (optax_cdg.channel_directed(2.0, metric="reweighted", method=method)
          if method == "closed" else optax_cdg.channel_directed(method=method))
    update = jax.jit(lambda g, tx=tx: tx.update(g, optax.EmptyState())[0])
    # The single-device reference, computed by this process alone.
    want = jax.device_get(update(jax.device_put(tree, local)))
    for mode in args.modes.split(","):
      axis_type = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}[mode]
      mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(axis_type,) * 2)
      device_process = [d.process_index for d in mesh.devices.flat]
      for case, (spec, splits_transform_axis) in CASES.items():
        with jax.set_mesh(mesh):
          sharded = place(tree, mesh, spec)
          compiled = update.lower(sharded).compile()
          out = update(sharded)
        diff, kept, shards = 0.0, True, 0
        for o, i, w in zip(jax.tree.leaves(out), jax.tree.leaves(sharded),
                           jax.tree.leaves(want), strict=True):
          kept &= o.sharding.is_equivalent_to(i.sharding, o.ndim)
          for shard in o.addressable_shards:
            d = np.abs(np.asarray(shard.data) - w[shard.index])
            diff = max(diff, float(d.max()))
            shards += 1
        ops = hlo.collectives(compiled.as_text(), len(device_process))
        traffic = hlo.traffic(ops, device_process)
        records.append({
            "method": method, "mode": mode, "case": case, "spec": str(spec),
            "splits_transform_axis": splits_transform_axis,
            "max_abs_diff": diff, "sharding_kept": bool(kept),
            "shards_checked": shards,
            "collectives": [{"kind": op.kind, "bytes": op.bytes,
                             "groups": op.groups} for op in ops],
            "sent_bytes": traffic["sent"],
            "cross_process_bytes": traffic["cross_process"],
        })
  harness.report({
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "local_devices": jax.local_device_count(),
      "device_process": device_process,
      "kernel_bytes": int(sum(x["kernel"].nbytes for x in tree.values())),
      "records": records,
  })


main()
