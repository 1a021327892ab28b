"""The streaming commands as a user runs them: produce → ingest (backfill) → stats → replay from a time → ingest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest

from pipeline.schemas import Document
from workers.broker import LocalBroker

pytestmark = pytest.mark.slow


def _cli(*args: str, timeout: float = 300) -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "macstream.cli", *args], capture_output=True, text=True, env=env,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"not JSON on stdout: {out.stdout[:2000]!r}\nstderr: {out.stderr[-2000:]}") from None


def test_produce_ingest_stats_replay(tiny_checkpoint, tmp_path) -> None:
    first = [Document(id=f"a{i}", text=f"Early story {i} about Acme.") for i in range(10)]
    later = [Document(id=f"b{i}", text=f"Later story {i} about Globex.") for i in range(5)]
    store = str(tmp_path / "store")
    with LocalBroker(log_dir=tmp_path / "logs") as broker:
        kafka = ["--bootstrap-servers", broker.bootstrap, "--topic", "news"]
        for name, docs in (("first", first), ("later", later)):
            (tmp_path / f"{name}.jsonl").write_text("".join(d.model_dump_json() + "\n" for d in docs))
        assert _cli("produce", *kafka, str(tmp_path / "first.jsonl"), "--partitions", "2")["produced"] == 10
        time.sleep(1.2)
        between = datetime.now(UTC).isoformat()
        time.sleep(1.2)
        assert _cli("produce", *kafka, str(tmp_path / "later.jsonl"))["produced"] == 5

        ingest = ["ingest", *kafka, "--store", store, "--checkpoint", str(tiny_checkpoint), "--exit-when-idle", "3"]
        report = _cli(*ingest)
        assert report["upserted"] == 15 and report["dead_lettered"] == 0
        stats = _cli("stats", "--store", store)
        assert stats["collections"] == {report["collection"]: {"documents": 15, "chunks": 15}}

        # replay from a time: only the later records come again, and they are unchanged (nothing re-encoded)
        offsets = _cli("replay", *kafka, "--from", between)["offsets"]
        assert sum(offsets.values()) == 10
        again = _cli(*ingest)
        assert again["records"] == 5 and again["unchanged"] == 5 and again["upserted"] == 0
        assert _cli("stats", "--store", store)["collections"][report["collection"]]["documents"] == 15


def test_bad_ingest_flags_exit_2_naming_the_field(tmp_path) -> None:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    out = subprocess.run([sys.executable, "-m", "macstream.cli", "ingest", "--topic", "t", "--batch-size", "0"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and "batch-size" in out.stderr
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"max_in_flihgt": 3}))
    out = subprocess.run([sys.executable, "-m", "macstream.cli", "ingest", "--topic", "t", "--config", str(cfg)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and "max_in_flihgt" in out.stderr
