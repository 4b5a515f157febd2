"""The sharded update's collectives across processes, from the compiled HLO.

Launches N local JAX processes (default 2 x 4 virtual CPU devices, joined on
127.0.0.1) running sharded_update.py, beside this script, on the ResNet-18
conv tree, and prints, for each sharding mode and kernel sharding on the
2 x 4 mesh ("a", "b"), the collectives in the compiled update and the bytes
they move per device (all of it, and the part that crosses to another
process), with the largest difference from the single-device update. No
times: the processes share this machine's cores.

With --faults instead: how a 2-process job ends when one process is killed
or raises at step 5 of a loop of cross-process sums (basic.py, heartbeat
timeout 10 s): each process's exit and when.

  python tests/multiprocess/report.py [--processes 2 --devices 4]
  python tests/multiprocess/report.py --faults

A report, not a test: pytest does not collect it (its name is not test_*).
"""

import argparse
import collections
import os

# The multi-process tests' launcher, beside this script.
import harness


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices", type=int, default=4,
                      help="virtual CPU devices per process")
  parser.add_argument("--method", default="auto")
  parser.add_argument("--faults", action="store_true")
  args = parser.parse_args()
  if args.faults:
    faults()
    return
  results = harness.run(
      os.path.join(harness.HERE, "sharded_update.py"), args.processes,
      args.devices, ["--tree", "resnet18", "--methods", args.method],
      timeout=3600)
  first = results[0]
  print(f"{args.processes} processes x {args.devices} devices; devices' "
        f"processes in mesh order: {first['device_process']}; ResNet-18 "
        f"conv kernels {first['kernel_bytes'] / 1e6:.1f} MB; "
        f"channel_directed(method={args.method!r})")
  print("| mode | kernel sharding | collectives in the update | sent per "
        "device | to other processes | max abs diff (all processes) |")
  print("|---|---|---|---|---|---|")
  for i, rec in enumerate(first["records"]):
    counts = collections.Counter(c["kind"] for c in rec["collectives"])
    found = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    diff = max(r["records"][i]["max_abs_diff"] for r in results)
    print(f"| {rec['mode']} | `{rec['spec']}` | {found or 'none'} | "
          f"{rec['sent_bytes'] / 1e6:.2f} MB | "
          f"{rec['cross_process_bytes'] / 1e6:.2f} MB | {diff:.1e} |")


FAULTS = {
    "process 1 killed": dict(kill_on={1: r"^step 5 "}),
    "process 0 (coordinator) killed": dict(kill_on={0: r"^step 5 "}),
    "process 1 raises, fail-fast hook": dict(args=["--fail-on", "1"]),
    "process 0 raises, fail-fast hook": dict(args=["--fail-on", "0"]),
    "process 1 raises, no hook": dict(args=["--fail-on", "1",
                                            "--no-fail-fast"]),
}


def faults(timeout: float = 120.0) -> None:
  print("| fault at step 5 | process 0 | process 1 |")
  print("|---|---|---|")
  for name, spec in FAULTS.items():
    extra = spec.get("args", [])
    if extra:
      extra = extra + ["--fail-step", "5"]
    outcomes = harness.launch(
        os.path.join(harness.HERE, "basic.py"), 2, 4,
        ["--steps", "1000"] + extra, timeout=timeout, grace=None,
        kill_on=spec.get("kill_on"))
    cells = [(f"killed by the harness ({o.killed})" if o.killed
              else f"exit status {o.returncode}") + f" at {o.seconds:.1f} s"
             for o in outcomes]
    print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
  main()
