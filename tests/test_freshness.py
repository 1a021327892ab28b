"""`macstream bench freshness`: the always-on path (broker, Ray, ingest job, Serve) end to end on a few documents,
with the tiny checkpoint; every document produced must become answerable over HTTP with its own source cited."""

from __future__ import annotations

import json

import pytest

from benchmarks import freshness
from benchmarks.config import VARIANT_KEYS, FreshnessBench


def test_percentiles_and_variants() -> None:
    xs = [float(i) for i in range(1, 101)]
    s = freshness.summary(xs)
    assert (s["p50"], s["p90"], s["p99"], s["max"], s["n"]) == (50.0, 90.0, 99.0, 100.0, 100)
    assert freshness.summary([])["p99"] is None
    assert freshness.pct([3.0], 0.99) == 3.0
    assert freshness.parse_variant("batch_size=4, poll_timeout_ms=50") == {"batch_size": 4, "poll_timeout_ms": 50}
    for bad in ("topic=x", "batch_size", "batch_size=four"):
        with pytest.raises(ValueError):
            freshness.parse_variant(bad)
        with pytest.raises(ValueError):  # refused as early by the bench config (while the command line is parsed)
            FreshnessBench(variants=[bad])
    assert VARIANT_KEYS == freshness.TUNABLE  # the config's copy (it does not import this module: Ray, the model)


def test_articles_are_fresh_one_per_entity_with_their_own_question() -> None:
    got = freshness.articles(12, seed=0, tag="t1")
    ids = [d.id for d, _ in got]
    assert len(set(ids)) == 12 and all(i.startswith("fresh-t1-syn-test-") for i in ids)
    assert len({i.rsplit("-a", 1)[0] for i in ids}) == 12  # one article per entity
    assert all(q for _, q in got)
    assert [d.id for d, _ in freshness.articles(12, seed=0, tag="t2")] != ids  # a new tag: ids never seen before


@pytest.mark.slow
def test_bench_freshness_every_document_becomes_queryable(tiny_checkpoint, tmp_path) -> None:
    from benchmarks.report import run_benchmark, write_report
    from macstream.cli import bench_settings, parser

    argv = ["bench", "freshness", "--checkpoint", str(tiny_checkpoint), "--freshness-docs", "4",
            "--freshness-burst", "4", "--freshness-variant", "batch_size=2,poll_timeout_ms=50",
            "--out-dir", str(tmp_path)]
    cfg = bench_settings(parser().parse_args(argv))
    result = run_benchmark(cfg, tmp_path, "macstream bench " + " ".join(argv[1:]))
    written = json.loads((tmp_path / "freshness.json").read_text())
    assert written["how"]["command"] == "macstream bench " + " ".join(argv[1:])
    how = written["how"]
    for key in ("machine", "rate_docs_per_s", "documents", "poll_interval_s", "warm", "capacity_docs_per_s", "mode",
                "method"):
        assert how[key] is not None, key
    assert how["documents"] == 4 and how["poll_interval_s"] == 0.05 and how["warm"] is True
    assert how["rate_docs_per_s"] == pytest.approx(how["capacity_docs_per_s"] / 2)
    assert [r["name"] for r in result["runs"]] == ["product defaults", "batch_size=2, poll_timeout_ms=50"]
    assert result["runs"][1]["ingest"]["batch_size"] == 2 and result["runs"][1]["ingest"]["poll_timeout_ms"] == 50
    for run in written["runs"]:
        assert run["documents"] == 4 and run["queryable"] == 4, run["per_document"]  # every document became answerable
        assert run["dead_lettered"] == 0
        for row in run["per_document"]:
            assert row["queryable"] and row["ttq_s"] > 0 and row["answered_s"] >= row["ttq_s"]
            assert row["in_store_s"] is not None and 0 < row["in_store_s"] <= row["ttq_s"] + 0.1
            assert row["mode"] == how["mode"]
        t = run["ttq_s"]
        assert t["n"] == 4 and t["p50"] <= t["p90"] <= t["p99"] <= t["max"]
        assert run["ingest_batches"]["records"] == 4 and isinstance(run["goal"]["met"], bool)
    report = write_report(tmp_path).read_text()
    assert "## Freshness" in report and "](freshness_cdf.png)" in report
    assert (tmp_path / "freshness_cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| product defaults: " in report
