"""Archive backfill, export and import end to end: real Ray (Ray Data reading, the ingest encoder actors), the real
embedded store (Qdrant Edge, owned by its actor), the tiny checkpoint, a real broker for the live-topic test, and the
CLI as a subprocess for the kill-and-resume test.

Expected store contents are derived from the archive's rows (last valid row per document wins), never hard-coded
counts of what the code happened to do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")

from pipeline.cluster import init_ray  # noqa: E402
from pipeline.config import BackfillConfig, IngestConfig  # noqa: E402
from pipeline.memory_export import ExportFormatError, VersionMismatch, export_collection, import_file, stored_documents  # noqa: E402
from pipeline.model.mac import checkpoint_identity  # noqa: E402
from pipeline.schemas import Document  # noqa: E402
from pipeline.store import StoreBusy, collection_name, open_store  # noqa: E402
from pipeline.store.actor import connect_store  # noqa: E402
from workers import kafka_io  # noqa: E402
from workers.archive import read_dead_letters  # noqa: E402
from workers.backfill import BackfillJob  # noqa: E402
from workers.broker import LocalBroker  # noqa: E402
from workers.messages import content_hash  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
D_ENC = 384  # MiniLM, the tiny checkpoint's encoder
T0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
COLUMNS = ["id", "text", "title", "published_at", "op"]


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def _row(doc_id, text, title=None, hours=0, op=None) -> dict:
    return {"id": doc_id, "text": text, "title": title, "published_at": T0 + timedelta(hours=hours), "op": op}


def _doc(row: dict) -> Document:
    return Document.model_validate({k: v for k, v in row.items() if k != "op" and v is not None})


def _write_parquet(path: Path, rows: list[dict], extra: dict | None = None) -> None:
    table = pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("text", pa.string()),
                                                         ("title", pa.string()),
                                                         ("published_at", pa.timestamp("us", tz="UTC")),
                                                         ("op", pa.string())]))
    for name, values in (extra or {}).items():
        table = table.append_column(name, pa.array(values))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _backfill(checkpoint, store, source, **kw) -> dict:
    cfg = BackfillConfig(source=str(source), store=str(store), checkpoint=str(checkpoint), **({"batch_size": 4} | kw))
    return BackfillJob(cfg, progress=False).start().run()


def _contents(store, collection) -> dict[str, tuple[Document, str, int]]:
    """id → (document, stored content hash, chunks), read back completely (every point the store counts)."""
    return {d.id: (d, h, len(cs)) for d, h, cs in stored_documents(store, collection)}


# ---- the archive: good, duplicate, updated and bad rows ----------------------------------------------------------
@pytest.fixture(scope="module")
def archive(cluster, tiny_checkpoint, tmp_path_factory):
    """A store that held three documents before, then a directory archive of two Parquet files backfilled into it.
    Returns (store location, report, dead-letter path, expected {id: Document}, expected dead letters)."""
    root = tmp_path_factory.mktemp("archive")
    store = root / "store"
    before = [_row("keep", "Keep: the harbour opened a second pier in May.", "Pier", 1),
              _row("edit", "Edit: the old version of the museum story.", "Museum", 2),
              _row("gone", "Gone: a story that the archive retracts.", "Retracted", 3)]
    _write_parquet(root / "before.parquet", before)
    first = _backfill(tiny_checkpoint, store, root / "before.parquet")
    assert first["upserted"] == 3 and first["dead_lettered"] == 0 and first["dead_letter_file"] is None

    good = [_row(f"g{i}", f"Good {i}: the city of Town{i} elected Mayor{i} by {i + 40} votes.", f"Vote {i}", 10 + i)
            for i in range(5)]
    updated_g1 = _row("g1", "Good 1, corrected: Mayor1 won by a recount of 51 votes.", "Vote 1 (corrected)", 30)
    edit_v2 = _row("edit", "Edit: the museum reopened with a new wing on 3 June.", "Museum", 31)
    rows_a = [*good, dict(good[0]), updated_g1,  # an exact duplicate; a later version of g1
              dict(before[0]),  # what the store already holds
              edit_v2,  # a new version of a stored document
              {"id": "gone", "text": None, "title": None, "published_at": None, "op": "delete"},
              _row("no-text", None, "Nothing", 40), _row("blank", "   ", "Blank", 41),  # missing_text x2
              _row(None, "A row without an id.", None, 42),  # missing_id
              _row("merge", "An unknown operation.", None, 43, op="merge"),  # unknown_op
              _row("huge", "x" * 3000, None, 44)]  # oversize (limit below)
    _write_parquet(root / "src" / "part-0.parquet", rows_a)
    rows_b = [_row("h0", "A row of a file with a column no document has.", None, 50)]
    _write_parquet(root / "src" / "part-1.parquet", rows_b, extra={"category": ["sports"]})
    (root / "src" / "_SUCCESS").write_text("")  # a marker file, skipped
    dl = root / "dead.parquet"
    report = _backfill(tiny_checkpoint, store, root / "src", dead_letter=str(dl), max_message_bytes=2048, workers=2)

    expected = {r["id"]: _doc(r) for r in [before[0], good[0], updated_g1, *good[2:], edit_v2]}
    dead = {("no-text", "missing_text"), ("blank", "missing_text"), (None, "missing_id"), ("merge", "unknown_op"),
            ("huge", "oversize"), ("h0", "invalid_document")}
    return str(store), report, dl, expected, dead, len(rows_a) + len(rows_b)


def test_archive_gives_exactly_the_expected_store_and_dead_letters(archive, tiny_checkpoint):
    store_loc, report, dl, expected, dead, n_rows = archive
    collection = collection_name(checkpoint_identity(tiny_checkpoint)[0])
    contents = _contents(connect_store(store_loc), collection)
    assert set(contents) == set(expected)  # "gone" deleted, no bad row, no superseded version
    for doc_id, doc in expected.items():
        stored_doc, stored_hash, _ = contents[doc_id]
        assert stored_doc == doc and stored_hash == content_hash(doc), doc_id
    # encoded: g0..g4 (g1 once, its last version) and the new version of "edit"; not "keep" nor the duplicate of g0
    assert report["upserted"] == len(expected) - 1
    assert report["unchanged"] == 2 and report["superseded"] == 1 and report["deleted"] == 1
    assert report["records"] == n_rows and report["complete"] is True
    assert report["chunks_written"] == sum(contents[d][2] for d in expected if d != "keep")
    rows = read_dead_letters(str(dl))
    assert {(r["id"], r["kind"]) for r in rows} == dead and len(rows) == len(dead)
    assert report["dlq_by_kind"] == {k: sum(1 for _, kk in dead if kk == k) for _, k in dead}
    assert all(r["stage"] == "parse" and r["reason"] and r["value"] for r in rows)
    by_id = {r["id"]: r for r in rows}
    assert Path(by_id["h0"]["source"]).name == "part-1.parquet" and b"sports" in by_id["h0"]["value"]
    assert Path(by_id["merge"]["source"]).name == "part-0.parquet"


def test_a_rerun_encodes_nothing_and_rewrites_the_same_dead_letters(archive, tiny_checkpoint, tmp_path):
    store_loc, first, dl, expected, dead, n_rows = archive
    src = Path(first["source"])
    again = _backfill(tiny_checkpoint, store_loc, src, dead_letter=str(tmp_path / "dl.parquet"), max_message_bytes=2048)
    assert again["upserted"] == 0 and again["records"] == n_rows and again["superseded"] == 1
    assert again["unchanged"] == len(expected) + 1  # every stored winner, plus the duplicate row
    assert {(r["id"], r["kind"]) for r in read_dead_letters(again["dead_letter_file"])} == dead


def test_jsonl_lines_are_validated_like_topic_messages(cluster, tiny_checkpoint, tmp_path):
    lines = [json.dumps({"id": "j1", "text": "The ferry to the island runs twice a day from June."}).encode(),
             b"{not json",
             b"[1, 2, 3]",
             b"",  # blank lines are not rows
             json.dumps({"id": "j2", "text": "The library extends its hours in winter.", "op": "upsert"}).encode(),
             "{\"id\": \"j3\", \"text\": \"caf\xe9\"}".encode("latin-1"),  # not UTF-8
             json.dumps({"id": "j4", "text": "x", "title": 7}).encode()]
    src = tmp_path / "news.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    report = _backfill(tiny_checkpoint, tmp_path / "store", f"file://{src}")  # a URI: pyarrow's filesystems
    rows = read_dead_letters(report["dead_letter_file"])
    assert {(r["line"], r["kind"]) for r in rows} == {(2, "invalid_json"), (3, "wrong_type"), (6, "invalid_json"),
                                                      (7, "invalid_document")}
    assert {r["value"] for r in rows} == {lines[1], lines[2], lines[5], lines[6]}  # raw, byte for byte
    assert report["upserted"] == 2 and report["records"] == 6
    Path(report["dead_letter_file"]).unlink()


@ray.remote(num_cpus=1)
class _Hog:
    def ping(self) -> int:
        return 1


def test_backfill_needs_no_free_cpu_to_read(cluster, tiny_checkpoint, tmp_path):
    """With the encoder holding the last free CPU, both passes over the source still run: every Ray Data task of the
    plan reserves no CPU (a projection or listing task reserving one waited forever once the encoders held every
    core)."""
    import threading

    free = ray.available_resources().get("CPU", 0)
    hog = _Hog.options(num_cpus=free - 0.5).remote()  # the encoder gets the last 0.5 (fitted to the cluster)
    ray.get(hog.ping.remote())
    docs = [Document(id=f"c{i}", text=f"Bridge {i} reopens after repairs in week {i}.") for i in range(6)]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(d.model_dump_json() + "\n" for d in docs))
    result: dict = {}
    try:
        run = threading.Thread(target=lambda: result.update(_backfill(tiny_checkpoint, tmp_path / "store", src)),
                               daemon=True)
        run.start()
        run.join(timeout=300)
        assert not run.is_alive(), "the backfill waited for a CPU it will never get"
    finally:
        ray.kill(hog)
    assert result["upserted"] == len(docs) and result["complete"]


def test_bad_sources_fail_in_one_line_before_anything_starts(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        BackfillJob(BackfillConfig(source=str(tmp_path / "nope.parquet")))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="no .parquet or .jsonl file"):
        BackfillJob(BackfillConfig(source=str(tmp_path)))
    (tmp_path / "a.jsonl").write_text("{}\n")
    _write_parquet(tmp_path / "b.parquet", [_row("x", "y")])
    with pytest.raises(ValueError, match="both Parquet and JSONL"):
        BackfillJob(BackfillConfig(source=str(tmp_path)))


# ---- export / import -----------------------------------------------------------------------------------------------
def _same_bits(a: pa.Table, b: pa.Table, exact_vectors: bool = True) -> None:
    """Every column equal, modulations bit for bit; retrieval vectors too unless ``exact_vectors`` is False (a
    qdrant-client collection renormalises the cosine vectors it stores: equal up to float32 rounding)."""
    assert a.column_names == b.column_names and a.num_rows == b.num_rows
    for name in a.column_names:
        if name in ("vector", "modulation"):
            dt = np.uint32 if name == "vector" else np.uint16
            def flat(t, name=name):
                col = t.column(name).combine_chunks().flatten()
                return (col.flatten() if name == "modulation" else col).to_numpy()
            if name == "vector" and not exact_vectors:
                assert np.allclose(flat(a), flat(b), rtol=0, atol=1e-6), name
                continue
            assert np.array_equal(flat(a).view(dt), flat(b).view(dt)), name
        else:
            assert a.column(name).equals(b.column(name)), name


def test_export_then_import_round_trips_bit_exact(archive, tiny_checkpoint, tmp_path):
    store_loc, _, _, expected, _, _ = archive
    version, model_id = checkpoint_identity(tiny_checkpoint)
    collection = collection_name(version)
    source = connect_store(store_loc)
    first = export_collection(source, collection, tmp_path / "memory.parquet")
    assert first["documents"] == len(expected) and first["checkpoint"] == version
    table = pq.read_table(tmp_path / "memory.parquet")
    meta = table.schema.metadata
    assert meta[b"macstream.checkpoint"] == version.encode() and meta[b"macstream.format"] == b"1"
    assert table.schema.field("modulation").type.value_type.value_type == pa.float16()
    assert set(table.column("id").to_pylist()) == set(expected)

    # the embedded engine, the numpy backend and qdrant-client (the server path's code and collection layout)
    for target in (str(tmp_path / "edge-copy"), "memory", ":memory:"):
        store = connect_store(target) if "memory" not in target else open_store(target)
        done = import_file(store, tmp_path / "memory.parquet", version, model_id)
        assert done["documents"] == len(expected) and done["points"] == table.num_rows
        export_collection(store, collection, tmp_path / "again.parquet")
        _same_bits(table, pq.read_table(tmp_path / "again.parquet"), exact_vectors=target != ":memory:")
        assert _contents(store, collection) == _contents(source, collection)
        q = np.asarray(table.column("vector").combine_chunks().flatten().to_numpy()[:D_ENC]).reshape(1, -1)
        a, b = source.search(collection, q, 3)[0], store.search(collection, q, 3)[0]
        assert [(h.document.id, h.chunk.modulation.chunk) for h in a] == \
               [(h.document.id, h.chunk.modulation.chunk) for h in b]


def test_import_refuses_another_checkpoint_and_damaged_files(archive, tiny_checkpoint, tmp_path):
    store_loc, _, _, _, _, _ = archive
    version, model_id = checkpoint_identity(tiny_checkpoint)
    export_collection(connect_store(store_loc), collection_name(version), tmp_path / "m.parquet")
    target = open_store("memory")
    with pytest.raises(VersionMismatch) as err:
        import_file(target, tmp_path / "m.parquet", "0123456789ab", model_id)
    assert "\n" not in str(err.value) and version in str(err.value)
    assert target.collections() == []  # nothing written
    t = pq.read_table(tmp_path / "m.parquet")
    chunks = t.column("chunk").to_pylist()
    cut = t.set_column(t.schema.get_field_index("chunk"), t.schema.field("chunk"),
                       pa.array([chunks[0] + 1, *chunks[1:]], pa.int32()))  # a document without its chunk 0
    pq.write_table(cut, tmp_path / "cut.parquet")
    with pytest.raises(ExportFormatError, match="where 0 was expected"):
        import_file(target, tmp_path / "cut.parquet", version, model_id)
    pq.write_table(t.replace_schema_metadata({}), tmp_path / "plain.parquet")
    with pytest.raises(ExportFormatError, match="not a macstream memory export"):
        import_file(target, tmp_path / "plain.parquet", version, model_id)
    assert target.collections() == []
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "macstream.cli", "import", str(tmp_path / "m.parquet"), "--store",
                          "memory"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # shipped ckpt
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().count("\n") == 0 and "holds modulations of checkpoint" in run.stderr


# ---- crash and resume ----------------------------------------------------------------------------------------------
def _wait_free(location: str, timeout: float = 60.0) -> None:
    """Until no process holds the embedded store (a killed owner's lock goes with its process)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            open_store(location).close()
            return
        except StoreBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_killed_mid_backfill_then_rerun_loses_and_duplicates_nothing(tiny_checkpoint, tmp_path):
    n = 500
    docs = [Document(id=f"k{i}", title=f"Budget {i}", text=f"Council {i} approved budget line {i * 7} for roads.")
            for i in range(n)]
    src = tmp_path / "archive.jsonl"
    src.write_text("".join(d.model_dump_json(exclude_none=True) + "\n" for d in docs) + "{broken\n")
    store, dl = str(tmp_path / "store"), tmp_path / "dead.parquet"
    cmd = [sys.executable, "-m", "macstream.cli", "backfill", str(src), "--store", store, "--checkpoint",
           str(tiny_checkpoint), "--batch-size", "1", "--max-in-flight", "1", "--dead-letter", str(dl)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: the driver and the cluster it starts
    try:
        for line in proc.stderr:  # progress lines: "backfill: R/N rows, W written, ..."
            if " written" in line and int(line.split(" written")[0].rsplit(" ", 1)[1]) > 0:
                break
        else:
            pytest.fail(f"backfill ended before writing anything: {proc.wait()}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    _wait_free(store)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["complete"] and report["records"] == n + 1
    assert report["unchanged"] > 0, "nothing was stored before the kill: the test did not kill mid-way"
    assert report["upserted"] > 0, "everything was stored before the kill: the test did not kill mid-way"
    assert report["upserted"] + report["unchanged"] == n
    s = open_store(store)
    try:
        contents = _contents(s, collection_name(checkpoint_identity(tiny_checkpoint)[0]))  # checks every chunk
        assert s.counts(collection_name(checkpoint_identity(tiny_checkpoint)[0]))["documents"] == n
    finally:
        s.close()
    assert set(contents) == {d.id for d in docs}
    assert all(contents[d.id][0] == d and contents[d.id][1] == content_hash(d) for d in docs)
    assert [(r["line"], r["kind"]) for r in read_dead_letters(str(dl))] == [(n + 1, "invalid_json")]


# ---- then the live topic -----------------------------------------------------------------------------------------
def test_a_document_backfilled_then_seen_on_the_topic_is_not_encoded_again(cluster, tiny_checkpoint, tmp_path):
    from workers.ingest import IngestJob

    docs = [Document(id=f"t{i}", text=f"Port {i} handled {i * 1000} containers in April.", published_at=T0)
            for i in range(8)]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(d.model_dump_json(exclude_none=True) + "\n" for d in docs))
    store = str(tmp_path / "store")
    assert _backfill(tiny_checkpoint, store, src)["upserted"] == len(docs)
    changed = docs[-1].model_copy(update={"text": "Port 7 handled 7500 containers in April, a record."})
    with LocalBroker(log_dir=tmp_path / "broker") as broker:
        kafka_io.ensure_topic(broker.bootstrap, "live", 2)
        kafka_io.produce(broker.bootstrap, "live", [*docs[:-1], changed])
        cfg = IngestConfig(bootstrap_servers=broker.bootstrap, topic="live", group_id="g-live", store=store,
                           checkpoint=str(tiny_checkpoint), exit_when_idle=4.0, batch_size=4)
        job = IngestJob(cfg, partitions=2, progress=False).start()
        deadline = time.monotonic() + 240
        while not job.idle():
            assert time.monotonic() < deadline, job.snapshot()
            job.supervise()
            time.sleep(0.3)
        snap = job.stop()
    assert snap["records"] == len(docs) and snap["unchanged"] == len(docs) - 1 and snap["upserted"] == 1
    stored = connect_store(store).content_hashes(collection_name(checkpoint_identity(tiny_checkpoint)[0]),
                                                 [changed.id])
    assert stored == {changed.id: content_hash(changed)}
