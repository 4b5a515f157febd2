"""The package's layers: the JAX internals `_apply` uses, and its imports."""

import ast
import os

import pytest

from optax_cdg import _apply

PACKAGE = os.path.dirname(os.path.abspath(_apply.__file__))
# The mathematics, which imports nothing from the application above it.
MATHS = ("_checks", "_gains", "_operator")
# What only `_apply` may use.
INTERNAL_PREFIXES = ("jax._src", "jax.interpreters", "jax.extend")


def _modules():
  return sorted(n[:-3] for n in os.listdir(PACKAGE)
                if n.endswith(".py") and n != "__init__.py")


def _tree(name):
  with open(os.path.join(PACKAGE, f"{name}.py"), encoding="utf-8") as f:
    return ast.parse(f.read())


def _imports(name):
  """The modules `name` imports, under TYPE_CHECKING too."""
  out = set()
  for node in ast.walk(_tree(name)):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out |= {f"{node.module}.{a.name}" for a in node.names}
  return out


def _package_imports(name):
  return {m.split(".")[1] for m in _imports(name)
          if m.startswith("optax_cdg.") and m.split(".")[1] in _modules()}


@pytest.mark.parametrize("path", sorted(_apply.JAX_INTERNALS))
def test_every_jax_internal_is_there(path):
  try:
    _apply.internal(path)
  except ImportError as e:
    pytest.fail(str(e), pytrace=False)


def test_a_missing_internal_is_named(monkeypatch):
  path = "jax.interpreters.ad.no_such_rule"
  monkeypatch.setitem(_apply.JAX_INTERNALS, path, "a test")
  with pytest.raises(ImportError, match=r"optax_cdg needs "
                     r"jax\.interpreters\.ad\.no_such_rule \(a test\), which "
                     r"jax .* does not have; it was checked against jax"):
    _apply.internal(path)


@pytest.mark.parametrize("name", _modules())
def test_only_apply_uses_jax_internals(name):
  if name == "_apply":
    return
  used = {m for m in _imports(name) if m.startswith(INTERNAL_PREFIXES)}
  source = ast.unparse(_tree(name))
  assert not used, f"{name} imports {sorted(used)}: only _apply may"
  assert "jax.config." not in source, name


def test_the_maths_imports_nothing_above_it():
  for name in MATHS:
    above = _package_imports(name) - set(MATHS)
    assert not above, f"{name} imports {sorted(above)}"


def test_no_import_cycle():
  graph = {n: _package_imports(n) for n in _modules()}

  def reaches(start, goal, seen=()):
    return any(m == goal or (m not in seen and reaches(m, goal, (*seen, m)))
               for m in graph[start])

  cycles = [n for n in graph if reaches(n, n)]
  assert not cycles, {n: sorted(graph[n]) for n in cycles}
