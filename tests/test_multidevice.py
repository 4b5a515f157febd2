"""Runs tests/multidevice in its own process on 8 virtual CPU devices."""

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).parent


def test_on_eight_virtual_cpu_devices():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + " --xla_force_host_platform_device_count=8")
  env["PYTHONPATH"] = os.pathsep.join(
      [str(HERE.parent)] + [p for p in [env.get("PYTHONPATH")] if p])
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
       str(HERE / "multidevice")],
      cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=900,
      check=False)
  assert result.returncode == 0, (result.stdout[-8000:]
                                  + result.stderr[-4000:])
