"""The seeded studies, run from the repository root as modules.

  python -m studies.reproduce --quick --out DIR
  python -m studies.mnist1d_evidence --quick --out DIR

They build on the examples' models and training loop, the module
`examples.common`.
"""
