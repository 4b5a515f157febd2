"""Runs N local JAX processes joined by `jax.distributed`, and collects them.

The parent side (`launch`, `run`) starts N Python processes of one script,
each with `--xla_force_host_platform_device_count` virtual CPU devices, a
coordinator on 127.0.0.1 at a free port, and a result file of its own. It
waits for all of them under one timeout, then kills whatever is left, so a
hang can never outlive the test. `run` raises `MultiprocessError` with each
process's exit status and the tail of its output unless all of them finished
cleanly and reported a result.

The child side is `boot.py`, which every process runs first: it pins the
cross-process CPU collectives (gloo) to the loopback interface, then runs the
script as `__main__`. A script joins the job with `initialize()` (or, for
examples/data_parallel.py, with the coordinator flags that this module
formats into its arguments) and reports with `report(obj)`.

Nothing listens beyond 127.0.0.1: the coordinator binds to it explicitly and
gloo binds to the address it is given (`listening_addresses` lets a test
check that on the live processes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

# Seconds without a heartbeat after which the coordination service declares a
# process dead and fails the others (JAX's default is 100 s, too long here).
HEARTBEAT_TIMEOUT_S = 10


class MultiprocessError(AssertionError):
  """A launched process failed, hung, or reported no result."""


@dataclasses.dataclass
class Outcome:
  """What one process left behind."""
  process_id: int
  returncode: int           # negative: killed by that signal
  seconds: float            # from launch to exit (or to the kill)
  output: str               # stdout and stderr, interleaved
  result: object = None     # what it passed to report(), or None
  killed: str | None = None  # why the harness killed it, if it did

  def describe(self, tail: int = 3000) -> str:
    status = (f"killed by the harness ({self.killed})" if self.killed
              else f"exit status {self.returncode}")
    reported = ("reported a result" if self.result is not None
                else "reported nothing")
    return (f"--- process {self.process_id}: {status} after "
            f"{self.seconds:.1f} s, {reported}; last output:\n"
            f"{self.output[-tail:]}")


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(process_id: int, num_processes: int, devices: int, coordinator: str,
         result_path: str, extra: Mapping[str, str] | None) -> dict[str, str]:
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                 env.get("XLA_FLAGS", ""))
  env.update({
      "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}",
      "JAX_PLATFORMS": "cpu",
      "PYTHONPATH": os.pathsep.join(
          [REPO, HERE] + [p for p in [env.get("PYTHONPATH")] if p]),
      "PYTHONUNBUFFERED": "1",
      "MP_PROCESS_ID": str(process_id),
      "MP_NUM_PROCESSES": str(num_processes),
      "MP_COORDINATOR": coordinator,
      "MP_RESULT": result_path,
      # One BLAS/OpenMP thread each: N processes share the cores.
      "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
  })
  env.update(extra or {})
  return env


def launch(script: str, num_processes: int, devices_per_process: int,
           args: Sequence[str] = (), timeout: float = 300.0,
           grace: float | None = 30.0, kill_on: Mapping[int, str] | None = None,
           env: Mapping[str, str] | None = None) -> list[Outcome]:
  """Runs `script` as `num_processes` joined processes; their outcomes.

  Args:
    script: a Python file, run as `__main__` in each process.
    num_processes: how many processes.
    devices_per_process: virtual CPU devices in each.
    args: its command line; "{process_id}", "{num_processes}" and
      "{coordinator}" are replaced in each process.
    timeout: seconds for the whole job; processes still running then are
      killed (SIGKILL; `Outcome.killed` says why).
    grace: once a process has failed, seconds the others get to exit on their
      own before they are killed (None: wait until the timeout).
    kill_on: {process_id: regex}: SIGKILL that process as soon as a line of
      its output matches (a fault injected from outside, mid-run).
    env: extra environment variables for every process.

  The coordinator's port is free when chosen; another program could take it
  before process 0 binds it, which fails the launch loudly, not silently.
  """
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(f"num_processes={num_processes} and devices_per_process="
                     f"{devices_per_process} must both be >= 1.")
  coordinator = f"127.0.0.1:{free_port()}"
  tmp = tempfile.TemporaryDirectory(prefix="mp_results_")
  kill_on = {k: re.compile(v) for k, v in (kill_on or {}).items()}
  procs, outputs, results, readers = [], [], [], []
  killed: dict[int, str] = {}
  start = time.monotonic()
  ended: list[float | None] = [None] * num_processes

  def pump(i, stream):
    for line in iter(stream.readline, ""):
      outputs[i].append(line)
      if i in kill_on and i not in killed and kill_on[i].search(line):
        killed[i] = f"on request, at output {line.strip()[:80]!r}"
        _kill(procs[i])
    stream.close()

  for i in range(num_processes):
    fmt = {"process_id": i, "num_processes": num_processes,
           "coordinator": coordinator}
    results.append(os.path.join(tmp.name, f"result_{i}.json"))
    outputs.append([])
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(HERE, "boot.py"), script]
        + [a.format(**fmt) for a in args],
        cwd=REPO, env=_env(i, num_processes, devices_per_process, coordinator,
                           results[i], env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True))  # its own group: killpg reaches children
    readers.append(threading.Thread(target=pump, args=(i, procs[i].stdout),
                                    daemon=True))
    readers[-1].start()
  deadline, why = start + timeout, f"timeout of {timeout:g} s"
  try:
    while any(e is None for e in ended):
      now = time.monotonic()
      for i, p in enumerate(procs):
        if ended[i] is None and p.poll() is not None:
          ended[i] = now - start
          if (p.returncode != 0 and grace is not None and i not in killed
              and now + grace < deadline):
            deadline = now + grace
            why = f"{grace:g} s after process {i} failed"
      if now >= deadline:
        break
      time.sleep(0.05)
  finally:
    for i, p in enumerate(procs):
      if p.poll() is None:
        killed[i] = why
        _kill(p)
        p.wait()
        ended[i] = time.monotonic() - start
    for t in readers:
      t.join(timeout=10)
  outcomes = []
  for i, p in enumerate(procs):
    result = None
    if os.path.exists(results[i]):
      with open(results[i]) as f:
        result = json.load(f)
    outcomes.append(Outcome(
        process_id=i, returncode=p.returncode, seconds=ended[i],
        output="".join(outputs[i]), result=result, killed=killed.get(i)))
  tmp.cleanup()
  return outcomes


def _kill(proc: subprocess.Popen) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:  # it exited meanwhile
    pass


def check(outcomes: Sequence[Outcome], results: bool = True) -> list:
  """Each process's result; MultiprocessError unless every process exited
  with status 0 (and, with `results`, reported a result)."""
  bad = [o for o in outcomes
         if o.returncode != 0 or (results and o.result is None)]
  if bad:
    raise MultiprocessError(
        f"{len(bad)} of {len(outcomes)} processes failed:\n"
        + "\n".join(o.describe() for o in bad))
  return [o.result for o in outcomes]


def run(script: str, num_processes: int, devices_per_process: int,
        args: Sequence[str] = (), timeout: float = 300.0,
        results: bool = True, **kwargs) -> list:
  """`launch`, then `check`: the list of results, one per process."""
  return check(launch(script, num_processes, devices_per_process, args,
                      timeout, **kwargs), results)


# ---------------------------------------------------------------- child side


def initialize(fail_fast: bool = True) -> None:
  """Joins this process to the job that `launch` started (call it first).

  With `fail_fast`, an uncaught exception ends the process at once
  (`os._exit`) after printing its traceback. Otherwise Python's exit runs
  JAX's shutdown, which waits for every other process at a barrier while
  they wait for this one in their next collective: the job hangs.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if fail_fast:
    sys.excepthook = _exit_now
  coordinator = os.environ["MP_COORDINATOR"]
  jax.distributed.initialize(
      coordinator_address=coordinator,
      num_processes=int(os.environ["MP_NUM_PROCESSES"]),
      process_id=int(os.environ["MP_PROCESS_ID"]),
      coordinator_bind_address=coordinator,
      heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
      initialization_timeout=60)


def _exit_now(kind, value, tb) -> None:
  sys.__excepthook__(kind, value, tb)
  sys.stderr.flush()
  sys.stdout.flush()
  os._exit(1)  # pylint: disable=protected-access


def report(obj) -> None:
  """Hands `obj` (JSON-serializable) back to the launching test."""
  path = os.environ["MP_RESULT"]
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f)
  os.replace(path + ".tmp", path)


def listening_addresses(pid: int) -> set[tuple[str, int]]:
  """The (address, port) pairs that process `pid` listens on (Linux /proc)."""
  inodes = set()
  for fd in os.listdir(f"/proc/{pid}/fd"):
    try:
      target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
      continue
    if target.startswith("socket:["):
      inodes.add(target[8:-1])
  found = set()
  for table, width in (("tcp", 8), ("tcp6", 32)):
    with open(f"/proc/{pid}/net/{table}") as f:
      next(f)
      for row in f:
        cols = row.split()
        local, state, inode = cols[1], cols[3], cols[9]
        if state != "0A" or inode not in inodes:  # 0A: LISTEN
          continue
        addr, port = local.split(":")
        found.add((_decode_address(addr, width), int(port, 16)))
  return found


def _decode_address(hex_addr: str, width: int) -> str:
  raw = bytes.fromhex(hex_addr)
  # /proc prints each 32-bit word in host (little-endian) order.
  raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
  family = socket.AF_INET if width == 8 else socket.AF_INET6
  return socket.inet_ntop(family, raw)
