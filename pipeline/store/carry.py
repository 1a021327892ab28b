"""Carry a memory over to a new checkpoint whose write path is unchanged, instead of re-encoding it.

A store keeps one collection per checkpoint version, because a new checkpoint usually writes other modulations. But
a checkpoint that changes only the read side (``train-readout --readout-from``: a new readout and answer path over the
same selector, LM layer and retrieval encoder) writes exactly what the old one wrote: its collection can be filled
by copying the old one, which for months of news is minutes instead of days of encoding.

Nothing is taken on trust. Before anything is written, a few documents spread over the old collection are encoded
again with the new checkpoint and compared with what the store holds:

- the same windows (count per document);
- every modulation within ``tolerance`` relative L2 of the fresh one (the stored one went through the collection's
  codec: int4 is off by about 0.08, int8 by 0.005; another selector keeps other tokens, so its states differ
  wholesale — measured only on the tiny test checkpoints, not at full size);
- every retrieval vector at cosine ≥ 0.999 to the fresh one.

One failure refuses the carry with :class:`WritePathChanged` (one line: re-encode with ``replay`` or ``backfill``).

Semantics: the old collection is only read; the new one receives each complete document of the old one with its
content hash, retrieval vectors and modulations (stamped with the new version), through the store's ``upsert``
(idempotent point ids: a carry that stopped half way is run again). A document the new collection already holds is
kept as it is (it may be newer than the old copy). The store should be opened with the old collection's codec
(:meth:`~pipeline.store.base.Store.codec_of`), so the copy is bit for bit.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from pipeline.schemas import EncodedChunk
from pipeline.store.base import Store, collection_name

TOLERANCE = 0.15  # relative L2 between a stored and a fresh modulation; above it the write path changed
MIN_COSINE = 0.999  # between a stored and a fresh retrieval vector


class WritePathChanged(ValueError):
    """The new checkpoint does not write what the old collection holds: its memory must be re-encoded."""


def verify(store: Store, source: str, model, sample: int = 4, tolerance: float = TOLERANCE) -> dict:
    """Encode ``sample`` documents of collection ``source`` (evenly spread over it) again with ``model`` and compare
    them with the stored ones; raise :class:`WritePathChanged` on the first difference. Returns {documents, windows,
    max_rel_error, min_cosine}."""
    ids = store.document_ids(source)
    if not ids:
        raise ValueError(f"collection {source} holds no documents: nothing to carry over")
    picked = [ids[i] for i in sorted({int(i) for i in np.linspace(0, len(ids) - 1, min(sample, len(ids)))})]
    stored = store.documents(source, picked)
    fresh: dict[tuple[str, int], EncodedChunk] = {}
    for c in model.encode_documents([d.document for d in stored]):
        fresh[(c.modulation.doc_id, c.modulation.chunk)] = c
    worst, lowest, windows = 0.0, 1.0, 0
    for doc, _, chunks in stored:
        n_fresh = sum(1 for key in fresh if key[0] == doc.id)
        if n_fresh != len(chunks):
            raise WritePathChanged(f"{doc.id!r}: {len(chunks)} windows in {source}, {n_fresh} from checkpoint "
                                   f"{model.version}: its windows differ, re-encode (`macstream replay` or `backfill`)")
        for c in chunks:
            f = fresh[(doc.id, c.modulation.chunk)]
            a, b = c.modulation.tokens.astype(np.float32), f.modulation.tokens.astype(np.float32)  # (T, d_LM) each
            if a.shape != b.shape:
                raise WritePathChanged(f"{doc.id!r} window {c.modulation.chunk}: modulation {a.shape} in {source}, "
                                       f"{b.shape} from checkpoint {model.version}: re-encode")
            rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))
            cos = float(np.dot(c.vector, f.vector) / max(np.linalg.norm(c.vector) * np.linalg.norm(f.vector), 1e-12))
            if rel > tolerance or cos < MIN_COSINE:
                raise WritePathChanged(
                    f"{doc.id!r} window {c.modulation.chunk}: checkpoint {model.version} writes another memory than "
                    f"{source} holds (modulation off by {rel:.3f} relative, retrieval cosine {cos:.4f}): its write "
                    f"path changed, re-encode with `macstream replay` or `macstream backfill`")
            worst, lowest, windows = max(worst, rel), min(lowest, cos), windows + 1
    return {"documents": len(stored), "windows": windows, "max_rel_error": worst, "min_cosine": lowest}


def carry_over(store: Store, source_version: str, model, sample: int = 4, batch: int = 256) -> dict:
    """Copy the memory of checkpoint ``source_version`` into ``model``'s collection once :func:`verify` passes.
    Returns {from, to, verified, documents, kept, chunks}."""
    source, target = collection_name(source_version), collection_name(model.version)
    if source == target:
        raise ValueError(f"checkpoint {model.version} is the one whose memory this is: nothing to carry over")
    if source not in store.collections():
        have = ", ".join(store.collections()) or "none"
        raise ValueError(f"no collection {source} in this store (collections: {have})")
    verified = verify(store, source, model, sample)
    written = kept = chunks = 0
    pending: list = []

    def flush() -> None:
        nonlocal written, kept, chunks
        present = store.content_hashes(target, [d.document.id for d in pending])
        for doc, content_hash, old in pending:
            if doc.id in present:
                kept += 1
                continue
            store.upsert(target, doc, content_hash, [
                EncodedChunk(replace(c.modulation, model_id=model.model_id, checkpoint=model.version), c.vector)
                for c in old])
            written, chunks = written + 1, chunks + len(old)
        pending.clear()

    for stored in store.iter_documents(source, batch=batch):
        pending.append(stored)
        if len(pending) >= batch:
            flush()
    flush()
    if hasattr(store, "optimize"):  # the embedded engine: build the new collection's index now, not at first query
        store.optimize(target)
    return {"from": source, "to": target, "verified": verified, "documents": written, "kept": kept,
            "chunks": chunks, "counts": store.counts(target)}
