"""The sharded channel_directed update across processes (sharded_update.py).

For 2 processes x 4 devices and 4 x 2, one 2 x 4 mesh ("a", "b") over all
of them, both sharding modes, every kernel sharding in sharded_update.CASES:
each process's shards of the result equal the update it computes alone on
one device; the compiled program has no all-gather and no all-reduce, and
an all-to-all exactly when a mesh axis splits the output-channel axis.
"""

import os

import harness
import pytest

pytestmark = pytest.mark.multiprocess

WORKER = os.path.join(harness.HERE, "sharded_update.py")
# (processes, devices each) -> methods checked: the default, and the
# closed form ("reweighted" under "auto").
TOPOLOGIES = {(2, 4): "auto,closed", (4, 2): "auto"}
_RUNS = {}


def _run(processes, devices, tree="small", methods=None):
  key = (processes, devices, tree)
  if key not in _RUNS:
    methods = methods or TOPOLOGIES[(processes, devices)]
    _RUNS[key] = harness.run(WORKER, processes, devices,
                             ["--tree", tree, "--methods", methods],
                             timeout=900)
  return _RUNS[key]


def _check(results, processes, devices):
  assert [r["process_index"] for r in results] == list(range(processes))
  first = results[0]["records"]
  cases = {(r["method"], r["mode"], r["case"]) for r in first}
  assert {m for _, m, _ in cases} == {"auto", "explicit"}
  for result in results:
    assert result["process_count"] == processes
    assert result["local_devices"] == devices
    for rec, rec0 in zip(result["records"], first, strict=True):
      name = f"process {result['process_index']}: {rec['method']} " \
             f"{rec['mode']} {rec['case']} {rec['spec']}"
      # Every addressable shard of every leaf was compared.
      assert rec["shards_checked"] % devices == 0 and rec["shards_checked"]
      # The same fibers through the same FFT code, but in batches of other
      # sizes, whose SIMD remainders differ by CPU (AVX2, AVX-512): within
      # a few roundings of values of size ~1 (tests/_bounds.py has the
      # per-fiber bound; the worst seen on AMD is 0).
      assert rec["max_abs_diff"] <= 1e-6, (name, rec["max_abs_diff"])
      assert rec["sharding_kept"], name
      kinds = {c["kind"] for c in rec["collectives"]}
      if rec["splits_transform_axis"]:
        assert kinds == {"all-to-all"}, (name, kinds)
      else:
        assert not kinds, (name, kinds)
      # One SPMD program: every process compiled the same collectives.
      assert rec["collectives"] == rec0["collectives"], name


@pytest.mark.parametrize("processes,devices", sorted(TOPOLOGIES))
def test_exact_and_collectives(processes, devices):
  _check(_run(processes, devices), processes, devices)


@pytest.mark.parametrize("processes,devices", sorted(TOPOLOGIES))
def test_the_all_to_alls_cross_processes(processes, devices):
  # The point of the exercise: the moves go over the process boundary (for
  # 2 x 4, mesh axis "a" is the process axis; for 4 x 2, "b" spans two
  # processes as well).
  results = _run(processes, devices)
  records = {(r["method"], r["mode"], r["case"]): r
             for r in results[0]["records"]}
  for mode in ("auto", "explicit"):
    crossing = records[("auto", mode, "output a")]
    assert crossing["cross_process_bytes"] > 0
    assert crossing["cross_process_bytes"] == crossing["sent_bytes"]
    within = records[("auto", mode, "output b")]
    if processes == 2:  # "b" lies inside each process
      assert within["sent_bytes"] > 0 and within["cross_process_bytes"] == 0
    else:
      assert 0 < within["cross_process_bytes"] < within["sent_bytes"]


@pytest.mark.slow
def test_resnet18_tree_2x4():
  results = _run(2, 4, tree="resnet18", methods="auto")
  _check(results, 2, 4)
