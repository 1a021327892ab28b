"""`macstream up`, the always-on path, as a user runs it: a real broker, real Ray, real Serve over HTTP, a real store.

Pre-flight refusals (busy port, unreachable broker, a store another process holds) are one line and exit 2 with nothing
started. A full run ingests what is produced, answers it over HTTP citing its source, and on SIGTERM mid-stream stops
with every committed offset in the store and nothing left holding the port or the store.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from pipeline.schemas import Document
from workers import kafka_io
from workers.broker import LocalBroker, free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _up(*args: str, command: str = "up", **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "macstream.cli", command, *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _refused(*args: str, command: str = "up") -> str:
    t0 = time.monotonic()
    proc = _up(*args, command=command)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out, err[-2000:])
    lines = [ln for ln in err.splitlines() if ln.startswith("macstream:")]
    assert len(lines) == 1, err[-2000:]
    assert time.monotonic() - t0 < 60  # refused before Ray or a broker started
    return lines[0]


def test_up_refuses_a_busy_port_an_unreachable_broker_and_a_held_store(tmp_path) -> None:
    from pipeline.store.edge import EdgeStore

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        assert "in use" in _refused("--topic", "t", "--port", str(busy), "--store", str(tmp_path / "a"))
    assert "no Kafka broker answers" in _refused("--topic", "t", "--port", str(free_port()),
                                                 "--store", str(tmp_path / "b"),
                                                 "--bootstrap-servers", f"127.0.0.1:{free_port()}")
    held = EdgeStore(str(tmp_path / "held"))
    try:
        line = _refused("--topic", "t", "--port", str(free_port()), "--store", str(tmp_path / "held"))
        assert "another process" in line and "macstream up" in line
        # `serve` (and `ingest`) started beside another owner of the store: refused at once, naming the fixes
        line = _refused("--port", str(free_port()), "--store", str(tmp_path / "held"), command="serve")
        assert "another process" in line and "RAY_ADDRESS" in line
    finally:
        held.close()


def _docs(prefix: str, n: int) -> list[Document]:
    return [Document(id=f"{prefix}{i}", title=f"{prefix} story {i}", source="wire",
                     text=f"Company {prefix.upper()}corp{i} appointed Person{i} as chief executive.") for i in range(n)]


def _wait(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _ready(base: str) -> bool:
    try:
        return requests.get(base + "/ready", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def test_up_ingests_and_serves_then_stops_on_sigterm_losing_nothing(tiny_checkpoint, tmp_path) -> None:
    from pipeline.store.edge import EdgeStore

    port, store = free_port(), tmp_path / "store"
    with LocalBroker(log_dir=tmp_path / "logs") as broker:
        proc = _up("--topic", "news", "--bootstrap-servers", broker.bootstrap, "--port", str(port),
                   "--store", str(store), "--checkpoint", str(tiny_checkpoint), "--batch-size", "4",
                   "--partitions", "2")
        try:
            started = json.loads(proc.stdout.readline() or "{}")
            assert started.get("url") == f"http://127.0.0.1:{port}", (
                proc.stderr.read()[-3000:] if not started else started)
            base = started["url"]
            _wait(lambda: _ready(base), 120, "/ready")
            kafka_io.produce(broker.bootstrap, "news", _docs("a", 8))
            stats = lambda: requests.get(base + "/v1/memory/stats", timeout=10).json()  # noqa: E731
            _wait(lambda: stats().get("documents") == 8, 120, "8 documents in memory")
            r = requests.post(base + "/v1/answer", json={"question": "Who leads Acorp3?", "max_new_tokens": 4},
                              timeout=60)
            assert r.status_code == 200 and r.json()["mode"] == started["default_mode"]
            assert any(s["id"].startswith("a") for s in r.json()["sources"])
            kafka_io.produce(broker.bootstrap, "news", _docs("b", 40))  # then stop while these are being ingested
            _wait(lambda: stats().get("documents", 0) > 8, 120, "ingest of the second burst to begin")
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err[-3000:]
        snapshot = json.loads(out[out.index("{\n"):])
        committed = {int(p): o for p, o in snapshot["committed"].items()}
        assert committed, snapshot
        # every record below a committed offset is in the store (nothing acknowledged was lost)
        records = kafka_io.read_all(broker.bootstrap, "news")
        below = {r.key.decode() for r in records if r.offset < committed.get(r.partition, 0)}
        assert len(below) >= 8
    with pytest.raises(requests.ConnectionError):  # nothing is left serving
        requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
    s = EdgeStore(str(store))  # nothing is left holding the store
    try:
        present = s.content_hashes(snapshot["collection"], sorted(below))
    finally:
        s.close()
    assert set(present) == below, f"committed but missing: {sorted(below - set(present))}"


def test_up_with_a_local_broker_when_none_is_given(tiny_checkpoint, tmp_path) -> None:
    port = free_port()
    proc = _up("--topic", "news", "--port", str(port), "--store", str(tmp_path / "store"),
               "--checkpoint", str(tiny_checkpoint))
    try:
        started = json.loads(proc.stdout.readline() or "{}")
        assert started.get("bootstrap_servers"), proc.stderr.read()[-3000:]
        _wait(lambda: _ready(started["url"]), 120, "/ready")
        kafka_io.produce(started["bootstrap_servers"], "news", _docs("c", 3))
        _wait(lambda: requests.get(started["url"] + "/v1/memory/stats", timeout=10).json().get("documents") == 3, 120,
              "3 documents")
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=180)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    host, broker_port = started["bootstrap_servers"].rsplit(":", 1)
    with socket.socket() as s:  # the local broker stopped with it
        assert s.connect_ex((host, int(broker_port))) != 0


def _tree(proc: subprocess.Popen) -> list:
    import psutil

    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _left_behind(procs: list) -> list[str]:
    """The processes of a stopped command's tree (Ray's GCS, raylet, workers, the local broker) still running."""
    import psutil

    gone, alive = psutil.wait_procs(procs, timeout=30)
    return [f"{p.pid} {p.name()}" for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_up_fits_two_workers_to_two_cores_and_serves_only_once_ingest_runs(tiny_checkpoint, tmp_path) -> None:
    """On this 2-core machine `--workers 2` plus one Serve replica asks for 3 CPUs: the encoders are fitted to the
    free share with a warning (it used to start one encoder and wait for the second forever), documents are ingested,
    and SIGTERM leaves no process of the run behind."""
    port = free_port()
    proc = _up("--topic", "news", "--port", str(port), "--store", str(tmp_path / "store"), "--workers", "2",
               "--checkpoint", str(tiny_checkpoint), "--partitions", "2")
    tree: list = []
    try:
        started = json.loads(proc.stdout.readline() or "{}")
        assert started.get("url"), proc.stderr.read()[-3000:]
        _wait(lambda: _ready(started["url"]), 120, "/ready")
        kafka_io.produce(started["bootstrap_servers"], "news", _docs("w", 6))
        _wait(lambda: requests.get(started["url"] + "/v1/memory/stats", timeout=10).json().get("documents") == 6, 120,
              "6 documents ingested by two fitted encoders")
        tree = _tree(proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "each reserves 0.5 CPU instead" in err, err[-3000:]
    assert not _left_behind(tree)


@pytest.mark.parametrize("after_s", [0.5, 4.0, 12.0])
def test_sigterm_at_any_stage_of_start_up_exits_0_and_leaves_nothing_running(tiny_checkpoint, tmp_path,
                                                                             after_s) -> None:
    """SIGTERM while the broker, Ray, the encoders or Serve are starting: exit 0 and no process of the run left (it
    used to abort with 134 and leave Ray behind when the signal came before start-up had finished)."""
    proc = _up("--topic", "news", "--port", str(free_port()), "--store", str(tmp_path / "store"), "--workers", "2",
               "--checkpoint", str(tiny_checkpoint))
    tree: list = []
    try:
        deadline = time.monotonic() + after_s
        while time.monotonic() < deadline:  # collect the tree as it grows: the signal may come before all of it exists
            tree = list({p.pid: p for p in tree + _tree(proc)}.values())
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert not _left_behind(tree), err[-3000:]


def test_plans_the_cluster_cannot_hold_are_refused_in_one_line(tiny_checkpoint, tmp_path) -> None:
    """Too little of this 2-core machine for the plan even when fitted: one line naming the shortfall, exit 2."""
    line = _refused("--port", str(free_port()), "--store", str(tmp_path / "a"), "--replicas", "3",
                    "--checkpoint", str(tiny_checkpoint), command="serve")
    assert "serve needs 3 CPU" in line and "--replicas" in line
    line = _refused("--topic", "t", "--port", str(free_port()), "--store", str(tmp_path / "b"), "--workers", "8",
                    "--checkpoint", str(tiny_checkpoint))
    assert "ingest needs 8 encoder(s)" in line and "kept for serving" in line and "--workers" in line
