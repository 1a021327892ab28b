"""Online fine-tuning baselines of the MAC paper (Tack et al. 2024, §4.1: *Uniform* and *Salient Spans*).

MAC adapts to a document with one forward pass. The baselines adapt by gradient descent instead: documents arrive
in stream (published_at) order, and after each one the LM takes K optimiser steps on that document's
language-modelling loss. When the stream ends, the fine-tuned LM answers every question with the one-shot ``base``
prompt. Two modes:

- ``ft-uniform``: the loss covers every token of the document (title, date and text, as MAC reads it);
- ``ft-salient``: the loss covers only the tokens of *salient spans* (names, dates, numbers, money, percentages),
  found by :func:`salient_spans`, a documented regex heuristic (spaCy is not installed, and this project adds no
  dependencies). A document without a salient span takes no step.

**What is trained.** The whole LM (full fine-tuning). SmolLM2-135M: 135M parameters, 0.54 GB in fp32; with
gradients and AdamW's two moments, the training state is ~2.2 GB. That fits the 24 GiB here, so there is no LoRA
path: ``peft`` is not installed, and it would only be needed for LMs too large for full fine-tuning.

**The shared LM is never touched.** Each run deep-copies ``FrozenLM.model`` into an :class:`OnlineFinetuner`, which
owns the copy and its optimiser, answers through a :class:`~pipeline.lm.FrozenLM` view of the copy, and drops both
when its ``with`` block ends. The next run starts again from the shared, unchanged weights. The shared LM's
parameters keep ``requires_grad=False`` and never hold a ``.grad``.

**Costs, per document.** Wall time of the K steps, including tokenisation and the salient tagger. Memory, two
ways. ``peak_rss_mb`` is measured: the process's resident set (``/proc/self/statm``, sampled every 2 ms while
adapting) at its peak, minus the resident set just before the copy was made. It counts the copy, gradients,
optimiser state and activations, and it is the same measure ``bench_baselines`` uses for MAC's encode.
``state_mb`` is counted from the tensors: the copy's parameters, the gradients (same size) and the optimiser state.

**Hyperparameters** (optimiser, learning rate, K) are picked by :func:`tune` on the *validation* split, by token F1
over a small grid. They are never picked on test.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import gc
import itertools
import os
import re
import resource
import threading
import time
from collections.abc import Callable, Iterable
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from .config import StrictModel
from .lm import FrozenLM, pad_batch
from .prompts import answer_continuation, document_text, prompt_for
from .schemas import Document, Question

FT_MODES = ("ft-uniform", "ft-salient")
RETENTION_GROWTH = (1, 2, 4, 8)


class FinetuneConfig(StrictModel):
    """Online fine-tuning of the whole LM (full FT) on each incoming document. Pick the values with :func:`tune`
    on the validation split."""

    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Optimiser. One instance lives for the whole stream, so AdamW's moments carry over from one document to the next.")
    lr: float = Field(3e-5, gt=0.0, le=1.0, description="Learning rate, constant. No warm-up: a stream has no known length.")
    steps: int = Field(1, ge=1, le=100, description="K: optimiser steps on each document, all on the same batch (the document's windows).")
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay (AdamW) or L2 (SGD). 0: over a long stream, decay would pull every weight toward zero, not only the ones the news changes.")
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="SGD momentum (ignored by AdamW).")
    grad_clip: float = Field(1.0, gt=0.0, description="Max global gradient norm per step.")
    max_tokens: int = Field(512, ge=8, le=8192, description="Window length. A longer document is split into non-overlapping windows, and each step trains on all of them as one batch.")


def config_for(finetune, mode: str) -> FinetuneConfig:
    """The config of ``mode`` from ``None`` (defaults), one :class:`FinetuneConfig` for every mode, or a dict
    {mode: FinetuneConfig | dict}."""
    if finetune is None:
        return FinetuneConfig()
    if isinstance(finetune, FinetuneConfig):
        return finetune
    got = finetune.get(mode)
    if got is None:
        return FinetuneConfig()
    return got if isinstance(got, FinetuneConfig) else FinetuneConfig.model_validate(got)


# ---- the salient-span tagger ----------------------------------------------------------------------------------------
_MONTH_NAMES = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
                "November", "December")
_MONTH = r"(?:" + "|".join(_MONTH_NAMES) + r"|(?:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)\.)"
_WEEKDAY = r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_NUM = r"\d+(?:,\d{3})*(?:\.\d+)?"
_SCALE = r"(?:\s+(?:hundred|thousand|million|billion|trillion))?"
_PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    ("date", re.compile(rf"\b{_MONTH}(?:\s+\d{{1,2}}(?:st|nd|rd|th)?)?(?:,?\s+\d{{4}})?(?![\w])")),  # March 19, 2023
    ("date", re.compile(rf"\b\d{{1,2}}(?:st|nd|rd|th)?\s+{_MONTH}(?:,?\s+\d{{4}})?(?![\w])")),  # 13 January 2024
    ("date", re.compile(r"\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2}/\d{1,2}/\d{2,4}\b")),  # 2024-01-13, 1/13/2024
    ("date", re.compile(rf"\b{_WEEKDAY}\b")),
    ("money", re.compile(rf"(?:US)?[$€£¥]\s?{_NUM}{_SCALE}(?![\w])")),  # $598 million, €3.5 billion
    ("money", re.compile(rf"\b{_NUM}{_SCALE}\s+(?:dollars|euros|pounds|yen|yuan|rupees)\b")),
    ("percent", re.compile(rf"\b{_NUM}\s?(?:%|percent\b|per cent\b)")),  # 12%, 3.5 percent
    ("number", re.compile(rf"\b{_NUM}{_SCALE}(?![\w])")),  # 47,120; 2023; 3 million
)
# Capitalised words that open a sentence or a name without being part of one ("The Daily Quorum" → "Daily Quorum").
_FUNCTION_WORDS = frozenset(
    "a an the on in at by for from to of with after before but and or as if it its his her their our my your this that "
    "these those when while since until then there here what which who whom whose why how i we you he she they "
    "mr mrs ms dr".split()
)
_WORD = re.compile(r"[^\W\d_][\w'’\-]*|\S")  # a word, or any other single non-space character
_CONNECTORS = frozenset({"of", "de", "del", "da", "van", "von", "der", "la", "le", "al", "bin", "&"})
_OPENERS = ".!?:;\"“”—–\n"  # a capitalised word right after one of these starts a sentence (or a title line)


def _is_cap(word: str) -> bool:
    return word[:1].isupper()


def _name_spans(text: str) -> list[tuple[int, int]]:
    """Proper-name spans: runs of capitalised words on one line (an inner connector such as "of" allowed, leading
    function words dropped) of two words or more, anywhere; a single capitalised word only mid-sentence (the first
    word of a sentence is capitalised anyway)."""
    words = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(text)]
    spans, i = [], 0
    while i < len(words):
        if not _is_cap(words[i][2]):
            i += 1
            continue
        j = i + 1  # extend the run while the next word is capitalised and on the same line
        while j < len(words):
            gap = text[words[j - 1][1]: words[j][0]]
            if "\n" in gap:
                break
            if _is_cap(words[j][2]):
                j += 1
            elif words[j][2].lower() in _CONNECTORS and j + 1 < len(words) and _is_cap(words[j + 1][2]) \
                    and "\n" not in text[words[j][1]: words[j + 1][0]]:
                j += 2
            else:
                break
        run = words[i:j]
        before = text[: run[0][0]].rstrip(" \t")
        at_sentence_start = not before or before[-1] in _OPENERS
        while run and run[0][2].lower() in _FUNCTION_WORDS:
            run = run[1:]
            at_sentence_start = False
        if run and (len(run) >= 2 or not at_sentence_start):
            spans.append((run[0][0], run[-1][1]))
        i = j
    return spans


def salient_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of salient information, merged and sorted. A heuristic stands in for an
    NER tagger; it marks:

    - dates: month names with an optional day and year, "13 January 2024", ISO and slash dates, weekdays;
    - money ("$598 million", "3 billion euros"), percentages ("12%", "3.5 percent"), other numbers ("47,120", years);
    - names: runs of two or more capitalised words ("Lopeth Robotics", "Bank of America"; a leading "The"/"On"... is
      dropped), and single capitalised words that do not open a sentence ("Gresiport").

    It misses lower-case entities and names at the start of a sentence that are a single word, and it marks
    capitalised words that are not names when they fall mid-sentence (e.g. in a headline written in title case).
    """
    spans = [(m.start(), m.end()) for _, pat in _PATTERNS for m in pat.finditer(text)]
    spans += _name_spans(text)
    merged: list[list[int]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def document_tokens(tokenizer, doc: Document | str, salient: bool) -> tuple[list[int], list[bool]]:
    """Token ids of what the LM reads for a document (:func:`~pipeline.prompts.document_text`), and per token
    whether the loss covers it: all tokens (uniform), or those overlapping a salient span (a token that straddles a
    span's edge counts). Needs a fast tokenizer (offset mapping)."""
    text = doc if isinstance(doc, str) else document_text(doc)
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if not salient:
        return ids, [True] * len(ids)
    spans = salient_spans(text)
    mask = [e > s and any(s < se and e > ss for ss, se in spans) for s, e in offsets]  # special tokens: (0, 0)
    return ids, mask


# ---- memory measurement ---------------------------------------------------------------------------------------------
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc), or its lifetime peak where /proc is absent."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so the next RSS baseline is honest."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Context manager: the process's peak resident set while the block runs, sampled every ``interval`` seconds
    by a thread (torch releases the GIL inside ops, so the sampler sees their allocations)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> "PeakRSS":
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# ---- the online fine-tuner ------------------------------------------------------------------------------------------
def stream_order(docs: Iterable[Document]) -> list[Document]:
    """Publication order, undated last, ties by id (as ``evaluate`` orders the stream)."""
    return sorted(docs, key=lambda d: (d.published_at is None, d.published_at or 0, d.id))


def _optimizer(params, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    try:  # fused AdamW: one kernel for all parameters (on this CPU 0.1 s per step vs 0.3-0.7 s for foreach)
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class OnlineFinetuner:
    """A private, trainable copy of a frozen LM for one pass over a stream. Use it as a context manager: the copy
    and its optimiser are dropped on exit, so every run starts from the shared LM's unchanged weights.

    ``view`` is a :class:`FrozenLM` over the copy: the same generation and choice scoring as the shared LM.
    """

    def __init__(self, lm: FrozenLM, cfg: FinetuneConfig, salient: bool):
        if lm.tokenizer is None:
            raise ValueError("online fine-tuning needs the LM's tokenizer")
        self.lm, self.cfg, self.salient = lm, cfg, salient
        self.documents_seen = 0
        self.model = copy.deepcopy(lm.model)  # the shared model is only read, here and never again
        self.view = FrozenLM(self.model, lm.tokenizer, name=f"{lm.name}+{'ft-salient' if salient else 'ft-uniform'}")
        self.view._stop_ids = lm.stop_ids()  # same tokenizer: skip rescanning the vocabulary
        self.model.requires_grad_(True)  # FrozenLM froze the copy; train it (it stays in eval mode: no dropout)
        self.optimizer = _optimizer([p for p in self.model.parameters()], cfg)

    def __enter__(self) -> "OnlineFinetuner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Drop the copy, its gradients and the optimiser state."""
        self.model = self.view = self.optimizer = None
        release_memory()

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def state_bytes(self) -> int:
        """Bytes of the copy's parameters + their gradients + the optimiser state (tensors counted once)."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        opt = {t.data_ptr(): t.numel() * t.element_size() for st in self.optimizer.state.values()
               for t in st.values() if torch.is_tensor(t) and t.dim() > 0}
        return 2 * params + sum(opt.values())

    def batch(self, doc: Document) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(ids, attention mask, labels) of a document's windows; labels are -100 where the loss does not look.
        None when no token after a window's first is in the loss (nothing to learn from)."""
        ids, mask = document_tokens(self.lm.tokenizer, doc, self.salient)
        n = self.cfg.max_tokens
        wins = [(ids[s: s + n], mask[s: s + n]) for s in range(0, len(ids), n)]
        wins = [(i, m) for i, m in wins if any(m[1:])]  # the first token of a window is never predicted
        if not wins:
            return None
        dev = self.view.device
        x, att = pad_batch([i for i, _ in wins], self.lm.pad_id, dev)
        keep, _ = pad_batch([[int(b) for b in m] for _, m in wins], 0, dev)
        labels = torch.where((keep > 0) & (att > 0), x, torch.full_like(x, -100))
        return x, att, labels

    def adapt(self, doc: Document) -> dict:
        """K optimiser steps on one document. Returns its costs: seconds, peak RSS (bytes), steps, loss before/after."""
        t0 = time.perf_counter()
        out = {"steps": 0, "loss_tokens": 0}
        with PeakRSS() as mem:
            batch = self.batch(doc)
            if batch is not None:
                x, att, labels = batch
                out["loss_tokens"] = int((labels[:, 1:] != -100).sum())
                with torch.enable_grad():
                    for k in range(self.cfg.steps):
                        loss = self.model(input_ids=x, attention_mask=att, labels=labels, use_cache=False).loss
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                        out["loss_first" if k == 0 else "loss_last"] = float(loss.detach())
                out["steps"] = self.cfg.steps
        self.documents_seen += 1
        return out | {"seconds": time.perf_counter() - t0, "peak_rss": mem.peak}


def run_stream(lm: FrozenLM, docs: list[Document], cfg: FinetuneConfig, salient: bool,
               evaluate_at: dict[int, Callable[[FrozenLM], None]] | None = None, progress: bool = False) -> dict:
    """Fine-tune a fresh copy of ``lm`` online over ``docs`` (sorted into stream order). After the n-th document
    (n = 1..len; n = 0 is before the first) calls ``evaluate_at[n](view)`` with the copy as it is then. The copy is
    dropped at the end. Returns the adaptation costs (per document and summarised)."""
    from tqdm import tqdm

    docs, evaluate_at = stream_order(docs), evaluate_at or {}
    bad = [n for n in evaluate_at if not 0 <= n <= len(docs)]
    if bad:
        raise ValueError(f"evaluate_at positions {bad} are outside 0..{len(docs)}")
    release_memory()
    baseline = rss_bytes()  # before the copy: the copy is part of what fine-tuning costs
    per_doc = []
    with OnlineFinetuner(lm, cfg, salient) as ft:
        if 0 in evaluate_at:
            evaluate_at[0](ft.view)
        for n, doc in enumerate(tqdm(docs, desc="ft-salient" if salient else "ft-uniform", disable=not progress), 1):
            per_doc.append(ft.adapt(doc) | {"id": doc.id})
            if n in evaluate_at:
                evaluate_at[n](ft.view)
        state, trainable = ft.state_bytes(), ft.trainable_parameters
    secs = [d["seconds"] for d in per_doc]
    return {
        "method": "full fine-tuning (every LM parameter; no LoRA: peft is not installed and the 135M LM fits)",
        "config": cfg.model_dump(),
        "trainable_parameters": trainable,
        "documents": len(docs),
        "documents_trained": sum(1 for d in per_doc if d["steps"]),
        "seconds_per_document": float(np.mean(secs)) if secs else 0.0,
        "seconds_per_document_max": float(np.max(secs)) if secs else 0.0,
        "seconds_total": float(np.sum(secs)),
        "peak_rss_mb": max((d["peak_rss"] for d in per_doc), default=baseline) / 2**20 - baseline / 2**20,
        "state_mb": state / 2**20,
        "loss_tokens_per_document": float(np.mean([d["loss_tokens"] for d in per_doc])) if per_doc else 0.0,
        "per_document": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items() if k != "peak_rss"}
                         | {"peak_rss_mb": round((d["peak_rss"] - baseline) / 2**20, 1)} for d in per_doc],
    }


# ---- evaluation of one mode over one stream ---------------------------------------------------------------------------
def retention_block(docs: list[Document], questions: list[Question]) -> tuple[int, list[Question]]:
    """n0 = the first eighth of the stream (at least one document), as ``evaluate.retention`` defines it, so 8× is
    the whole stream; and the questions answered by those documents alone."""
    n0 = max(1, len(docs) // 8)
    first = {d.id for d in docs[:n0]}
    return n0, [q for q in questions if q.doc_ids and set(q.doc_ids) <= first]


def answer_with(lm: FrozenLM, questions: list[Question], settings) -> list[dict]:
    """Answer questions with ``lm`` alone, the ``base`` prompt (one-shot): per-question rows as ``evaluate`` makes."""
    from types import SimpleNamespace

    from .evaluate import answer_batch

    shim = SimpleNamespace(lm=lm)  # answer_batch reads only .lm in the base mode
    rows = []
    for s in range(0, len(questions), settings.batch_size):
        qs = questions[s: s + settings.batch_size]
        rows += answer_batch(shim, "base", qs, [[] for _ in qs], settings)
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
        growth = {f"{g}x": {"documents": n0 * g, "f1": 100.0 * float(np.mean([answered[n0 * g][q.id]["f1"] for q in block]))}
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
