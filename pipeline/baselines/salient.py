"""The salient-span tagger of ``ft-salient``: names, dates, numbers, money and percentages, by a documented regex
heuristic (spaCy is not installed, and this project adds no dependencies)."""

from __future__ import annotations

import re

from pipeline.prompts import document_text
from pipeline.schemas import Document

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
