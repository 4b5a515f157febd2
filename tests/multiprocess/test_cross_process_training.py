"""examples/data_parallel.py as 2 processes x 4 devices, against 1 x 8.

Data-parallel (`--mode dp`, automatic sharding) and FSDP-style (`--mode
fsdp`, explicit sharding, each kernel split along its output axis over all 8
devices), 20 steps of CDG + SGD momentum on the small CNN: every process ends
with the same parameters, the loss falls, and the result matches the same
run in one process on 8 devices to a bound derived below.
"""

import numpy as np
import pytest

pytestmark = pytest.mark.multiprocess

MODES = ("dp", "fsdp")


@pytest.mark.parametrize("mode", MODES)
def test_every_process_ends_with_the_same_parameters(mode, example_runs):
  saved = example_runs.get(mode, 2, 4)["saved"]
  assert saved[0].keys() == saved[1].keys()
  assert any("Conv_2" in k for k in saved[0])
  for key in saved[0]:
    np.testing.assert_array_equal(saved[0][key], saved[1][key], err_msg=key)


@pytest.mark.parametrize("mode", MODES)
def test_the_loss_falls(mode, example_runs):
  losses = example_runs.get(mode, 2, 4)["saved"][0]["losses"]
  assert len(losses) == 20 and np.all(np.isfinite(losses))
  assert losses[-5:].mean() < losses[:5].mean() - 0.2, losses


# Two processes of 4 devices and one of 8 do the same arithmetic in exact
# arithmetic; they differ in the order in which float32 partial sums are
# reduced across devices (gloo between processes, XLA within one). So:
#
# - The first loss is computed before any update, from the same parameters
#   and the same per-device batches: only the order of its sum over the 64
#   positive per-example losses differs. Each order is within
#   gamma_63 = 63 u / (1 - 63 u) of the exact sum (Higham, "Accuracy and
#   Stability of Numerical Algorithms", 2nd ed., eq. 4.4), u = 2^-24, so
#   the two are within 2 gamma_63 |loss|.
U = 2.0 ** -24
GAMMA_63 = 63 * U / (1 - 63 * U)
# - After that, the reordering perturbs every step's gradient by up to
#   gamma_8 ~ 5e-7 relative, and training carries the perturbation forward.
#   Where a ReLU or a max-pool switches branch, that is a jump, so no smooth
#   bound on the growth holds; measured after 20 steps: 2.4e-7 (AMD EPYC)
#   and 6.2e-5 (Intel Xeon, AVX-512) in the losses. The check must still
#   see a change in what is computed: switching CDG off, the smallest
#   change the example offers, moves the losses by 1e-3 at step 2 and by
#   2e-2 to 3e-2 from step 15 on (test_the_bound_sees_a_change_of_method
#   asserts it on every run). A tolerance of 1e-3 (absolute on losses near
#   2; relative, in the 2-norm, on each parameter array) sits 16 times above
#   the largest reordering difference seen and 20 times below that change.
TRAINING_TOL = 1e-3


def _relative(a, b):
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("mode", MODES)
def test_the_first_loss_matches_the_single_process_run(mode, example_runs):
  first = example_runs.get(mode, 2, 4)["saved"][0]["losses"][0]
  want = example_runs.get(mode, 1, 8)["saved"][0]["losses"][0]
  assert abs(first - want) <= 2 * GAMMA_63 * abs(want), (first, want)


@pytest.mark.parametrize("mode", MODES)
def test_training_matches_the_single_process_run(mode, example_runs):
  multi = example_runs.get(mode, 2, 4)["saved"][0]
  single = example_runs.get(mode, 1, 8)["saved"][0]
  assert multi.keys() == single.keys()
  np.testing.assert_allclose(multi["losses"], single["losses"], rtol=0,
                             atol=TRAINING_TOL)
  for key in single:
    if key != "losses":
      assert _relative(multi[key], single[key]) <= TRAINING_TOL, key


def test_the_bound_sees_a_change_of_method(example_runs):
  on = example_runs.get("dp", 1, 8)["saved"][0]
  off = example_runs.get("dp", 1, 8, smoothing=0.0)["saved"][0]
  assert np.abs(on["losses"] - off["losses"])[-5:].min() > 5 * TRAINING_TOL
  kernels = [k for k in on if "Conv" in k and "kernel" in k]
  assert kernels
  for key in kernels:
    assert _relative(off[key], on[key]) > 5 * TRAINING_TOL, key


def test_fsdp_keeps_kernels_split_along_the_output_axis(example_runs):
  for outcome in example_runs.get("fsdp", 2, 4)["outcomes"]:
    assert "Conv_2 kernel sharding: P(None, None, None, 'data')" in (
        outcome.output)
