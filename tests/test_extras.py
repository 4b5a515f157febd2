"""tests/_extras.require: a missing extra skips, a broken one fails."""

import sys

import pytest

import _extras


def test_missing_module_skips():
  with pytest.raises(pytest.skip.Exception, match="not installed"):
    _extras.require("optax_cdg_no_such_extra")
  with pytest.raises(pytest.skip.Exception, match="not installed"):
    _extras.require("optax_cdg.no_such_submodule")


def test_broken_module_raises(tmp_path, monkeypatch):
  # Installed, but its own import fails the way an equinox too old for
  # this jax does.
  (tmp_path / "broken_extra").mkdir()
  (tmp_path / "broken_extra" / "__init__.py").write_text(
      "import jaxlib.no_such_module\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delitem(sys.modules, "broken_extra", raising=False)
  with pytest.raises(ModuleNotFoundError, match="jaxlib.no_such_module"):
    _extras.require("broken_extra")


def test_installed_module_is_returned():
  assert _extras.require("optax_cdg._transform").__name__ == (
      "optax_cdg._transform")
