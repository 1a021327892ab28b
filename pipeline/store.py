"""The memory store: modulations + retrieval vectors + document metadata, one collection per checkpoint version.

One small interface, two backends, and congruence tests (tests/test_store.py) that run the same operations through
each and assert equal results:

- :class:`InMemoryStore`: exact numpy search over :class:`~pipeline.memory.MemoryBank` s (evaluation, unit tests);
- :class:`QdrantStore`: ``qdrant-client`` against a server URL (production), a local path (the embedded default,
  pure Python, **one process per path**: in a Ray job one actor owns it, see ``workers/store_actor.py``) or
  ``":memory:"``.

Semantics every backend guarantees:
- ``upsert`` is idempotent. Point ids are deterministic (uuid5 of checkpoint version, document id, chunk index), so a
  redelivered document overwrites itself. A new version of a document overwrites its chunks in place, *then* removes
  the chunks past its new length: the document is never absent from retrieval while it is replaced, and chunks of
  one document are replaced together.
- A point is written with its modulation in the same payload: no point exists without one.
- ``delete`` removes every chunk of the document; deleting an absent document is a no-op returning False.
- ``content_hashes`` returns what ``upsert`` stored, so a writer can skip re-encoding unchanged content.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from datetime import datetime, timezone

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .mac import EncodedChunk
from .memory import Hit, MemoryBank
from .modulation import Modulation
from .schemas import Document

_NAMESPACE = uuid.UUID("6f1d3c52-8a0e-4c55-9a43-2f6c1d0b7e11")


def collection_name(version: str) -> str:
    """One collection per checkpoint version: a new checkpoint writes a new collection; the old one stays."""
    return f"macstream-{version}"


def point_id(version: str, doc_id: str, chunk: int) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{version}/{doc_id}/{chunk}"))


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt


class SearchFilter(BaseModel):
    """Retrieval filters, ANDed. Time bounds are inclusive; a document without ``published_at`` fails a time bound.
    Naive datetimes are read as UTC."""

    model_config = ConfigDict(extra="forbid")

    since: datetime | None = Field(None, description="Only documents published at or after this time.")
    until: datetime | None = Field(None, description="Only documents published at or before this time.")
    source: str | None = Field(None, description="Only documents of this source.")
    tenant: str | None = Field(None, description="Only documents of this tenant (API keys map to a tenant).")

    @model_validator(mode="after")
    def _ordered(self) -> "SearchFilter":
        if self.since and self.until and _utc(self.since) > _utc(self.until):
            raise ValueError(f"since ({self.since.isoformat()}) is after until ({self.until.isoformat()})")
        return self

    def matches(self, doc: Document) -> bool:
        if self.since or self.until:
            if doc.published_at is None:
                return False
            t = _utc(doc.published_at)
            if (self.since and t < _utc(self.since)) or (self.until and t > _utc(self.until)):
                return False
        return (self.source is None or doc.source == self.source) and (self.tenant is None or doc.tenant == self.tenant)


class Store(ABC):
    """Where modulations live. Collections are created on first upsert."""

    @abstractmethod
    def upsert(self, collection: str, doc: Document, content_hash: str, chunks: list[EncodedChunk]) -> None:
        """Insert or replace ``doc`` with exactly ``chunks`` (all of it, in chunk order)."""

    @abstractmethod
    def delete(self, collection: str, doc_id: str) -> bool:
        """Remove every chunk of the document; return whether it existed."""

    @abstractmethod
    def content_hashes(self, collection: str, doc_ids: list[str]) -> dict[str, str]:
        """Stored content hash of each of ``doc_ids`` that exists."""

    @abstractmethod
    def search(self, collection: str, vectors: np.ndarray, k: int, flt: SearchFilter | None = None) -> list[list[Hit]]:
        """vectors (B, d_enc), unit norm → per row the k best chunks passing ``flt``, best first, cosine scores."""

    @abstractmethod
    def counts(self, collection: str, tenant: str | None = None) -> dict[str, int]:
        """{"documents": distinct documents, "chunks": points}; zeros for an absent collection. With ``tenant``: only
        that tenant's documents (what an API key may see)."""

    @abstractmethod
    def collections(self) -> list[str]:
        """Names of the macstream collections, sorted."""

    @abstractmethod
    def newest_published(self, collection: str, tenant: str | None = None) -> datetime | None:
        """The latest ``published_at`` in the collection (UTC), None when no document has one; with ``tenant``: among
        that tenant's documents only."""

    def stats(self) -> dict:
        return {c: self.counts(c) for c in self.collections()}

    def close(self) -> None:
        pass

    @staticmethod
    def check_chunks(doc: Document, chunks: list[EncodedChunk]) -> str:
        """Validate what an upsert writes; return the checkpoint version of its modulations."""
        if not chunks:
            raise ValueError(f"document {doc.id!r}: no chunks to store")
        versions = {c.modulation.checkpoint for c in chunks}
        if len(versions) != 1 or any(c.modulation.doc_id != doc.id for c in chunks):
            raise ValueError(f"document {doc.id!r}: chunks must all belong to it and to one checkpoint")
        if [c.modulation.chunk for c in chunks] != list(range(len(chunks))):
            raise ValueError(f"document {doc.id!r}: chunks must be 0..{len(chunks) - 1} in order")
        return versions.pop()


class InMemoryStore(Store):
    """Exact search in process memory. Not shared between processes; lost on exit."""

    def __init__(self) -> None:
        self._banks: dict[str, MemoryBank] = {}
        self._hashes: dict[str, dict[str, str]] = {}

    def upsert(self, collection: str, doc: Document, content_hash: str, chunks: list[EncodedChunk]) -> None:
        self.check_chunks(doc, chunks)
        self._banks.setdefault(collection, MemoryBank()).upsert(doc, chunks)
        self._hashes.setdefault(collection, {})[doc.id] = content_hash

    def delete(self, collection: str, doc_id: str) -> bool:
        self._hashes.get(collection, {}).pop(doc_id, None)
        return collection in self._banks and self._banks[collection].delete(doc_id)

    def content_hashes(self, collection: str, doc_ids: list[str]) -> dict[str, str]:
        known = self._hashes.get(collection, {})
        return {d: known[d] for d in doc_ids if d in known}

    def search(self, collection: str, vectors: np.ndarray, k: int, flt: SearchFilter | None = None) -> list[list[Hit]]:
        if collection not in self._banks:
            return [[] for _ in range(len(vectors))]
        return self._banks[collection].search(np.asarray(vectors, np.float32), k, flt.matches if flt else None)

    def _doc_ids(self, collection: str, tenant: str | None) -> list[str]:
        bank = self._banks.get(collection)
        ids = bank.document_ids() if bank else []
        return ids if tenant is None else [d for d in ids if bank.document(d).tenant == tenant]

    def counts(self, collection: str, tenant: str | None = None) -> dict[str, int]:
        ids = self._doc_ids(collection, tenant)
        return {"documents": len(ids), "chunks": sum(len(self._banks[collection].chunks(d)) for d in ids)}

    def collections(self) -> list[str]:
        return sorted(c for c, b in self._banks.items() if len(b))

    def newest_published(self, collection: str, tenant: str | None = None) -> datetime | None:
        docs = [self._banks[collection].document(d) for d in self._doc_ids(collection, tenant)]
        times = [_utc(d.published_at) for d in docs if d.published_at is not None]
        return max(times) if times else None


class QdrantStore(Store):
    """qdrant-client: ``location`` is a server URL (http://host:6333), a local directory, or ":memory:".

    Payload (JSON, as local mode requires): the modulation as base64 float16, the document's fields, and filterable
    top-level keys ``doc_id``, ``chunk``, ``published_ts`` (epoch seconds), ``source``, ``tenant``; on a server
    these get payload indexes.
    """

    def __init__(self, location: str, api_key: str | None = None):
        from qdrant_client import QdrantClient, models

        self._m = models
        self.location = location
        self.remote = location.startswith(("http://", "https://"))
        if self.remote:
            self.client = QdrantClient(url=location, api_key=api_key)
        elif location == ":memory:":
            self.client = QdrantClient(location=":memory:")
        else:
            try:
                self.client = QdrantClient(path=location)
            except RuntimeError as err:  # the storage folder is locked by another process
                raise RuntimeError(f"store {location} is open in another process (an embedded store has one owner: "
                                   f"stop the running ingest/serve job or point at a Qdrant server): {err}") from None
        self._known: set[str] = set()

    # ---- helpers -------------------------------------------------------------------------------------------------
    def _ensure(self, collection: str, dim: int) -> None:
        if collection in self._known:
            return
        m = self._m
        if not self.client.collection_exists(collection):
            self.client.create_collection(collection, vectors_config=m.VectorParams(size=dim, distance=m.Distance.COSINE))
            if self.remote:  # local mode ignores payload indexes (and warns)
                for field, kind in (("doc_id", m.PayloadSchemaType.KEYWORD), ("source", m.PayloadSchemaType.KEYWORD),
                                    ("tenant", m.PayloadSchemaType.KEYWORD), ("published_ts", m.PayloadSchemaType.FLOAT),
                                    ("chunk", m.PayloadSchemaType.INTEGER)):
                    self.client.create_payload_index(collection, field, kind)
        self._known.add(collection)

    def _exists(self, collection: str) -> bool:
        return collection in self._known or self.client.collection_exists(collection)

    def _doc_filter(self, doc_id: str, min_chunk: int | None = None):
        m = self._m
        must = [m.FieldCondition(key="doc_id", match=m.MatchValue(value=doc_id))]
        if min_chunk is not None:
            must.append(m.FieldCondition(key="chunk", range=m.Range(gte=min_chunk)))
        return m.Filter(must=must)

    def _filter(self, flt: SearchFilter | None):
        if flt is None:
            return None
        m, must = self._m, []
        if flt.since or flt.until:
            must.append(m.FieldCondition(key="published_ts", range=m.Range(
                gte=_utc(flt.since).timestamp() if flt.since else None,
                lte=_utc(flt.until).timestamp() if flt.until else None)))
        for key in ("source", "tenant"):
            if getattr(flt, key) is not None:
                must.append(m.FieldCondition(key=key, match=m.MatchValue(value=getattr(flt, key))))
        return m.Filter(must=must) if must else None

    @staticmethod
    def _hit(point) -> Hit:
        p = point.payload
        doc = Document.model_validate(p["document"])
        tokens = Modulation.decode_tokens(p["tokens"], p["num_tokens"])
        mod = Modulation(p["doc_id"], p["chunk"], p["n_chunks"], tokens, p["model_id"], p["checkpoint"])
        return Hit(EncodedChunk(mod, np.asarray(point.vector, np.float32) if point.vector is not None else None),
                   doc, float(point.score))

    # ---- interface -----------------------------------------------------------------------------------------------
    def upsert(self, collection: str, doc: Document, content_hash: str, chunks: list[EncodedChunk]) -> None:
        version = self.check_chunks(doc, chunks)
        self._ensure(collection, int(chunks[0].vector.shape[0]))
        m = self._m
        meta = doc.model_dump(mode="json", exclude_none=True)
        flat = {"doc_id": doc.id, "content_hash": content_hash, "source": doc.source, "tenant": doc.tenant,
                "published_ts": _utc(doc.published_at).timestamp() if doc.published_at else None}
        points = [m.PointStruct(
            id=point_id(version, doc.id, c.modulation.chunk),
            vector=np.asarray(c.vector, np.float32).tolist(),
            payload=flat | {"chunk": c.modulation.chunk, "n_chunks": c.modulation.n_chunks,
                            "num_tokens": int(c.modulation.tokens.shape[0]), "tokens": c.modulation.tokens_b64(),
                            "model_id": c.modulation.model_id, "checkpoint": c.modulation.checkpoint, "document": meta},
        ) for c in chunks]
        self.client.upsert(collection, points=points, wait=True)
        # overwrite first, then drop the tail of a document that shrank: never a moment without the document
        self.client.delete(collection, points_selector=m.FilterSelector(filter=self._doc_filter(doc.id, len(chunks))), wait=True)

    def delete(self, collection: str, doc_id: str) -> bool:
        if not self._exists(collection):
            return False
        existed = self.client.count(collection, count_filter=self._doc_filter(doc_id), exact=True).count > 0
        if existed:
            self.client.delete(collection, points_selector=self._m.FilterSelector(filter=self._doc_filter(doc_id)), wait=True)
        return existed

    def content_hashes(self, collection: str, doc_ids: list[str]) -> dict[str, str]:
        if not doc_ids or not self._exists(collection):
            return {}
        version = collection.removeprefix("macstream-")
        points = self.client.retrieve(collection, ids=[point_id(version, d, 0) for d in doc_ids],
                                      with_payload=["doc_id", "content_hash"], with_vectors=False)
        return {p.payload["doc_id"]: p.payload["content_hash"] for p in points}

    def search(self, collection: str, vectors: np.ndarray, k: int, flt: SearchFilter | None = None) -> list[list[Hit]]:
        if k <= 0 or not self._exists(collection):
            return [[] for _ in range(len(vectors))]
        m = self._m
        qf = self._filter(flt)
        reqs = [m.QueryRequest(query=np.asarray(v, np.float32).tolist(), limit=k, filter=qf, with_payload=True,
                               with_vector=True) for v in vectors]
        return [[self._hit(p) for p in r.points] for r in self.client.query_batch_points(collection, requests=reqs)]

    def counts(self, collection: str, tenant: str | None = None) -> dict[str, int]:
        if not self._exists(collection):
            return {"documents": 0, "chunks": 0}
        m = self._m
        scope = self._filter(SearchFilter(tenant=tenant))  # None without a tenant
        first = m.FieldCondition(key="chunk", match=m.MatchValue(value=0))
        chunks = self.client.count(collection, count_filter=scope, exact=True).count
        docs = self.client.count(collection, count_filter=m.Filter(must=[first, *(scope.must if scope else [])]),
                                 exact=True).count
        return {"documents": docs, "chunks": chunks}

    def collections(self) -> list[str]:
        names = [c.name for c in self.client.get_collections().collections if c.name.startswith("macstream-")]
        return sorted(n for n in names if self.counts(n)["chunks"])

    def newest_published(self, collection: str, tenant: str | None = None) -> datetime | None:
        if not self._exists(collection):
            return None
        m = self._m
        points, _ = self.client.scroll(collection, scroll_filter=self._filter(SearchFilter(tenant=tenant)), limit=1,
                                       with_payload=["published_ts"], with_vectors=False,
                                       order_by=m.OrderBy(key="published_ts", direction=m.Direction.DESC))
        if not points or points[0].payload.get("published_ts") is None:
            return None
        return datetime.fromtimestamp(points[0].payload["published_ts"], timezone.utc)

    def close(self) -> None:
        self.client.close()


def open_store(location: str) -> Store:
    """"memory" → :class:`InMemoryStore`; anything else (URL, directory, ":memory:") → :class:`QdrantStore`."""
    return InMemoryStore() if location == "memory" else QdrantStore(location)
