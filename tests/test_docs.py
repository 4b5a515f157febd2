"""Every ```python block of README.md and docs/*.md runs.

Each page runs in a fresh process of its own (`tests/_doc_blocks.py`): its
blocks in order, in one namespace, importing the same `optax_cdg` as this
process. A block marked `<!-- skip: REASON -->` is reported as skipped.
"""

import os
import subprocess
import sys

import pytest

import _doc_blocks
import optax_cdg

PAGES = _doc_blocks.pages()
PAGES_WITH_CODE = [p for p in PAGES if _doc_blocks.parse(p)]


def test_the_readme_and_the_guides_have_code():
  # A parser that found nothing would make every page test vanish.
  assert "README.md" in PAGES_WITH_CODE
  assert os.path.join("docs", "getting_started.md") in PAGES_WITH_CODE


@pytest.mark.parametrize("page", PAGES)
def test_skip_markers_are_well_formed(page):
  for block in _doc_blocks.parse(page):  # raises on a stray or empty marker
    if block.skip is not None:
      assert block.skip.strip(), (page, block.line)


@pytest.fixture(scope="module")
def page_runs(request, tmp_path_factory):
  """One process per page this session tests, all started at once."""
  wanted = {item.callspec.params["page"] for item in request.session.items
            if getattr(item, "originalname", "") == "test_page_code_runs"}
  env = dict(os.environ)
  package_root = os.path.dirname(os.path.dirname(optax_cdg.__file__))
  env["PYTHONPATH"] = os.pathsep.join(
      [package_root] + [p for p in [env.get("PYTHONPATH")] if p])
  runs = {}
  for page in PAGES_WITH_CODE:
    if page not in wanted or all(b.skip is not None
                                 for b in _doc_blocks.parse(page)):
      continue
    # In a scratch directory, as a reader's fresh session: a block that
    # writes files writes them there.
    runs[page] = subprocess.Popen(
        [sys.executable, os.path.join(_doc_blocks.REPO, "tests",
                                      "_doc_blocks.py"), page],
        cwd=tmp_path_factory.mktemp("page"), env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  yield runs
  for process in runs.values():
    if process.poll() is None:
      process.kill()
      process.communicate()


@pytest.mark.parametrize("page", PAGES_WITH_CODE)
def test_page_code_runs(page, page_runs):
  blocks = _doc_blocks.parse(page)
  if page not in page_runs:
    pytest.skip("; ".join(f"line {b.line}: {b.skip}" for b in blocks))
  process = page_runs[page]
  stdout, stderr = process.communicate(timeout=600)
  assert process.returncode == 0, (
      f"a ```python block of {page} failed:\n{stdout[-4000:]}\n"
      f"{stderr[-8000:]}")
  skipped = [b for b in blocks if b.skip is not None]
  for b in skipped:
    assert f"{page}:{b.line}: skipped" in stdout
  ran = [b for b in blocks if b.skip is None]
  for b in ran:
    assert f"{page}:{b.line}: ran" in stdout, stdout


def test_readme_stays_short():
  # The README is the front page; the reference lives in docs/.
  # Counted in bytes of UTF-8, as `wc -c` counts: "±" and "−" take two and
  # three.
  with open(os.path.join(_doc_blocks.REPO, "README.md"), "rb") as f:
    length = len(f.read())
  assert length <= 8000, f"README.md has {length} bytes (at most 8000)"
