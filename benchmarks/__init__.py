"""What ``macstream bench`` runs: ``quality``, ``ingest``, ``serve``, ``baselines``, ``freshness``, and the report
writer (``report``). Each prints and records how it was measured (``machine``). Results live in
``benchmarks/results/<date>/``. One-off studies are in ``research/`` (research/README.md)."""
