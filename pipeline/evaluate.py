"""``macstream eval``: stream every document of a portable dataset into a memory, then answer every question.

Modes (all with the same frozen LM, greedy decoding, stop at newline):
- ``base``: the LM alone (one-shot prompt);
- ``rag``: the top-k retrieved document texts in the prompt (one-shot prompt);
- ``mac``: the aggregated modulations of the top-k retrieved chunks as the prefix (bare prompt, as trained);
- ``mac+rag``: both;
- ``ft-uniform`` / ``ft-salient``: online fine-tuning baselines (:mod:`pipeline.baselines`): a private copy of the
  LM takes K gradient steps on each document in stream order (loss on every token / on salient spans only), then
  answers with the ``base`` prompt. They need the document stream, not the memory bank.
Scores: strict EM, the MAC paper's lenient EM, token F1; multiple-choice accuracy where questions have choices (the
choice with the highest mean per-token log-likelihood under the mode); for ``mac``: selection accuracy (the gold
document gets the most aggregator attention) next to the retriever's own top-1 accuracy and recall@k. Retention:
F1 on the questions of the first eighth of the stream as the memory grows 1×, 2×, 4×, 8× (for the ft modes: as
fine-tuning goes on over 1×, 2×, 4×, 8× of that block).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import replace

import numpy as np
from tqdm import tqdm

from pipeline.baselines import config_for, finetune_eval
from pipeline.model.mac import MACModel
from pipeline.modes import FT_MODES, Mode
from pipeline.prompts import PROMPTS
from pipeline.schemas import Document, Question
from pipeline.scoring import RETENTION_GROWTH, EvalSettings, answer_batch, retention_block, stream_order, summarize
from pipeline.store.bank import MemoryBank


def build_memory(model: MACModel, docs: list[Document], progress: bool = True) -> MemoryBank:
    """Encode documents in stream (published_at) order into a fresh bank. One amortizer forward per chunk."""
    bank = MemoryBank()
    for s in tqdm(range(0, len(docs), 64), desc="encode", disable=not progress):
        part = docs[s: s + 64]
        chunks = model.encode_documents(part)
        by_doc = defaultdict(list)
        for c in chunks:
            by_doc[c.modulation.doc_id].append(c)
        for d in part:
            bank.upsert(d, by_doc[d.id])
    return bank


def run_questions(model: MACModel, bank: MemoryBank, questions: list[Question], modes, settings: EvalSettings,
                  desc: str) -> dict[str, list[dict]]:
    q_vecs = model.encoder.embed([q.question for q in questions]).numpy() if questions else np.zeros((0, 1))
    hits = bank.search(q_vecs, settings.top_k) if len(bank) else [[] for _ in questions]
    out: dict[str, list[dict]] = {m: [] for m in modes}
    steps = [(m, s) for m in modes for s in range(0, len(questions), settings.batch_size)]
    for mode, s in tqdm(steps, desc=desc, disable=not settings.progress):
        qs, hs = questions[s: s + settings.batch_size], hits[s: s + settings.batch_size]
        out[mode] += answer_batch(model, mode, qs, hs, settings)
    return out


def evaluate(model: MACModel, docs: list[Document], questions: list[Question], settings: EvalSettings) -> dict:
    """Full evaluation; returns a JSON-able report (per-mode metrics, retention, costs, per-question rows)."""
    for m in settings.modes:
        if m not in FT_MODES:
            Mode.parse(m)  # raises with the valid choices
    if not settings.top_k >= 1:
        raise ValueError("top_k must be >= 1")
    model.eval()
    docs = stream_order(docs)
    qs = sorted(questions, key=lambda q: not q.doc_ids)  # answerable first
    if settings.limit:
        qs = qs[: settings.limit]
    ft_modes = [m for m in settings.modes if m in FT_MODES]
    lm_settings = replace(settings, modes=tuple(m for m in settings.modes if m not in FT_MODES))
    bank, encode_s, rows = None, 0.0, {}
    if lm_settings.modes or not ft_modes:
        t0 = time.perf_counter()
        bank = build_memory(model, docs, settings.progress)
        encode_s = time.perf_counter() - t0
        rows = run_questions(model, bank, qs, lm_settings.modes, settings, "answer")
    ft = {m: finetune_eval(model.lm, m, docs, qs, config_for(settings.finetune, m), settings, settings.retention)
          for m in ft_modes}
    rows |= {m: r["rows"] for m, r in ft.items()}
    report = {
        "documents": len(docs), "chunks": bank.num_chunks if bank is not None else None, "questions": len(qs),
        "top_k": settings.top_k, "checkpoint": model.version, "lm": model.cfg.lm, "encoder": model.cfg.encoder,
        "prompts": {m: PROMPTS["base" if m in FT_MODES else Mode.parse(m).kind] for m in settings.modes},
        "metrics": {m: summarize(rs) for m, rs in rows.items() if rs},
        "cost": {
            "bytes_per_modulation": model.cfg.num_tokens * model.lm.hidden_size * 2,
            "bytes_per_retrieval_vector": model.encoder.width * 4,
            "bytes_per_expanded_prefix": (model.lm.num_layers * 2 * model.cfg.prefix_tokens * model.lm.num_kv_heads
                                          * model.lm.head_dim * 2),
            "encode_seconds_per_document": encode_s / max(1, len(docs)),
        },
        "rows": rows,
    }
    for m, rs in rows.items():  # mean prompt tokens are a cost, not a percentage
        if rs:
            report["metrics"][m]["prompt_tokens"] = float(np.mean([r["prompt_tokens"] for r in rs]))
            report["metrics"][m]["seconds"] = float(np.mean([r["seconds"] for r in rs]))
            report["metrics"][m]["aggregate_seconds"] = float(np.mean([r["aggregate_seconds"] for r in rs]))
    if ft:
        report["adaptation"] = {m: r["cost"] for m, r in ft.items()}
    if settings.retention:
        # retention reports F1 only: skip the multiple-choice scoring it would otherwise compute and drop
        no_mc = replace(lm_settings, multiple_choice=False)
        report["retention"] = retention(model, docs, qs, no_mc) if lm_settings.modes else {}
        for m, r in ft.items():  # same block (first eighth) and growth points as retention(): merge per point
            if r["retention"]:
                report["retention"]["questions"] = r["retention"]["questions"]
                growth = report["retention"].setdefault("growth", {})
                for g, point in r["retention"]["growth"].items():
                    growth.setdefault(g, {"documents": point["documents"]})[m] = point["f1"]
    return report


def retention(model: MACModel, docs: list[Document], questions: list[Question], settings: EvalSettings) -> dict:
    """F1 of the first eighth's questions with memory = first n·g documents, g = 1, 2, 4, 8 (stream order)."""
    n0, qs = retention_block(docs, questions)
    modes = [m for m in settings.modes if m != "base"]
    if not qs or not modes:
        return {}
    out = {"questions": len(qs), "growth": {}}
    for g in RETENTION_GROWTH:
        bank = build_memory(model, docs[: n0 * g], progress=False)
        rows = run_questions(model, bank, qs, modes, settings, f"retention {g}x")
        out["growth"][f"{g}x"] = {"documents": len(bank), **{m: summarize(rs)["f1"] for m, rs in rows.items()}}
    return out
