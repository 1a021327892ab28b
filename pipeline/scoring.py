"""Answer a batch and score it: the per-question rows that every evaluation shares (``eval``, the fine-tuning
baselines, the benchmarks), their per-mode summary, and the stream order and retention block they are measured on.

A row: ``id``, ``prediction``, strict ``em``, ``lenient_em``, ``f1``, ``prompt_tokens``, ``seconds``; where the
question names its gold documents also ``retriever_top1``, ``recall_at_k`` and (MAC modes) ``selection``; where it
has choices, ``mc_accuracy``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.answering import answer, lm_of, prepare
from pipeline.metrics import score_answer
from pipeline.model.lm import FrozenLM
from pipeline.model.mac import MACModel
from pipeline.modes import KINDS, Mode
from pipeline.prompts import answer_continuation
from pipeline.schemas import Document, Hit, Question

RETENTION_GROWTH = (1, 2, 4, 8)  # memory sizes, in multiples of the stream's first eighth, that retention measures at


@dataclass
class EvalSettings:
    modes: tuple[str, ...] = KINDS
    top_k: int = 4
    max_new_tokens: int = 16
    batch_size: int = 16
    retention: bool = True
    multiple_choice: bool = True
    limit: int | None = None  # evaluate only the first N questions (answerable ones first)
    progress: bool = True
    finetune: object = None  # ft modes: a config.FinetuneConfig for both, or {mode: config}; None: defaults


def summarize(rows: list[dict]) -> dict[str, float]:
    """Per-mode means in percent of every 0/1-or-fraction score, each over the rows that carry it (e.g. selection
    only over questions with a gold document, mc_accuracy only over questions with choices), with its count."""
    scores = ("em", "lenient_em", "f1", "mc_accuracy", "selection", "retriever_top1", "recall_at_k")
    out: dict[str, float] = {}
    for key in scores:
        vals = [r[key] for r in rows if key in r]
        if vals:
            out[key] = 100.0 * float(np.mean(vals))
            out[f"n_{key}"] = len(vals)
    return out


@torch.no_grad()
def answer_batch(model: MACModel | FrozenLM, mode: Mode | str, questions: list[Question], hits: list[list[Hit]],
                 settings: EvalSettings) -> list[dict]:
    """Answer one batch in one mode; return per-question rows (prediction, scores, costs). ``model`` may be a bare
    :class:`FrozenLM` for the text-only modes (the fine-tuning baselines answer through their fine-tuned copy)."""
    mode = Mode.parse(mode)
    t0 = time.perf_counter()
    answers = answer(model, mode, [q.question for q in questions], hits, settings.max_new_tokens)
    t_total = time.perf_counter() - t0
    rows, with_weights = [], mode.uses_aggregator
    for i, (q, a) in enumerate(zip(questions, answers)):
        row = {"id": q.id, "prediction": a.text, **score_answer(a.text, q.answers), "prompt_tokens": a.prompt_tokens,
               "seconds": t_total / len(questions), "aggregate_seconds": a.seconds["aggregate"]}
        if with_weights:
            row["weights"] = a.weights
        gold = set(q.doc_ids or ())
        if gold and hits[i]:
            row["retriever_top1"] = float(hits[i][0].document.id in gold)
            row["recall_at_k"] = float(any(h.document.id in gold for h in hits[i]))
            if a.picked is not None:  # the document the aggregator's pick rule reads first
                row["selection"] = float(a.picked in gold)
        rows.append(row)
    if settings.multiple_choice and any(q.choices for q in questions):
        prompts, prefix, _ = prepare(model, mode, [q.question for q in questions], hits)
        for row, q, acc in zip(rows, questions, choice_accuracy(model, questions, prompts, prefix)):
            if q.choices:
                row["mc_accuracy"] = acc
    return rows


@torch.no_grad()
def choice_accuracy(model: MACModel | FrozenLM, questions: list[Question], prompts: list[str], prefix) -> list[float]:
    """1.0 where the gold answer's choice has the highest mean per-token log-likelihood, else 0.0.

    Questions are grouped by their number of choices so each prompt is read once (its cache serves every choice).
    """
    lm = lm_of(model)
    tok = lm.tokenizer
    out = [0.0] * len(questions)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        if q.choices:
            groups[len(q.choices)].append(i)
    for idx in groups.values():
        p_ids = [tok(prompts[i])["input_ids"] for i in idx]
        c_ids = [[tok(answer_continuation(c), add_special_tokens=False)["input_ids"] for c in questions[i].choices]
                 for i in idx]
        pre = prefix.index(torch.tensor(idx)) if prefix is not None else None
        scores = lm.choice_logprobs(p_ids, c_ids, pre)  # (n, C)
        for row, i in enumerate(idx):
            out[i] = float(questions[i].choices[int(scores[row].argmax())] == questions[i].answers[0])
    return out


def stream_order(docs: Iterable[Document]) -> list[Document]:
    """Publication order, undated last, ties by id (as ``evaluate`` orders the stream)."""
    return sorted(docs, key=lambda d: (d.published_at is None, d.published_at or 0, d.id))


def retention_block(docs: list[Document], questions: list[Question]) -> tuple[int, list[Question]]:
    """n0 = the first eighth of the stream (at least one document), as ``evaluate.retention`` defines it, so 8× is
    the whole stream; and the questions answered by those documents alone."""
    n0 = max(1, len(docs) // 8)
    first = {d.id for d in docs[:n0]}
    return n0, [q for q in questions if q.doc_ids and set(q.doc_ids) <= first]
