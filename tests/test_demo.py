"""`make demo` end to end: the real broker, Ray, the ingest job, Ray Serve over HTTP and the shipped checkpoint.

What a newcomer must see: at least one question answered wrongly before its article arrives and correctly after, the
quality table, and a clean shutdown that leaves no broker or Ray process behind.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from pipeline.config import REPO_ROOT

LEFTOVERS = ("tansu", "raylet", "gcs_server")


def _running() -> dict[str, int]:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return {name: sum(name in line for line in ps.splitlines()) for name in LEFTOVERS}


@pytest.mark.slow
def test_demo_end_to_end():
    before = _running()
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled")
    proc = subprocess.run([sys.executable, "-m", "macstream.demo"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, f"demo failed:\n{out[-3000:]}\n{proc.stderr[-3000:]}"
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]", "shut down", "Run each part alone"):
        assert step in out, f"missing {step!r} in:\n{out}"
    # some mode is wrong before the article arrives and right after it
    flips = re.findall(r"before: .*✗\s+after: .*✓", out)
    assert flips, f"no question went from wrong to right:\n{out}"
    table = re.findall(r"^\s+(base|rag|mac|mac\+rag)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert [t[0] for t in table] == ["base", "rag", "mac", "mac+rag"], out
    assert _running() == before, "the demo left broker or Ray processes behind"
