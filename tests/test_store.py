"""Store congruence: the same operations through every backend give the same results (in the style of
qdrant-client's own congruence tests), plus the semantics each backend must keep.

Backends: the in-memory store (numpy, exact), the embedded default (Qdrant Edge, with and without its segment
optimizers having run) and qdrant-client: ":memory:" and local mode on a directory. No Qdrant server can be run on this
machine, so qdrant-client's local mode stands in for the server path (the same client code and collection layout: only
the transport differs); against a server, add ``QdrantStore("http://HOST:6333")`` to ``BACKENDS``."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from pipeline.modulation import Modulation
from pipeline.modulation_codec import codec as codec_for
from pipeline.schemas import Document, EncodedChunk
from pipeline.store import SearchFilter, Store, StoreBusy, StoreFormatError, collection_name, open_store, point_id
from pipeline.store.edge import EdgeStore
from pipeline.store.inmemory import InMemoryStore
from pipeline.store.qdrant import QdrantStore

COLL = collection_name("v1")
DIM = 8


def _chunks(doc_id: str, seeds: list[int], version: str = "v1") -> list[EncodedChunk]:
    out = []
    for i, s in enumerate(seeds):
        v = np.random.default_rng(s).normal(size=DIM).astype(np.float32)
        tokens = np.random.default_rng(s + 1000).normal(size=(3, 4)).astype(np.float16)
        out.append(EncodedChunk(Modulation(doc_id, i, len(seeds), tokens, "lm|enc", version), v / np.linalg.norm(v)))
    return out


def _doc(i: int, **kw) -> Document:
    base = dict(id=f"d{i}", text=f"text {i}", published_at=datetime(2024, 1, 1 + i, tzinfo=UTC),
                source="wire" if i % 2 else "blog", tenant="t1" if i % 3 else "t2")
    return Document(**(base | kw))


def _fill(store: Store) -> None:
    for i in range(12):
        store.upsert(COLL, _doc(i), f"h{i}", _chunks(f"d{i}", [i] if i % 4 else [i, 100 + i]))


BACKENDS = {"memory": lambda tmp: InMemoryStore(),
            "edge": lambda tmp: EdgeStore(str(tmp / "edge"), codec="fp16"),
            # the optimizers (index building, segment merging) after every write
            "edge-optimized": lambda tmp: EdgeStore(str(tmp / "edge-opt"), codec="fp16", optimize_every=1),
            # compact modulations (int8, int4, int4z, int4zw): equal to the others once the reference's
            # modulations are coded the same way (see _coded)
            "edge-int8": lambda tmp: EdgeStore(str(tmp / "edge-int8"), codec="int8"),
            "edge-int4": lambda tmp: EdgeStore(str(tmp / "edge-int4"), codec="int4"),
            "edge-int4z": lambda tmp: EdgeStore(str(tmp / "edge-int4z"), codec="int4z"),
            "edge-int4zw": lambda tmp: EdgeStore(str(tmp / "edge-int4zw"), codec="int4zw"),
            "qdrant-memory": lambda tmp: QdrantStore(":memory:", codec="fp16"),
            "qdrant-path-int4zw": lambda tmp: QdrantStore(str(tmp / "q")),  # the default codec
            "qdrant-memory-int8": lambda tmp: QdrantStore(":memory:", codec="int8"),
            "qdrant-memory-int4": lambda tmp: QdrantStore(":memory:", codec="int4"),
            "qdrant-memory-int4z": lambda tmp: QdrantStore(":memory:", codec="int4z"),
            "qdrant-memory-int4zw": lambda tmp: QdrantStore(":memory:", codec="int4zw"),
            # a collection of the layout before native modulations (base64 in the payload): read and written as it was
            "qdrant-legacy": lambda tmp: _legacy(QdrantStore(":memory:"))}


def _legacy(store: QdrantStore, collection: str = COLL) -> QdrantStore:
    """``store`` with ``collection`` created as the releases before native modulations did: one unnamed vector."""
    from qdrant_client import models as m

    store.client.create_collection(collection, vectors_config=m.VectorParams(size=DIM, distance=m.Distance.COSINE))
    return store


@pytest.fixture(params=list(BACKENDS))
def store(request, tmp_path) -> Store:
    s = BACKENDS[request.param](tmp_path)
    yield s
    s.close()


def _run_ops(store: Store) -> dict:
    """A fixed script of writes and reads; returns everything observable."""
    _fill(store)
    out = {"counts0": store.counts(COLL)}
    store.upsert(COLL, _doc(4, text="new"), "h4b", _chunks("d4", [44]))  # 2 chunks → 1: the tail must go
    store.upsert(COLL, _doc(5), "h5", _chunks("d5", [5]))  # redelivery: no duplicate
    out["deleted"] = [store.delete(COLL, "d7"), store.delete(COLL, "d7"), store.delete(COLL, "zz")]
    out["counts1"] = store.counts(COLL)
    out["hashes"] = store.content_hashes(COLL, ["d4", "d5", "d7", "nope"])
    q = np.stack([c.vector for c in _chunks("q", [3, 100, 8])])
    flts = [None, SearchFilter(source="wire"), SearchFilter(tenant="t2"),
            SearchFilter(since=datetime(2024, 1, 4), until=datetime(2024, 1, 9, tzinfo=UTC)),
            SearchFilter(tenant="nobody")]
    out["search"] = [[[(h.document.id, h.chunk.modulation.chunk, round(h.score, 4)) for h in hits]
                      for hits in store.search(COLL, q, 5, f)] for f in flts]
    hit = store.search(COLL, q[:1], 1)[0][0]
    out["payload"] = (hit.document.model_dump(), hit.chunk.modulation.tokens.tolist(), hit.chunk.modulation.checkpoint)
    out["collections"] = store.collections()
    out["newest"] = (store.newest_published(COLL), store.newest_published("macstream-none"))
    out["tenant"] = (store.counts(COLL, "t2"), store.counts(COLL, "nobody"), store.newest_published(COLL, "t2"),
                     store.newest_published(COLL, "nobody"), store.counts("macstream-none", "t2"))
    out["absent"] = (store.counts("macstream-none"), store.search("macstream-none", q, 3),
                     store.content_hashes("macstream-none", ["d1"]), store.document_ids("macstream-none"),
                     store.documents("macstream-none", ["d1"]))
    # the listing an export pages through: ids sorted, documents whole (every chunk, bit-exact), absent ids skipped
    out["ids"] = store.document_ids(COLL)
    out["documents"] = [(d.model_dump(), h, [(c.modulation.chunk, c.modulation.n_chunks, c.modulation.tokens.tobytes(),
                                              np.round(c.vector, 5).tolist()) for c in cs])  # server: renormalised
                        for d, h, cs in store.documents(COLL, ["d0", "d7", "d4", "nope", "d10"])]
    out["iterated"] = [d.id for d, _, _ in store.iter_documents(COLL, batch=4)]
    return out


def _coded(result: dict, codec: str) -> dict:
    """``result`` of _run_ops with every modulation it holds passed through ``codec`` (encode, decode): what a store
    coding with it must return."""
    c = codec_for(codec)
    doc, tokens, checkpoint = result["payload"]
    documents = [(d, h, [(i, n, c.round_trip(np.frombuffer(b, np.float16).reshape(-1, 4)).tobytes(), v)
                         for i, n, b, v in cs]) for d, h, cs in result["documents"]]
    return result | {"payload": (doc, c.round_trip(np.array(tokens, np.float16)).tolist(), checkpoint),
                     "documents": documents}


def test_backends_are_congruent(tmp_path) -> None:
    results = {}
    for name, make in BACKENDS.items():
        s = make(tmp_path)
        results[name] = _run_ops(s)
        s.close()
    ref = results["memory"]
    assert ref["counts0"] == {"documents": 12, "chunks": 15}
    assert ref["counts1"] == {"documents": 11, "chunks": 13}
    assert ref["deleted"] == [True, False, False]
    assert ref["hashes"] == {"d4": "h4b", "d5": "h5"}
    assert ref["ids"] == ref["iterated"] == sorted(f"d{i}" for i in range(12) if i != 7)
    assert [(d["id"], h, [c[:2] for c in cs]) for d, h, cs in ref["documents"]] == \
        [("d0", "h0", [(0, 2), (1, 2)]), ("d4", "h4b", [(0, 1)]), ("d10", "h10", [(0, 1)])]
    assert ref["documents"][0][2][1][2] == _chunks("d0", [0, 100])[1].modulation.tokens.tobytes()
    assert ref["newest"] == (datetime(2024, 1, 12, tzinfo=UTC), None)
    # a tenant's view: t2 owns d0 (2 chunks), d3, d6, d9; nothing of the others leaks into its counts
    assert ref["tenant"] == ({"documents": 4, "chunks": 5}, {"documents": 0, "chunks": 0},
                             datetime(2024, 1, 10, tzinfo=UTC), None, {"documents": 0, "chunks": 0})
    for name, r in results.items():
        codec = name.rsplit("-", 1)[-1]
        assert r == (_coded(ref, codec) if codec in ("int8", "int4", "int4z", "int4zw") else ref), name
    assert results["edge-int8"]["payload"][1] != ref["payload"][1]  # the compact stores did code them


def test_filters_and_tenant_isolation(store: Store) -> None:
    _fill(store)
    q = np.stack([c.vector for c in _chunks("q", [1, 2, 3])])
    for hits in store.search(COLL, q, 20, SearchFilter(tenant="t2")):
        assert hits and {h.document.tenant for h in hits} == {"t2"}
    since = datetime(2024, 1, 6, tzinfo=UTC)
    for hits in store.search(COLL, q, 20, SearchFilter(since=since, source="wire")):
        assert hits and all(h.document.published_at >= since and h.document.source == "wire" for h in hits)


@pytest.mark.parametrize("location", ["edge", "local:q"])
def test_persistent_path_survives_reopen(tmp_path, location) -> None:
    location = str(tmp_path / location) if location == "edge" else "local:" + str(tmp_path / "q")
    s = open_store(location)
    _fill(s)
    s.close()
    s = open_store(location)
    assert s.counts(COLL) == {"documents": 12, "chunks": 15}
    with pytest.raises(StoreBusy, match="another process"):
        open_store(location)
    s.close()
    s = open_store(location)  # closing released it
    assert s.stats() == {COLL: {"documents": 12, "chunks": 15}}
    s.close()


def test_upsert_refuses_inconsistent_chunks(store: Store) -> None:
    with pytest.raises(ValueError, match="no chunks"):
        store.upsert(COLL, _doc(1), "h", [])
    with pytest.raises(ValueError, match="belong"):
        store.upsert(COLL, _doc(1), "h", _chunks("d2", [1]))
    with pytest.raises(ValueError, match="in order"):
        store.upsert(COLL, _doc(1), "h", _chunks("d1", [1, 2])[::-1])


def test_filter_validation() -> None:
    with pytest.raises(ValueError, match="after until"):
        SearchFilter(since=datetime(2024, 2, 1), until=datetime(2024, 1, 1))


def test_every_backend_keeps_the_store_interface() -> None:
    """A backend (or the Ray-actor proxy) whose method drops a parameter of the interface fails at call time in
    production (a tenant-scoped count reaching the proxy was a 500): check the signatures here."""
    import inspect

    from pipeline.store.actor import RemoteStore

    names = [n for n, f in vars(Store).items() if callable(f) and not n.startswith("_")]
    assert {"counts", "newest_published", "search", "upsert"} <= set(names)
    for cls in (InMemoryStore, EdgeStore, QdrantStore, RemoteStore):
        for name in names:
            want = list(inspect.signature(getattr(Store, name)).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters) == want, (cls.__name__, name)


def test_open_store_picks_the_backend_by_location(tmp_path) -> None:
    kinds = {"memory": InMemoryStore, ":memory:": QdrantStore, str(tmp_path / "e"): EdgeStore,
             "local:" + str(tmp_path / "l"): QdrantStore}
    for location, cls in kinds.items():
        s = open_store(location)
        try:
            assert type(s) is cls, location
        finally:
            s.close()


def _old_store(path) -> None:
    """A directory written by the old embedded engine (qdrant-client local mode) with data in it."""
    s = _legacy(QdrantStore(str(path)))
    _fill(s)
    s.close()


def test_a_store_of_the_old_format_is_refused_with_how_to_re_encode_never_read_as_empty(tmp_path, capsys) -> None:
    from macstream.cli import main
    from pipeline.store.actor import ensure_store_free

    old = tmp_path / "old"
    _old_store(old)
    before = sorted(p.relative_to(old) for p in old.rglob("*"))
    for attempt in (lambda: EdgeStore(str(old)), lambda: open_store(str(old)), lambda: ensure_store_free(str(old))):
        with pytest.raises(StoreFormatError) as err:
            attempt()
        msg = str(err.value)
        assert "old format" in msg and "macstream replay" in msg and "--from earliest" in msg and f"local:{old}" in msg
        assert f"macstream migrate-store --from {old}" in msg
    with pytest.raises(SystemExit) as code:  # `macstream stats` says so in one line, exit 2
        main(["stats", "--store", str(old)])
    assert code.value.code == 2 and "macstream replay" in capsys.readouterr().err
    assert sorted(p.relative_to(old) for p in old.rglob("*")) == before  # nothing written into it
    s = open_store(f"local:{old}")  # the old engine still reads it, all of it
    try:
        assert s.counts(COLL) == {"documents": 12, "chunks": 15}
    finally:
        s.close()
    main(["stats", "--store", f"local:{old}"])
    assert json.loads(capsys.readouterr().out)["collections"] == {COLL: {"documents": 12, "chunks": 15}}


def test_a_directory_that_is_not_a_store_is_refused(tmp_path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(StoreFormatError, match="not a macstream store"):
        EdgeStore(str(tmp_path / "x"))
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "macstream-store.json").write_text('{"engine": "qdrant-edge", "format": 99}')
    with pytest.raises(StoreFormatError, match="format"):
        EdgeStore(str(tmp_path / "y"))
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"


def test_modulations_are_stored_natively_and_read_back_bit_exact(tmp_path) -> None:
    """A real-shape modulation (48 x 576 float16, including subnormals, signed zeros and the largest finite values)
    comes back from a search bit for bit; it lives in the engine's float16 multivector field, not in the payload."""
    rng = np.random.default_rng(7)
    tokens = rng.normal(size=(48, 576)).astype(np.float16)
    tokens.flat[:6] = np.array([0.0, -0.0, 6.1e-5, -5.96e-8, 65504.0, -65504.0], np.float16)
    v = rng.normal(size=384).astype(np.float32)
    chunk = EncodedChunk(Modulation("d0", 0, 1, tokens, "lm|enc", "v1"), v / np.linalg.norm(v))
    s = EdgeStore(str(tmp_path / "e"), codec="fp16")
    try:
        s.upsert(COLL, _doc(0), "h", [chunk])
        w = rng.normal(size=384).astype(np.float32)  # a second document, of fewer tokens, does not disturb it
        short = EncodedChunk(Modulation("d1", 0, 1, tokens[:5], "lm|enc", "v1"), w / np.linalg.norm(w))
        s.upsert(COLL, _doc(1), "h1", [short])
        hit = s.search(COLL, chunk.vector[None], 1)[0][0]
        got = hit.chunk.modulation.tokens
        assert got.dtype == np.float16 and got.shape == (48, 576)
        assert np.array_equal(got.view(np.uint16), tokens.view(np.uint16))
        assert s.search(COLL, chunk.vector[None], 2)[0][1].chunk.modulation.tokens.shape == (5, 576)
        shards = s._get(COLL)
        pid = point_id("v1", "d0", 0)
        indexed = shards.index.retrieve([pid], with_payload=True, with_vector=True)[0]
        assert "tokens" not in indexed.payload and set(indexed.vector) == {"retrieval"}  # not in the payload
        stored = shards.modulations.retrieve([pid], with_payload=True, with_vector=True)[0]
        assert set(stored.vector) == {"modulation"} and len(stored.vector["modulation"]) == 48
    finally:
        s.close()


@pytest.mark.parametrize("codec", ["int8", "int4", "int4z", "int4zw"])
def test_compact_modulations_are_native_uint8_within_half_a_scale_and_stable(tmp_path, codec) -> None:
    """A compact collection stores uint8 codes as a multivector (d_LM columns for int8, d_LM/2 for int4 and int4z,
    d_LM/2 + 14 for int4zw) and one float16 scale per channel (int4z and int4zw: and d_LM/2 bytes of zero points;
    int4zw: and the 28 wide channels' indices, 56 bytes), nothing in the payload; every state
    comes back within half its channel's scale, short windows keep their length, and storing what was read back reads
    back the same bits (export → import is exact)."""
    rng = np.random.default_rng(3)
    tokens = (rng.normal(size=(48, 576)) * rng.uniform(0.05, 4.0, size=576)).astype(np.float16)
    v = rng.normal(size=384).astype(np.float32)
    chunk = EncodedChunk(Modulation("d0", 0, 1, tokens, "lm|enc", "v1"), v / np.linalg.norm(v))
    s = EdgeStore(str(tmp_path / "e"), codec=codec)
    try:
        s.upsert(COLL, _doc(0), "h", [chunk])
        w = rng.normal(size=384).astype(np.float32)
        s.upsert(COLL, _doc(1), "h1", [EncodedChunk(Modulation("d1", 0, 1, tokens[:5], "lm|enc", "v1"),
                                                    w / np.linalg.norm(w))])
        got = s.search(COLL, chunk.vector[None], 1)[0][0].chunk.modulation.tokens
        assert got.dtype == np.float16 and got.shape == (48, 576)
        stored = s._get(COLL).modulations.retrieve([point_id("v1", "d0", 0)], with_payload=True, with_vector=True)[0]
        rows, scale = np.array(stored.vector["modulation"]), np.array(stored.vector["scale"], np.float32)
        width = {"int8": 576, "int4zw": 288 + 14}.get(codec, 288)
        assert rows.shape == (48, width) and scale.shape == (576,) and not stored.payload
        assert set(stored.vector) == {"modulation", "scale", *(["zero"] if codec.startswith("int4z") else []),
                                      *(["wide"] if codec == "int4zw" else [])}
        assert rows.min() >= 0 and rows.max() <= 255 and np.array_equal(rows, np.rint(rows))
        err = np.abs(got.astype(np.float32) - tokens.astype(np.float32))
        assert (err <= scale / 2 + np.abs(tokens.astype(np.float32)) * 2**-10 + 1e-7).all()  # + float16 rounding
        assert 0 < err.max() and (scale > 0).all()
        assert np.array_equal(got, codec_for(codec).round_trip(tokens))
        assert s.search(COLL, w[None] / np.linalg.norm(w), 1)[0][0].chunk.modulation.tokens.shape == (5, 576)
        s.upsert(COLL, _doc(2), "h2", [EncodedChunk(Modulation("d2", 0, 1, got, "lm|enc", "v1"),
                                                    chunk.vector)])  # what was read back, stored again
        again = s.documents(COLL, ["d2"])[0].chunks[0].modulation.tokens
        assert np.array_equal(again.view(np.uint16), got.view(np.uint16))
        assert json.loads((tmp_path / "e" / "collections" / COLL / "codec.json").read_text()) == {"codec": codec}
    finally:
        s.close()


def test_a_format_1_store_reads_as_before_and_each_collection_keeps_its_codec(tmp_path) -> None:
    """A store written before codecs existed (format 1: float16, no codec.json) opens and answers unchanged; a
    compact collection created in it upgrades the marker (a format-1 reader must refuse it, not misread it); a
    collection keeps the codec it was created with, whatever the codec the store is opened with later."""
    root = tmp_path / "e"
    s = EdgeStore(str(root), codec="fp16")
    _fill(s)
    s.close()
    (root / "collections" / COLL / "codec.json").unlink()  # as format 1 wrote it
    (root / "macstream-store.json").write_text('{"engine": "qdrant-edge", "format": 1}')
    s = EdgeStore(str(root), codec="int4")
    try:
        assert s.counts(COLL) == {"documents": 12, "chunks": 15}
        got = s.documents(COLL, ["d1"])[0].chunks[0].modulation.tokens
        assert np.array_equal(got.view(np.uint16), _chunks("d1", [1])[0].modulation.tokens.view(np.uint16))
        assert json.loads((root / "macstream-store.json").read_text())["format"] == 1  # nothing compact yet
        s.upsert(collection_name("v2"), _doc(1), "h", _chunks("d1", [1], version="v2"))
        assert json.loads((root / "macstream-store.json").read_text()) == {"engine": "qdrant-edge", "format": 2}
    finally:
        s.close()
    s = EdgeStore(str(root), codec="int8")
    try:
        assert s._get(COLL).codec == "fp16" and s._get(collection_name("v2")).codec == "int4"
        s.upsert(COLL, _doc(30), "h30", _chunks("d30", [30]))  # an old collection stays float16
        assert np.array_equal(s.documents(COLL, ["d30"])[0].chunks[0].modulation.tokens,
                              _chunks("d30", [30])[0].modulation.tokens)
    finally:
        s.close()
    with pytest.raises(ValueError, match="expected one of int4zw, int8, int4z, int4, fp16"):
        EdgeStore(str(tmp_path / "other"), codec="int3")


def test_a_write_survives_a_process_that_dies_without_closing(tmp_path) -> None:
    """upsert returns once the write is in the WAL: a process killed right after (no close, no flush) loses nothing,
    and its death releases the directory."""
    import subprocess
    import sys

    code = ("import os, sys; sys.path.insert(0, os.getcwd()); from tests.test_store import _fill, COLL; "
            "from pipeline.store.edge import EdgeStore; s = EdgeStore(sys.argv[1]); _fill(s); "
            "print(s.counts(COLL), flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "e")], capture_output=True, text=True, timeout=120,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr[-2000:]
    s = EdgeStore(str(tmp_path / "e"))
    try:
        assert s.counts(COLL) == {"documents": 12, "chunks": 15}
        assert s.content_hashes(COLL, ["d3", "d11"]) == {"d3": "h3", "d11": "h11"}
    finally:
        s.close()


@pytest.mark.filterwarnings("ignore:Failed to obtain server version")
def test_a_server_url_carries_the_collections_layout() -> None:
    """`http://host:6333?shards=6&replicas=2` lays new collections out on a distributed Qdrant; anything else in the
    query is refused at the edge (the layout is applied when a collection is created: no server needed here)."""
    from pipeline.store.qdrant import ServerLayout

    url, layout = ServerLayout.from_url("http://qdrant-0:6333?shards=6&replicas=2&write_consistency=2")
    assert url == "http://qdrant-0:6333" and layout == ServerLayout(shards=6, replicas=2, write_consistency=2)
    assert ServerLayout.from_url("http://qdrant:6333") == ("http://qdrant:6333", ServerLayout())
    for bad in ("shard=6", "replicas=0", "replicas=1&write_consistency=2", "shards=six"):
        with pytest.raises(ValueError, match="server layout"):
            ServerLayout.from_url(f"http://qdrant:6333?{bad}")
    s = QdrantStore("http://127.0.0.1:9?shards=3&replicas=2")  # no server there: qdrant-client only warns
    try:
        assert s.layout == ServerLayout(shards=3, replicas=2)
    finally:
        s.close()


def test_macstream_stats_answers_as_before_on_the_embedded_store(tmp_path, capsys) -> None:
    from macstream.cli import main

    s = open_store(str(tmp_path / "e"))
    _fill(s)
    s.upsert(collection_name("v2"), _doc(1), "h", _chunks("d1", [1], version="v2"))  # a second checkpoint's
    s.close()
    main(["stats", "--store", str(tmp_path / "e")])
    out = json.loads(capsys.readouterr().out)
    assert out == {"store": str(tmp_path / "e"), "collections": {COLL: {"documents": 12, "chunks": 15},
                                                                 collection_name("v2"): {"documents": 1, "chunks": 1}}}


def test_a_collection_whose_creation_was_cut_short_is_created_again(tmp_path) -> None:
    """A process that died after creating a collection's modulation shard but before its index: the collection does
    not exist (the index is what makes points retrievable) and the next upsert reuses the modulations."""
    import shutil

    s = EdgeStore(str(tmp_path / "e"))
    s.upsert(COLL, _doc(1), "h1", _chunks("d1", [1]))
    s.close()
    shutil.rmtree(tmp_path / "e" / "collections" / COLL / "index")
    s = EdgeStore(str(tmp_path / "e"))
    try:
        assert s.counts(COLL) == {"documents": 0, "chunks": 0} and s.collections() == []
        _fill(s)
        assert s.counts(COLL) == {"documents": 12, "chunks": 15}
        assert s.search(COLL, _chunks("q", [1])[0].vector[None], 1)[0][0].document.id == "d1"
    finally:
        s.close()


def test_migrate_store_copies_the_old_format_without_re_encoding(tmp_path, capsys) -> None:
    """Every document, hash, retrieval vector and modulation of an old local-mode store lands in a new Edge store:
    the same counts, hashes, search results and bit-identical modulations; the old store is left as it was."""
    from macstream.cli import main

    old, new = tmp_path / "old", tmp_path / "new"
    _old_store(old)
    main(["migrate-store", "--from", str(old), "--to", str(new)])
    report = json.loads(capsys.readouterr().out)
    assert report["collections"] == {COLL: {"documents": 12, "chunks": 15, "incomplete": 0}}
    a, b = open_store(f"local:{old}"), open_store(str(new))
    try:
        assert type(b) is EdgeStore and a.stats() == b.stats()
        ids = [f"d{i}" for i in range(12)]
        assert a.content_hashes(COLL, ids) == b.content_hashes(COLL, ids) and len(a.content_hashes(COLL, ids)) == 12
        q = np.stack([c.vector for c in _chunks("q", [3, 100, 8])])
        for flt in (None, SearchFilter(tenant="t2"), SearchFilter(since=datetime(2024, 1, 6))):
            for ha, hb in zip(a.search(COLL, q, 15, flt), b.search(COLL, q, 15, flt)):
                assert [(h.document, h.chunk.modulation.chunk, round(h.score, 4)) for h in ha] == \
                       [(h.document, h.chunk.modulation.chunk, round(h.score, 4)) for h in hb]
                for x, y in zip(ha, hb):
                    assert np.array_equal(x.chunk.modulation.tokens.view(np.uint16),
                                          y.chunk.modulation.tokens.view(np.uint16))
    finally:
        a.close()
        b.close()
    for bad in ((new, tmp_path / "other"), (old, new)):  # not the old format; a destination that is not empty
        with pytest.raises(SystemExit):
            main(["migrate-store", "--from", str(bad[0]), "--to", str(bad[1])])


def test_export_streams_document_batches_and_refuses_a_collection_that_changed_meanwhile(tmp_path) -> None:
    """`macstream export` reads the memory a batch of documents at a time (never all of it at once) and writes one
    state of it: a write landing while it reads leaves no file behind and says why."""
    import pyarrow.parquet as pq

    from pipeline.memory_export import export_collection, import_file

    store = EdgeStore(str(tmp_path / "edge"))
    _fill(store)
    reads: list[int] = []
    real = store.documents

    def counted(collection, doc_ids):
        reads.append(len(doc_ids))
        return real(collection, doc_ids)

    store.documents = counted
    done = export_collection(store, COLL, tmp_path / "m.parquet", batch=5)
    assert reads == [5, 5, 2] and (done["documents"], done["points"]) == (12, 15)
    table = pq.read_table(tmp_path / "m.parquet")
    assert table.column("id").to_pylist() == [d for d in sorted(f"d{i}" for i in range(12)) for _ in
                                              range(2 if int(d[1:]) % 4 == 0 else 1)]
    copy = InMemoryStore()
    import_file(copy, tmp_path / "m.parquet", "v1", "lm|enc")
    assert [(d, h, len(cs)) for d, h, cs in copy.iter_documents(COLL)] == \
           [(d, h, len(cs)) for d, h, cs in store.iter_documents(COLL)]

    reads.clear()

    def racing(collection, doc_ids):  # ingest writes a new document while the export reads its second batch
        if len(reads) == 1:
            store.upsert(COLL, _doc(20), "h20", _chunks("d20", [20]))
        reads.append(len(doc_ids))
        return real(collection, doc_ids)

    store.documents = racing
    with pytest.raises(RuntimeError, match="changed while it was read"):
        export_collection(store, COLL, tmp_path / "n.parquet", batch=5)
    assert not list(tmp_path.glob("n.parquet*"))  # neither the file nor its partial
    store.close()


@pytest.mark.parametrize("codec", ["int8", "int4", "int4z", "int4zw", "fp16"])
def test_a_qdrant_collection_keeps_modulations_as_native_vectors_and_its_codec(tmp_path, codec) -> None:
    """Through qdrant-client (the server path; local mode here): a new collection stores the modulation as named
    vectors (uint8 rows + a float16 scale, or float16 rows), nothing of it in the payload; reopened with another
    default codec, the collection is read and written with its own. A collection of the old layout stays in it."""
    from pipeline.modulation_codec import store_vector_sizes

    path = str(tmp_path / "q")
    s = QdrantStore(path, codec=codec)
    try:
        _fill(s)
        point = s.client.retrieve(COLL, [point_id("v1", "d1", 0)], with_payload=True, with_vectors=True)[0]
        assert "tokens" not in point.payload and set(point.vector) == {"retrieval", *store_vector_sizes(codec, 4)}
        assert np.array(point.vector["modulation"]).shape == (3, {"int4zw": 2 + 14}.get(
            codec, 2 if codec.startswith("int4") else 4))
        before = s.documents(COLL, ["d1"])[0].chunks[0].modulation.tokens
        assert np.array_equal(before, codec_for(codec).round_trip(_chunks("d1", [1])[0].modulation.tokens))
    finally:
        s.close()
    other = "fp16" if codec != "fp16" else "int8"
    s = QdrantStore(path, codec=other)
    try:
        assert s._layout_of(COLL) == codec
        s.upsert(COLL, _doc(1), "h1b", _chunks("d1", [1]))  # rewritten with the collection's codec, not the store's
        assert np.array_equal(s.documents(COLL, ["d1"])[0].chunks[0].modulation.tokens, before)
        legacy = collection_name("v0")
        _legacy(s, legacy).upsert(legacy, _doc(1), "h", _chunks("d1", [1], version="v0"))
        point = s.client.retrieve(legacy, [point_id("v0", "d1", 0)], with_payload=True, with_vectors=True)[0]
        assert "tokens" in point.payload and isinstance(point.vector, list)
        got = s.search(legacy, _chunks("d1", [1])[0].vector[None], 1)[0][0].chunk.modulation.tokens
        assert np.array_equal(got, _chunks("d1", [1])[0].modulation.tokens)  # float16, bit for bit
    finally:
        s.close()
