"""Run a snippet in a fresh Python process and read its peak memory.

The peak resident set size of a process (`ru_maxrss`) only grows, so a memory
bound must be measured in a process that did nothing else: the snippet runs
in its own interpreter, with the repository on its path, and reports JSON.
"""

import json
import os
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = """
import json, resource, sys
def peak_mib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def report(**values):
  print(json.dumps(values))
"""


def run(code: str, timeout: float = 600) -> dict:
  """Runs `PRELUDE + code`, which must call `report(...)` once; its values."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  out = subprocess.run([sys.executable, "-c", PRELUDE + code], env=env,
                       capture_output=True, text=True, timeout=timeout,
                       check=False)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])
