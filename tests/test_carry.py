"""Carrying a memory over to a checkpoint that writes the same memory (pipeline/store/carry.py, `macstream carry`):
real tiny checkpoints on disk, the real MiniLM, the embedded Qdrant Edge store. A readout-only change is carried bit
for bit and stamped with the new version; a changed selector is refused before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.schemas import Document
from pipeline.store import collection_name
from pipeline.store.edge import EdgeStore

TEXT = ("The Varnholt Bridge in Osterby reopened on Monday after a two-year repair that cost 41 million crowns, the "
        "city's transport office said. Engineer Mira Talvenn led the work. ")


def _docs(n: int = 5) -> list[Document]:
    return [Document(id=f"d{i}", text=TEXT * (1 + 6 * (i % 2)) + f"Item {i}.", title=f"T{i}") for i in range(n)]


def _variant(ckpt, out, module: str):
    """The checkpoint at ``ckpt`` with one module's weights moved, saved to ``out``; returns the loaded model."""
    from pipeline.model.mac import MACModel

    m = MACModel.load(ckpt)
    with torch.no_grad():
        for p in getattr(m, module).parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.version = m.save(out)
    return MACModel.load(out)


@pytest.fixture(scope="module")
def models(tiny_checkpoint, tmp_path_factory):
    from pipeline.model.mac import MACModel

    root = tmp_path_factory.mktemp("carry")
    a = MACModel.load(tiny_checkpoint).eval()
    return a, _variant(tiny_checkpoint, root / "readout", "expander"), _variant(tiny_checkpoint, root / "selector",
                                                                             "amortizer"), root


def _filled(path, model, codec: str = "int8") -> EdgeStore:
    store = EdgeStore(str(path), codec=codec)
    chunks = model.encode_documents(_docs())
    for d in _docs():
        store.upsert(collection_name(model.version), d, f"h-{d.id}", [c for c in chunks if c.modulation.doc_id == d.id])
    return store


def test_a_readout_only_checkpoint_gets_the_memory_bit_for_bit_and_once(models, tmp_path) -> None:
    from pipeline.store.carry import carry_over

    a, readout, _, _ = models
    assert readout.version != a.version
    store = _filled(tmp_path / "s", a)
    try:
        report = carry_over(store, a.version, readout)
        assert report["verified"]["documents"] == 4 and report["verified"]["max_rel_error"] < 0.05
        assert report["documents"] == 5 and report["kept"] == 0
        assert report["chunks"] == store.counts(collection_name(a.version))["chunks"] > 5  # long documents: windows
        assert store.counts(collection_name(readout.version)) == store.counts(collection_name(a.version))
        old = {d.document.id: d for d in store.documents(collection_name(a.version), [f"d{i}" for i in range(5)])}
        for doc, h, chunks in store.documents(collection_name(readout.version), [f"d{i}" for i in range(5)]):
            assert h == old[doc.id].content_hash and doc == old[doc.id].document
            for c, o in zip(chunks, old[doc.id].chunks, strict=True):
                assert c.modulation.checkpoint == readout.version and c.modulation.model_id == readout.model_id
                assert np.array_equal(c.modulation.tokens.view(np.uint16), o.modulation.tokens.view(np.uint16))
                assert np.array_equal(c.vector, o.vector)
        again = carry_over(store, a.version, readout)  # run twice: what the new collection holds is kept
        assert again["documents"] == 0 and again["kept"] == 5
        hits = store.search(collection_name(readout.version), readout.encode_documents(_docs(1))[0].vector[None], 1)
        assert hits[0][0].chunk.modulation.checkpoint == readout.version
    finally:
        store.close()


def test_a_checkpoint_with_another_selector_is_refused_before_anything_is_written(models, tmp_path) -> None:
    from pipeline.store.carry import WritePathChanged, carry_over

    a, _, selector, _ = models
    store = _filled(tmp_path / "s", a)
    try:
        with pytest.raises(WritePathChanged, match="write path changed, re-encode"):
            carry_over(store, a.version, selector)
        assert collection_name(selector.version) not in store.collections()
        with pytest.raises(ValueError, match="nothing to carry over"):
            carry_over(store, a.version, a)
        with pytest.raises(ValueError, match="no collection macstream-000000000000 in this store"):
            carry_over(store, "000000000000", selector)
    finally:
        store.close()


def test_the_carry_command_keeps_the_old_collections_codec(models, tmp_path, capsys) -> None:
    from macstream.cli import main

    a, readout, _, root = models
    _filled(tmp_path / "s", a, codec="int4z").close()
    main(["carry", "--from", a.version, "--store", str(tmp_path / "s"), "--checkpoint", str(root / "readout")])
    out = json.loads(capsys.readouterr().out)
    assert out["to"] == collection_name(readout.version) and out["documents"] == 5
    store = EdgeStore(str(tmp_path / "s"))  # opened with the default codec, int8
    try:
        assert store.codec_of(collection_name(readout.version)) == "int4z"
    finally:
        store.close()
    with pytest.raises(SystemExit) as err:
        main(["carry", "--from", "000000000000", "--store", str(tmp_path / "s"), "--checkpoint", str(root / "readout")])
    assert err.value.code == 2 and "no collection macstream-000000000000" in capsys.readouterr().err
