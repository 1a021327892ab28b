"""Store congruence: the same operations through every backend give the same results (in the style of
qdrant-client's own congruence tests), plus the semantics each backend must keep."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pytest

from pipeline.modulation import Modulation
from pipeline.schemas import Document, EncodedChunk
from pipeline.store import SearchFilter, Store, collection_name
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
    base = dict(id=f"d{i}", text=f"text {i}", published_at=datetime(2024, 1, 1 + i, tzinfo=timezone.utc),
                source="wire" if i % 2 else "blog", tenant="t1" if i % 3 else "t2")
    return Document(**(base | kw))


def _fill(store: Store) -> None:
    for i in range(12):
        store.upsert(COLL, _doc(i), f"h{i}", _chunks(f"d{i}", [i] if i % 4 else [i, 100 + i]))


@pytest.fixture(params=["memory", "qdrant-memory", "qdrant-path"])
def store(request, tmp_path) -> Store:
    s = {"memory": lambda: InMemoryStore(), "qdrant-memory": lambda: QdrantStore(":memory:"),
         "qdrant-path": lambda: QdrantStore(str(tmp_path / "q"))}[request.param]()
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
            SearchFilter(since=datetime(2024, 1, 4), until=datetime(2024, 1, 9, tzinfo=timezone.utc)),
            SearchFilter(tenant="nobody")]
    out["search"] = [[[(h.document.id, h.chunk.modulation.chunk, round(h.score, 4)) for h in hits]
                      for hits in store.search(COLL, q, 5, f)] for f in flts]
    hit = store.search(COLL, q[:1], 1)[0][0]
    out["payload"] = (hit.document.model_dump(), hit.chunk.modulation.tokens.tolist(), hit.chunk.modulation.checkpoint)
    out["collections"] = store.collections()
    out["newest"] = (store.newest_published(COLL), store.newest_published("macstream-none"))
    out["tenant"] = (store.counts(COLL, "t2"), store.counts(COLL, "nobody"), store.newest_published(COLL, "t2"),
                     store.newest_published(COLL, "nobody"), store.counts("macstream-none", "t2"))
    out["absent"] = (store.counts("macstream-none"), store.search("macstream-none", q, 3), store.content_hashes("macstream-none", ["d1"]))
    return out


def test_backends_are_congruent(tmp_path) -> None:
    results = {}
    for name, s in {"memory": InMemoryStore(), "qdrant-memory": QdrantStore(":memory:"),
                    "qdrant-path": QdrantStore(str(tmp_path / "q"))}.items():
        results[name] = _run_ops(s)
        s.close()
    ref = results["memory"]
    assert ref["counts0"] == {"documents": 12, "chunks": 15}
    assert ref["counts1"] == {"documents": 11, "chunks": 13}
    assert ref["deleted"] == [True, False, False]
    assert ref["hashes"] == {"d4": "h4b", "d5": "h5"}
    assert ref["newest"] == (datetime(2024, 1, 12, tzinfo=timezone.utc), None)
    # a tenant's view: t2 owns d0 (2 chunks), d3, d6, d9; nothing of the others leaks into its counts
    assert ref["tenant"] == ({"documents": 4, "chunks": 5}, {"documents": 0, "chunks": 0},
                             datetime(2024, 1, 10, tzinfo=timezone.utc), None, {"documents": 0, "chunks": 0})
    for name, r in results.items():
        assert r == ref, name


def test_filters_and_tenant_isolation(store: Store) -> None:
    _fill(store)
    q = np.stack([c.vector for c in _chunks("q", [1, 2, 3])])
    for hits in store.search(COLL, q, 20, SearchFilter(tenant="t2")):
        assert hits and {h.document.tenant for h in hits} == {"t2"}
    since = datetime(2024, 1, 6, tzinfo=timezone.utc)
    for hits in store.search(COLL, q, 20, SearchFilter(since=since, source="wire")):
        assert hits and all(h.document.published_at >= since and h.document.source == "wire" for h in hits)


def test_persistent_path_survives_reopen(tmp_path) -> None:
    s = QdrantStore(str(tmp_path / "q"))
    _fill(s)
    s.close()
    s = QdrantStore(str(tmp_path / "q"))
    assert s.counts(COLL) == {"documents": 12, "chunks": 15}
    with pytest.raises(RuntimeError, match="another process"):
        QdrantStore(str(tmp_path / "q"))
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
    for cls in (InMemoryStore, QdrantStore, RemoteStore):
        for name in names:
            want = list(inspect.signature(getattr(Store, name)).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters) == want, (cls.__name__, name)
