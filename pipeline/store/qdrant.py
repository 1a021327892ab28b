"""The Qdrant backend (qdrant-client): a server URL in production, ":memory:", or a local directory in qdrant-client's
pure-Python local mode (the embedded engine before Qdrant Edge, chosen with ``--store local:DIR``; **one process per
path**: in a Ray job one actor owns it, see :mod:`pipeline.store.actor`).

Same semantics as every backend (see :mod:`pipeline.store.base`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.modulation import Modulation
from pipeline.modulation_codec import (
    MODULATION,
    SCALE,
    WIDE_CHANNELS,
    ZERO,
    from_store_vectors,
    store_vector_sizes,
    store_vectors,
)
from pipeline.schemas import Document, EncodedChunk, Hit
from pipeline.store.base import (
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

LEGACY = "payload"  # a collection of the layout before native modulations: one unnamed vector, base64 in the payload


class ServerLayout(BaseModel):
    """How a collection is laid out on a Qdrant server in distributed mode, from the store URL's query string, e.g.
    ``http://qdrant:6333?shards=6&replicas=2``. Applied when a collection is created (one per checkpoint version: the
    next checkpoint's collection gets the new layout); an existing collection keeps its own (Qdrant moves and
    replicates shards online). Unset: the server's defaults (one shard, replication factor 1)."""

    model_config = ConfigDict(extra="forbid")

    shards: int | None = Field(None, ge=1, description="Shards per collection (spread over the peers).")
    replicas: int | None = Field(None, ge=1, description="Copies of each shard (replication factor): a collection "
                                 "stays readable and writable with replicas - 1 peers down.")
    write_consistency: int | None = Field(None, ge=1, description="Replicas that must acknowledge a write before it "
                                          "returns (write consistency factor); at most ``replicas``.")

    @model_validator(mode="after")
    def _consistent(self) -> ServerLayout:
        if self.write_consistency and self.write_consistency > (self.replicas or 1):
            raise ValueError(f"write_consistency={self.write_consistency} exceeds replicas={self.replicas or 1}")
        return self

    @classmethod
    def from_url(cls, url: str) -> tuple[str, ServerLayout]:
        """Split ``url`` into the server URL (query removed) and its layout. Raises ValueError on unknown keys."""
        parts = urlsplit(url)
        try:
            layout = cls.model_validate(dict(parse_qsl(parts.query, strict_parsing=bool(parts.query))))
        except (ValidationError, ValueError) as err:
            raise ValueError(f"store URL {url}: the query sets the server layout (shards, replicas, "
                             f"write_consistency): {err}") from None
        return urlunsplit(parts._replace(query="")), layout


class QdrantStore(Store):
    """qdrant-client: ``location`` is a server URL (http://host:6333, optionally ``?shards=N&replicas=R``: see
    :class:`ServerLayout`), a local directory (local mode), or ":memory:".

    A collection it creates holds one point per window with named vectors: ``retrieval`` (d_enc, cosine, the one the
    HNSW index is built on) and the modulation stored natively, coded by ``codec`` (``int8`` by default, ``int4z``,
    ``int4zw``, ``int4``, ``fp16``; :func:`pipeline.modulation_codec.store_vectors`): ``modulation`` (a uint8 or
    float16 multivector), ``scale`` (float16, not for fp16), for int4z and int4zw ``zero`` (uint8), and for int4zw
    ``wide`` (uint8), all without an index and on disk, read back only for the hits of a search. The codec is read
    from the collection's vector layout, so a collection keeps the one it was created with. The payload (JSON) holds
    the document's fields and the filterable keys ``doc_id``, ``chunk``, ``published_ts`` (epoch seconds), ``source``,
    ``tenant``; on a server these get payload indexes.

    A collection written before native modulations (one unnamed vector, the modulation as base64 float16 in the
    payload) is read and written in that layout, as it was.
    """

    def __init__(self, location: str, api_key: str | None = None, codec: str = DEFAULT_CODEC):
        from qdrant_client import QdrantClient, models

        self._m = models
        self.location = location
        self.remote = location.startswith(("http://", "https://"))
        url, self.layout = ServerLayout.from_url(location) if self.remote else (location, ServerLayout())
        if self.remote:
            self.client = QdrantClient(url=url, api_key=api_key)
        elif location == ":memory:":
            self.client = QdrantClient(location=":memory:")
        else:
            try:
                self.client = QdrantClient(path=location)
            except RuntimeError as err:  # the storage folder is locked by another process
                raise StoreBusy(f"store {location} is open in another process (an embedded store has one owner: "
                                   f"stop the running ingest/serve job or point at a Qdrant server): {err}") from None
        self.codec = check_codec(codec)
        self._layout: dict[str, str] = {}  # collection → its codec, or LEGACY

    # ---- helpers -------------------------------------------------------------------------------------------------
    def _layout_of(self, collection: str) -> str | None:
        """The codec an existing collection stores its modulations with (LEGACY: base64 payload); None: absent."""
        if collection in self._layout:
            return self._layout[collection]
        if not self.client.collection_exists(collection):
            return None
        vectors = self.client.get_collection(collection).config.params.vectors
        if not isinstance(vectors, dict):
            layout = LEGACY
        elif RETRIEVAL in vectors and MODULATION in vectors:
            rows = vectors[MODULATION]
            if SCALE not in vectors:
                layout = "fp16"
            elif WIDE_CHANNELS in vectors:
                layout = "int4zw"
            elif ZERO in vectors:
                layout = "int4z"
            else:
                layout = "int4" if rows.size * 2 == vectors[SCALE].size else "int8"
        else:
            raise StoreFormatError(f"collection {collection} in {self.location} has vectors {sorted(vectors)}: not "
                                   f"a macstream collection")
        self._layout[collection] = layout
        return layout

    def _ensure(self, collection: str, d_enc: int, d_lm: int) -> str:
        """Create ``collection`` when absent (with this store's codec); returns its layout."""
        layout = self._layout_of(collection)
        if layout is None:
            m = self._m
            sizes = store_vector_sizes(self.codec, d_lm)
            # read back for the hits, never searched: no graph, on disk
            stored = dict(distance=m.Distance.DOT, on_disk=True, hnsw_config=m.HnswConfigDiff(m=0))
            vectors = {RETRIEVAL: m.VectorParams(size=d_enc, distance=m.Distance.COSINE),
                       MODULATION: m.VectorParams(
                           size=sizes[MODULATION], **stored,
                           datatype=m.Datatype.FLOAT16 if self.codec == "fp16" else m.Datatype.UINT8,
                           multivector_config=m.MultiVectorConfig(comparator=m.MultiVectorComparator.MAX_SIM))}
            for name in set(sizes) - {MODULATION}:  # the scale (float16); zero points, wide channels (uint8)
                vectors[name] = m.VectorParams(size=sizes[name], **stored,
                                               datatype=m.Datatype.FLOAT16 if name == SCALE else m.Datatype.UINT8)
            self.client.create_collection(collection, vectors_config=vectors,
                                          shard_number=self.layout.shards, replication_factor=self.layout.replicas,
                                          write_consistency_factor=self.layout.write_consistency)
            if self.remote:  # local mode ignores payload indexes (and warns)
                tenant = m.KeywordIndexParams(type=m.KeywordIndexType.KEYWORD, is_tenant=True)  # co-locates a tenant
                for field, kind in (("doc_id", m.PayloadSchemaType.KEYWORD), ("source", m.PayloadSchemaType.KEYWORD),
                                    ("tenant", tenant), ("published_ts", m.PayloadSchemaType.FLOAT),
                                    ("chunk", m.PayloadSchemaType.INTEGER)):
                    self.client.create_payload_index(collection, field, kind)
            self._layout[collection] = layout = self.codec
        return layout

    def _exists(self, collection: str) -> bool:
        return self._layout_of(collection) is not None

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
    def _chunk(point, layout: str) -> EncodedChunk:
        p, v = point.payload, point.vector
        if layout == LEGACY:
            tokens, vector = Modulation.decode_tokens(p["tokens"], p["num_tokens"]), v
        else:
            tokens, vector = from_store_vectors(v, layout), v.get(RETRIEVAL)
        mod = Modulation(p["doc_id"], p["chunk"], p["n_chunks"], tokens, p["model_id"], p["checkpoint"])
        return EncodedChunk(mod, np.asarray(vector, np.float32) if vector is not None else None)

    def _hit(self, point, layout: str) -> Hit:
        return Hit(self._chunk(point, layout), Document.model_validate(point.payload["document"]), float(point.score))

    # ---- interface -----------------------------------------------------------------------------------------------
    def upsert(self, collection: str, doc: Document, content_hash: str, chunks: list[EncodedChunk]) -> None:
        version = self.check_chunks(doc, chunks)
        layout = self._ensure(collection, int(chunks[0].vector.shape[0]), int(chunks[0].modulation.tokens.shape[1]))
        m = self._m
        meta = doc.model_dump(mode="json", exclude_none=True)
        flat = {"doc_id": doc.id, "content_hash": content_hash, "source": doc.source, "tenant": doc.tenant,
                "published_ts": _utc(doc.published_at).timestamp() if doc.published_at else None}

        points = []
        for c in chunks:
            vector = np.asarray(c.vector, np.float32).tolist()
            payload = flat | {"chunk": c.modulation.chunk, "n_chunks": c.modulation.n_chunks, "document": meta,
                              "model_id": c.modulation.model_id, "checkpoint": c.modulation.checkpoint}
            if layout == LEGACY:
                payload |= {"num_tokens": int(c.modulation.tokens.shape[0]), "tokens": c.modulation.tokens_b64()}
            else:
                vector = {RETRIEVAL: vector, **store_vectors(c.modulation.tokens, layout)}
            points.append(m.PointStruct(id=point_id(version, doc.id, c.modulation.chunk), vector=vector,
                                        payload=payload))
        self.client.upsert(collection, points=points, wait=True)
        # overwrite first, then drop the tail of a document that shrank: never a moment without the document
        tail = m.FilterSelector(filter=self._doc_filter(doc.id, len(chunks)))
        self.client.delete(collection, points_selector=tail, wait=True)

    def delete(self, collection: str, doc_id: str) -> bool:
        if not self._exists(collection):
            return False
        existed = self.client.count(collection, count_filter=self._doc_filter(doc_id), exact=True).count > 0
        if existed:
            selector = self._m.FilterSelector(filter=self._doc_filter(doc_id))
            self.client.delete(collection, points_selector=selector, wait=True)
        return existed

    def content_hashes(self, collection: str, doc_ids: list[str]) -> dict[str, str]:
        if not doc_ids or not self._exists(collection):
            return {}
        version = collection.removeprefix("macstream-")
        points = self.client.retrieve(collection, ids=[point_id(version, d, 0) for d in doc_ids],
                                      with_payload=["doc_id", "content_hash"], with_vectors=False)
        return {p.payload["doc_id"]: p.payload["content_hash"] for p in points}

    def search(self, collection: str, vectors: np.ndarray, k: int, flt: SearchFilter | None = None) -> list[list[Hit]]:
        layout = self._layout_of(collection) if k > 0 else None
        if layout is None:
            return [[] for _ in range(len(vectors))]
        m = self._m
        qf = self._filter(flt)
        using = None if layout == LEGACY else RETRIEVAL
        reqs = [m.QueryRequest(query=np.asarray(v, np.float32).tolist(), using=using, limit=k, filter=qf,
                               with_payload=True, with_vector=True) for v in vectors]
        return [[self._hit(p, layout) for p in r.points]
                for r in self.client.query_batch_points(collection, requests=reqs)]

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

    def codec_of(self, collection: str) -> str | None:
        layout = self._layout_of(collection)
        return "fp16" if layout == LEGACY else layout  # the old layout holds float16 too

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
        return datetime.fromtimestamp(points[0].payload["published_ts"], UTC)

    def document_ids(self, collection: str) -> list[str]:
        if not self._exists(collection):
            return []
        m, ids, offset = self._m, [], None
        first = m.Filter(must=[m.FieldCondition(key="chunk", match=m.MatchValue(value=0))])
        while True:
            points, offset = self.client.scroll(collection, scroll_filter=first, limit=4096, offset=offset,
                                                with_payload=["doc_id"], with_vectors=False)
            ids += [p.payload["doc_id"] for p in points]
            if offset is None:
                return sorted(ids)

    def documents(self, collection: str, doc_ids: list[str]) -> list[StoredDocument]:
        layout = self._layout_of(collection) if doc_ids else None
        if layout is None:
            return []
        version = collection.removeprefix("macstream-")
        heads = self.client.retrieve(collection, ids=[point_id(version, d, 0) for d in doc_ids],
                                     with_payload=["doc_id", "n_chunks"], with_vectors=False)
        n = {p.payload["doc_id"]: p.payload["n_chunks"] for p in heads}
        ids = [point_id(version, d, i) for d in doc_ids if d in n for i in range(n[d])]
        points = {str(p.id): p for p in self.client.retrieve(collection, ids=ids, with_payload=True,
                                                             with_vectors=True)}
        out = []
        for d in doc_ids:
            mine = [str(point_id(version, d, i)) for i in range(n.get(d, 0))]
            if mine and all(i in points for i in mine):  # a document deleted meanwhile: skipped whole
                first = points[mine[0]].payload
                out.append(StoredDocument(Document.model_validate(first["document"]), first["content_hash"],
                                          [self._chunk(points[i], layout) for i in mine]))
        return out

    def close(self) -> None:
        self.client.close()
