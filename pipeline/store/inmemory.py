"""The in-process backend: exact numpy search over :class:`~pipeline.store.bank.MemoryBank` s (evaluation, unit tests).

Not shared between processes; lost on exit. Same semantics as every backend (see :mod:`pipeline.store.base`).
"""

from __future__ import annotations

from datetime import datetime

import numpy as np

from pipeline.schemas import Document, EncodedChunk, Hit
from pipeline.store.bank import MemoryBank
from pipeline.store.base import SearchFilter, Store, StoredDocument, _utc


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

    def document_ids(self, collection: str) -> list[str]:
        return sorted(self._doc_ids(collection, None))

    def documents(self, collection: str, doc_ids: list[str]) -> list[StoredDocument]:
        bank, hashes = self._banks.get(collection), self._hashes.get(collection, {})
        return [StoredDocument(bank.document(d), hashes[d], list(bank.chunks(d)))
                for d in doc_ids if bank is not None and d in hashes]
