"""In-process memory bank: modulations + retrieval vectors + documents, exact top-k by cosine.

This is the evaluation-time memory (``macstream eval`` streams every document into it). It follows the store
contract the ingest path builds on: upsert by document id replaces every chunk of that document (idempotent),
delete removes them all, search returns chunks best-first with their cosine score.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.modulation import Modulation
from pipeline.schemas import Document, EncodedChunk, Hit


class MemoryBank:
    def __init__(self) -> None:
        self._chunks: dict[str, list[EncodedChunk]] = {}
        self._docs: dict[str, Document] = {}
        self._matrix: np.ndarray | None = None  # (N_chunks, d_enc), rebuilt lazily after writes
        self._rows: list[EncodedChunk] = []

    def __len__(self) -> int:
        return len(self._docs)

    @property
    def num_chunks(self) -> int:
        return sum(map(len, self._chunks.values()))

    def upsert(self, doc: Document, chunks: list[EncodedChunk]) -> None:
        """Insert or replace the document: all of its previous chunks are dropped first."""
        if not chunks or any(c.modulation.doc_id != doc.id for c in chunks):
            raise ValueError(f"chunks must be non-empty and belong to document {doc.id!r}")
        self._chunks[doc.id] = list(chunks)
        self._docs[doc.id] = doc
        self._matrix = None

    def delete(self, doc_id: str) -> bool:
        """Remove the document and all its chunks; return whether it existed."""
        self._docs.pop(doc_id, None)
        existed = self._chunks.pop(doc_id, None) is not None
        self._matrix = None
        return existed

    def document(self, doc_id: str) -> Document:
        return self._docs[doc_id]

    def document_ids(self) -> list[str]:
        return list(self._docs)

    def chunks(self, doc_id: str) -> list[EncodedChunk]:
        return list(self._chunks[doc_id])

    def search(self, vectors: np.ndarray, k: int, where: Callable[[Document], bool] | None = None) -> list[list[Hit]]:
        """vectors: (B, d_enc) unit-norm → per row the k best chunks (of documents passing ``where``), best first."""
        if self._matrix is None:
            self._rows = [c for cs in self._chunks.values() for c in cs]
            self._matrix = np.stack([c.vector for c in self._rows]) if self._rows else np.zeros((0, vectors.shape[1]))
        keep = np.arange(len(self._rows))
        if where is not None:
            keep = np.array([i for i, c in enumerate(self._rows) if where(self._docs[c.modulation.doc_id])], dtype=int)
        if len(keep) == 0 or k <= 0:
            return [[] for _ in range(len(vectors))]
        sims = vectors @ self._matrix[keep].T  # (B, N_kept)
        k = min(k, len(keep))
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        out = []
        for b, idx in enumerate(top):
            idx = idx[np.argsort(-sims[b, idx], kind="stable")]
            rows = [self._rows[keep[i]] for i in idx]
            out.append([Hit(c, self._docs[c.modulation.doc_id], float(sims[b, i])) for c, i in zip(rows, idx)])
        return out


def save_bank(bank: MemoryBank, path) -> int:
    """Write the bank as JSONL (one document per line with its chunks, modulations as base64 float16). Returns bytes."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w") as fh:
        for doc_id, chunks in bank._chunks.items():
            fh.write(json.dumps({
                "document": json.loads(bank.document(doc_id).model_dump_json(exclude_none=True)),
                "chunks": [{"chunk": c.modulation.chunk, "n_chunks": c.modulation.n_chunks,
                            "model_id": c.modulation.model_id, "checkpoint": c.modulation.checkpoint,
                            "tokens": c.modulation.tokens_b64(), "num_tokens": int(c.modulation.tokens.shape[0]),
                            "vector": c.vector.astype(np.float32).tolist()} for c in chunks],
            }) + "\n")
    return p.stat().st_size


def load_bank(path) -> MemoryBank:
    """Read a bank written by :func:`save_bank`."""
    bank = MemoryBank()
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            doc = Document.model_validate(rec["document"])
            chunks = [EncodedChunk(Modulation(doc.id, c["chunk"], c["n_chunks"],
                                              Modulation.decode_tokens(c["tokens"], c["num_tokens"]),
                                              c["model_id"], c["checkpoint"]),
                                   np.asarray(c["vector"], dtype=np.float32))
                      for c in rec["chunks"]]
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{path}:{n}: not a memory record: {err}") from None
        bank.upsert(doc, chunks)
    return bank
