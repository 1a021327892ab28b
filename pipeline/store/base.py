"""The memory store: modulations + retrieval vectors + document metadata, one collection per checkpoint version.

One small interface, three backends, and congruence tests (tests/test_store.py) that run the same operations through
each and assert equal results:

- :class:`~pipeline.store.inmemory.InMemoryStore`: exact numpy search (evaluation, unit tests);
- :class:`~pipeline.store.edge.EdgeStore`: the embedded default, Qdrant's engine in-process (Qdrant Edge) on a local
  directory, modulations stored natively as int8 (or 4-bit, float16) multivectors; **one process per directory**: in
  a Ray job one actor owns it, see :mod:`pipeline.store.actor`;
- :class:`~pipeline.store.qdrant.QdrantStore`: ``qdrant-client`` against a server URL (production), ``":memory:"``, or
  ``local:DIR`` (qdrant-client's pure-Python local mode, the embedded engine before Qdrant Edge; kept to read stores
  of that format), modulations stored natively in the same codecs as named vectors beside the retrieval vector.

Semantics every backend guarantees:
- ``upsert`` is idempotent. Point ids are deterministic (uuid5 of checkpoint version, document id, chunk index), so a
  redelivered document overwrites itself. A new version of a document overwrites its chunks in place, *then* removes
  the chunks past its new length: the document is never absent from retrieval while it is replaced, and chunks of
  one document are replaced together.
- A point is written with its modulation in the same write: no point exists without one.
- ``delete`` removes every chunk of the document; deleting an absent document is a no-op returning False.
- ``content_hashes`` returns what ``upsert`` stored, so a writer can skip re-encoding unchanged content.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import NamedTuple, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.config import ModulationCodec
from pipeline.schemas import Document, EncodedChunk, Hit

# How a Qdrant store (the embedded engine or a server) codes the modulations of the collections it creates
# (pipeline.modulation_codec.store_vectors); the first is the default: the smallest that loses at most 1 F1
# (docs/results.md). A collection keeps the codec it was created with.
CODECS = get_args(ModulationCodec)
DEFAULT_CODEC = CODECS[0]
RETRIEVAL = "retrieval"  # the named vector a Qdrant collection searches: the window's retrieval vector (d_enc)


def check_codec(codec: str) -> str:
    if codec not in CODECS:
        raise ValueError(f"modulation codec {codec!r}: expected one of {', '.join(CODECS)}")
    return codec


class StoreRejection(ValueError):
    """The store refuses a write because of what was sent (no chunks, chunks of another document or checkpoint, out of
    order). The only store error a consumer dead-letters: anything else is the store's or the code's fault and is
    retried or crashes loudly, never silently dropped."""


class StoreFormatError(ValueError):
    """The store location holds data this backend does not read (e.g. a directory of the old embedded format). Never
    read as empty: the message says how to re-encode or which backend reads it."""


class StoreBusy(RuntimeError):
    """The embedded store directory is open in another process (an embedded store has one owner). The message names
    the ways out."""


_NAMESPACE = uuid.UUID("6f1d3c52-8a0e-4c55-9a43-2f6c1d0b7e11")


def collection_name(version: str) -> str:
    """One collection per checkpoint version: a new checkpoint writes a new collection; the old one stays."""
    return f"macstream-{version}"


def point_id(version: str, doc_id: str, chunk: int) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{version}/{doc_id}/{chunk}"))


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


class SearchFilter(BaseModel):
    """Retrieval filters, ANDed. Time bounds are inclusive; a document without ``published_at`` fails a time bound.
    Naive datetimes are read as UTC."""

    model_config = ConfigDict(extra="forbid")

    since: datetime | None = Field(None, description="Only documents published at or after this time.")
    until: datetime | None = Field(None, description="Only documents published at or before this time.")
    source: str | None = Field(None, description="Only documents of this source.")
    tenant: str | None = Field(None, description="Only documents of this tenant (API keys map to a tenant).")

    @model_validator(mode="after")
    def _ordered(self) -> SearchFilter:
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


class StoredDocument(NamedTuple):
    """One document as a store holds it: what an export writes and an import upserts back."""

    document: Document
    content_hash: str
    chunks: list[EncodedChunk]


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

    @abstractmethod
    def document_ids(self, collection: str) -> list[str]:
        """Every document id of the collection, sorted; [] for an absent one. Ids only (read from the index, never
        the modulations), so a listing of 10^6 windows stays small."""

    @abstractmethod
    def documents(self, collection: str, doc_ids: list[str]) -> list[StoredDocument]:
        """Each of ``doc_ids`` that is stored, in the order given, whole: the document, its content hash and every
        chunk in chunk order (modulations bit-exact, retrieval vectors as stored)."""

    def iter_documents(self, collection: str, batch: int = 256) -> Iterator[StoredDocument]:
        """Every stored document, sorted by id, read ``batch`` documents at a time: memory stays bounded by one batch
        whatever the collection's size (an export of a month of news). A document written or deleted meanwhile may
        or may not be seen; one listed but deleted before its batch is read is skipped."""
        ids = self.document_ids(collection)
        for s in range(0, len(ids), batch):
            yield from self.documents(collection, ids[s: s + batch])

    def stats(self) -> dict:
        return {c: self.counts(c) for c in self.collections()}

    def codec_of(self, collection: str) -> str | None:
        """How ``collection`` codes its modulations (``CODECS``); None where the store keeps float16 as written (the
        in-memory store) or the collection does not exist."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook: a store holding nothing open has nothing to close
        """Release what the store holds open (files, clients); idempotent. The default holds nothing."""

    @staticmethod
    def check_chunks(doc: Document, chunks: list[EncodedChunk]) -> str:
        """Validate what an upsert writes; return the checkpoint version of its modulations."""
        if not chunks:
            raise StoreRejection(f"document {doc.id!r}: no chunks to store")
        versions = {c.modulation.checkpoint for c in chunks}
        if len(versions) != 1 or any(c.modulation.doc_id != doc.id for c in chunks):
            raise StoreRejection(f"document {doc.id!r}: chunks must all belong to it and to one checkpoint")
        if [c.modulation.chunk for c in chunks] != list(range(len(chunks))):
            raise StoreRejection(f"document {doc.id!r}: chunks must be 0..{len(chunks) - 1} in order")
        return versions.pop()
