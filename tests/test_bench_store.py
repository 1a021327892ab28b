"""`macstream bench store`: the command outside checks call, at a size small enough for a test (real stores, real
subprocesses, the product's Store interface)."""

from __future__ import annotations

import json

import pytest

from benchmarks.store import parse_points
from macstream.cli import main

REQUIRED = {"points", "upserts_per_s", "query_p50_ms", "query_p99_ms", "rss_mb", "disk_mb", "bytes_per_window"}


def test_points_parse_and_bad_sizes_are_refused() -> None:
    assert parse_points("10000,100000") == parse_points("1e4, 1e5") == [10_000, 100_000]
    for bad in ("", "0", "1e4,x", "-5"):
        with pytest.raises(ValueError, match="--points"):
            parse_points(bad)


@pytest.mark.slow
def test_bench_store_writes_one_row_per_engine_and_size_and_a_plot(tmp_path, capsys) -> None:
    out = tmp_path / "store.json"
    main(["bench", "store", "--points", "150,300", "--out", str(out), "--local-cap", "150", "--store-queries", "10",
          "--store-workdir", str(tmp_path)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["engine"], r["points"]) for r in rows] == [("edge", 150), ("edge", 300), ("local", 150)]
    for r in rows:
        assert "error" not in r, r
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["upserts_per_s"] > 0 and 0 < r["query_p50_ms"] <= r["query_p99_ms"] and r["rss_mb"] > 0
        assert r["bytes_per_window"] == pytest.approx(r["disk_mb"] * 2**20 / r["points"])
        assert set(r["query_by_filter"]) == {"none", "tenant", "since", "tenant+since"}
        assert 0 <= r["recall_at_k"] <= 1
    edge = [r for r in rows if r["engine"] == "edge"]
    assert edge[0]["recall_at_k"] == 1.0  # below the indexing threshold the search is exact
    assert out.with_suffix(".png").stat().st_size > 0
    assert result["how"]["command"].startswith("macstream bench store --points 150,300")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("macstream-bench-store-")]  # stores removed
    assert "| edge | 300 |" in capsys.readouterr().out
