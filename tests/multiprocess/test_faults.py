"""A process killed mid-run, and the job restarted from its checkpoint.

examples/data_parallel.py (FSDP, 2 processes x 4 devices) writes an Orbax
checkpoint at step 10 from both processes. Process 1 is SIGKILLed from
outside right after it logs step 14, while process 0 is inside the next
step's collectives: process 0 must stop on its own with an error that says a
peer died, well within the harness's timeout. The job is then started again:
it resumes from step 10 and ends bit-identical to the uninterrupted run
(test_cross_process_training's run of the same command).
"""

import os

import harness
import numpy as np
import pytest
from test_launcher import PEER_DIED

import conftest

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def killed_then_resumed(example_runs):
  d = example_runs.directory("fault")
  save, ckpt = os.path.join(d, "final"), os.path.join(d, "ckpt")
  args = conftest.example_args("fsdp", save, ckpt, 2, 4)
  killed = harness.launch(conftest.EXAMPLE, 2, 4, args, timeout=600,
                          grace=None, kill_on={1: r"^step 14 "})
  checkpoints = {step: sorted(os.listdir(os.path.join(ckpt, step, "default")))
                 for step in os.listdir(ckpt)}
  resumed = harness.launch(conftest.EXAMPLE, 2, 4, args, timeout=600)
  return {"killed": killed, "checkpoints": checkpoints, "resumed": resumed,
          "save": save}


def test_the_others_fail_clearly_and_soon(killed_then_resumed):
  victim, survivor = killed_then_resumed["killed"][1], (
      killed_then_resumed["killed"][0])
  assert victim.killed and victim.returncode == -9, victim.describe()
  assert "step 15 " not in victim.output
  # Not killed by the harness: it stopped by itself, with a reason.
  assert survivor.killed is None and survivor.returncode != 0, (
      survivor.describe())
  assert survivor.seconds - victim.seconds < conftest.HEARTBEAT_S + 20
  assert PEER_DIED.search(survivor.output), survivor.describe()
  assert f"step {conftest.STEPS} " not in survivor.output


def test_the_checkpoint_was_written_by_all_processes(killed_then_resumed):
  written = killed_then_resumed["checkpoints"]
  assert list(written) == ["10"], written
  # Orbax's OCDBT format: each process wrote its own shards' file.
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(written["10"]), written


def test_the_restarted_job_continues_bit_identically(killed_then_resumed,
                                                      example_runs):
  harness.check(killed_then_resumed["resumed"], results=False)
  for o in killed_then_resumed["resumed"]:
    assert "resumed from the checkpoint of step 10" in o.output
  resumed = conftest.load_saved(killed_then_resumed["save"], 2)
  straight = example_runs.get("fsdp", 2, 4)["saved"]
  for process in range(2):
    got, want = resumed[process], straight[process]
    assert got.keys() == want.keys()
    # The resumed run logs only the steps after the checkpoint.
    np.testing.assert_array_equal(got["losses"], want["losses"][10:])
    for key in want:
      if key != "losses":
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
