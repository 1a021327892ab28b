"""Copy a store of the old embedded format (qdrant-client local mode) into a new Qdrant Edge store, without
re-encoding: every point's document, content hash, retrieval vector and modulation (base64 float16 in the old payload,
a native float16 multivector in the new store: codec fp16, bit for bit) are carried over, one collection per
checkpoint version.

The old store is only read (through the store interface, ``page`` documents at a time); the new one must be a new or
empty directory. A document whose chunks are not all there (0..n_chunks-1) is not written and is counted under
``incomplete`` (one without its first chunk is not listed at all). At the end the documents written are counted in the
new store: a difference raises. Local mode holds the whole old store in RAM while it reads it, as it always did.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.store.base import StoreFormatError


def migrate_local(old: str, new: str, page: int = 256) -> dict:
    """Copy the local-mode store at ``old`` into a new Edge store at ``new``; return, per collection, the documents
    and chunks written and the incomplete documents skipped."""
    from pipeline.store.edge import EdgeStore
    from pipeline.store.qdrant import QdrantStore

    if not (Path(old) / "meta.json").exists():
        raise StoreFormatError(f"{old} is not a store of the old format (qdrant-client local mode: no meta.json)")
    if Path(new).exists() and any(Path(new).iterdir()):
        raise StoreFormatError(f"{new} is not empty: migrate into a new directory")
    src, dst = QdrantStore(old), EdgeStore(new, codec="fp16")  # a copy, bit for bit
    report = {}
    try:
        for coll in src.collections():
            written = 0
            for doc, content_hash, chunks in src.iter_documents(coll, batch=page):  # complete documents only
                dst.upsert(coll, doc, content_hash, chunks)
                written += 1
            dst.optimize(coll)
            counts, expected = dst.counts(coll), src.counts(coll)
            incomplete = expected["documents"] - written
            if counts["documents"] != written:
                raise RuntimeError(f"{coll}: {expected} in {old}, {written} read, {counts} written to {new}")
            report[coll] = counts | {"incomplete": incomplete}
    finally:
        src.close()
        dst.close()
    return report
