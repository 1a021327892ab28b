"""Selection on real news with full-length articles in the memory (``macstream diagnose --news``).

Does the aggregator pick the right **document** as well as the retriever does, when the memory holds long articles
(many windows each) beside the short evidence texts? Per set, ``questions`` RealTimeQA questions from weeks the
checkpoint never trained on, and a memory of their evidence texts (the gold documents, one window each) plus
``articles`` full-length news articles, the search-engine results stored with the RealTimeQA 2022 questions
(``past/2022/*_gcs.jsonl``; median ~900 words, several windows each):

- ``heldout``: the held-out last weeks of the selection years (2022–23), exactly the weeks ``train-readout`` holds
  out to judge the selection (``selection_validation_share``). The split a pick rule may be calibrated on;
- ``test-2024``: RealTimeQA 2024, test only (never calibrate or tune on it).

The articles were searched for *other* (2022) questions, as no search results are stored for these weeks. Half of
them are the articles a lexical search (TF-IDF over the whole 2022 pool, independent of the MiniLM retriever) ranks
nearest to the set's questions, one per question in turn, so the memory holds topical distractors as a search
engine's results would be; the other half are drawn at random. Questions, articles and the encoded memory are
seeded; the memory is cached under ``.cache/news-selection/<checkpoint>/`` (a rerun only retrieves and aggregates).

Per question, the retriever's top-k windows and the aggregator's mass over them (as ``select+rag`` computes them);
then the **gold document pick rate** of each picker: the retriever's top-1 window's document, the aggregator's
document with the mass summed or maxed over its windows, and the checkpoint's pick rule (pipeline/model/pick.py;
the retriever as a floor). Every miss is classified: the gold document was not retrieved at all; another question's
evidence text was picked; a full-length article was picked (that contains the gold answer's string, or not).
"""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import REPO_ROOT, ReadoutTrainConfig
from pipeline.data import realtimeqa
from pipeline.evaluate import build_memory, run_questions
from pipeline.model.mac import MACModel
from pipeline.model.pick import DocumentPick, pick_order
from pipeline.schemas import Document, Question
from pipeline.scoring import EvalSettings, summarize
from pipeline.store.bank import MemoryBank, load_bank, save_bank

SETS = ("heldout", "test-2024")
ARTICLE_YEAR = 2022  # the one year whose search-result articles are stored
CACHE = REPO_ROOT / ".cache" / "news-selection"
MISSES = ("gold_not_retrieved", "other_evidence", "article_with_answer", "article")


def set_questions(name: str) -> tuple[list[Question], dict[str, Document]]:
    """The answerable questions of a set and their evidence documents (id → document). RealTimeQA is read where
    :func:`pipeline.data.realtimeqa.default_root` says; FileNotFoundError when it is not there."""
    if not realtimeqa.available():
        raise FileNotFoundError(f"RealTimeQA data not found at {realtimeqa.default_root()} "
                                f"(set {realtimeqa.ENV_VAR})")
    if name == "heldout":
        from pipeline.train_readout import realtimeqa_selection_data

        docs, qs = realtimeqa_selection_data(ReadoutTrainConfig())[1]  # the weeks train-readout holds out
    elif name == "test-2024":
        docs, qs = realtimeqa.load([2024])
    else:
        raise ValueError(f"unknown news set {name!r}; expected one of {list(SETS)}")
    by_id = {d.id: d for d in docs}
    qs = [q for q in qs if q.doc_ids and q.doc_ids[0] in by_id]
    return qs, {q.doc_ids[0]: by_id[q.doc_ids[0]] for q in qs}


def article_pool() -> list[Document]:
    """Every stored search-result article (full length, deduplicated by url), in file order."""
    docs, _ = realtimeqa.load([ARTICLE_YEAR], with_search_results=True)
    return [d for d in docs if "-gcs" in d.id]


def choose_articles(questions: list[Question], pool: list[Document], n: int, seed: int,
                    near_share: float = 0.5) -> list[Document]:
    """``n`` articles of ``pool``: ``round(near_share · n)`` lexically nearest to the questions (TF-IDF cosine, each
    question's best unchosen article in turn), the rest drawn at random (seeded). Deterministic."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if n > len(pool):
        raise ValueError(f"{n} articles asked, the pool holds {len(pool)}")
    vec = TfidfVectorizer(stop_words="english", sublinear_tf=True, min_df=2)
    A = vec.fit_transform([d.text for d in pool])
    sims = (vec.transform([q.question for q in questions]) @ A.T).toarray()  # (Q, N)
    ranked = np.argsort(-sims, axis=1, kind="stable")
    chosen: list[int] = []
    taken: set[int] = set()
    want, depth = round(near_share * n), 0
    while len(chosen) < want and depth < ranked.shape[1]:
        for row in ranked[:, depth]:
            if len(chosen) < want and int(row) not in taken:
                taken.add(int(row))
                chosen.append(int(row))
        depth += 1
    rest = [i for i in range(len(pool)) if i not in taken]
    chosen += random.Random(f"news-articles:{seed}").sample(rest, n - len(chosen))
    return [pool[i] for i in chosen]


def news_memory(model: MACModel, name: str, questions: int = 100, articles: int = 200, seed: int = 0,
                cache: Path | None = CACHE, log=print) -> tuple[list[Question], MemoryBank]:
    """The set's sampled questions and their memory (evidence texts + articles), encoded by ``model`` or read from
    the cache (keyed by checkpoint version, set, sizes and seed; ``cache=None``: never cached)."""
    qs, evidence = set_questions(name)
    qs = sorted(random.Random(f"news-questions:{name}:{seed}").sample(qs, min(questions, len(qs))), key=lambda q: q.id)
    key = f"{name}-q{len(qs)}-a{articles}-s{seed}"
    path = cache / model.version / f"{key}.jsonl" if cache is not None else None
    if path is not None and path.exists():
        bank = load_bank(path)
        missing = [q.doc_ids[0] for q in qs if q.doc_ids[0] not in bank.document_ids()]
        if not missing:
            return qs, bank
        log(f"news selection: cached memory {path} lacks {len(missing)} gold documents; encoding again")
    t0 = time.perf_counter()
    docs = [evidence[q.doc_ids[0]] for q in qs] + choose_articles(qs, article_pool(), articles, seed)
    bank = _encode_resumably(model, docs, path.with_suffix(".partial.jsonl") if path is not None else None, log)
    log(f"news selection: encoded {key}: {len(bank)} documents, {bank.num_chunks} windows "
        f"({time.perf_counter() - t0:.0f} s)")
    if path is not None:
        save_bank(bank, path)
        path.with_suffix(".partial.jsonl").unlink(missing_ok=True)
    return qs, bank


def _encode_resumably(model: MACModel, docs: list[Document], partial: Path | None, log, step: int = 8) -> MemoryBank:
    """Encode ``docs`` ``step`` at a time, appending each finished step to ``partial`` (when given), so an
    interrupted run resumes where it stopped: documents already in ``partial`` are read back, not encoded again."""
    done = MemoryBank()
    if partial is not None and partial.exists():
        try:
            done = load_bank(partial)
        except ValueError as err:  # cut off mid-write: start again
            log(f"news selection: {partial} unreadable ({err}); encoding from the start")
            partial.unlink()
    if len(done):
        log(f"news selection: resuming from {partial} ({len(done)} documents encoded)")
    todo = [d for d in docs if d.id not in set(done.document_ids())]
    for s in range(0, len(todo), step):
        part = build_memory(model, todo[s: s + step], progress=False)
        for d in todo[s: s + step]:
            done.upsert(d, part.chunks(d.id))
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
            tmp = partial.with_suffix(".step")
            save_bank(part, tmp)
            with partial.open("a") as out:
                out.write(tmp.read_text())
            tmp.unlink()
    bank = MemoryBank()  # in the documents' order, whatever order they were encoded in
    for d in docs:
        bank.upsert(done.document(d.id), done.chunks(d.id))
    return bank


def _contains(text: str, answer: str) -> bool:
    return answer.strip().lower() in text.lower()


@torch.no_grad()
def select_records(model: MACModel, bank: MemoryBank, questions: list[Question], top_k: int,
                   batch: int = 32) -> list[dict]:
    """Per question: its gold document, the retriever's top-k windows (their documents and cosines, best first) and
    the aggregator's mass over them, and which retrieved documents contain the gold answer's string."""
    out = []
    for s in range(0, len(questions), batch):
        part = questions[s: s + batch]
        enc = model.encode_questions([q.question for q in part])
        hits = bank.search(enc.vectors.numpy(), top_k)
        mass = model.selection(enc, [[(h.chunk.modulation, h.score) for h in hs] for hs in hits])
        for q, hs, m in zip(part, hits, mass):
            docs = {h.document.id: h.document for h in hs}
            out.append({"id": q.id, "gold": q.doc_ids[0], "docs": [h.document.id for h in hs],
                        "windows": [h.chunk.modulation.chunk for h in hs],
                        "scores": [round(h.score, 5) for h in hs], "mass": [round(float(x), 6) for x in m[: len(hs)]],
                        "answer_in": {d: _contains(doc.text, q.answers[0]) for d, doc in docs.items()}})
    return out


def picked(record: dict, picker: str | DocumentPick | None) -> str:
    """The document a picker reads first: ``"retriever"`` (top-1 window's document) or a :class:`DocumentPick`
    rule (None: the aggregator's heaviest document by summed mass, the rule before the floor)."""
    if picker == "retriever":
        return record["docs"][0]
    return pick_order(record["docs"], record["mass"], picker)[0]


def miss_kind(record: dict, doc: str) -> str | None:
    """None for a right pick, else one of :data:`MISSES`."""
    if doc == record["gold"]:
        return None
    if record["gold"] not in record["docs"]:
        return "gold_not_retrieved"
    if doc.endswith("-ev"):
        return "other_evidence"
    return "article_with_answer" if record["answer_in"].get(doc) else "article"


def pick_summary(records: list[dict], pickers: dict[str, str | DocumentPick | None]) -> dict:
    """Per picker: gold-document pick rate (%), its misses by kind, and the question-by-question comparison with the
    retriever (both right, only this picker, only the retriever, neither)."""
    base = [picked(r, "retriever") == r["gold"] for r in records]
    n = max(1, len(records))
    out = {"questions": len(records),
           "gold_retrieved": round(100 * sum(r["gold"] in r["docs"] for r in records) / n, 1)}
    for name, rule in pickers.items():
        docs = [picked(r, rule) for r in records]
        right = [d == r["gold"] for d, r in zip(docs, records)]
        kinds = [miss_kind(r, d) for r, d in zip(records, docs)]
        out[name] = {"pick_rate": round(100 * sum(right) / n, 1),
                     "misses": {k: kinds.count(k) for k in MISSES},
                     "vs_retriever": {"both": sum(a and b for a, b in zip(right, base)),
                                      "only_this": sum(a and not b for a, b in zip(right, base)),
                                      "only_retriever": sum(b and not a for a, b in zip(right, base)),
                                      "neither": sum(not a and not b for a, b in zip(right, base))}}
    return out


MARGINS = tuple(round(0.01 * i, 2) for i in range(101))


def margin_curve(records: list[dict], pooling: str, margins=MARGINS) -> list[tuple[float, float]]:
    """(margin, pick rate %) of the floor rule with this pooling, for every margin."""
    n = max(1, len(records))
    out = []
    for m in margins:
        rule = DocumentPick(pooling=pooling, margin=m)
        out.append((m, round(100 * sum(picked(r, rule) == r["gold"] for r in records) / n, 2)))
    return out


def calibrate(records: list[dict], source: str, poolings=("sum", "max"), margins=MARGINS) -> DocumentPick:
    """The floor rule with the highest pick rate on ``records`` (a calibration split, never a test set; one record per
    question and k); among equal rates the larger margin (the rule nearest the retriever), then sum pooling.
    ``source`` is recorded."""
    best = None
    for pooling in poolings:
        for m, rate in margin_curve(records, pooling, margins):
            cand = (rate, m, pooling == "sum")
            if best is None or cand > best[0]:
                best = (cand, pooling, m)
    (rate, m, _), pooling, _ = best
    retr = 100 * sum(picked(r, "retriever") == r["gold"] for r in records) / max(1, len(records))
    return DocumentPick(pooling=pooling, margin=m, calibration={
        "on": source, "records": len(records), "pick_rate": rate, "retriever_pick_rate": round(retr, 2),
        "rule": "highest pick rate; ties: larger margin, then sum pooling"})


def run(model: MACModel, sets=SETS, questions: int = 100, articles: int = 200, top_ks=(4, 8), seed: int = 0,
        modes: tuple[str, ...] = (), cache: Path | None = CACHE,
        answer_k: int = 4, log=print) -> dict:
    """The instrument (module docstring) on each set and each k in ``top_ks``; with ``modes`` (e.g. ``rag@1``,
    ``select+rag@1``) also every question answered in each mode from the same memory at ``top_k=answer_k``
    (F1, MC accuracy, selection). JSON-able; per-question records under ``records``."""
    model.eval()
    rule = getattr(model, "pick", None)
    pickers = {"retriever": "retriever", "aggregator_sum": DocumentPick(pooling="sum"),
               "aggregator_max": DocumentPick(pooling="max")}
    if rule is not None and rule.margin is not None:
        pickers["checkpoint_rule"] = rule
    out: dict = {"checkpoint": model.version, "pick_rule": rule.model_dump() if rule else None, "seed": seed,
                 "articles_from": f"RealTimeQA {ARTICLE_YEAR} search results", "sets": {}}
    for name in sets:
        qs, bank = news_memory(model, name, questions, articles, seed, cache, log)
        docs = [bank.document(d) for d in bank.document_ids()]
        rep: dict = {"questions": len(qs), "documents": len(bank), "windows": bank.num_chunks,
                     "evidence_documents": sum(d.id.endswith("-ev") for d in docs),
                     "articles": sum("-gcs" in d.id for d in docs),
                     "question_ids_sha": hashlib.sha256(",".join(q.id for q in qs).encode()).hexdigest()[:12],
                     "by_k": {}, "records": {}}
        for k in top_ks:
            recs = select_records(model, bank, qs, k)
            rep["by_k"][str(k)] = pick_summary(recs, pickers)
            rep["records"][str(k)] = recs
        if modes:
            rows = run_questions(model, bank, qs, modes, EvalSettings(modes=tuple(modes), top_k=answer_k,
                                                                       retention=False, progress=False), "answer")
            rep["answers"] = {"top_k": answer_k, "metrics": {m: summarize(rs) for m, rs in rows.items()},
                              "rows": {m: [{k: v for k, v in r.items() if k != "weights"} for r in rs]
                                       for m, rs in rows.items()}}
        out["sets"][name] = rep
    return out


def table(result: dict) -> str:
    """Markdown: pick rate per set, k and picker, with the misses."""
    lines = ["| set | k | gold retrieved | picker | pick rate | misses: not retrieved / other evidence / article "
             "with answer / article | only this / only retriever |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, rep in result["sets"].items():
        for k, s in rep["by_k"].items():
            for picker, v in s.items():
                if not isinstance(v, dict):
                    continue
                m = v["misses"]
                lines.append(f"| {name} | {k} | {s['gold_retrieved']} | {picker} | {v['pick_rate']} | "
                             + " / ".join(str(m[x]) for x in MISSES)
                             + f" | {v['vs_retriever']['only_this']} / {v['vs_retriever']['only_retriever']} |")
    return "\n".join(lines)
