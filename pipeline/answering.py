"""Answer questions from retrieved memory in one of four modes. Shared by ``eval`` and the server.

Modes (same frozen LM, greedy decoding, stop at newline): ``base`` (the LM alone), ``rag`` (the retrieved document
texts in the prompt), ``mac`` (the aggregated modulations of the retrieved chunks as the prefix), ``mac+rag`` (both).
Citation weights: for the MAC modes, the aggregator's attention mass per document (its chunks' mass summed).
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


@torch.no_grad()
def prepare(model: MACModel, mode: str, questions: list[str], hits: list[list[Hit]]) -> tuple[list[str], Prefix | None, torch.Tensor | None]:
    """Prompts, and for the MAC modes the aggregated prefix and per-chunk attention mass (B, K)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {list(MODES)}")
    use_mac, use_text = mode in ("mac", "mac+rag"), mode in ("rag", "mac+rag")
    if (use_mac or use_text) and not all(hits):
        raise ValueError(f"mode {mode!r} needs a non-empty memory for every question")
    prompts = [prompt_for(mode, q, unique_docs(h) if use_text else ()) for q, h in zip(questions, hits)]
    if not use_mac:
        return prompts, None, None
    prefix, mass = model.memory_prefix(questions, [[(x.chunk.modulation, x.score) for x in h] for h in hits])
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
