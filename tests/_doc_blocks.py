"""The ```python blocks of a Markdown page, and a runner for them.

A page's blocks run in order, in one namespace, in a process of their own
(`python tests/_doc_blocks.py PAGE`), as a reader who pastes them one after
the other into a fresh interpreter would run them. A block whose nearest
non-blank line before its opening fence is

  <!-- skip: REASON -->

is not run (a block that needs a GPU or several hosts); REASON says why. The
marker is an HTML comment, so neither GitHub nor MyST renders it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import textwrap
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_FENCE = re.compile(r"^(?P<indent>\s*)```python\s*$")
_CLOSE = re.compile(r"^\s*```\s*$")
_MARKER = re.compile(r"^\s*<!--\s*skip\b(?P<rest>.*?)-->\s*$")
_REASON = re.compile(r"^:\s*(?P<reason>\S.*?)\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
  """One ```python block: where it starts, its code, why it is skipped."""

  page: str
  line: int  # 1-based line of the opening fence
  code: str
  skip: str | None  # the reason, or None for a block that runs


def pages() -> list[str]:
  """README.md and every docs/*.md, as paths relative to the repository."""
  docs = os.path.join(REPO, "docs")
  return ["README.md"] + sorted(
      os.path.join("docs", name) for name in os.listdir(docs)
      if name.endswith(".md"))


def parse(page: str) -> list[Block]:
  """The ```python blocks of `page` (relative to the repository), in order.

  Raises:
    ValueError: a block is never closed, or a skip marker has no reason or
      is not followed by a ```python block.
  """
  with open(os.path.join(REPO, page), encoding="utf-8") as f:
    lines = f.read().splitlines()
  blocks = []
  marker = None  # (line number, reason) of a skip marker awaiting its block
  i = 0
  while i < len(lines):
    line = lines[i]
    if not line.strip():
      i += 1
      continue
    m = _MARKER.match(line)
    if m:
      reason = _REASON.match(m.group("rest").strip())
      if reason is None:
        raise ValueError(f"{page}:{i + 1}: a skip marker needs a reason: "
                         "<!-- skip: REASON -->")
      if marker is not None:
        raise ValueError(f"{page}:{marker[0]}: skip marker not followed by "
                         "a ```python block")
      marker = (i + 1, reason.group("reason"))
      i += 1
      continue
    fence = _FENCE.match(line)
    if marker is not None and fence is None:
      raise ValueError(f"{page}:{marker[0]}: skip marker not followed by a "
                       "```python block")
    if fence is None:
      i += 1
      continue
    start = i
    i += 1
    body = []
    while i < len(lines) and not _CLOSE.match(lines[i]):
      body.append(lines[i])
      i += 1
    if i == len(lines):
      raise ValueError(f"{page}:{start + 1}: ```python block is never closed")
    code = textwrap.dedent("\n".join(body)) + "\n"
    blocks.append(Block(page, start + 1, code,
                        marker[1] if marker is not None else None))
    marker = None
    i += 1
  if marker is not None:
    raise ValueError(f"{page}:{marker[0]}: skip marker not followed by a "
                     "```python block")
  return blocks


def run_page(page: str) -> int:
  """Runs the page's blocks in one namespace; 1 at the first failure."""
  namespace = {"__name__": "__main__"}
  for block in parse(page):
    if block.skip is not None:
      print(f"{page}:{block.line}: skipped ({block.skip})")
      continue
    start = time.perf_counter()
    try:
      # Blank lines in front, so that a traceback's line numbers are the
      # page's own.
      code = "\n" * block.line + block.code
      exec(compile(code, page, "exec"), namespace)  # pylint: disable=exec-used
    except BaseException:  # pylint: disable=broad-except
      print(f"{page}:{block.line}: the ```python block starting here "
            "failed:", file=sys.stderr)
      traceback.print_exc()
      return 1
    print(f"{page}:{block.line}: ran in {time.perf_counter() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(run_page(sys.argv[1]))
