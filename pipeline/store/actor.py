"""The store owner: one Ray actor does all I/O of an embedded store (Qdrant Edge, like qdrant-client local mode,
allows one process per directory). :class:`RemoteStore` is the same :class:`~pipeline.store.Store` interface,
forwarded to that actor, so consumers and serve replicas never know which backend they write to.

Calls from one caller run in the order they were made (Ray actor ordering), which is what keeps a consumer's writes
in offset order. The actor restarts after a crash and retries the call it was running: every store operation is
idempotent, so a retry is safe.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.schemas import Document, EncodedChunk, Hit
from pipeline.store import LOCAL_MODE, SearchFilter, Store, StoreBusy, StoredDocument, is_remote, open_store

__all__ = ["RemoteStore", "StoreActor", "StoreBusy", "connect_store", "ensure_store_free", "store_actor_name"]


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class StoreActor:
    """Owns one store and runs every call on it, in the order each caller made them."""

    def __init__(self, location: str, codec: str | None = None):
        self.store, self.codec = open_store(location, codec), codec

    def use_codec(self, codec: str) -> str | None:
        """Take ``codec`` for the collections created from now on, unless another writer already asked for another
        one: then return that one (the caller refuses to start)."""
        if self.codec not in (None, codec):
            return self.codec
        self.codec = codec
        if hasattr(self.store, "codec"):
            self.store.codec = codec
        return None

    def upsert(self, collection: str, doc: Document, content_hash: str, chunks: list[EncodedChunk]) -> None:
        self.store.upsert(collection, doc, content_hash, chunks)

    def delete(self, collection: str, doc_id: str) -> bool:
        return self.store.delete(collection, doc_id)

    def content_hashes(self, collection: str, doc_ids: list[str]) -> dict[str, str]:
        return self.store.content_hashes(collection, doc_ids)

    def search(self, collection: str, vectors: np.ndarray, k: int, flt: SearchFilter | None = None) -> list[list[Hit]]:
        return self.store.search(collection, vectors, k, flt)

    def counts(self, collection: str, tenant: str | None = None) -> dict[str, int]:
        return self.store.counts(collection, tenant)

    def collections(self) -> list[str]:
        return self.store.collections()

    def newest_published(self, collection: str, tenant: str | None = None) -> datetime | None:
        return self.store.newest_published(collection, tenant)

    def document_ids(self, collection: str) -> list[str]:
        return self.store.document_ids(collection)

    def documents(self, collection: str, doc_ids: list[str]) -> list[StoredDocument]:
        return self.store.documents(collection, doc_ids)

    def stats(self) -> dict:
        return self.store.stats()


class RemoteStore(Store):
    """A :class:`Store` whose calls run in the owning actor (blocking until it answers)."""

    def __init__(self, actor):
        self.actor = actor

    def upsert(self, collection: str, doc: Document, content_hash: str, chunks: list[EncodedChunk]) -> None:
        ray.get(self.actor.upsert.remote(collection, doc, content_hash, chunks))

    def delete(self, collection: str, doc_id: str) -> bool:
        return ray.get(self.actor.delete.remote(collection, doc_id))

    def content_hashes(self, collection: str, doc_ids: list[str]) -> dict[str, str]:
        return ray.get(self.actor.content_hashes.remote(collection, doc_ids))

    def search(self, collection: str, vectors: np.ndarray, k: int, flt: SearchFilter | None = None) -> list[list[Hit]]:
        return ray.get(self.actor.search.remote(collection, vectors, k, flt))

    def counts(self, collection: str, tenant: str | None = None) -> dict[str, int]:
        return ray.get(self.actor.counts.remote(collection, tenant))

    def collections(self) -> list[str]:
        return ray.get(self.actor.collections.remote())

    def newest_published(self, collection: str, tenant: str | None = None) -> datetime | None:
        return ray.get(self.actor.newest_published.remote(collection, tenant))

    def document_ids(self, collection: str) -> list[str]:
        return ray.get(self.actor.document_ids.remote(collection))

    def documents(self, collection: str, doc_ids: list[str]) -> list[StoredDocument]:
        return ray.get(self.actor.documents.remote(collection, doc_ids))

    def stats(self) -> dict:
        return ray.get(self.actor.stats.remote())


def store_actor_name(location: str) -> str:
    return "macstream-store-" + hashlib.sha1(location.encode()).hexdigest()[:10]


def ensure_store_free(location: str) -> None:
    """Raise at once, before anything starts, when the embedded store at ``location`` cannot be opened here:
    :class:`~pipeline.store.StoreFormatError` for a directory of another format (the old qdrant-client local mode: the
    message says how to re-encode), :class:`StoreBusy` when no owner of ``location`` exists in this cluster yet and
    another process holds the directory (a second `ingest` or `serve` on one machine would otherwise start, report
    ready, and fail on every store call). Joining a cluster whose owner already exists is fine: that is how ingest
    and serve share it."""
    if is_remote(location) or location in ("memory", ":memory:"):
        return
    local_mode, path = location.startswith(LOCAL_MODE), location.removeprefix(LOCAL_MODE)
    if not Path(path).exists():
        return
    if not local_mode:
        from pipeline.store.edge import check_format

        check_format(Path(path))  # the format first: an old directory is refused even while another process holds it
    try:
        if local_mode:
            from qdrant_client import QdrantClient

            try:
                QdrantClient(path=path).close()
            except RuntimeError:
                raise StoreBusy(path) from None
        else:
            from pipeline.store.edge import check_free

            check_free(path)
        return  # free: nobody holds it (and no Ray cluster was needed to find out)
    except StoreBusy:
        pass
    try:
        ray.get_actor(store_actor_name(location), namespace="macstream")
        return  # this cluster's owner holds it: share
    except ValueError:
        pass
    raise StoreBusy(
        f"store {path} is open in another process (an embedded store has one owner). Run ingest and serve "
        f"together with `macstream up`, or join one Ray cluster (`ray start --head`, then RAY_ADDRESS=auto for "
        f"both), or use a Qdrant server (--store http://HOST:6333)")


def _head_node_id() -> str | None:
    """The id of the cluster's head node (the one holding Ray's internal head resource), when it is alive."""
    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return node["NodeID"]
    return None


def connect_store(location: str, codec: str | None = None) -> Store:
    """A Qdrant server URL → a direct client (any number of processes may connect). Anything else → the one named
    actor in this Ray cluster that owns it (created on first use, shared by ingest and serve). Raises
    :class:`StoreBusy` when a process outside the cluster holds the directory. ``codec`` (writers: ingest, backfill):
    the embedded store's codec for new collections; a writer asking for another codec than one already running
    raises ValueError."""
    if is_remote(location):
        return open_store(location, codec)
    ensure_store_free(location)
    # detached: the owner must outlive whichever process happened to create it (e.g. a serve replica being replaced).
    # Pinned (hard) to the head node, the one node a cluster cannot lose: an owner on a worker node that dies stalls
    # every write until Ray restarts it, and a soft affinity still let Ray place it on a worker node. Without a head in
    # view, softly on this process's node. The directory must be on that machine: across machines, use a Qdrant server.
    head = _head_node_id()
    here = NodeAffinitySchedulingStrategy(head or ray.get_runtime_context().get_node_id(), soft=head is None)
    actor = StoreActor.options(name=store_actor_name(location), namespace="macstream", get_if_exists=True,
                               lifetime="detached", scheduling_strategy=here).remote(location, codec)
    if codec is not None:
        other = ray.get(actor.use_codec.remote(codec))
        if other is not None:
            raise ValueError(f"store {location} is open in this cluster by a writer that codes new collections as "
                             f"{other}; this job asks for {codec}: give both the same modulation_codec")
    return RemoteStore(actor)
