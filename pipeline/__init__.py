"""The MAC engine and its data: the records (``schemas``, ``modulation``, ``modes``), the model (``model/``), training,
evaluation (``answering``, ``scoring``, ``evaluate``, ``diagnose``), the fine-tuning baselines (``baselines/``), the
memory store (``store/``), datasets (``data/``) and the one config (``config``). Imports nothing from the folders
above it (workers, serving, benchmarks, macstream)."""

__version__ = "0.1.0"
