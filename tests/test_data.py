"""Synthetic news generator, portable format round trip, and the RealTimeQA loader."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.data import realtimeqa
from pipeline.data.portable import DOCUMENTS_FILE, QUESTIONS_FILE, read_portable, write_portable
from pipeline.data.synthetic import SPLITS, generate, stream, write_synthetic
from pipeline.metrics import normalize_answer
from pipeline.schemas import Document, Question

N = 40
MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
MONTH_YEAR = re.compile(rf"({MONTHS}) (\d{{4}})")
Split = tuple[list[Document], list[Question]]


@pytest.fixture(scope="module")
def test_split() -> Split:
    return generate("test", N, seed=0)


def _entity(doc: Document) -> str:
    return doc.id.rsplit("-a", 1)[0]


def _company_names(questions: list[Question]) -> set[str]:
    """Entity names as the questions spell them: the only two consecutive capitalised words of every template."""
    return {name for q in questions for name in re.findall(r"[A-Z][a-z]+ [A-Z][a-z]+", q.question)}


def test_synthetic_is_deterministic() -> None:
    assert generate("train", 10, seed=3) == generate("train", 10, seed=3)
    assert generate("train", 10, seed=3) != generate("train", 10, seed=4)


def test_splits_have_disjoint_entities_and_names() -> None:
    # Large enough that unpartitioned random names would collide; different seeds: disjointness must not rely on them.
    splits = {s: generate(s, 400, seed=i) for i, s in enumerate(SPLITS)}
    companies = {s: _company_names(splits[s][1]) for s in SPLITS}
    names = {s: {a for q in splits[s][1] for a in q.answers if a[0].isalpha()} for s in SPLITS}
    for i, a in enumerate(SPLITS):
        assert len(companies[a]) == 400
        for b in SPLITS[i + 1 :]:
            assert not companies[a] & companies[b], (a, b)
            assert not names[a] & names[b], (a, b)


def test_ids_unique_and_prefixed(test_split: Split) -> None:
    documents, questions = test_split
    doc_ids = [d.id for d in documents]
    q_ids = [q.id for q in questions]
    assert len(set(doc_ids)) == len(doc_ids) and len(set(q_ids)) == len(q_ids)
    assert all(i.startswith("syn-test-e") for i in doc_ids + q_ids)
    assert all(q.id.startswith(q.doc_ids[0] + "-q") for q in questions)


def test_articles_short_and_every_article_has_questions(test_split: Split) -> None:
    documents, questions = test_split
    per_doc = {d.id: 0 for d in documents}
    for q in questions:
        per_doc[q.doc_ids[0]] += 1
    assert all(1 <= n <= 3 for n in per_doc.values())
    assert all(40 <= len(d.text.split()) <= 90 for d in documents)
    per_entity: dict[str, int] = {}
    for d in documents:
        per_entity[_entity(d)] = per_entity.get(_entity(d), 0) + 1
    assert len(per_entity) == N and all(2 <= n <= 4 for n in per_entity.values())


def test_answers_are_spans_of_their_document_and_not_in_question(test_split: Split) -> None:
    documents, questions = test_split
    by_id = {d.id: d for d in documents}
    for q in questions:
        (answer,) = q.answers
        assert q.doc_ids and len(q.doc_ids) == 1
        assert answer in by_id[q.doc_ids[0]].text
        assert 1 <= len(answer.split()) <= 4
        assert answer.lower() not in q.question.lower()
        assert normalize_answer(answer) not in normalize_answer(q.question)
        assert q.choices is not None and len(q.choices) == 4 and len(set(q.choices)) == 4 and answer in q.choices
        assert q.asked_at > by_id[q.doc_ids[0]].published_at


def test_question_month_singles_out_its_article(test_split: Split) -> None:
    documents, questions = test_split
    by_id = {d.id: d for d in documents}
    for q in questions:
        gold = by_id[q.doc_ids[0]]
        month, year = MONTH_YEAR.search(q.question).groups()
        assert (gold.published_at.strftime("%B"), gold.published_at.year) == (month, int(year))
        assert f"{month} {gold.published_at.day}, {year}" in gold.text
        siblings = [d for d in documents if _entity(d) == _entity(gold) and d.id != gold.id]
        assert all(d.published_at.strftime("%B %Y") != f"{month} {year}" for d in siblings)
    assert len({q.question for q in questions}) == len(questions)


def test_stream_is_in_publication_order() -> None:
    docs = stream("validation", 15, seed=1)
    assert [d.published_at for d in docs] == sorted(d.published_at for d in docs)
    assert {d.id for d in docs} == {d.id for d in generate("validation", 15, seed=1)[0]}


def test_unknown_split_rejected() -> None:
    with pytest.raises(ValueError, match="split"):
        generate("dev", 3)


def test_portable_round_trip(tmp_path: Path, test_split: Split) -> None:
    documents, questions = test_split
    write_portable(tmp_path, documents, questions)
    assert read_portable(tmp_path) == (documents, questions)
    first = json.loads((tmp_path / QUESTIONS_FILE).read_text().splitlines()[0])
    assert set(first) == {"id", "question", "answers", "doc_ids", "choices", "asked_at"}


def test_portable_omits_none_fields(tmp_path: Path) -> None:
    write_portable(tmp_path, [Document(id="d", text="t")], [Question(id="q", question="?", answers=["a"])])
    assert json.loads((tmp_path / DOCUMENTS_FILE).read_text()) == {"id": "d", "text": "t"}
    assert json.loads((tmp_path / QUESTIONS_FILE).read_text()) == {"id": "q", "question": "?", "answers": ["a"]}


def test_write_synthetic(tmp_path: Path) -> None:
    write_synthetic(tmp_path / "out", "train", 5, seed=2)
    assert read_portable(tmp_path / "out") == generate("train", 5, seed=2)


def test_portable_bad_line_names_file_and_line(tmp_path: Path) -> None:
    write_portable(tmp_path, [Document(id="d1", text="x"), Document(id="d2", text="y")], [])
    path = tmp_path / DOCUMENTS_FILE
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], '{"id": "d3", "txt": "typo"}', lines[1]]) + "\n")
    with pytest.raises(ValueError, match=r"(?s)documents\.jsonl:2: invalid Document.*txt"):
        read_portable(tmp_path)
    path.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=r"documents\.jsonl:2"):
        read_portable(tmp_path)


def test_portable_rejects_dangling_doc_ids_and_duplicates(tmp_path: Path) -> None:
    doc = Document(id="d1", text="x")
    with pytest.raises(ValueError, match="unknown document"):
        write_portable(tmp_path, [doc], [Question(id="q", question="?", answers=["a"], doc_ids=["d2"])])
    with pytest.raises(ValueError, match="duplicate document id"):
        write_portable(tmp_path, [doc, doc], [])
    write_portable(tmp_path, [doc], [])
    (tmp_path / QUESTIONS_FILE).write_text('{"id": "q", "question": "?", "answers": ["a"], "doc_ids": ["nope"]}\n')
    with pytest.raises(ValueError, match="nope"):
        read_portable(tmp_path)


# RealTimeQA: the loader's logic on a tiny fake folder (always runs), then the real data (skips when absent).


def _write_rows(path: Path, rows: list[dict | str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _row(qid: str, evidence: str = "", answer: object = ["1"], date: str = "2022/06/17") -> dict:
    return {
        "question_id": qid,
        "question_date": date,
        "question_source": "CNN",
        "question_url": "https://quiz.example/1",
        "question_sentence": f"Question {qid}?",
        "choices": ["Oslo", "Rome ", "Lima", "Kyiv"],
        "answer": answer,
        "evidence": evidence,
    }


def test_realtimeqa_loader_on_fake_folder(tmp_path: Path) -> None:
    good = _row("1", evidence='<p>The <a href="x">capital</a> is&nbsp;Rome &amp; more.</p>')
    _write_rows(tmp_path / "past/2022/20220617_qa.jsonl", [good, "{broken", _row("2"), _row("3", answer=["9"])])
    _write_rows(tmp_path / "backnumber/2022/20220617_qa.jsonl", [good, _row("4", answer="2", date="2022-06-18")])
    _write_rows(tmp_path / "past/2022/20220617_qa_nota.jsonl", [_row("5")])
    search = [{"url": "https://a.example/1", "title": "T", "text": "Some  news.", "publish_date": "2022/06/01"},
              {"url": "https://a.example/1", "title": "dup", "text": "Again"}, {"url": "https://a.example/2"}]
    _write_rows(tmp_path / "past/2022/20220617_gcs.jsonl", [
        {"question_id": "1", "search_result": repr(search)},
        {"question_id": "2", "search_result": [{"url": "https://a.example/3", "text": "Other"}]},
        {"question_id": "99", "search_result": [{"url": "https://a.example/4", "text": "Unasked"}]},
    ])
    assert realtimeqa.available(tmp_path)
    docs, questions = realtimeqa.load([2022], root=tmp_path)
    by_id = {q.id: q for q in questions}
    assert sorted(by_id) == ["rtqa-1", "rtqa-2", "rtqa-4"]  # dedup, bad JSON and bad answer skipped, nota ignored
    assert [d.id for d in docs] == ["rtqa-1-ev"]
    assert docs[0].text == "The capital is Rome & more."
    assert by_id["rtqa-1"].answers == ["Rome"] and by_id["rtqa-1"].doc_ids == ["rtqa-1-ev"]
    assert by_id["rtqa-2"].doc_ids is None
    assert by_id["rtqa-4"].answers == ["Lima"] and by_id["rtqa-4"].asked_at.day == 18
    docs, _ = realtimeqa.load([2022], root=tmp_path, with_search_results=True)
    assert [(d.id, d.text) for d in docs[1:]] == [("rtqa-1-gcs0", "Some news."), ("rtqa-2-gcs0", "Other")]
    assert docs[1].published_at.month == 6 and docs[1].source == "a.example" and docs[2].published_at is None
    assert realtimeqa.load([2023], root=tmp_path) == ([], [])
    assert not realtimeqa.available(tmp_path / "missing")


def test_realtimeqa_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(realtimeqa.ENV_VAR, str(tmp_path))
    assert realtimeqa.default_root() == tmp_path


@pytest.fixture(scope="module")
def rtqa_2024() -> Split:
    if not realtimeqa.available():
        pytest.skip(f"RealTimeQA not found at {realtimeqa.default_root()}")
    return realtimeqa.load([2024])


def test_realtimeqa_2024(rtqa_2024: Split) -> None:
    documents, questions = rtqa_2024
    assert len(documents) > 0 and len(questions) > 0
    tag = re.compile(r"<[A-Za-z/!][^>]*>|&(amp|lt|gt|quot|nbsp|#\d+);")
    assert not [d.id for d in documents if tag.search(d.text)]
    assert all(q.choices and q.answers[0] in q.choices for q in questions)
    assert len({d.id for d in documents}) == len(documents)
    assert len({q.id for q in questions}) == len(questions)
    doc_ids = {d.id for d in documents}
    assert all(set(q.doc_ids or ()) <= doc_ids for q in questions)
    assert all(q.asked_at is not None for q in questions)  # not all in 2024: the 20240209 quiz is dated 2023/09/29
