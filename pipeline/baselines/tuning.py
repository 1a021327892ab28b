"""Scoring the fine-tuning baselines on a stream, and choosing their hyperparameters on the validation split."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable

import numpy as np
import torch

from pipeline.baselines.finetune import run_stream
from pipeline.config import FinetuneConfig
from pipeline.model.lm import FrozenLM
from pipeline.modes import BASE, FT_MODES
from pipeline.prompts import answer_continuation, prompt_for
from pipeline.schemas import Document, Question
from pipeline.scoring import RETENTION_GROWTH, answer_batch, retention_block, stream_order


def answer_with(lm: FrozenLM, questions: list[Question], settings) -> list[dict]:
    """Answer questions with ``lm`` alone, the ``base`` prompt (one-shot): per-question rows as ``evaluate`` makes."""
    rows = []
    for s in range(0, len(questions), settings.batch_size):
        qs = questions[s: s + settings.batch_size]
        rows += answer_batch(lm, BASE, qs, [[] for _ in qs], settings)
    return rows


@torch.no_grad()
def gold_logprobs(lm: FrozenLM, questions: list[Question], batch_size: int = 16) -> list[float]:
    """Mean per-token log p(gold answer | base prompt) per question: a graded signal of what the LM knows, where
    greedy answers of a small LM score F1 0 across the board."""
    tok, out = lm.tokenizer, []
    for s in range(0, len(questions), batch_size):
        qs = questions[s: s + batch_size]
        p = [tok(prompt_for("base", q.question))["input_ids"] for q in qs]
        a = [tok(answer_continuation(q.answers[0]), add_special_tokens=False)["input_ids"] for q in qs]
        sums, counts = lm.continuation_logprobs(p, a)
        out += (sums / counts).tolist()
    return out


def finetune_eval(lm: FrozenLM, mode: str, docs: list[Document], questions: list[Question], cfg: FinetuneConfig,
                  settings, retention: bool = True, gold_logprob: bool = False) -> dict:
    """One online fine-tuning run of ``mode`` over the stream; answers every question after the whole stream, and the
    retention block's questions after 1×, 2×, 4×, 8× of the block (F1 only, no multiple choice there).

    ``settings`` is an ``evaluate.EvalSettings`` (max_new_tokens, batch_size, multiple_choice). ``gold_logprob``
    adds each final row's :func:`gold_logprobs` value. Returns
    ``{"rows": [...], "retention": {"questions": n, "growth": {"1x": {"documents": n0, "f1": ...}}}, "cost": {...}}``.
    """
    if mode not in FT_MODES:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; expected one of {list(FT_MODES)}")
    docs = stream_order(docs)
    n0, block = retention_block(docs, questions) if retention else (0, [])
    at: dict[int, list[Question]] = {len(docs): list(questions)}
    if block:
        for g in RETENTION_GROWTH:
            if n0 * g <= len(docs):
                at.setdefault(n0 * g, [])
                have = {q.id for q in at[n0 * g]}
                at[n0 * g] = at[n0 * g] + [q for q in block if q.id not in have]
    answered: dict[int, dict[str, dict]] = {}

    def evaluator(n: int):
        def run(view: FrozenLM) -> None:
            s = dataclasses.replace(settings, multiple_choice=settings.multiple_choice and n == len(docs))
            answered[n] = {r["id"]: r for r in answer_with(view, at[n], s)}
            if gold_logprob and n == len(docs):
                for q, lp in zip(at[n], gold_logprobs(view, at[n])):
                    answered[n][q.id]["gold_logprob"] = lp
        return run

    cost = run_stream(lm, docs, cfg, mode == "ft-salient", {n: evaluator(n) for n in at}, settings.progress)
    out = {"rows": [answered[len(docs)][q.id] for q in questions], "cost": cost, "retention": {}}
    if block:
        growth = {f"{g}x": {"documents": n0 * g,
                            "f1": 100.0 * float(np.mean([answered[n0 * g][q.id]["f1"] for q in block]))}
                  for g in RETENTION_GROWTH if n0 * g <= len(docs)}
        out["retention"] = {"questions": len(block), "growth": growth}
    return out


# ---- hyperparameter choice on the validation split ------------------------------------------------------------------
DEFAULT_GRID = {"optimizer": ["adamw"], "lr": [1e-5, 3e-5, 1e-4, 3e-4], "steps": [1, 3]}


def select_best(results: list[dict]) -> dict:
    """Highest validation F1; ties go to the higher EM, then the higher gold-answer log-likelihood (graded, so it
    still ranks configs when a small LM's F1 is 0 for all of them), then fewer steps (cheaper), then the lower
    learning rate (less drift from the base LM)."""
    if not results:
        raise ValueError("select_best needs at least one result")
    return max(results, key=lambda r: (round(r["f1"], 6), round(r["em"], 6), round(r.get("gold_logprob", 0.0), 6),
                                       -r["config"]["steps"], -r["config"]["lr"]))


def tune(lm: FrozenLM, docs: list[Document], questions: list[Question], settings, modes=FT_MODES,
         grid: dict | None = None, log: Callable[[dict], None] | None = None) -> dict:
    """Run every grid point of every mode over the *validation* stream and pick, per mode, the config with the best
    F1 (:func:`select_best`; ties broken by the gold answer's log-likelihood). No retention, no multiple choice
    (speed). Also scores the untuned LM (``base``) for reference. Returns ``{"grid", "questions", "documents",
    "base", "results", "chosen": {mode: config}}``; F1/EM in percent, gold_logprob in nats per token."""
    grid = grid or DEFAULT_GRID
    unknown = set(grid) - set(FinetuneConfig.model_fields)
    if unknown:
        raise ValueError(f"grid keys {sorted(unknown)} are not FinetuneConfig fields")
    s = dataclasses.replace(settings, multiple_choice=False, progress=False)
    base_rows = answer_with(lm, questions, s)
    out = {"grid": grid, "documents": len(docs), "questions": len(questions),
           "base": {k: 100.0 * float(np.mean([r[k] for r in base_rows])) for k in ("f1", "em")}
           | {"gold_logprob": float(np.mean(gold_logprobs(lm, questions)))}, "results": [], "chosen": {}}
    keys = list(grid)
    for mode in modes:
        mine = []
        for values in itertools.product(*(grid[k] for k in keys)):
            cfg = FinetuneConfig(**dict(zip(keys, values)))
            t0 = time.perf_counter()
            res = finetune_eval(lm, mode, docs, questions, cfg, s, retention=False, gold_logprob=True)
            row = {"mode": mode, "config": cfg.model_dump(),
                   **{k: 100.0 * float(np.mean([r[k] for r in res["rows"]])) for k in ("f1", "em")},
                   "gold_logprob": float(np.mean([r["gold_logprob"] for r in res["rows"]])),
                   "seconds_per_document": res["cost"]["seconds_per_document"], "seconds": time.perf_counter() - t0}
            mine.append(row)
            if log:
                log(row)
        out["results"] += mine
        out["chosen"][mode] = select_best(mine)["config"]
    return out
