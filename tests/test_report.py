"""The benchmark report and the configuration reference (docs/configuration.md) are generated, never hand-edited."""

from __future__ import annotations

import json

import pytest

from benchmarks.config import AllBench, StoreBench
from benchmarks.report import run_benchmark, write_report
from pipeline.config import REFERENCE_FILE, REFERENCE_MARKERS, reference_markdown


def test_configuration_reference_is_current():
    text = REFERENCE_FILE.read_text()
    start, end = REFERENCE_MARKERS
    assert start in text and end in text, f"{REFERENCE_FILE.name} lost its configuration-reference markers"
    block = text.split(start, 1)[1].split(end, 1)[0].strip()
    assert block == reference_markdown().strip(), f"{REFERENCE_FILE.name} is stale: run `python -m pipeline.config`"


def test_reference_lists_every_field():
    from pipeline.config import IngestConfig, ModelConfig, PromptTrainConfig, ReadoutTrainConfig, ServeConfig

    ref = reference_markdown()
    for cls in (ModelConfig, ReadoutTrainConfig, PromptTrainConfig, IngestConfig, ServeConfig):
        for name, field in cls.model_fields.items():
            assert f"| `{name}` |" in ref, f"{cls.__name__}.{name} missing from the reference"
            assert field.description, f"{cls.__name__}.{name} has no description"


def _quality(mods):
    metrics = {m: {"em": 10.0 * i, "lenient_em": 11.0 * i, "f1": 12.0 * i, "prompt_tokens": 30.0 + i,
                   "seconds": 0.1 * i} for i, m in enumerate(mods)}
    growth = {f"{g}x": {"documents": 10 * g, **{m: 50.0 / g for m in mods if m != "base"}} for g in (1, 2, 4, 8)}
    rep = {"documents": 40, "questions": 80, "metrics": metrics, "retention": {"questions": 9, "growth": growth},
           "cost": {"bytes_per_modulation": 13824, "bytes_per_expanded_prefix": 46080,
                    "encode_seconds_per_document": 0.05}}
    return {"datasets": {"synthetic-test": rep},
            "how": {"method": "m", "checkpoint": "abc", "top_k": 4, "synthetic_entities": 5}}


def test_report_has_tables_and_plots(tmp_path):
    mods = ["base", "rag", "mac", "mac+rag"]
    (tmp_path / "quality.json").write_text(json.dumps(_quality(mods)))
    runs = [{"workers": w, "documents": 100, "seconds": 50.0 / w, "docs_per_s": 2.0 * w, "batch_latency_p50_s": 7.0}
            for w in (1, 2)]
    (tmp_path / "ingest.json").write_text(json.dumps(
        {"runs": runs, "how": {"method": "m", "documents": 100, "batch_size": 16, "partitions": 4}}))
    out = write_report(tmp_path)
    text = out.read_text()
    for png in ("quality_by_mode.png", "retention.png", "bytes_per_document.png", "ingest_scaling.png"):
        assert f"]({png})" in text
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| mac+rag | 30.0 | 33.0 | 36.0 |" in text  # the numbers of the input, not made up
    assert "| 2 | 100 | 25.0 | 4.00 | 7.00 |" in text
    assert "Not measured in this report: serve, baselines, freshness." in text


def test_run_benchmark_takes_a_target_config(tmp_path):
    """It dispatches on the config's type; `store` (its own JSON, no report) and `all` (the CLI runs each) are not
    its to run, and are refused before anything starts."""
    for cfg in (StoreBench(), AllBench()):
        with pytest.raises(ValueError, match=f"bench {cfg.target}"):
            run_benchmark(cfg, tmp_path)
    assert not list(tmp_path.iterdir())


def test_run_benchmark_hands_each_target_its_settings(tmp_path, monkeypatch):
    """Each target's settings reach its benchmark as the shared parser's flags did (the runs replaced by recorders),
    and the command is recorded in the JSON written under the target's name."""
    from benchmarks import backfill, baselines, freshness, ingest, quality, serve
    from benchmarks.config import (
        BackfillBench,
        BaselinesBench,
        FreshnessBench,
        IngestBench,
        QualityBench,
        ServeBench,
    )

    calls = []
    record = lambda *a, **kw: calls.append((a, kw)) or {}
    for module, fn in ((quality, "run"), (ingest, "run"), (backfill, "run"), (serve, "run"), (baselines, "run"),
                       (freshness, "run"), (freshness, "run_feed")):
        monkeypatch.setattr(module, fn, record)
    cases = [
        (QualityBench(entities=7, rtqa_questions=9, top_k=2), "quality", (None, 7, 9, 2), {}),
        (IngestBench(entities=5, workers=[1, 3]), "ingest", (None, 5, (1, 3)), {}),
        (BackfillBench(checkpoint="ck", workers=[2]), "backfill", ("ck", 40, (2,)), {}),
        (ServeBench(corpus="realtimeqa", entities=4, requests=6, top_k=4, batch_wait=0.02), "serve-realtimeqa",
         (None, 4, 6, 8, 4, 16, 0.02, 1), {"docs": "realtimeqa", "throughput": False}),
        (FreshnessBench(docs=4, burst=4, variants=["batch_size=2,poll_timeout_ms=50"], mode="mac"), "freshness",
         (None, 4, None, 4, 0.05, ({"batch_size": 2, "poll_timeout_ms": 50},), "store"), {"workers": 1, "mode": "mac"}),
        (FreshnessBench(source="feed", docs=30, feeds_interval=2), "freshness-feed", (None, 30, 2.0),
         {"poll_interval_s": 0.05, "mode": None}),
    ]
    for cfg, name, args, kwargs in cases:
        calls.clear()
        run_benchmark(cfg, tmp_path, f"macstream bench {cfg.target} ...")
        assert calls == [(args, kwargs)], name
        assert json.loads((tmp_path / f"{name}.json").read_text())["how"]["command"] == \
            f"macstream bench {cfg.target} ..."
    calls.clear()
    run_benchmark(BaselinesBench(entities=3, tuning="t.json"), tmp_path)  # writes its own files
    (args, kwargs), = calls
    assert args == (tmp_path / "baselines.json",) and kwargs == {
        "checkpoint": None, "entities": 3, "rtqa_docs": 48, "tune_entities": 5, "tuning": "t.json", "threads": 1,
        "top_k": 4, "max_new_tokens": 16, "command": "macstream bench baselines --entities 3 --tuning t.json"}
