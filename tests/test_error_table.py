"""The table of bad arguments in docs/errors.md is what the code does."""

import _error_table


def test_page_table_matches_the_code():
  _, match = _error_table.page_table()
  assert match is not None, (
      "docs/errors.md lost its generated bad-arguments table")
  assert match.group(0) == _error_table.table(), (
      "docs/errors.md's bad-arguments table is out of date: run "
      "`PYTHONPATH=. python tests/_error_table.py --write`.")


def test_every_public_function_has_rows():
  sections = {section for section, _, _ in _error_table.ROWS}
  for name in ("channel_directed", "metric_gradient", "spectral_gain",
               "laplacian_smoothing", "linen_conv_kernels",
               "nnx_conv_kernels", "KernelSpec"):
    assert name in sections or any(
        name in code for _, code, _ in _error_table.ROWS), name
  assert sections >= {"channel_directed", "kernels", "metric_gradient",
                      "spectral_gain", "laplacian_smoothing", "helpers"}
  # Every row that is not documented as returning NaN raises an error.
  for _, code, cut in _error_table.ROWS:
    outcome, message = _error_table.run(code, cut)
    assert outcome in ("ValueError", "TypeError") or message == (
        "returns nan"), (code, outcome, message)
