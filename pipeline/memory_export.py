"""A collection's memory as one Parquet file, and back: backups, moving a memory between store backends, sharing an
encoded archive.

One row per stored point (document window), sorted by document id then chunk, with the columns of :func:`schema`:

- ``point_id`` (the store's deterministic id), ``id``, ``chunk``, ``n_chunks``, ``content_hash``;
- the document's fields (``text``, ``title``, ``published_at``, ``source``, ``url``, ``tenant``) as the store holds
  them: strings, ``published_at`` in ISO-8601 with its original offset (so the content hash still matches), null
  when absent;
- ``vector``: the retrieval vector, ``fixed_size_list<float32>[d_enc]``;
- ``modulation``: the modulation, ``fixed_size_list<fixed_size_list<float16>[d_LM]>[T]``, bit-exact.

Schema metadata: ``macstream.format`` (:data:`FORMAT`), ``macstream.checkpoint`` (the version that produced the
modulations), ``macstream.model_id``, ``macstream.collection``, ``macstream.documents``, ``macstream.points``. Export
is deterministic (same memory → same rows, same metadata), so export → import → export round-trips bit-exact.
Import writes through the :class:`~pipeline.store.Store` interface into any backend, document by document
(``upsert``: idempotent, a document already stored is replaced by the file's), and refuses a file of another
checkpoint version: its modulations mean nothing to another checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.modulation import Modulation
from pipeline.schemas import Document, EncodedChunk
from pipeline.store import Store, StoredDocument, collection_name, point_id

FORMAT = "1"
DOC_FIELDS = [f for f in Document.model_fields if f != "id"]
ROWS_PER_GROUP = 512


class ExportFormatError(ValueError):
    """The file is not a memory export this version reads (or it is damaged)."""


class VersionMismatch(ValueError):
    """The file's modulations were produced by another checkpoint than the one the store is filled for."""


def schema(d_enc: int, num_tokens: int, d_lm: int, meta: dict[str, str]) -> pa.Schema:
    fields = [pa.field("point_id", pa.string(), False), pa.field("id", pa.string(), False),
              pa.field("chunk", pa.int32(), False), pa.field("n_chunks", pa.int32(), False),
              pa.field("content_hash", pa.string(), False)]
    fields += [pa.field(f, pa.string()) for f in DOC_FIELDS]
    fields += [pa.field("vector", pa.list_(pa.float32(), d_enc), False),
               pa.field("modulation", pa.list_(pa.list_(pa.float16(), d_lm), num_tokens), False)]
    return pa.schema(fields, metadata={f"macstream.{k}": str(v) for k, v in meta.items()})


def stored_documents(store: Store, collection: str) -> list[StoredDocument]:
    """Every document of ``collection`` with its content hash and all its chunks, sorted by id (all in memory: for
    small collections and tests; an export streams :meth:`Store.iter_documents` instead)."""
    return list(store.iter_documents(collection))


def _table(rows: list[tuple[Document, str, EncodedChunk]], sch: pa.Schema) -> pa.Table:
    d_enc = sch.field("vector").type.list_size
    mod_type = sch.field("modulation").type
    dumped = [doc.model_dump(mode="json") for doc, _, _ in rows]
    cols: dict[str, pa.Array] = {
        "point_id": pa.array([point_id(c.modulation.checkpoint, d.id, c.modulation.chunk) for d, _, c in rows]),
        "id": pa.array([d.id for d, _, _ in rows]),
        "chunk": pa.array([c.modulation.chunk for _, _, c in rows], pa.int32()),
        "n_chunks": pa.array([c.modulation.n_chunks for _, _, c in rows], pa.int32()),
        "content_hash": pa.array([h for _, h, _ in rows]),
    }
    for f in DOC_FIELDS:
        cols[f] = pa.array([d[f] for d in dumped], pa.string())
    vecs = np.stack([np.asarray(c.vector, np.float32) for _, _, c in rows])
    mods = np.stack([c.modulation.tokens.astype(np.float16) for _, _, c in rows])
    cols["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), d_enc)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(mods.reshape(-1), pa.float16()), mod_type.value_type.list_size)
    cols["modulation"] = pa.FixedSizeListArray.from_arrays(inner, mod_type.list_size)
    return pa.Table.from_arrays([cols[f.name] for f in sch], schema=sch)


def export_collection(store: Store, collection: str, out: str | Path, batch: int = 256) -> dict:
    """Write every point of ``collection`` to ``out``, streaming: documents are read ``batch`` at a time
    (:meth:`Store.iter_documents`) and written as they come, so memory stays bounded by one batch at any size. The file
    is written to ``<out>.partial`` and moved into place only when complete. Returns {file, collection, checkpoint,
    model_id, documents, points, bytes}. An empty collection is refused; so is a collection that changed while it was
    read (documents or points at the end differ from the start: the file would not be one state of the memory), and
    one holding modulations of several checkpoints; in each case nothing is left at ``out``."""
    import pyarrow.parquet as pq

    before = store.counts(collection)
    if not before["chunks"]:
        raise ValueError(f"export: collection {collection} is empty or absent in this store (collections here: "
                         f"{', '.join(store.collections()) or 'none'})")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    writer, sch, stamp, docs, points, rows = None, None, None, 0, 0, []

    def flush() -> None:
        nonlocal writer, sch
        if writer is None:
            first = rows[0][2].modulation
            meta = {"format": FORMAT, "checkpoint": first.checkpoint, "model_id": first.model_id,
                    "collection": collection, "documents": before["documents"], "points": before["chunks"]}
            sch = schema(int(np.asarray(rows[0][2].vector).shape[0]), *first.tokens.shape, meta)
            writer = pq.ParquetWriter(partial, sch, compression="zstd")
        writer.write_table(_table(rows, sch))
        rows.clear()

    try:
        for doc, content_hash, chunks in store.iter_documents(collection, batch):
            for c in chunks:
                mine = (c.modulation.checkpoint, c.modulation.model_id)
                if stamp is not None and mine != stamp:
                    raise RuntimeError(f"export: {collection} holds modulations of several checkpoints: "
                                       f"{sorted({stamp, mine})}; nothing written")
                stamp = mine
                rows.append((doc, content_hash, c))
            docs, points = docs + 1, points + len(chunks)
            if len(rows) >= ROWS_PER_GROUP:
                flush()
        if rows:
            flush()
        after = store.counts(collection)
        if (docs, points) != (before["documents"], before["chunks"]) or after != before:
            raise RuntimeError(f"export: {collection} changed while it was read ({before['documents']} documents / "
                               f"{before['chunks']} points at the start, {docs} / {points} read, "
                               f"{after['documents']} / {after['chunks']} at the end); nothing written: export again "
                               f"while nothing writes to it")
    except BaseException:
        if writer is not None:
            writer.close()
        partial.unlink(missing_ok=True)
        raise
    writer.close()
    partial.replace(out)
    return {"file": str(out), "collection": collection, "checkpoint": stamp[0], "model_id": stamp[1],
            "documents": docs, "points": points, "bytes": out.stat().st_size}


def read_header(path: str | Path) -> dict[str, str]:
    """The export's metadata (without the ``macstream.`` prefix). Raises :class:`ExportFormatError` for a file that
    is not an export of this format."""
    import pyarrow.parquet as pq

    try:
        sch = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise ExportFormatError(f"{path}: not a Parquet file ({err})") from None
    meta = {k.decode(): v.decode() for k, v in (sch.metadata or {}).items() if k.startswith(b"macstream.")}
    meta = {k.removeprefix("macstream."): v for k, v in meta.items()}
    if meta.get("format") != FORMAT:
        raise ExportFormatError(f"{path}: not a macstream memory export of format {FORMAT} (its metadata says "
                                f"format {meta.get('format')!r})")
    missing = [f.name for f in schema(1, 1, 1, {}) if f.name not in sch.names]
    if missing:
        raise ExportFormatError(f"{path}: columns {missing} are missing")
    return meta


def _check_layout(path: str | Path) -> None:
    """Every document's rows contiguous, chunks 0..n-1 in order: checked before anything is written."""
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["id", "chunk", "n_chunks"]).to_pydict()
    prev, want, n_prev = None, 0, 0
    seen: set[str] = set()
    for doc_id, chunk, n in zip(t["id"], t["chunk"], t["n_chunks"]):
        if doc_id != prev:
            if prev is not None and want != n_prev:
                raise ExportFormatError(f"{path}: document {prev!r} has {want} of its {n_prev} chunks")
            if doc_id in seen:
                raise ExportFormatError(f"{path}: the rows of document {doc_id!r} are not together")
            seen.add(doc_id)
            prev, want = doc_id, 0
        if chunk != want:
            raise ExportFormatError(f"{path}: document {doc_id!r}: chunk {chunk} where {want} was expected")
        want, n_prev = want + 1, n
    if prev is not None and want != n_prev:
        raise ExportFormatError(f"{path}: document {prev!r} has {want} of its {n_prev} chunks")


def import_file(store: Store, path: str | Path, version: str, model_id: str) -> dict:
    """Write every document of the export at ``path`` into ``store`` (collection of ``version``). Raises
    :class:`VersionMismatch` (one line) when the file holds another checkpoint version's modulations, and
    :class:`ExportFormatError` for a damaged file, both before anything is written. The modulations are stamped with
    ``model_id``, the importing checkpoint's (same version = same weights; the LM's name in a model id can be a
    machine's local path, so the exporter's is kept only in the file's metadata). Returns {file, collection,
    checkpoint, documents, points}."""
    import pyarrow.parquet as pq

    meta = read_header(path)
    if meta.get("checkpoint") != version:
        raise VersionMismatch(f"{path} holds modulations of checkpoint {meta.get('checkpoint')}, not of {version}, the "
                              f"checkpoint this store is filled for: import it with --checkpoint set to that "
                              f"checkpoint, or re-encode the documents with `macstream backfill`")
    _check_layout(path)
    collection = collection_name(version)
    docs = points = 0
    pending: list[tuple[Document, str, EncodedChunk]] = []

    def flush() -> None:
        nonlocal docs
        doc, h, _ = pending[0]
        store.upsert(collection, doc, h, [c for _, _, c in pending])
        docs += 1
        pending.clear()

    for batch in pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_GROUP):
        num_tokens = batch.schema.field("modulation").type.list_size
        vecs = batch.column("vector").flatten().to_numpy().reshape(len(batch), -1)
        mods = batch.column("modulation").flatten().flatten().to_numpy().reshape(len(batch), num_tokens, -1)
        cols = batch.select(["id", "chunk", "n_chunks", "content_hash", *DOC_FIELDS]).to_pydict()
        for i in range(len(batch)):
            if pending and pending[0][0].id != cols["id"][i]:
                flush()
            if not pending:
                fields = {f: cols[f][i] for f in DOC_FIELDS if cols[f][i] is not None}
                doc = Document.model_validate({"id": cols["id"][i], **fields})
            else:
                doc = pending[0][0]
            mod = Modulation(doc.id, cols["chunk"][i], cols["n_chunks"][i], mods[i].copy(), model_id, version)
            pending.append((doc, cols["content_hash"][i], EncodedChunk(mod, vecs[i].copy())))
            points += 1
    if pending:
        flush()
    return {"file": str(path), "collection": collection, "checkpoint": version, "documents": docs, "points": points}
