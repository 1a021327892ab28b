"""Answer questions from retrieved memory in one of four modes. Shared by ``eval`` and the server.

Modes (same frozen LM, greedy decoding, stop at newline): ``base`` (the LM alone), ``rag`` (the retrieved document
texts in the prompt), ``mac`` (the aggregated modulations of the retrieved chunks as the prefix), ``mac+rag`` (both).
Citation weights: for the MAC modes, the aggregator's attention mass per document (its chunks' mass summed).

``rag@N`` and ``mac+rag@N`` put only N of the retrieved documents' texts in the prompt: for ``rag@N`` the retriever's
best N, for ``mac+rag@N`` the N the aggregator weighs most (heaviest first) — the learned, question-conditioned
re-ranking decides what the LM reads, and a small LM reads one document far better than four. Every retrieved chunk
still enters the aggregation (the prefix is the same as in ``mac``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .lm import Prefix
from .mac import MACModel
from .memory import Hit
from .prompts import prompt_for
from .schemas import Document

MODES = ("base", "rag", "mac", "mac+rag")


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    weights: dict[str, float] = field(default_factory=dict)  # document id → attention mass (MAC modes)
    seconds: dict[str, float] = field(default_factory=dict)  # aggregate / generate, this question's share


def unique_docs(hits: list[Hit]) -> list[Document]:
    seen, out = set(), []
    for h in hits:
        if h.document.id not in seen:
            seen.add(h.document.id)
            out.append(h.document)
    return out


def parse_mode(mode: str) -> tuple[str, int | None]:
    """``"mac+rag@2"`` → ("mac+rag", 2); ``"mac"`` → ("mac", None). N: how many documents' texts enter the prompt."""
    base, at, n = mode.partition("@")
    if base not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {list(MODES)}, or rag@N / mac+rag@N")
    if at and (base not in ("rag", "mac+rag") or not n.isdigit() or int(n) < 1):
        raise ValueError(f"mode {mode!r}: @N (N >= 1 documents' texts in the prompt) applies to rag and mac+rag only")
    return base, int(n) if at else None


def mode_spec(mode: str, context_docs: int | None) -> str:
    """The inverse of :func:`parse_mode`: ("mac+rag", 1) → ``"mac+rag@1"``; (mode, None) → mode."""
    return f"{mode}@{context_docs}" if context_docs else mode


def uses_mac(mode: str) -> bool:
    return parse_mode(mode)[0] in ("mac", "mac+rag")


@torch.no_grad()
def prepare(model: MACModel, mode: str, questions: list[str], hits: list[list[Hit]]) -> tuple[list[str], Prefix | None, torch.Tensor | None]:
    """Prompts, and for the MAC modes the aggregated prefix and per-chunk attention mass (B, K)."""
    base, n_docs = parse_mode(mode)
    use_mac, use_text = base in ("mac", "mac+rag"), base in ("rag", "mac+rag")
    if (use_mac or use_text) and not all(hits):
        raise ValueError(f"mode {mode!r} needs a non-empty memory for every question")
    prefix = mass = None
    if use_mac:
        prefix, mass = model.memory_prefix(questions, [[(x.chunk.modulation, x.score) for x in h] for h in hits])
    prompts = []
    for i, (q, h) in enumerate(zip(questions, hits)):
        docs = unique_docs(h) if use_text else []
        if n_docs is not None:
            if mass is not None:  # the documents the aggregator weighs most, heaviest first
                weight = citation_weights(h, mass[i])
                docs = sorted(docs, key=lambda d: -weight[d.id])
            docs = docs[:n_docs]
        prompts.append(prompt_for(base, q, docs))
    return prompts, prefix, mass


def citation_weights(hits: list[Hit], mass: torch.Tensor) -> dict[str, float]:
    weights: dict[str, float] = defaultdict(float)
    for h, w in zip(hits, mass.tolist()):
        weights[h.document.id] += w
    return {d: round(w, 4) for d, w in weights.items()}


@torch.no_grad()
def answer(model: MACModel, mode: str, questions: list[str], hits: list[list[Hit]], max_new_tokens: int) -> list[Answer]:
    """Answer a batch of questions in one mode (one batched generation)."""
    tok = model.lm.tokenizer
    t0 = time.perf_counter()
    prompts, prefix, mass = prepare(model, mode, questions, hits)
    t_agg = time.perf_counter() - t0
    ids = [tok(p)["input_ids"] for p in prompts]
    outs = model.lm.generate(ids, prefix, max_new_tokens)
    t_gen = time.perf_counter() - t0 - t_agg
    n = max(1, len(questions))
    return [Answer(tok.decode(o).strip(), len(ids[i]), citation_weights(hits[i], mass[i]) if mass is not None else {},
                   {"aggregate": t_agg / n, "generate": t_gen / n}) for i, o in enumerate(outs)]
