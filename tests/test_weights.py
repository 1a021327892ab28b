"""First use of a fresh MACSTREAM_HOME by several processes at once (e.g. `ingest --workers 4`): exactly one copy of
the dequantised LM is published, every process loads it, and no temporary directory is left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOAD = ("from pipeline.model.weights import resolve_lm; from pipeline.config import DEFAULT_LM; "
        "from transformers import AutoConfig, AutoTokenizer; p = resolve_lm(DEFAULT_LM); "
        "AutoTokenizer.from_pretrained(p); print(AutoConfig.from_pretrained(p).num_hidden_layers)")


@pytest.mark.slow
def test_concurrent_first_use_publishes_one_complete_copy(tmp_path) -> None:
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "smollm2-135m-instruct.tmp-crashed").mkdir()  # a process that died mid-dequantisation
    env = dict(os.environ, MACSTREAM_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    procs = [subprocess.Popen([sys.executable, "-c", LOAD], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
        assert out.strip().splitlines()[-1] == "30"  # SmolLM2-135M's layers, read from the published copy
    entries = sorted(x.name for x in (home / "models").iterdir())
    assert entries == ["smollm2-135m-instruct", "smollm2-135m-instruct.lock"], entries  # no .tmp-* left
    assert (home / "models" / "smollm2-135m-instruct" / "model.safetensors").stat().st_size > 100e6
