"""The memory store: modulations + retrieval vectors + document metadata, one collection per checkpoint version.

:mod:`~pipeline.store.base` is the interface and its guarantees; :mod:`~pipeline.store.inmemory` and
:mod:`~pipeline.store.qdrant` are the backends (congruence-tested in tests/test_store.py);
:mod:`~pipeline.store.actor` is the Ray actor that owns an embedded store for a whole cluster;
:mod:`~pipeline.store.bank` is the evaluation-time memory bank.
"""

from __future__ import annotations

from pipeline.store.base import SearchFilter, Store, StoreRejection, collection_name, point_id

__all__ = ["SearchFilter", "Store", "StoreRejection", "collection_name", "open_store", "point_id"]


def open_store(location: str) -> Store:
    """"memory" → :class:`InMemoryStore`; anything else (URL, directory, ":memory:") → :class:`QdrantStore`."""
    if location == "memory":
        from pipeline.store.inmemory import InMemoryStore

        return InMemoryStore()
    from pipeline.store.qdrant import QdrantStore  # imports qdrant-client only when used

    return QdrantStore(location)
