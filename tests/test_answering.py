"""Mode specs and which document texts each mode puts in the prompt (tiny real model, real memory bank)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import torch

from pipeline.answering import prepare
from pipeline.model.lm import FrozenLM, Prefix
from pipeline.modes import Mode
from pipeline.prompts import document_text
from pipeline.schemas import Document
from pipeline.store.bank import MemoryBank


def test_mode_parse_and_str_are_inverse() -> None:
    assert Mode.parse("mac") == Mode("mac") and Mode.parse("mac+rag@2") == Mode("mac+rag", 2)
    assert Mode.parse("rag@1") == Mode("rag", 1) and Mode.parse(Mode("rag", 1)) == Mode("rag", 1)
    for mode, n in (("mac+rag", 3), ("rag", None), ("base", None)):  # what serve builds from mode + context_docs
        assert Mode.parse(str(Mode(mode, n))) == Mode(mode, n)
    assert Mode("mac").uses_mac and not Mode("mac").uses_text and Mode("mac+rag", 1).uses_text
    assert not Mode("base").uses_memory and Mode("rag").uses_memory and not Mode("rag").uses_mac
    sel = Mode.parse("select+rag@1")  # the aggregator selects the text, the memory is not the prefix
    assert sel == Mode("select+rag", 1) and sel.uses_text and sel.uses_aggregator and not sel.uses_mac
    assert not Mode("rag").uses_aggregator and Mode("mac").uses_aggregator
    for bad in ("mac@1", "base@2", "rag@0", "rag@x", "rag@", "nope", "mac+rag@-1"):
        with pytest.raises(ValueError, match="mode"):
            Mode.parse(bad)


def test_mac_modes_refuse_a_bare_lm(tiny_mac) -> None:
    """The text modes answer through a bare FrozenLM (the fine-tuning baselines do); a MAC mode needs the MACModel."""
    assert isinstance(tiny_mac.lm, FrozenLM)
    with pytest.raises(TypeError, match="MACModel"):
        prepare(tiny_mac.lm, "mac", ["q"], [[object()]])


def test_context_docs_follow_retriever_for_rag_and_aggregator_for_mac_rag(tiny_mac) -> None:
    docs = [Document(id=f"d{i}", text=f"Company {i} moved its headquarters to City{i}.", title=f"Story {i}",
                     published_at=datetime(2024, 1, 1 + i, tzinfo=UTC)) for i in range(4)]
    bank = MemoryBank()
    for d, c in zip(docs, tiny_mac.encode_documents(docs)):
        bank.upsert(d, [c])
    q = "Where did Company 2 move its headquarters?"
    hits = bank.search(tiny_mac.encoder.embed([q]).numpy(), 4)
    texts = {d.id: document_text(d) for d in docs}

    (full,), _, _ = prepare(tiny_mac, "rag", [q], hits)
    assert all(t in full for t in texts.values())
    (one,), prefix, _ = prepare(tiny_mac, "rag@1", [q], hits)
    assert prefix is None and texts[hits[0][0].document.id] in one  # the retriever's best, alone
    assert sum(t in one for t in texts.values()) == 1

    (two,), mac_prefix, mass = prepare(tiny_mac, "mac+rag@2", [q], hits)
    assert mac_prefix is not None
    order = [hits[0][int(k)].document.id for k in torch.argsort(mass[0], descending=True)]
    # the two documents the aggregator weighs most, heaviest first; the other two are not in the prompt
    assert two.index(texts[order[0]]) < two.index(texts[order[1]])
    assert texts[order[2]] not in two and texts[order[3]] not in two

    # select+rag@2: the same two texts in the same order; no prefix without an answer prompt, the prompt with one
    assert tiny_mac.answer_prompt is None
    (sel,), prefix, sel_mass = prepare(tiny_mac, "select+rag@2", [q], hits)
    assert sel == two and prefix is None and torch.equal(sel_mass, mass)
    lm = tiny_mac.lm
    prompt = Prefix(torch.randn(1, lm.num_layers, lm.num_kv_heads, 3, lm.head_dim),
                    torch.randn(1, lm.num_layers, lm.num_kv_heads, 3, lm.head_dim))
    tiny_mac.answer_prompt = prompt
    try:
        prompts, prefix, _ = prepare(tiny_mac, "select+rag@2", [q, q], hits * 2)
        assert prompts == [two, two] and prefix.keys.shape[0] == 2  # the prompt, once per question
        assert torch.equal(prefix.keys[1:], prompt.keys) and torch.equal(prefix.values[:1], prompt.values)
        (_,), again, _ = prepare(tiny_mac, "mac+rag@2", [q], hits)
        assert torch.equal(again.keys, mac_prefix.keys)  # mac+rag keeps exactly the memory's prefix
    finally:
        tiny_mac.answer_prompt = None


def test_context_docs_put_only_the_best_window_of_a_long_document(tiny_mac) -> None:
    """rag@1 / mac+rag@1 on a long article: the prompt holds its best window (the retriever's first chunk, or the
    chunk the aggregator weighs most), not the whole article, so its length is bounded by max_doc_tokens."""
    sentences = " ".join(f"In district {i} the council of Town{i} approved budget line {i * 7}." for i in range(60))
    doc = Document(id="long", text=sentences, title="Budget")
    chunks = tiny_mac.encode_documents([doc])
    assert len(chunks) >= 3  # several windows
    bank = MemoryBank()
    bank.upsert(doc, chunks)
    q = "What did the council of Town41 approve?"
    hits = bank.search(tiny_mac.encoder.embed([q]).numpy(), 8)
    tok = tiny_mac.lm.tokenizer
    whole = document_text(doc)
    (one,), _, _ = prepare(tiny_mac, "rag@1", [q], hits)
    best = hits[0][0].chunk.modulation.chunk
    assert tiny_mac.window_text(doc, best) in one and whole not in one
    (full,), _, _ = prepare(tiny_mac, "rag", [q], hits)
    assert whole in full  # without context_docs: the whole article, as before
    (mixed,), _, mass = prepare(tiny_mac, "mac+rag@1", [q], hits)
    heaviest = hits[0][int(mass[0].argmax())].chunk.modulation.chunk
    assert tiny_mac.window_text(doc, heaviest) in mixed
    window = tiny_mac.window_text(doc, best)
    assert window in whole and window != window.lower()  # cut from the original text: case and spacing kept
    assert len(tok(one)["input_ids"]) < len(tok(full)["input_ids"]) / 2
