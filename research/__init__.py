"""One-off studies: questions asked once about the memory, with their results (research/README.md is the index).

Not part of the product: nothing in ``pipeline``, ``workers``, ``serving``, ``benchmarks`` or ``macstream`` imports
this package (tests/test_layout.py checks it), and the product image leaves it out. Run a study from the repo root,
e.g. ``python -m research.ceilings --help``.
"""
