"""`bench soak`'s arithmetic (the soak itself runs `up` for an hour: it is a benchmark, not a test): latency windows
between memory samples, growth measured after warm-up only, and the memory of a real process tree."""

from __future__ import annotations

import subprocess
import sys

from benchmarks.soak import _windows, growth, memory


def _sample(t: float, rss: float, anon: float, chunks: int) -> dict:
    return {"t_s": t, "rss_mb": rss, "anon_mb": anon, "by_role": {"store": {"rss_mb": rss / 4, "anon_mb": anon / 4}},
            "store": {"documents": chunks, "chunks": chunks}}


def test_each_window_holds_the_questions_asked_since_the_previous_sample_and_growth_skips_warm_up() -> None:
    samples = [_sample(0, 100, 50, 0), _sample(10, 200, 80, 5), _sample(20, 210, 80, 9), _sample(30, 220, 88, 12)]
    asked = [(1, 0.5, 0.01), (9, 1.5, None), (12, 2.0, 0.02), (25, 1.0, 0.03), (31, 9.0, 0.04)]
    w = _windows(samples, asked, warm_s=10)
    assert [x["questions"] for x in w] == [0, 2, 1, 1]  # the question at 31 s came after the last sample
    assert [x["warm"] for x in w] == [False, True, True, True]
    assert w[3]["anon_mb_by_role"] == {"store": 22.0}  # each role's heap, to find which one grows
    assert w[1]["p99_s"] == 1.5 and w[1]["retrieve_p99_ms"] == 10.0 and w[0]["p99_s"] is None
    assert round(growth(w, "rss_mb"), 4) == 0.1  # 200 → 220, the warm-up's 100 → 200 left out
    assert round(growth(w, "anon_mb"), 4) == 0.1 and growth(w[:2], "rss_mb") is None


def test_memory_counts_this_process_and_its_children() -> None:
    alone = memory()
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(200 * 2**20); time.sleep(30)"])
    try:
        for _ in range(100):
            with_child = memory()
            if with_child["anon_mb"] > alone["anon_mb"] + 150:
                break
            subprocess.run(["sleep", "0.1"])
        assert with_child["processes"] == alone["processes"] + 1
        assert with_child["anon_mb"] > alone["anon_mb"] + 150 and with_child["rss_mb"] >= with_child["anon_mb"]
    finally:
        child.kill()
        child.wait()
