"""The document pick: mass pooled over a document's windows, the retriever's top-1 as a floor (pure logic), the rule
shipped beside a checkpoint (the tiny checkpoint on disk), and the news-selection instrument's bookkeeping."""

from __future__ import annotations

import shutil

import pytest

from pipeline.model.pick import PICK_FILE, DocumentPick, load_pick, pick_order, pooled, save_pick
from pipeline.news_selection import calibrate, choose_articles, margin_curve, miss_kind, pick_summary, picked
from pipeline.schemas import Document, Question

# retriever order: a's window first; b has three lighter windows whose sum beats a's one
DOCS = ["a", "b", "b", "c", "b"]
MASS = [0.30, 0.20, 0.15, 0.10, 0.25]  # sum: a .30, b .60, c .10; max: a .30, b .25, c .10


def test_pooled_sums_or_maxes_each_documents_windows() -> None:
    assert pooled(DOCS, MASS, "sum") == pytest.approx({"a": 0.30, "b": 0.60, "c": 0.10})
    assert pooled(DOCS, MASS, "max") == pytest.approx({"a": 0.30, "b": 0.25, "c": 0.10})
    assert list(pooled(DOCS, MASS)) == ["a", "b", "c"]  # order of first appearance
    with pytest.raises(ValueError, match="windows"):
        pooled(["a"], [0.1, 0.2])
    with pytest.raises(ValueError, match="pooling"):
        pooled(DOCS, MASS, "mean")


def test_without_a_margin_the_heaviest_document_is_read_first() -> None:
    assert pick_order(DOCS, MASS) == ["b", "a", "c"]
    assert pick_order(DOCS, MASS, DocumentPick(pooling="max")) == ["a", "b", "c"]
    assert pick_order([], []) == []
    assert pick_order(["x", "y"], [0.5, 0.5]) == ["x", "y"]  # a tie keeps the retriever's order


def test_the_retriever_is_a_floor_the_aggregator_must_beat_by_the_margin() -> None:
    # b beats the retriever's a by 0.30 (sum pooling)
    assert pick_order(DOCS, MASS, DocumentPick(margin=0.29))[0] == "b"
    assert pick_order(DOCS, MASS, DocumentPick(margin=0.30)) == ["a", "b", "c"]  # not *more* than the margin: kept
    assert pick_order(DOCS, MASS, DocumentPick(margin=1.0))[0] == "a"  # the retriever, always
    # with max pooling a is already the heaviest: any margin keeps it
    assert pick_order(DOCS, MASS, DocumentPick(pooling="max", margin=0.0))[0] == "a"
    # margin 0 drops only ties to the retriever
    assert pick_order(["x", "y"], [0.4, 0.4], DocumentPick(margin=0.0))[0] == "x"
    assert pick_order(["x", "y"], [0.4, 0.41], DocumentPick(margin=0.0))[0] == "y"
    # the rest follow by pooled mass, and every document appears once
    order = pick_order(["c", "a", "b", "a"], [0.05, 0.3, 0.4, 0.25], DocumentPick(margin=0.9))
    assert order == ["c", "a", "b"]


def test_the_rule_is_validated_and_round_trips_beside_a_checkpoint(tmp_path) -> None:
    assert load_pick(tmp_path) is None
    rule = DocumentPick(pooling="max", margin=0.12, calibration={"on": "held-out weeks"})
    save_pick(rule, tmp_path)
    assert load_pick(tmp_path) == rule
    (tmp_path / PICK_FILE).write_text('{"pooling": "sum", "margin": 1.5}')
    with pytest.raises(ValueError, match=PICK_FILE):
        load_pick(tmp_path)
    (tmp_path / PICK_FILE).write_text('{"pooling": "mean"}')
    with pytest.raises(ValueError, match=PICK_FILE):
        load_pick(tmp_path)
    with pytest.raises(ValueError):
        DocumentPick(margin=-0.1)


def _record(gold: str, docs: list[str], mass: list[float], answer_in: dict | None = None) -> dict:
    return {"id": gold, "gold": gold, "docs": docs, "mass": mass, "answer_in": answer_in or {}}


def test_misses_are_classified_and_counted_against_the_retriever() -> None:
    recs = [
        # the aggregator picks an article that contains the answer
        _record("q1-ev", ["q1-ev", "art-gcs0", "art-gcs0"], [0.2, 0.4, 0.4], {"art-gcs0": True}),
        _record("q2-ev", ["q3-ev", "q2-ev"], [0.3, 0.7]),  # retriever misses (other evidence), aggregator right
        _record("q4-ev", ["x-gcs1", "y-gcs2"], [0.6, 0.4]),  # gold never retrieved
        _record("q5-ev", ["q5-ev", "z-gcs3"], [0.9, 0.1]),  # both right
    ]
    assert miss_kind(recs[0], "art-gcs0") == "article_with_answer"
    assert miss_kind(recs[1], "q3-ev") == "other_evidence"
    assert miss_kind(recs[2], "x-gcs1") == "gold_not_retrieved"
    assert miss_kind(recs[3], "q5-ev") is None
    assert picked(recs[0], "retriever") == "q1-ev" and picked(recs[0], None) == "art-gcs0"
    s = pick_summary(recs, {"retriever": "retriever", "agg": DocumentPick(), "floor": DocumentPick(margin=0.65)})
    assert s["questions"] == 4 and s["gold_retrieved"] == 75.0
    assert s["retriever"]["pick_rate"] == 50.0 and s["agg"]["pick_rate"] == 50.0
    assert s["agg"]["misses"] == {"gold_not_retrieved": 1, "other_evidence": 0, "article_with_answer": 1, "article": 0}
    assert s["agg"]["vs_retriever"] == {"both": 1, "only_this": 1, "only_retriever": 1, "neither": 1}
    # a margin above both of the aggregator's leads (0.6, 0.4) keeps the retriever's picks, right and wrong
    assert s["floor"]["pick_rate"] == 50.0 and s["floor"]["vs_retriever"]["both"] == 2
    assert s["floor"]["vs_retriever"]["only_this"] == s["floor"]["vs_retriever"]["only_retriever"] == 0


def test_calibration_takes_the_best_rate_and_the_larger_margin_on_ties() -> None:
    recs = [_record("g", ["o", "g"], [0.375, 0.625]),  # the aggregator is right, by 0.25
            _record("g", ["g", "o"], [0.4375, 0.5625])]  # the aggregator is wrong, by 0.125
    curve = dict(margin_curve(recs, "sum"))
    assert curve[0.0] == curve[0.12] == 50.0 and curve[0.13] == curve[0.24] == 100.0 and curve[0.25] == 50.0
    rule = calibrate(recs, "unit test")
    assert rule.margin == 0.24 and rule.pooling == "sum"  # 0.13..0.24 would do; max pooling ties: sum kept
    assert rule.calibration["pick_rate"] == 100.0 and rule.calibration["retriever_pick_rate"] == 50.0
    assert rule.calibration["on"] == "unit test"


def test_articles_nearest_to_the_questions_come_first_then_random_ones() -> None:
    topics = ["volcano eruption iceland lava", "football cup final goal", "election senate vote ballot",
              "bank interest rate inflation", "rocket launch orbit moon", "storm hurricane coast flooding"]
    pool = [Document(id=f"p{i}-gcs{j}", text=f"{t} report number {j} " * 3)
            for i, t in enumerate(topics) for j in range(2)]
    qs = [Question(id="q1", question="Which volcano erupted in Iceland?", answers=["x"]),
          Question(id="q2", question="Who scored the goal in the cup final?", answers=["y"])]
    got = choose_articles(qs, pool, 6, seed=0)
    assert len({d.id for d in got}) == 6
    assert {d.id.split("-")[0] for d in got[:3]} <= {"p0", "p1"}  # the 3 near ones: about the questions
    assert [d.id for d in got] == [d.id for d in choose_articles(qs, pool, 6, seed=0)]  # seeded
    with pytest.raises(ValueError, match="pool"):
        choose_articles(qs, pool, 13, seed=0)


@pytest.mark.slow
def test_the_tiny_checkpoint_reads_its_rule_and_select_rag_keeps_the_floor(tiny_checkpoint, tmp_path) -> None:
    """The tiny checkpoint on disk with a pick.json: MACModel.load reads it, select+rag@1 reads the retriever's top-1
    document when the margin is 1 and the aggregator's heaviest without a rule, and the answer says which it read."""
    from pipeline.answering import answer, prepare
    from pipeline.model.mac import MACModel
    from pipeline.prompts import document_text
    from pipeline.store.bank import MemoryBank

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    model = MACModel.load(ckpt)
    assert model.pick is None  # no pick.json: the heaviest document
    docs = [Document(id=f"d{i}", text=f"Company {i} moved its headquarters to City{i} in spring.", title=f"S{i}")
            for i in range(6)]
    bank = MemoryBank()
    for d, c in zip(docs, model.encode_documents(docs)):
        bank.upsert(d, [c])
    qs = [f"Where did Company {i} move its headquarters?" for i in range(6)]
    # hits in reverse: the list's first hit is the retriever's top-1 by definition, and the aggregator (whose logits
    # carry the retriever's scores) then weighs another document most, so the floor has something to decide
    hits = [h[::-1] for h in bank.search(model.encoder.embed(qs).numpy(), 4)]
    _, _, mass = prepare(model, "select+rag@1", qs, hits)
    heaviest = [h[int(m[: len(h)].argmax())].document.id for h, m in zip(hits, mass)]
    top1 = [h[0].document.id for h in hits]
    assert [a.picked for a in answer(model, "select+rag@1", qs, hits, 2)] == heaviest

    save_pick(DocumentPick(margin=1.0), ckpt)
    floored = MACModel.load(ckpt)
    assert floored.pick == DocumentPick(margin=1.0) and floored.version == model.version  # not part of the version
    prompts, _, _ = prepare(floored, "select+rag@1", qs, hits)
    assert heaviest != top1  # the untrained aggregator disagrees with the retriever somewhere: the floor matters
    for p, t in zip(prompts, top1):
        assert document_text(bank.document(t)) in p
    assert [a.picked for a in answer(floored, "select+rag@1", qs, hits, 2)] == top1


def test_the_report_shows_the_news_pick_table() -> None:
    from benchmarks.report import _news_selection

    row = {"pick_rate": 61.0, "misses": {"gold_not_retrieved": 5, "other_evidence": 3, "article_with_answer": 1,
                                         "article": 30}, "vs_retriever": {"only_this": 4, "only_retriever": 9}}
    ns = {"articles_from": "RealTimeQA 2022 search results", "top_k": 4,
          "sets": {"test-2024": {"documents": 300, "windows": 1100, "gold_retrieved": 95.0, "retriever": row}}}
    text = "\n".join(_news_selection(ns))
    assert "| test-2024 | 300 (1100) | 95.0 | retriever | 61.0 | 5 / 3 / 1 / 30 | 4 / 9 |" in text
    assert _news_selection(None) == []


def _fake_realtimeqa(root) -> None:
    """RealTimeQA-shaped folder: 2022 and 2023 quizzes (12 weeks, 3 questions each: the last 2 weeks are the held-out
    split), 2024 quizzes, and 2022 search results with long multi-window articles."""
    import json
    from datetime import date, timedelta

    def write(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    topics = ["harbour bridge", "river dam", "city council", "mountain railway", "solar farm", "football stadium"]
    day = date(2022, 6, 17)
    for week in range(12):
        rows = []
        for i in range(3):
            t = topics[(week + i) % len(topics)]
            city = f"Town{week}x{i}"
            rows.append({"question_id": f"{day:%Y%m%d}_{i}", "question_date": f"{day:%Y/%m/%d}",
                         "question_sentence": f"Which town approved the new {t} this week?",
                         "choices": [city, "Oslo", "Lima", "Kyiv"], "answer": ["0"],
                         "evidence": f"<p>The council of {city} approved the new {t} on Monday.</p>"})
        write(root / "past" / str(day.year) / f"{day:%Y%m%d}_qa.jsonl", rows)
        day += timedelta(days=35)
    write(root / "past/2024/20240105_qa.jsonl", [
        {"question_id": f"20240105_{i}", "question_date": "2024/01/05", "choices": [f"Ville{i}", "A", "B", "C"],
         "question_sentence": f"Where did the {topics[i]} open?", "answer": ["0"],
         "evidence": f"The {topics[i]} opened in Ville{i} after years of delay."} for i in range(4)])
    words = " ".join(f"The {t} project drew comment from residents of the district." for t in topics)
    write(root / "past/2022/20220617_gcs.jsonl", [
        {"question_id": f"20220617_{q}", "search_result": [
            {"url": f"https://news.example/{q}/{i}", "title": f"Story {q}.{i}", "text": f"Report {q}.{i}. " + words * 6}
            for i in range(4)]} for q in range(3)])


@pytest.mark.slow
def test_news_selection_runs_on_a_realtimeqa_folder_and_caches_its_memory(tiny_checkpoint, tmp_path,
                                                                           monkeypatch) -> None:
    """The instrument end to end with the tiny checkpoint: each set's memory holds its questions' evidence texts and
    the full-length articles (several windows each); every question is scored by every picker; a rerun reads the
    memory from the cache (no encoding) and gives the same records."""
    from pipeline import news_selection
    from pipeline.data import realtimeqa
    from pipeline.model.mac import MACModel

    _fake_realtimeqa(tmp_path / "rtqa")
    monkeypatch.setenv(realtimeqa.ENV_VAR, str(tmp_path / "rtqa"))
    model = MACModel.load(tiny_checkpoint)
    logs: list[str] = []
    first = news_selection.run(model, questions=4, articles=6, top_ks=(4,), cache=tmp_path / "cache",
                               log=logs.append)
    assert sum("encoded" in m for m in logs) == 2  # one memory per set
    for name in news_selection.SETS:
        rep = first["sets"][name]
        assert rep["evidence_documents"] == 4 and rep["articles"] == 6
        assert rep["windows"] > rep["documents"]  # the articles span several windows
        s = rep["by_k"]["4"]
        assert s["questions"] == 4 == len(rep["records"]["4"])
        for picker in ("retriever", "aggregator_sum", "aggregator_max"):
            v = s[picker]
            assert sum(v["misses"].values()) == round(4 * (100 - v["pick_rate"]) / 100)
            assert sum(v["vs_retriever"].values()) == 4
    held = first["sets"]["heldout"]["records"]["4"]
    assert all(r["id"].startswith("rtqa-2023") for r in held)  # the last weeks of the selection years
    logs.clear()
    again = news_selection.run(model, questions=4, articles=6, top_ks=(4,), cache=tmp_path / "cache",
                               log=logs.append)
    assert not logs and again["sets"]["heldout"]["records"] == first["sets"]["heldout"]["records"]
    monkeypatch.setenv(realtimeqa.ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="RealTimeQA"):
        news_selection.run(model, questions=4, articles=6, cache=None)


def test_the_shipped_rule_was_calibrated_on_held_out_weeks_never_on_the_test_year() -> None:
    from pipeline.config import SHIPPED_CHECKPOINT

    rule = load_pick(SHIPPED_CHECKPOINT)
    assert rule is not None and rule.margin is not None
    on = rule.calibration["on"]
    assert "held-out weeks of the selection years" in on and "2024" not in on
    assert rule.calibration["pick_rate"] >= rule.calibration["retriever_pick_rate"]  # where it was calibrated


@pytest.mark.slow
def test_an_interrupted_encoding_resumes_where_it_stopped(tiny_mac, tmp_path) -> None:
    """The news memory is encoded a few documents at a time into a partial file: a rerun reads those back and encodes
    only the rest; a partial file cut off mid-line is dropped and the encoding starts again."""
    import numpy as np

    from pipeline.news_selection import _encode_resumably

    docs = [Document(id=f"d{i}", text=f"Story {i}: the council of Town{i} approved a budget. " * (1 + 40 * (i % 2)))
            for i in range(5)]
    partial = tmp_path / "m.partial.jsonl"
    logs: list[str] = []
    first = _encode_resumably(tiny_mac, docs[:3], partial, logs.append, step=2)
    assert partial.exists() and not logs
    bank = _encode_resumably(tiny_mac, docs, partial, logs.append, step=2)
    assert logs == [f"news selection: resuming from {partial} (3 documents encoded)"]
    assert bank.document_ids() == [d.id for d in docs]
    for d in docs[:3]:  # read back from the partial file bit for bit, not encoded again
        assert all(np.array_equal(x.modulation.tokens, y.modulation.tokens)
                   for x, y in zip(bank.chunks(d.id), first.chunks(d.id), strict=True))
    fresh = _encode_resumably(tiny_mac, docs, None, logs.append)
    for d in docs:  # the same memory as one uninterrupted run, up to the float16 ulp a batch's padding can move
        a, b = bank.chunks(d.id), fresh.chunks(d.id)
        assert len(a) == len(b) >= 1
        assert all(np.allclose(x.modulation.tokens, y.modulation.tokens, rtol=1e-2, atol=1e-3) for x, y in zip(a, b))
    partial.write_text(partial.read_text()[:-40])  # cut off mid-line
    logs.clear()
    again = _encode_resumably(tiny_mac, docs[:2], partial, logs.append)
    assert "unreadable" in logs[0] and again.document_ids() == ["d0", "d1"]
