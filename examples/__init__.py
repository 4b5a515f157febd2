"""The example scripts, and common.py, the helpers they share.

Run a script from a clone (`python examples/quickstart.py`): it imports
`common` beside it. The studies import the same helpers as the module
`examples.common`, run from the repository root (`python -m studies....`).
"""
