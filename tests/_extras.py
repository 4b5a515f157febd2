"""Optional dependencies (the extras) in tests."""

import importlib
import importlib.util
import types

import pytest


def require(name: str) -> types.ModuleType:
  """Imports `name`, or skips when it is not installed.

  A module that is installed but fails to import (say, a release too old for
  this jax) is an error: `pytest.importorskip` would turn it into a skip, and
  a broken extra would pass CI unseen.
  """
  top = name.partition(".")[0]
  if (importlib.util.find_spec(top) is None
      or importlib.util.find_spec(name) is None):
    pytest.skip(f"{name} is not installed (an optional extra)",
                allow_module_level=True)
  return importlib.import_module(name)
