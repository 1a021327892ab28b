"""Copy a store of the old embedded format (qdrant-client local mode) into a new Qdrant Edge store, without
re-encoding: every point's document, content hash, retrieval vector and modulation (base64 float16 in the old payload,
a native float16 multivector in the new store: codec fp16, bit for bit) are carried over, one collection per
checkpoint version.

The old store is only read; the new one must be a new or empty directory. A document whose chunks are not all there
(0..n_chunks-1) is not written and is counted under ``incomplete``. At the end every collection's counts are compared:
a difference beyond the incomplete documents raises. Local mode holds the whole old store in RAM while it reads it,
as it always did.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from pipeline.schemas import Document
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
            layout = src._layout_of(coll)
            docs: dict[str, dict] = defaultdict(dict)
            offset = None
            while True:
                points, offset = src.client.scroll(coll, limit=page, offset=offset, with_payload=True,
                                                   with_vectors=True)
                for p in points:
                    docs[p.payload["doc_id"]][p.payload["chunk"]] = p
                if offset is None:
                    break
            written = incomplete = 0
            for by_chunk in docs.values():
                n = next(iter(by_chunk.values())).payload["n_chunks"]
                if sorted(by_chunk) != list(range(n)):
                    incomplete += 1
                    continue
                first = by_chunk[0].payload
                chunks = [src._chunk(p, layout) for _, p in sorted(by_chunk.items())]
                dst.upsert(coll, Document.model_validate(first["document"]), first["content_hash"], chunks)
                written += 1
            dst.optimize(coll)
            counts = dst.counts(coll)
            expected = src.counts(coll)
            if counts["documents"] != expected["documents"] - incomplete:
                raise RuntimeError(f"{coll}: {expected} in {old}, {counts} written to {new} ({incomplete} incomplete)")
            report[coll] = counts | {"incomplete": incomplete}
    finally:
        src.close()
        dst.close()
    return report
