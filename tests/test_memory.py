"""MemoryBank: idempotent upsert by document id, delete, exact top-k, persistence round trip."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.modulation import Modulation
from pipeline.schemas import Document, EncodedChunk
from pipeline.store.bank import MemoryBank, load_bank, save_bank


def _chunks(doc_id: str, vectors: list[list[float]], ckpt: str = "v1") -> list[EncodedChunk]:
    out = []
    for i, v in enumerate(vectors):
        v = np.asarray(v, dtype=np.float32)
        tokens = np.full((3, 4), i + 1, dtype=np.float16)
        out.append(EncodedChunk(Modulation(doc_id, i, len(vectors), tokens, "lm|enc", ckpt), v / np.linalg.norm(v)))
    return out


def _doc(i: str) -> Document:
    return Document(id=i, text=f"text of {i}")


def test_upsert_replaces_every_chunk_of_a_document():
    bank = MemoryBank()
    bank.upsert(_doc("a"), _chunks("a", [[1, 0], [0.9, 0.1], [0.8, 0.2]]))
    bank.upsert(_doc("a"), _chunks("a", [[0, 1]]))  # fewer chunks than before: the old ones must go
    assert len(bank) == 1 and bank.num_chunks == 1
    hits = bank.search(np.array([[1.0, 0.0]]), 5)[0]
    assert [h.document.id for h in hits] == ["a"] and hits[0].score == pytest.approx(0.0, abs=1e-6)


def test_same_upsert_twice_is_idempotent_and_delete_removes_from_search():
    bank = MemoryBank()
    for _ in range(2):
        bank.upsert(_doc("a"), _chunks("a", [[1, 0]]))
        bank.upsert(_doc("b"), _chunks("b", [[0, 1]]))
    assert len(bank) == 2 and bank.num_chunks == 2
    assert bank.delete("a") and not bank.delete("a")
    hits = bank.search(np.array([[1.0, 0.0]]), 5)[0]
    assert [h.document.id for h in hits] == ["b"]


def test_search_is_exact_top_k_best_first():
    rng = np.random.default_rng(0)
    bank = MemoryBank()
    vecs = rng.normal(size=(30, 8))
    for i, v in enumerate(vecs):
        bank.upsert(_doc(f"d{i}"), _chunks(f"d{i}", [v.tolist()]))
    q = rng.normal(size=(2, 8))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    for b, hits in enumerate(bank.search(q, 5)):
        expect = np.argsort(-(unit @ q[b]))[:5]
        assert [h.document.id for h in hits] == [f"d{i}" for i in expect]
        assert all(x.score >= y.score for x, y in zip(hits, hits[1:]))


def test_chunks_must_belong_to_the_document():
    with pytest.raises(ValueError, match="belong"):
        MemoryBank().upsert(_doc("a"), _chunks("b", [[1, 0]]))


def test_save_load_round_trip(tmp_path):
    bank = MemoryBank()
    bank.upsert(_doc("a"), _chunks("a", [[1, 0], [0, 1]]))
    bank.upsert(_doc("b"), _chunks("b", [[1, 1]]))
    save_bank(bank, tmp_path / "m.jsonl")
    back = load_bank(tmp_path / "m.jsonl")
    assert len(back) == 2 and back.num_chunks == 3
    q = np.array([[0.6, 0.8]])
    assert [(h.document.id, h.chunk.modulation.chunk, round(h.score, 5)) for h in back.search(q, 3)[0]] == \
           [(h.document.id, h.chunk.modulation.chunk, round(h.score, 5)) for h in bank.search(q, 3)[0]]
    m = back.search(q, 1)[0][0].chunk.modulation
    assert m.tokens.dtype == np.float16 and m.checkpoint == "v1"


def test_load_rejects_garbage_with_line_number(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"document": {"id": "a", "text": "x"}}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:1"):
        load_bank(p)
