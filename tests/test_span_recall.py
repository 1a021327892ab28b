"""Span recall (pipeline/span_recall.py): which spans of a real window become cloze questions, and that the items
are what the memory holds. The pure logic on hand-made token pieces; the items on the real SmolLM2 and the shipped
selector."""

from __future__ import annotations

import pytest

from pipeline.span_recall import CUE_TOKENS, candidate_spans, cloze

# one window as decoded BPE pieces: "... said chief executive Tavrek Olunde, who joined Kelvo Labs in 2021."
PIECES = ["Report", " from", " the", " board", ".", " The", " company", " said", " chief", " executive", " Tav", "rek",
          " Ol", "unde", ",", " who", " joined", " Kel", "vo", " Labs", " in", " 2021", "."]


def test_spans_are_name_like_runs_the_memory_kept_with_a_cue_before_them():
    everything = set(range(len(PIECES)))
    spans = candidate_spans(PIECES, everything)
    texts = ["".join(PIECES[a:b]).strip() for a, b in spans]
    assert texts == ["Tavrek Olunde", "Kelvo Labs", "2021"]  # the trailing comma and full stop are not the span
    assert all(a >= CUE_TOKENS[0] for a, _ in spans)  # "The" opens a sentence and has no cue: never a span
    # a span some of whose tokens the selector dropped is not in the memory: not asked
    assert "Tavrek Olunde" not in ["".join(PIECES[a:b]).strip() for a, b in candidate_spans(PIECES, everything - {12})]


def test_cloze_hides_the_span_between_its_cue_words():
    a, b = candidate_spans(PIECES, set(range(len(PIECES))))[1]
    question, answer = cloze(PIECES, a, b)
    assert answer == "Kelvo Labs"
    assert question == 'Fill in the blank: "executive Tavrek Olunde, who joined ___ in 2021."'  # 8 tokens of cue
    assert answer not in question
    assert cloze(["\n", " Kel", "vo"], 1, 3) is None  # no cue before the blank


@pytest.mark.slow
def test_span_items_ask_for_tokens_the_shipped_memory_keeps():
    from pipeline.model.mac import MACModel, checkpoint_dir
    from pipeline.prompts import document_text
    from pipeline.schemas import Document
    from pipeline.span_recall import span_items

    model = MACModel.load(checkpoint_dir())
    docs = [Document(id=f"d{i}", title="Markets", text=t) for i, t in enumerate([
        "Shares of Kelvo Labs rose 12 percent on Tuesday after the company said chief executive Tavrek Olunde would "
        "open a second factory in Porto Vessa, its first outside Norvania, by March 2027.",
        "The city council of Lindqvist approved a budget of 4.2 billion crowns, the mayor, Ingrid Hasselmo, told "
        "reporters at the Rathaus on Friday, after talks with the Vesterby Group broke down."])]
    items, mods = span_items(model, docs, n=10, seed=0)
    assert items and len({i.doc_id for i in items}) == len(items)  # one item per window
    for item in items:
        doc_id, window = item.doc_id.split("#")
        doc = next(d for d in docs if d.id == doc_id)
        w = model.windows(document_text(doc))[int(window)]
        kept = set(model.selected_positions([w])[0])
        assert item.answer in document_text(doc) and "___" in item.question
        answer_ids = model.lm.tokenizer(" " + item.answer, add_special_tokens=False)["input_ids"]
        at = [p for p in range(len(w)) if w[p: p + len(answer_ids)] == answer_ids]
        assert at and all(p + j in kept for j in range(len(answer_ids)) for p in at[:1])  # the memory holds it
        assert tuple(mods[item.doc_id].shape) == (model.cfg.num_tokens, model.lm.hidden_size)
