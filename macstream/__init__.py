"""The top floor: the ``macstream`` command line and the demo. May import every folder below it
(benchmarks → serving → workers → pipeline); nothing imports it.

Importing this package pins the process offline before any model library loads: no code path may reach a model hub.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
