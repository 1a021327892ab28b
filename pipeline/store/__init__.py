"""The memory store: modulations + retrieval vectors + document metadata, one collection per checkpoint version.

:mod:`~pipeline.store.base` is the interface and its guarantees; :mod:`~pipeline.store.inmemory`,
:mod:`~pipeline.store.edge` (the embedded default) and :mod:`~pipeline.store.qdrant` are the backends (congruence-tested
in tests/test_store.py);
:mod:`~pipeline.store.actor` is the Ray actor that owns an embedded store for a whole cluster;
:mod:`~pipeline.store.bank` is the evaluation-time memory bank.
"""

from __future__ import annotations

from pipeline.store.base import (
    DEFAULT_CODEC,
    SearchFilter,
    Store,
    StoreBusy,
    StoredDocument,
    StoreFormatError,
    StoreRejection,
    collection_name,
    point_id,
)

__all__ = ["SearchFilter", "Store", "StoreBusy", "StoredDocument", "StoreFormatError", "StoreRejection",
           "collection_name", "is_remote", "open_store", "point_id"]

LOCAL_MODE = "local:"  # prefix: qdrant-client's pure-Python local mode on a directory (the old embedded engine)


def is_remote(location: str) -> bool:
    """A Qdrant server URL: any number of processes may connect (no single owner)."""
    return location.startswith(("http://", "https://"))


def open_store(location: str, codec: str | None = None) -> Store:
    """Open the store at ``location`` in this process. ``codec``: how a Qdrant store (embedded or server) codes the
    modulations of the collections it creates (``int4zw``, ``int8``, ``int4z``, ``int4``, ``fp16``; None: the
    default, int4zw); the in-memory store keeps float16.

    - "memory" → :class:`~pipeline.store.inmemory.InMemoryStore` (numpy, lost on exit);
    - a Qdrant server URL (http://host:6333) or ":memory:" → :class:`~pipeline.store.qdrant.QdrantStore`;
    - "local:DIR" → :class:`~pipeline.store.qdrant.QdrantStore` in qdrant-client local mode on DIR (the old embedded
      engine, pure Python; to read a store of that format);
    - any other string is a directory → :class:`~pipeline.store.edge.EdgeStore` (Qdrant Edge, the embedded default).
      A directory of the old format raises :class:`StoreFormatError` saying how to re-encode it.
    """
    if location == "memory":
        from pipeline.store.inmemory import InMemoryStore

        return InMemoryStore()
    if is_remote(location) or location == ":memory:" or location.startswith(LOCAL_MODE):
        from pipeline.store.qdrant import QdrantStore  # imports qdrant-client only when used

        return QdrantStore(location.removeprefix(LOCAL_MODE), codec=codec or DEFAULT_CODEC)
    from pipeline.store.edge import EdgeStore

    return EdgeStore(location, codec=codec or DEFAULT_CODEC)
