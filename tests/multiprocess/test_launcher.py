"""The harness itself: processes join, results come back, failures are loud.

Only the first test runs in the default suite (a few seconds); the others
are marked `multiprocess` (`pytest -m multiprocess tests/multiprocess`).
"""

import os
import re

import harness
import pytest

BASIC = os.path.join(harness.HERE, "basic.py")
# What a surviving process prints when the job loses one of its processes:
# the coordination service's verdict, or gloo's own error on the dead link.
PEER_DIED = re.compile(r"another task died|Gloo \S+ failed|tasks are unhealthy")


def test_two_processes_join_and_reduce_across_them():
  results = harness.run(BASIC, 2, 2, timeout=120)
  assert [r["process_index"] for r in results] == [0, 1]
  for r in results:
    assert r["process_count"] == 2
    assert r["device_count"] == 4 and r["local_device_count"] == 2
    assert r["device_processes"] == [0, 0, 1, 1]
    assert r["sum"] == 0 + 1 + 2 + 3  # each device's index, over processes


@pytest.mark.multiprocess
def test_nothing_listens_beyond_loopback():
  results = harness.run(BASIC, 2, 4, timeout=120)
  listening = [tuple(a) for r in results for a in r["listening"]]
  # The coordinator (process 0) and gloo's pairs (every process) listen...
  assert all(r["listening"] for r in results), results
  # ...on 127.0.0.1 only (IPv4, or IPv4-mapped on an IPv6 socket).
  assert {a for a, _ in listening} <= {"127.0.0.1", "::ffff:127.0.0.1"}, (
      listening)


@pytest.mark.multiprocess
def test_four_processes():
  results = harness.run(BASIC, 4, 2, timeout=120)
  assert [r["device_processes"] for r in results] == [[0, 0, 1, 1, 2, 2, 3,
                                                       3]] * 4
  assert {r["sum"] for r in results} == {28.0}


@pytest.mark.multiprocess
def test_a_process_that_raises_fails_the_job_quickly():
  outcomes = harness.launch(BASIC, 2, 4, ["--steps", "100", "--fail-on", "1",
                                          "--fail-step", "3"],
                            timeout=120, grace=None)
  raiser, other = outcomes[1], outcomes[0]
  assert raiser.returncode == 1 and raiser.killed is None
  assert "process 1 fails on purpose at step 3" in raiser.output
  # The other process stops by itself (not killed by the harness) soon
  # after the heartbeats stop, with an error saying why.
  assert other.killed is None and other.returncode != 0, other.describe()
  assert other.seconds - raiser.seconds < harness.HEARTBEAT_TIMEOUT_S + 20
  assert PEER_DIED.search(other.output), other.describe()
  with pytest.raises(harness.MultiprocessError, match="2 of 2 processes"):
    harness.check(outcomes)


@pytest.mark.multiprocess
def test_the_coordinator_killed_mid_run_fails_the_others():
  outcomes = harness.launch(BASIC, 2, 4, ["--steps", "1000"],
                            kill_on={0: r"^step 5 "}, timeout=120, grace=None)
  assert outcomes[0].killed and outcomes[0].returncode == -9
  other = outcomes[1]
  assert other.killed is None and other.returncode != 0, other.describe()
  assert other.seconds - outcomes[0].seconds < harness.HEARTBEAT_TIMEOUT_S + 20
  assert PEER_DIED.search(other.output), other.describe()


@pytest.mark.multiprocess
def test_a_hang_is_cut_at_the_timeout():
  outcomes = harness.launch(BASIC, 2, 2, ["--hang-on", "1"], timeout=15)
  for o in outcomes:
    assert o.killed == "timeout of 15 s", o.describe()
    assert 15 <= o.seconds < 25
  with pytest.raises(harness.MultiprocessError,
                     match=r"process 1: killed by the harness \(timeout"):
    harness.check(outcomes)
