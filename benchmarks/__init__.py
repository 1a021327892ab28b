"""What ``macstream bench TARGET`` runs, one module per target: ``quality``, ``ingest``, ``backfill``, ``serve``,
``baselines``, ``freshness``, ``store``; each target's settings in ``config``, the report writer in ``report``. Each
prints and records how it was measured (``machine``). Results live in ``benchmarks/results/<date>/``. One-off studies
are in ``research/`` (research/README.md)."""
