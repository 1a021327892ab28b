"""The store owner: one Ray actor does all I/O of an embedded store (qdrant-client local mode allows one process
per path). :class:`RemoteStore` is the same :class:`~pipeline.store.Store` interface, forwarded to that actor, so
consumers and serve replicas never know which backend they write to.

Calls from one caller run in the order they were made (Ray actor ordering), which is what keeps a consumer's writes
in offset order. The actor restarts after a crash and retries the call it was running: every store operation is
idempotent, so a retry is safe.
"""

from __future__ import annotations

import hashlib

import numpy as np
import ray

from pipeline.memory import Hit
from pipeline.schemas import Document
from pipeline.store import SearchFilter, Store, open_store


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class StoreActor:
    def __init__(self, location: str):
        self.store = open_store(location)

    def call(self, method: str, *args, **kwargs):
        return getattr(self.store, method)(*args, **kwargs)


class RemoteStore(Store):
    """A :class:`Store` whose calls run in the owning actor."""

    def __init__(self, actor):
        self.actor = actor

    def _call(self, method: str, *args, **kwargs):
        return ray.get(self.actor.call.remote(method, *args, **kwargs))

    def upsert(self, collection: str, doc: Document, content_hash: str, chunks: list) -> None:
        self._call("upsert", collection, doc, content_hash, chunks)

    def delete(self, collection: str, doc_id: str) -> bool:
        return self._call("delete", collection, doc_id)

    def content_hashes(self, collection: str, doc_ids: list[str]) -> dict[str, str]:
        return self._call("content_hashes", collection, doc_ids)

    def search(self, collection: str, vectors: np.ndarray, k: int, flt: SearchFilter | None = None) -> list[list[Hit]]:
        return self._call("search", collection, vectors, k, flt)

    def counts(self, collection: str, tenant: str | None = None) -> dict[str, int]:
        return self._call("counts", collection, tenant)

    def collections(self) -> list[str]:
        return self._call("collections")

    def newest_published(self, collection: str, tenant: str | None = None):
        return self._call("newest_published", collection, tenant)

    def stats(self) -> dict:
        return self._call("stats")


def store_actor_name(location: str) -> str:
    return "macstream-store-" + hashlib.sha1(location.encode()).hexdigest()[:10]


def connect_store(location: str) -> Store:
    """A Qdrant server URL → a direct client (any number of processes may connect). Anything else → the one named
    actor in this Ray cluster that owns it (created on first use, shared by ingest and serve)."""
    if location.startswith(("http://", "https://")):
        return open_store(location)
    # detached: the owner must outlive whichever process happened to create it (e.g. a serve replica being replaced)
    actor = StoreActor.options(name=store_actor_name(location), namespace="macstream", get_if_exists=True,
                               lifetime="detached").remote(location)
    return RemoteStore(actor)
