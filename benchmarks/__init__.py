"""Every benchmark (``quality``, ``ingest``, ``serve``, ``baselines``, plus one-off studies) and the report writer
(``report``). Each prints and records how it was measured (``machine``). Results live in ``benchmarks/results/<date>/``."""
