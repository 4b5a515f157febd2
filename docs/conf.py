"""Sphinx configuration for the optax_cdg documentation.

Build (no network needed; warnings are errors in CI):

  pip install -e ".[docs]" && sphinx-build -W -b html docs docs/_build/html
"""

import os
import sys

# Document the package of this checkout, not another installed copy.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__),
                                                "..")))

import optax_cdg  # pylint: disable=g-import-not-at-top,wrong-import-position

project = "optax_cdg"
author = "optax_cdg authors"
copyright = "2026, optax_cdg authors"  # pylint: disable=redefined-builtin
release = optax_cdg.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    # Formulas are rendered in the reader's browser by MathJax, which Sphinx
    # loads from a CDN (its default mathjax_path, not set here): offline they
    # show as their LaTeX source. The build itself fetches nothing.
    "sphinx.ext.mathjax",
]
# No sphinx.ext.intersphinx: the build must not fetch anything.

source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"

myst_enable_extensions = ["dollarmath", "amsmath"]
# Anchors for "page.md#a-section" links between pages.
myst_heading_anchors = 3

# Google-style docstrings (Args:, Returns:, Examples:, References:).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True}

# Optax's theme. It ships its own fonts, icons and scripts, and downloads
# nothing at build time (no version switcher is configured).
html_theme = "sphinx_book_theme"
html_title = f"optax_cdg {release}"
default_role = "code"  # docstrings write inline code as `x`, as Markdown does


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
  """NamedTuple fields are documented by their class's `Attributes:`."""
  del app, what, name, options
  if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
    return True
  return skip


def _drop_type_docstring(app, what, name, obj, options, lines):
  """A constant has no docstring of its own: do not show its type's."""
  del app, name, options
  type_doc = (type(obj).__doc__ or "").strip()
  if what == "data" and type_doc and "\n".join(lines).strip() == type_doc:
    lines.clear()


def setup(app):
  app.connect("autodoc-skip-member", _skip_namedtuple_fields)
  app.connect("autodoc-process-docstring", _drop_type_docstring)
