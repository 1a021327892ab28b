"""``macstream bench store``: the embedded store at 10^4–10^6 windows, the Edge engine beside qdrant-client's local
mode (the old embedded engine) at the sizes that one survives.

Per engine and size, in a fresh process (so RSS is that store's alone) and a fresh directory:

1. write N windows through the product's :class:`~pipeline.store.Store` interface, one document of one window per
   upsert (a random 48 x 576 float16 modulation, a random unit 384-d retrieval vector, a ``text_chars`` text, one of
   10 tenants, one of 5 sources, published over 90 days): ``upserts_per_s`` is windows/s over the whole load, the
   engine's inline index building and merging included (``write_max_ms`` is the longest single upsert: the stall
   while it runs);
2. close, reopen (``open_s``), and time ``queries`` top-k searches per filter: none, tenant (1/10 of the points),
   since (the last 30 of 90 days), tenant+since. A search returns its k hits with their documents and modulations
   (what the serve path reads), so ``query_*_ms`` include reading the k modulations back; ``recall_at_k``: the
   share of the exact top-k (numpy over every vector) the unfiltered searches return (the index is approximate);
   ``engine_p50_ms`` / ``engine_p99_ms``: the same unfiltered searches asked of the engine directly for ids and
   document ids only (no modulations, no Python objects built): the engine's part of a search;
3. RSS of that process after the queries (``rss_mb``: resident set, memory-mapped store files included;
   ``rss_anon_mb``: the process's own heap), its peak (``rss_peak_mb``, during the load), and the directory's size
   on disk (``disk_mb``; ``bytes_per_window`` = disk / N).

Rows are written as they finish (``--out``, default ``benchmarks/results/<date>/store.json``) with a PNG beside the
JSON; a size whose run fails is recorded with its error and the next one still runs.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

TENANTS, SOURCES, DAYS = 10, 5, 90
T0 = datetime(2026, 1, 1, tzinfo=UTC)
LOCAL_CAP = 10_000  # local mode holds everything in RAM in pure Python: beyond this it is hours per size
FILTERS = ("none", "tenant", "since", "tenant+since")


def parse_points(text: str) -> list[int]:
    """"10000,100000" or "1e4,1e5" → [10000, 100000]; every size ≥ 1."""
    try:
        sizes = [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--points: comma-separated window counts, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--points: at least one size, each >= 1, got {text!r}")
    return sizes


def _memory() -> dict:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kb = lambda key: int(status.get(key, "0 kB").split()[0]) if key in status else 0  # noqa: E731
    return {"rss_mb": kb("VmRSS") / 1024, "rss_anon_mb": kb("RssAnon") / 1024, "rss_file_mb": kb("RssFile") / 1024,
            "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _disk_bytes(path: Path) -> int:
    """Bytes the directory occupies (allocated blocks: sparse files count what they use)."""
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def _doc(i: int, text: str, rng: np.random.Generator):
    from pipeline.schemas import Document

    return Document(id=f"doc-{i}", text=text, title=f"story {i}", source=f"wire-{i % SOURCES}",
                    tenant=f"t{i % TENANTS}", published_at=T0 + timedelta(seconds=float(rng.uniform(0, DAYS * 86400))),
                    url=f"https://news.example/{i}")


def _window(doc_id: str, rng: np.random.Generator, dim: int, tokens: int, d_lm: int, version: str):
    from pipeline.modulation import Modulation
    from pipeline.schemas import EncodedChunk

    mod = rng.standard_normal((tokens, d_lm), dtype=np.float32).astype(np.float16)
    v = rng.standard_normal(dim, dtype=np.float32)
    return EncodedChunk(Modulation(doc_id, 0, 1, mod, "bench|bench", version), v / np.linalg.norm(v))


def _ms(seconds, q: float) -> float:
    return float(np.percentile(seconds, q) * 1e3)


def _location(engine: str, path: Path) -> str:
    return f"local:{path}" if engine == "local" else str(path)


def measure(engine: str, points: int, path: Path, *, dim: int = 384, tokens: int = 48, d_lm: int = 576, k: int = 4,
            queries: int = 200, text_chars: int = 1000, seed: int = 0, codec: str | None = None) -> dict:
    """One row: load ``points`` windows into a fresh store at ``path`` with ``engine`` ("edge" or "local"), reopen it,
    time searches. Runs in the calling process (``run`` gives each row its own). ``codec``: how the store codes the
    modulations (both engines store them as named vectors; None: the store's default)."""
    from pipeline.modulation_codec import codec as codec_for
    from pipeline.store import DEFAULT_CODEC, SearchFilter, collection_name, open_store

    codec = codec or DEFAULT_CODEC
    if path.exists():
        shutil.rmtree(path)
    rng = np.random.default_rng(seed)
    coll, version = collection_name("bench"), "bench"
    text = ("Markets moved as the central bank held rates; analysts expect growth to slow. " * 40)[:text_chars]
    store = open_store(_location(engine, path), codec)
    writes = np.empty(points)
    kept = np.empty((points, dim), np.float32)  # for the exact top-k
    load0 = os.getloadavg()[0]
    for i in range(points):
        doc = _doc(i, text, rng)
        chunk = _window(doc.id, rng, dim, tokens, d_lm, version)
        kept[i] = chunk.vector
        t = time.perf_counter()
        store.upsert(coll, doc, f"h{i}", [chunk])
        writes[i] = time.perf_counter() - t
    spent = float(writes.sum())
    counted = store.counts(coll)
    store.close()
    t = time.perf_counter()
    store = open_store(_location(engine, path))
    assert store.counts(coll) == counted == {"documents": points, "chunks": points}, (counted, points)
    open_s = time.perf_counter() - t
    qs = rng.standard_normal((queries, dim), dtype=np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    since = T0 + timedelta(days=DAYS - 30)
    flts = {"none": None, "tenant": SearchFilter(tenant="t3"), "since": SearchFilter(since=since),
            "tenant+since": SearchFilter(tenant="t3", since=since)}
    exact = np.argsort(-(qs @ kept.T), axis=1)[:, :k]
    latency, found = {}, 0
    for name, flt in flts.items():
        store.search(coll, qs[:1], k, flt)  # warm
        times = []
        for j, q in enumerate(qs):
            t = time.perf_counter()
            hits = store.search(coll, q[None], k, flt)[0]
            times.append(time.perf_counter() - t)
            assert len(hits) == k or (flt is not None and len(hits) < k), (name, len(hits))  # few may match
            assert all(h.chunk.modulation.tokens.shape == (tokens, d_lm) for h in hits)
            assert flt is None or all(flt.matches(h.document) for h in hits)
            if flt is None:
                found += len({f"doc-{i}" for i in exact[j]} & {h.document.id for h in hits})
        latency[name] = {"p50_ms": _ms(times, 50), "p99_ms": _ms(times, 99)}
    engine_times = [_engine_query(store, engine, coll, q, k) for q in qs]
    mem = _memory()
    store.close()
    disk = _disk_bytes(path)
    return {"engine": engine, "points": points, "upserts_per_s": points / spent, "write_s": spent,
            "write_p50_ms": _ms(writes, 50), "write_p99_ms": _ms(writes, 99), "write_max_ms": _ms(writes, 100),
            "open_s": open_s,
            "query_p50_ms": latency["none"]["p50_ms"], "query_p99_ms": latency["none"]["p99_ms"],
            "query_by_filter": latency, **mem, "disk_mb": disk / 2**20, "bytes_per_window": disk / points,
            "engine_p50_ms": _ms(engine_times, 50), "engine_p99_ms": _ms(engine_times, 99),
            "recall_at_k": found / (queries * k), "codec": codec,
            "modulation_bytes": codec_for(codec).bytes_per_window(tokens, d_lm), "k": k, "queries": queries,
            "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def _engine_query(store, engine: str, coll: str, q: np.ndarray, k: int) -> float:
    """Seconds for one unfiltered top-k asked of the engine itself: ids and document ids, no vectors."""
    from pipeline.store.base import RETRIEVAL

    if engine == "edge":
        import qdrant_edge as qe

        from pipeline.store.edge import OVERSAMPLING, SEARCH_EF

        index = store._get(coll).index
        request = qe.QueryRequest(limit=k, query=qe.Query.Nearest(q.tolist(), using=RETRIEVAL), with_payload=["doc_id"],
                                  params=qe.SearchParams(hnsw_ef=SEARCH_EF, quantization=qe.QuantizationSearchParams(
                                      rescore=True, oversampling=OVERSAMPLING)))
        t = time.perf_counter()
        index.query(request)
    else:
        t = time.perf_counter()
        store.client.query_points(coll, query=q.tolist(), using=RETRIEVAL, limit=k, with_payload=["doc_id"])
    return time.perf_counter() - t


def _child(engine: str, points: int, path: Path, settings: dict, timeout: float | None) -> dict:
    """``measure`` in a fresh interpreter (its RSS is this row's alone), at a lower CPU priority."""
    arg = json.dumps({"engine": engine, "points": points, "path": str(path), "settings": settings})
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run([sys.executable, "-m", "benchmarks.store", arg], cwd=root, capture_output=True, text=True,
                             timeout=timeout, env=os.environ | {"PYTHONPATH": str(root)})
    except subprocess.TimeoutExpired:
        return {"engine": engine, "points": points, "error": f"did not finish in {timeout:.0f} s"}
    finally:
        shutil.rmtree(path, ignore_errors=True)
    if out.returncode != 0:
        tail = " | ".join(out.stderr.strip().splitlines()[-3:])[-500:]
        return {"engine": engine, "points": points, "error": f"exit {out.returncode}: {tail or 'no output'}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=110)
    for engine, color, marker in (("edge", "C0", "o"), ("local", "C3", "s")):
        mine = sorted((r for r in rows if r["engine"] == engine), key=lambda r: r["points"])
        if not mine:
            continue
        n = [r["points"] for r in mine]
        label = "Qdrant Edge" if engine == "edge" else "qdrant-client local mode"
        line = dict(color=color, marker=marker)
        axes[0].plot(n, [r["upserts_per_s"] for r in mine], "-", label=label, **line)
        axes[1].plot(n, [r["query_p99_ms"] for r in mine], "-", label=f"{label}: no filter", **line)
        axes[1].plot(n, [r["query_by_filter"]["tenant+since"]["p99_ms"] for r in mine], "--",
                     label=f"{label}: tenant+since", **line)
        axes[1].plot(n, [r["engine_p99_ms"] for r in mine], ":", label=f"{label}: engine only (no modulations)", **line)
        axes[2].plot(n, [r["rss_mb"] for r in mine], "-", label=f"{label}: RSS", **line)
        axes[2].plot(n, [r["disk_mb"] for r in mine], "--", label=f"{label}: disk", **line)
    axes[0].axhline(500, color="grey", lw=0.8, ls=":", label="target 500/s")
    axes[1].axhline(20, color="grey", lw=0.8, ls=":", label="target 20 ms at 10^5")
    titles = ("write rate", f"query p99, top-{result['how']['k']}", "RSS and disk")
    for ax, title, unit in zip(axes, titles, ("windows/s", "ms", "MB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("windows in the store")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(fontsize=7)
    loads = [x for r in rows for x in r.get("load_average", [])]
    if loads:
        fig.suptitle(f"{result['how']['machine']}; 1-min load average {min(loads):.1f}-{max(loads):.1f} during the "
                     "runs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run(points: list[int], out: Path, *, engines: tuple[str, ...] = ("edge", "local"), local_cap: int = LOCAL_CAP,
        workdir: Path | None = None, timeout: float | None = None, command: str = "", append: bool = False,
        **settings) -> dict:
    """Every (engine, size) row, local mode only up to ``local_cap``; the JSON (and its PNG) rewritten after each.
    ``append``: add the rows to those of an existing ``out`` (e.g. a row run again), its command recorded."""
    work = Path(tempfile.mkdtemp(prefix="macstream-bench-store-", dir=workdir))
    command = command or "macstream bench store"
    if append and out.exists():
        result = json.loads(out.read_text())
        result["how"].setdefault("commands", [result["how"]["command"]]).append(command)
    else:
        result = {"how": {"command": command, "method": __doc__.split("\n\n", 1)[1].strip(),
                          "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "local_cap": local_cap,
                          "k": settings.get("k", 4), "settings": settings,
                          "date": datetime.now(UTC).isoformat(timespec="seconds")},
                  "rows": []}
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for engine in engines:  # every Edge size first: the local-mode rows are the slow ones
            for n in points:
                if engine == "local" and n > local_cap:
                    continue
                print(f"store bench: {engine} at {n} windows", file=sys.stderr, flush=True)
                row = _child(engine, n, work / f"{engine}-{n}", settings, timeout)
                print(json.dumps(row), file=sys.stderr, flush=True)
                result["rows"].append(row)
                out.write_text(json.dumps(result, indent=2))
                plot(result, out.with_suffix(".png"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def table(result: dict) -> str:
    lines = ["| engine | windows | windows/s | write p99 / max ms | query p50 / p99 ms: none, tenant, since, "
             "tenant+since | engine p50 / p99 ms | recall@k | open s | RSS MB (anon) | disk MB | bytes/window |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['points']} | error: {r['error']} |" + "  |" * 8)
            continue
        q = ", ".join(f"{r['query_by_filter'][f]['p50_ms']:.1f} / {r['query_by_filter'][f]['p99_ms']:.1f}"
                      for f in FILTERS)
        lines.append(f"| {r['engine']} | {r['points']} | {r['upserts_per_s']:.0f} | {r['write_p99_ms']:.0f} / "
                     f"{r['write_max_ms']:.0f} | {q} | {r['engine_p50_ms']:.1f} / {r['engine_p99_ms']:.1f} | "
                     f"{r['recall_at_k']:.2f} | {r['open_s']:.2f} | {r['rss_mb']:.0f} ({r['rss_anon_mb']:.0f}) | "
                     f"{r['disk_mb']:.0f} | {r['bytes_per_window']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":  # one row, in the process `run` starts for it: the JSON of measure's arguments
    _a = json.loads(sys.argv[1])
    print(json.dumps(measure(_a["engine"], _a["points"], Path(_a["path"]), **_a["settings"])))
