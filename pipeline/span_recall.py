"""Span recall on real text: a training signal for the readout that no generator wrote (``span_share`` of
``train-readout``).

Why: fine-tuned only on the synthetic generator's questions, the readout learned that generator's names, not copying.
Outside it the memory knows the answer but cannot spell it: on a second synthetic style, of the wrong gold-memory
answers recall died in the readout for 195 of 216 (``diagnose --spelling --style other``; the selector had kept the
answer's tokens).

What: a real news window (RealTimeQA 2022–23, training years only) is written to memory as ingest writes it (one
forward, the selector's T states). A span the memory holds (every one of its tokens among the kept positions) is
hidden in a cloze question, with the words around it as the cue, and the readout is trained so that the frozen LM
answers the span from the memory, in the product's ``mac`` prompt. No label is needed: the text is the answer key.

Which spans: runs of 1–4 capitalised or numeric words (names, titles, figures: what news questions ask for), not the
first word of a sentence alone. Items are deterministic for a seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.model.mac import MACModel
from pipeline.prompts import document_text
from pipeline.schemas import Document

CUE_TOKENS = (8, 4)  # tokens of the window shown before and after the blank
MAX_SPAN_TOKENS = 10
_NAMELIKE = re.compile(r"^[A-Z0-9][\w'’.,&-]*$")
_TRAILING = {",", ".", ";", ":", "'", "’"}


@dataclass(frozen=True)
class SpanItem:
    """One cloze question on a window the memory holds. ``question``: the cue with the span blanked; ``answer``: the
    span as written in the window."""

    doc_id: str
    question: str
    answer: str


def _words(pieces: list[str]) -> list[tuple[int, int]]:
    """Token index ranges [a, b) of the words of a window, from each token's decoded text: a word starts at a token
    that begins with whitespace (or follows a line break) and runs over the tokens that do not."""
    words, start = [], None
    for i, p in enumerate(pieces):
        begins = p[:1].isspace() or i == 0 or pieces[i - 1].endswith("\n")
        if begins and start is not None:
            words.append((start, i))
        if begins:
            start = i
    if start is not None:
        words.append((start, len(pieces)))
    return words


def candidate_spans(pieces: list[str], kept: set[int]) -> list[tuple[int, int]]:
    """Token ranges [a, b) of name-like spans (1–4 capitalised or numeric words, at most ``MAX_SPAN_TOKENS`` tokens)
    whose every token is in ``kept`` and that leave ``CUE_TOKENS[0]`` tokens of cue before them. A single word that
    opens a sentence is not a span (its capital says nothing)."""
    words = _words(pieces)
    name = [bool(_NAMELIKE.match("".join(pieces[a:b]).strip())) for a, b in words]
    out = []
    i = 0
    while i < len(words):
        if not name[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(words) and name[j + 1] and j + 1 - i < 4:
            j += 1
        a, b = words[i][0], words[j][1]
        while b > a + 1 and pieces[b - 1].strip() in _TRAILING:  # "Chiaro," → "Chiaro"
            b -= 1
        before = "".join(pieces[max(0, a - 2):a]).strip()
        opens_sentence = not before or before[-1] in ".!?\n\"“:" or pieces[a - 1].endswith("\n")
        if (a >= CUE_TOKENS[0] and b - a <= MAX_SPAN_TOKENS and all(t in kept for t in range(a, b))
                and not (opens_sentence and i == j)):
            out.append((a, b))
        i = j + 1
    return out


def cloze(pieces: list[str], a: int, b: int) -> tuple[str, str] | None:
    """(question, answer) hiding tokens [a, b) of a window, with up to ``CUE_TOKENS`` tokens of cue on each side (cut
    at line breaks; the cue may begin inside a word: the shipped readout was tuned so); None when less than two words
    of cue precede the blank."""
    left = "".join(pieces[max(0, a - CUE_TOKENS[0]):a]).split("\n")[-1].strip()
    right = "".join(pieces[b:b + CUE_TOKENS[1]]).split("\n")[0].rstrip()
    answer = "".join(pieces[a:b]).strip()
    if len(left.split()) < 2 or not answer:
        return None
    return f'Fill in the blank: "{left} ___{right}"', answer


@torch.no_grad()
def span_items(model: MACModel, docs: list[Document], n: int, seed: int = 0,
               batch: int = 8) -> tuple[list[SpanItem], dict[str, Tensor]]:
    """Up to ``n`` cloze items, one per window, from windows of ``docs`` drawn at random (seeded), and each item's
    memory: the window's modulation (T, D) float16 on the CPU, keyed by ``SpanItem.doc_id`` (``<doc id>#<window>``).
    Windows with no span the memory holds are skipped."""
    rng = random.Random(seed)
    tok = model.lm.tokenizer
    windows = [(d.id, i, w) for d in docs for i, w in enumerate(model.windows(document_text(d)))]
    rng.shuffle(windows)
    items, mods = [], {}
    for s in range(0, len(windows), batch):
        if len(items) >= n:
            break
        part = windows[s: s + batch]
        states, kept = model.modulate([w for _, _, w in part])  # (B, T, D), positions per window
        for (doc_id, i, w), m, pos in zip(part, states, kept):
            pieces = [tok.decode([t]) for t in w]
            spans = candidate_spans(pieces, set(pos))
            if not spans or len(items) >= n:
                continue
            made = cloze(pieces, *rng.choice(spans))
            if made is None:
                continue
            key = f"{doc_id}#{i}"
            items.append(SpanItem(key, *made))
            mods[key] = m.to(torch.float16).cpu()
    return items, mods
