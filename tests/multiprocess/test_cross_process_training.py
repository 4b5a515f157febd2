"""examples/data_parallel.py as 2 processes x 4 devices, against 1 x 8.

Data-parallel (`--mode dp`, automatic sharding) and FSDP-style (`--mode
fsdp`, explicit sharding, each kernel split along its output axis over all 8
devices), 20 steps of CDG + SGD momentum on the small CNN: every process ends
with the same parameters, the loss falls, and the result matches the same
run in one process on 8 devices to float tolerance.
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


@pytest.mark.parametrize("mode", MODES)
def test_matches_the_single_process_run(mode, example_runs):
  multi = example_runs.get(mode, 2, 4)["saved"][0]
  single = example_runs.get(mode, 1, 8)["saved"][0]
  assert multi.keys() == single.keys()
  for key in single:
    np.testing.assert_allclose(multi[key], single[key], rtol=1e-5, atol=1e-5,
                               err_msg=key)


def test_fsdp_keeps_kernels_split_along_the_output_axis(example_runs):
  for outcome in example_runs.get("fsdp", 2, 4)["outcomes"]:
    assert "Conv_2 kernel sharding: P(None, None, None, 'data')" in (
        outcome.output)
