"""Every public function and class has an `Examples:` section that runs.

The `>>>` lines of each public name's docstring (its methods' too) run as
doctests, each docstring in a namespace of its own with nothing imported:
an example imports what it uses, so that it runs as pasted.
"""

import doctest
import inspect
import os
import re

import pytest

import optax_cdg

PUBLIC = sorted(optax_cdg.__all__)
# Functions and classes; constants (DEFAULT_SMOOTHING) have no docstring.
DOCUMENTED = [n for n in PUBLIC
              if inspect.isroutine(getattr(optax_cdg, n))
              or inspect.isclass(getattr(optax_cdg, n))]
_EXAMPLES = re.compile(r"^\s*Examples?:\s*$", re.M)

API_PAGE = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "docs", "api.md")


def test_public_names_are_found():
  assert "channel_directed" in DOCUMENTED and "KernelSpec" in DOCUMENTED


@pytest.mark.parametrize("name", DOCUMENTED)
def test_has_an_examples_section(name):
  doc = inspect.getdoc(getattr(optax_cdg, name)) or ""
  if not (_EXAMPLES.search(doc) and ">>>" in doc):
    pytest.fail(
        f"optax_cdg.{name} has no `Examples:` section with `>>>` lines in its "
        "docstring; every public function and class needs one that runs.",
        pytrace=False)


@pytest.mark.parametrize("name", DOCUMENTED)
def test_examples_run(name):
  obj = getattr(optax_cdg, name)
  finder = doctest.DocTestFinder(exclude_empty=True)
  tests = finder.find(obj, f"optax_cdg.{name}", globs={})
  examples = sum(len(t.examples) for t in tests)
  if not examples:
    pytest.skip(f"optax_cdg.{name} has no doctest (test_has_an_examples_"
                "section reports it)")
  # pytest --doctest-modules' own default flags, no more lenient.
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  report = []
  for test in tests:
    runner.run(test, out=report.append)
  result = runner.summarize(verbose=False)
  assert result.failed == 0, "".join(report)
  assert result.attempted == examples


def test_api_page_documents_every_constant():
  # automodule :members: documents the functions and classes of __all__;
  # a constant imported into the package needs its own autodata line.
  with open(API_PAGE, encoding="utf-8") as f:
    text = f.read()
  assert "automodule:: optax_cdg" in text and ":members:" in text
  for name in sorted(set(PUBLIC) - set(DOCUMENTED)):
    assert f"autodata:: optax_cdg.{name}" in text, name
