"""The embedded default: Qdrant's own engine in-process (``qdrant-edge-py``, the Rust storage of the Qdrant server:
segments, HNSW, payload indexes, a write-ahead log), two shards per collection under one directory.

Layout of a store directory::

    <dir>/macstream-store.json                    {"engine": "qdrant-edge", "format": 2}
    <dir>/macstream.lock                          held (flock) by the one process that has the store open
    <dir>/collections/<collection>/codec.json     {"codec": "int4zw"}: how this collection's modulations are coded
    <dir>/collections/<collection>/index/         Edge shard: retrieval vectors + payload (one point per window)
    <dir>/collections/<collection>/modulations/   Edge shard: the windows' modulations, under the same point ids

- ``index``: the window's retrieval vector (``retrieval``: d_enc, cosine, HNSW graph over int8-quantised copies in
  RAM, the k best rescored with the float32 originals) and its payload: the document's fields (``document``), the
  filterable keys ``doc_id``, ``chunk``, ``published_ts`` (epoch seconds), ``source``, ``tenant`` (each
  payload-indexed; ``tenant`` as Qdrant's tenant key), and ``n_chunks``, ``content_hash``, ``model_id``,
  ``checkpoint``.
- ``modulations``: the modulation stored natively as a multivector (``modulation``: T rows; distance Dot so the
  engine never normalises it; no index; on disk, memory-mapped), coded by the collection's codec
  (:mod:`pipeline.modulation_codec`), chosen when the collection is created and kept for its life:

  - ``int4zw`` (the default): int4z (below) with each window's 28 widest channels in 8 bits (their low nibbles after
    each row's codes: d_LM/2 + 14 bytes a row) and ``wide``, their indices (uint8 of 56): 15,992 bytes at T=48,
    d_LM=576; every state within half its channel's scale, within 1 F1 of float16 in every mode measured
    (docs/results.md);
  - ``int8``: uint8 rows of d_LM (the int8 codes + 128) and ``scale``, a float16 vector of d_LM (one per-channel
    scale): T·d_LM + 2·d_LM bytes (28,800), the least error of the compact codecs;
  - ``int4z``: 4-bit codes 0..15 packed two per byte (uint8 rows of d_LM/2), ``scale``, and ``zero``, the channels'
    4-bit zero points two a byte (uint8 of d_LM/2): 15,264 bytes, within half a scale too; about 1 F1 lost where
    the LM reads the memory on synthetic news, none on real news;
  - ``int4``: symmetric 4-bit codes packed two per byte and ``scale``: 14,976 bytes (a quarter more error than int4z);
  - ``fp16``: float16 rows of d_LM, bit-exact (55,296 bytes; every collection of a format-1 store).

  Read back only for the k hits of a search. It has a shard of its own so that building and merging the index never
  copies it. Decoding is exact and deterministic, and coding a decoded modulation again gives the same states, so an
  export → import round trip stays bit-exact.

Write order keeps the contract that no point is retrievable without its modulation: an upsert writes the
modulations first, then the index points; removals go the other way. Same semantics as every backend otherwise
(see :mod:`pipeline.store.base`). A write is in both shards' write-ahead logs when ``upsert`` returns: a process that
dies afterwards loses nothing (the next open replays them). The index's segment optimizers (HNSW building, merging)
run inline every ``optimize_every`` windows written to a collection: the Python binding holds the GIL while they
run, so that one call takes longer (``bench store`` reports the longest write). **One process per directory** (the
lock file; each shard's WAL locks too): in a Ray job one actor owns it (:mod:`pipeline.store.actor`). A directory
left in the old format (qdrant-client local mode) is refused with :class:`~pipeline.store.base.StoreFormatError`,
never read as empty.

Not reclaimed automatically: the space of modulations deleted, or replaced by a re-encoded document (the modulation
shard is append-only; :meth:`EdgeStore.compact` rewrites it on demand).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from pipeline.modulation import Modulation
from pipeline.modulation_codec import (
    MODULATION,
    SCALE,
    from_store_vectors,
    store_vector_names,
    store_vector_sizes,
    store_vectors,
)
from pipeline.schemas import Document, EncodedChunk, Hit
from pipeline.store.base import (
    CODECS,
    DEFAULT_CODEC,
    RETRIEVAL,
    SearchFilter,
    Store,
    StoreBusy,
    StoredDocument,
    StoreFormatError,
    _utc,
    check_codec,
    point_id,
)

# format 1: every collection's modulations in float16; format 2: each collection names its codec in codec.json
# (a collection without one is float16). A format-1 store is read as it is and upgraded to format 2 when a compact
# collection is created in it (a format-1 reader would misread one).
FORMAT, READS = {"engine": "qdrant-edge", "format": 2}, ({"engine": "qdrant-edge", "format": 1},)
MARKER, LOCK, COLLECTIONS, CODEC_FILE = "macstream-store.json", "macstream.lock", "collections", "codec.json"
INDEX, MODULATIONS = "index", "modulations"
# Windows written to a collection between two runs of the index shard's optimizers (the binding runs them in the
# caller's thread, holding the GIL) and between two flushes of both shards (a flush writes the segments and
# truncates the write-ahead log, which otherwise keeps every write: about 80 KB per modulation).
OPTIMIZE_EVERY = 4096
FLUSH_EVERY = 1024
# The index's segments: at most MAX_SEGMENT_KB of retrieval vectors each (about 26,000 windows of 384 float32), so an
# inline optimizer run never rebuilds a larger graph; the optimizers keep about SEGMENTS of them (merging the
# smallest). A search visits every segment: SEARCH_EF candidates per graph, OVERSAMPLING x k rescored exactly.
MAX_SEGMENT_KB, SEGMENTS = 40_000, 8
SEARCH_EF, OVERSAMPLING = 256, 4.0
_NAME = re.compile(r"^macstream-[A-Za-z0-9._-]+$")


def old_format_message(location: str) -> str:
    return (f"store {location} is in the old format (qdrant-client local mode: meta.json, collection/*/storage.sqlite),"
            f" which the embedded engine (Qdrant Edge) does not read; it is not opened as empty. Either copy it "
            f"without re-encoding (`macstream migrate-store --from {location} --to {location}.edge`, then "
            f"mv {location} {location}.old && mv {location}.edge {location}); or re-encode: move it aside (mv "
            f"{location} {location}.old), start ingest (or `macstream up`) on {location} and rewind the ingest group "
            f"to the start of the topic with `macstream replay --bootstrap-servers HOST:PORT --topic TOPIC --from "
            f"earliest` (what the topic still holds); or keep reading it with the old engine: --store local:{location}")


def check_format(root: Path) -> bool:
    """Raise :class:`StoreFormatError` when ``root`` is not an Edge store (or empty); return whether it is one."""
    if (root / "meta.json").exists() or (root / "collection").is_dir():
        raise StoreFormatError(old_format_message(str(root)))
    marker = root / MARKER
    if marker.exists():
        try:
            found = json.loads(marker.read_text())
        except ValueError:
            found = None
        if found != FORMAT and found not in READS:
            raise StoreFormatError(f"store {root}: {MARKER} says {found!r}; this version reads {[FORMAT, *READS]}")
        return True
    others = [p.name for p in root.iterdir() if p.name != LOCK] if root.is_dir() else []
    if others:
        raise StoreFormatError(f"{root} is not a macstream store (it holds {sorted(others)[:5]}): give an empty or new "
                               f"directory")
    return False


def lock(root: Path) -> int:
    """Take the store's lock (non-blocking); return the file descriptor that holds it. Raises :class:`StoreBusy`."""
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreBusy(f"store {root} is open in another process (an embedded store has one owner: stop the running "
                        f"ingest/serve job or point at a Qdrant server)") from None
    return fd


def check_free(location: str) -> None:
    """Raise :class:`StoreFormatError` (old or foreign directory) or :class:`StoreBusy` (held by another process)
    without opening the store; a directory that does not exist yet is free."""
    root = Path(location)
    if not root.exists():
        return
    check_format(root)
    os.close(lock(root))  # closing the descriptor releases the lock at once


class _Collection:
    """The two open shards of one collection, its codec and the windows written since the last optimize / flush."""

    def __init__(self, index, modulations, codec: str):
        self.index, self.modulations, self.codec = index, modulations, codec
        self.vectors = store_vector_names(codec)  # what a read fetches
        self.since_optimize = self.since_flush = 0


class EdgeStore(Store):
    """Qdrant Edge in this process: ``location`` is a directory (created when absent). ``codec``: how the collections
    this store creates code their modulations (``CODECS``; a collection keeps the codec it was created with).
    ``optimize_every`` and ``flush_every``: windows written to a collection between two runs of the index optimizers
    / two flushes."""

    def __init__(self, location: str, codec: str = DEFAULT_CODEC, optimize_every: int = OPTIMIZE_EVERY,
                 flush_every: int = FLUSH_EVERY):
        import qdrant_edge as qe

        self.q, self.codec = qe, check_codec(codec)
        self.location = location
        self.root = Path(location)
        self.root.mkdir(parents=True, exist_ok=True)
        known = check_format(self.root)
        self._lock: int | None = lock(self.root)
        if not known:
            (self.root / MARKER).write_text(json.dumps(FORMAT))
        self.optimize_every, self.flush_every = optimize_every, flush_every
        self._open: dict[str, _Collection] = {}

    # ---- shards --------------------------------------------------------------------------------------------------
    def _path(self, collection: str) -> Path:
        if not _NAME.match(collection) or ".." in collection:
            raise ValueError(f"not a collection name: {collection!r}")
        return self.root / COLLECTIONS / collection

    def _get(self, collection: str) -> _Collection | None:
        """The open shards of ``collection``, or None when it does not exist."""
        if collection in self._open:
            return self._open[collection]
        path = self._path(collection)
        if not (path / INDEX / "edge_config.json").exists():
            return None
        if not (path / MODULATIONS / "edge_config.json").exists():
            raise StoreFormatError(f"store {self.location}: collection {collection} has an index but no modulations")
        load = self.q.EdgeShard.load
        self._open[collection] = c = _Collection(load(str(path / INDEX)), load(str(path / MODULATIONS)),
                                                 self._codec_of(path))
        return c

    def _codec_of(self, path: Path) -> str:
        """The codec a collection was created with (none recorded: a format-1 collection, float16)."""
        if not (path / CODEC_FILE).exists():
            return "fp16"
        found = json.loads((path / CODEC_FILE).read_text()).get("codec")
        if found not in CODECS:
            raise StoreFormatError(f"store {self.location}: {path.name} is coded {found!r}, which this version does "
                                   f"not read ({', '.join(CODECS)})")
        return found

    def _write_json(self, path: Path, obj: dict) -> None:
        """Replace ``path`` atomically (a crash leaves the old or the new file, never half of one)."""
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(obj))
        os.replace(tmp, path)

    def _create(self, collection: str, d_enc: int, d_lm: int) -> _Collection:
        q, path = self.q, self._path(collection)
        # the codec, then modulations: an index without them is refused on open, modulations without an index are
        # invisible (and reused, with their codec: a process that died between the creations left them)
        path.mkdir(parents=True, exist_ok=True)
        if not (path / CODEC_FILE).exists():
            store_vector_sizes(self.codec, d_lm)  # refuses what the codec cannot hold
            self._write_json(path / CODEC_FILE, {"codec": self.codec})
        codec = self._codec_of(path)
        if codec != "fp16" and json.loads((self.root / MARKER).read_text()) != FORMAT:
            self._write_json(self.root / MARKER, FORMAT)  # a format-1 reader must not open a compact collection
        if (path / MODULATIONS / "edge_config.json").exists():
            modulations = q.EdgeShard.load(str(path / MODULATIONS))
        else:
            no_graph = q.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10_000)
            sizes = store_vector_sizes(codec, d_lm)
            rows = q.EdgeVectorParams(
                size=sizes[MODULATION], distance=q.Distance.Dot,
                datatype=q.VectorStorageDatatype.Float16 if codec == "fp16" else q.VectorStorageDatatype.Uint8,
                multivector_config=q.MultiVectorConfig(q.MultiVectorComparator.MaxSim), hnsw_config=no_graph,
                memory=q.Memory.Cold)
            vectors = {MODULATION: rows}
            for name in set(sizes) - {MODULATION}:  # the scale (float16); zero points, wide channels (uint8)
                vectors[name] = q.EdgeVectorParams(
                    size=sizes[name], distance=q.Distance.Dot, hnsw_config=no_graph, memory=q.Memory.Cold,
                    datatype=q.VectorStorageDatatype.Float16 if name == SCALE else q.VectorStorageDatatype.Uint8)
            modulations = q.EdgeShard.create(str(path / MODULATIONS), q.EdgeConfig(vectors=vectors,
                                                                                 payload_memory=q.Memory.Cold))
        index = q.EdgeShard.create(str(path / INDEX), q.EdgeConfig(
            vectors={RETRIEVAL: q.EdgeVectorParams(
                size=d_enc, distance=q.Distance.Cosine,
                hnsw_config=q.HnswIndexConfig(m=16, ef_construct=64, full_scan_threshold=10_000),
                quantization_config=q.ScalarQuantizationConfig(q.ScalarType.Int8, quantile=0.99, always_ram=True))},
            payload_memory=q.Memory.Cold,
            optimizers=q.EdgeOptimizersConfig(default_segment_number=SEGMENTS, max_segment_size=MAX_SEGMENT_KB)))
        for field, schema in (("doc_id", q.PayloadSchemaType.Keyword), ("chunk", q.PayloadSchemaType.Integer),
                              ("tenant", q.KeywordIndexParams(is_tenant=True)), ("source", q.PayloadSchemaType.Keyword),
                              ("published_ts", q.PayloadSchemaType.Float)):
            index.update(q.UpdateOperation.create_field_index(field, schema))
        self._open[collection] = c = _Collection(index, modulations, codec)
        return c

    def _wrote(self, c: _Collection, n: int) -> None:
        c.since_optimize += n
        c.since_flush += n
        if c.since_optimize >= self.optimize_every:
            c.index.optimize()
            c.since_optimize = 0
        if c.since_flush >= self.flush_every:
            c.modulations.flush()
            c.index.flush()
            c.since_flush = 0

    def optimize(self, collection: str | None = None) -> None:
        """Run the index shard's optimizers now (build the HNSW graph and quantised copies, merge segments) and flush
        both shards, on one collection or on every open one."""
        for name in [collection] if collection else list(self._open):
            c = self._get(name)
            if c is not None:
                c.index.optimize()
                c.modulations.flush()
                c.index.flush()
                c.since_optimize = c.since_flush = 0

    def compact(self, collection: str) -> None:
        """Reclaim the space of deleted or replaced modulations (rewrites the modulation shard: as long as copying
        it takes; the store answers nothing meanwhile)."""
        c = self._get(collection)
        if c is not None:
            c.modulations.optimize()

    # ---- filters -------------------------------------------------------------------------------------------------
    def _doc_filter(self, doc_id: str):
        return self.q.Filter(must=[self.q.FieldCondition("doc_id", match=self.q.MatchValue(doc_id))])

    def _filter(self, flt: SearchFilter | None, *extra):
        q, must = self.q, list(extra)
        if flt is not None:
            if flt.since or flt.until:
                must.append(q.FieldCondition("published_ts", range=q.RangeFloat(
                    gte=_utc(flt.since).timestamp() if flt.since else None,
                    lte=_utc(flt.until).timestamp() if flt.until else None)))
            for key in ("source", "tenant"):
                if getattr(flt, key) is not None:
                    must.append(q.FieldCondition(key, match=q.MatchValue(getattr(flt, key))))
        return q.Filter(must=must) if must else None

    def _ids(self, c: _Collection, flt) -> list:
        """Ids of every index point matching ``flt`` (a document's chunks: a handful)."""
        q, ids, offset = self.q, [], None
        while True:
            records, offset = c.index.scroll(q.ScrollRequest(offset=offset, limit=1024, filter=flt,
                                                             with_payload=False, with_vector=False))
            ids += [r.id for r in records]
            if offset is None:
                return ids

    def _remove(self, c: _Collection, ids: list) -> None:
        """Index points first, then their modulations: never a retrievable point without its modulation."""
        c.index.update(self.q.UpdateOperation.delete_points(ids))
        c.modulations.update(self.q.UpdateOperation.delete_points(ids))

    # ---- interface -----------------------------------------------------------------------------------------------
    def upsert(self, collection: str, doc: Document, content_hash: str, chunks: list[EncodedChunk]) -> None:
        version = self.check_chunks(doc, chunks)
        q = self.q
        c = self._get(collection) or self._create(collection, int(chunks[0].vector.shape[0]),
                                                   int(chunks[0].modulation.tokens.shape[1]))
        ids = [point_id(version, doc.id, ch.modulation.chunk) for ch in chunks]
        before = c.index.retrieve(ids[:1], with_payload=["n_chunks"], with_vector=False)  # the stored version's length
        stored = before[0].payload["n_chunks"] if before else 0
        flat = {"doc_id": doc.id, "content_hash": content_hash, "source": doc.source, "tenant": doc.tenant,
                "published_ts": _utc(doc.published_at).timestamp() if doc.published_at else None,
                "document": doc.model_dump(mode="json", exclude_none=True)}
        # one operation per shard (every chunk of the document or none), modulations before the points that use them
        c.modulations.update(q.UpdateOperation.upsert_points(
            [q.Point(i, store_vectors(ch.modulation.tokens, c.codec)) for i, ch in zip(ids, chunks)]))
        c.index.update(q.UpdateOperation.upsert_points(
            [q.Point(i, {RETRIEVAL: np.asarray(ch.vector, np.float32).tolist()},
                     flat | {"chunk": ch.modulation.chunk, "n_chunks": ch.modulation.n_chunks,
                             "model_id": ch.modulation.model_id, "checkpoint": ch.modulation.checkpoint})
             for i, ch in zip(ids, chunks)]))
        # overwrite first, then drop the tail of a document that shrank: never a moment without the document
        tail = [point_id(version, doc.id, i) for i in range(len(chunks), stored)]
        if tail:
            self._remove(c, tail)
        self._wrote(c, len(chunks))

    def delete(self, collection: str, doc_id: str) -> bool:
        c = self._get(collection)
        ids = self._ids(c, self._doc_filter(doc_id)) if c is not None else []
        if ids:
            self._remove(c, ids)
        return bool(ids)

    def content_hashes(self, collection: str, doc_ids: list[str]) -> dict[str, str]:
        c = self._get(collection)
        if not doc_ids or c is None:
            return {}
        version = collection.removeprefix("macstream-")
        records = c.index.retrieve([point_id(version, d, 0) for d in doc_ids], with_payload=["doc_id", "content_hash"],
                                   with_vector=False)
        return {r.payload["doc_id"]: r.payload["content_hash"] for r in records}

    def search(self, collection: str, vectors: np.ndarray, k: int, flt: SearchFilter | None = None) -> list[list[Hit]]:
        c = self._get(collection)
        if k <= 0 or c is None or len(vectors) == 0:
            return [[] for _ in range(len(vectors))]
        q, qf = self.q, self._filter(flt)
        exact_scores = q.SearchParams(hnsw_ef=SEARCH_EF, quantization=q.QuantizationSearchParams(
            rescore=True, oversampling=OVERSAMPLING))
        reqs = [q.QueryRequest(limit=k, query=q.Query.Nearest(np.asarray(v, np.float32).tolist(), using=RETRIEVAL),
                               filter=qf, params=exact_scores, with_payload=True, with_vector=[RETRIEVAL])
                for v in vectors]
        found = c.index.query_batch(q.QueryBatchRequest(reqs))
        ids = list({str(p.id): p.id for points in found for p in points}.values())  # the top-k only, once each
        mods = self._modulations(c, ids)
        missing = [i for i in ids if str(i) not in mods]
        if missing:
            raise RuntimeError(f"store {self.location}: {collection} points without a modulation: {missing[:3]}")
        return [[self._hit(p, mods[str(p.id)]) for p in points] for points in found]

    @staticmethod
    def _modulations(c: _Collection, ids: list) -> dict[str, np.ndarray]:
        """point id → its decoded modulation (T, d_LM) float16, for the ids that have one."""
        read = c.modulations.retrieve(ids, with_payload=False, with_vector=c.vectors)
        return {str(r.id): from_store_vectors(r.vector, c.codec) for r in read}

    @staticmethod
    def _chunk(point, tokens: np.ndarray) -> EncodedChunk:
        p = point.payload
        mod = Modulation(p["doc_id"], p["chunk"], p["n_chunks"], tokens, p["model_id"], p["checkpoint"])
        return EncodedChunk(mod, np.asarray(point.vector[RETRIEVAL], np.float32))

    def _hit(self, point, tokens: np.ndarray) -> Hit:
        return Hit(self._chunk(point, tokens), Document.model_validate(point.payload["document"]), float(point.score))

    def document_ids(self, collection: str) -> list[str]:
        c = self._get(collection)
        if c is None:
            return []
        q, ids, offset = self.q, [], None
        first = q.Filter(must=[q.FieldCondition("chunk", match=q.MatchValue(0))])
        while True:
            records, offset = c.index.scroll(q.ScrollRequest(offset=offset, limit=4096, filter=first,
                                                             with_payload=["doc_id"], with_vector=False))
            ids += [r.payload["doc_id"] for r in records]
            if offset is None:
                return sorted(ids)

    def documents(self, collection: str, doc_ids: list[str]) -> list[StoredDocument]:
        c = self._get(collection)
        if c is None or not doc_ids:
            return []
        version = collection.removeprefix("macstream-")
        heads = c.index.retrieve([point_id(version, d, 0) for d in doc_ids], with_payload=["doc_id", "n_chunks"],
                                 with_vector=False)
        n = {r.payload["doc_id"]: r.payload["n_chunks"] for r in heads}
        ids = [point_id(version, d, i) for d in doc_ids if d in n for i in range(n[d])]
        points = {str(r.id): r for r in c.index.retrieve(ids, with_payload=True, with_vector=[RETRIEVAL])}
        mods = self._modulations(c, ids)
        out = []
        for d in doc_ids:
            mine = [str(point_id(version, d, i)) for i in range(n.get(d, 0))]
            if mine and all(i in points and i in mods for i in mine):  # a document deleted meanwhile: skipped whole
                first = points[mine[0]].payload
                out.append(StoredDocument(Document.model_validate(first["document"]), first["content_hash"],
                                          [self._chunk(points[i], mods[i]) for i in mine]))
        return out

    def counts(self, collection: str, tenant: str | None = None) -> dict[str, int]:
        c = self._get(collection)
        if c is None:
            return {"documents": 0, "chunks": 0}
        q, scope = self.q, SearchFilter(tenant=tenant)
        chunks = c.index.count(q.CountRequest(exact=True, filter=self._filter(scope)))
        first = q.FieldCondition("chunk", match=q.MatchValue(0))
        docs = c.index.count(q.CountRequest(exact=True, filter=self._filter(scope, first)))
        return {"documents": docs, "chunks": chunks}

    def codec_of(self, collection: str) -> str | None:
        c = self._get(collection)
        return c.codec if c is not None else None

    def collections(self) -> list[str]:
        base = self.root / COLLECTIONS
        names = [p.name for p in base.iterdir() if _NAME.match(p.name)] if base.is_dir() else []
        return sorted(n for n in names if self.counts(n)["chunks"])

    def newest_published(self, collection: str, tenant: str | None = None) -> datetime | None:
        c = self._get(collection)
        if c is None:
            return None
        q = self.q
        records, _ = c.index.scroll(q.ScrollRequest(limit=1, filter=self._filter(SearchFilter(tenant=tenant)),
                                                    with_payload=["published_ts"], with_vector=False,
                                                    order_by=q.OrderBy("published_ts", q.Direction.Desc)))
        if not records or records[0].payload.get("published_ts") is None:
            return None
        return datetime.fromtimestamp(records[0].payload["published_ts"], UTC)

    def close(self) -> None:
        """Flush and close every shard, then release the directory. Idempotent."""
        for c in self._open.values():
            c.modulations.close()
            c.index.close()
        self._open.clear()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
