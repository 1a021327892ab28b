"""Answer metrics: SQuAD v1.1 normalisation, strict EM, token F1, and the MAC paper's lenient EM.

Every function compares one prediction with a list of gold answers and takes the best match (max over golds),
as the SQuAD v1.1 evaluation script does. Scores are in [0, 1]; :func:`aggregate` reports means in percent.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (SQuAD v1.1, verbatim)."""
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(pred: str, golds: Sequence[str]) -> float:
    """**Strict** exact match: 1.0 if the normalised prediction equals some normalised gold, else 0.0."""
    norm_pred = normalize_answer(pred)
    return max((float(norm_pred == normalize_answer(g)) for g in golds), default=0.0)


def lenient_exact_match(pred: str, golds: Sequence[str]) -> float:
    """**Lenient** exact match, as reported in the MAC paper (and CaMeLS before it).

    The normalised prediction is cut to the *character* length of the normalised gold before the comparison, so a
    prediction that starts with the gold answer and then keeps talking counts as correct ("Paris is the capital" vs
    "Paris" scores 1). This is what the reference code does (``norm_pred[:len(norm_truth)]`` in jihoontack/MAC
    ``utils.exact_match``); note the cut is by characters, so "Parisian" also matches "Paris". A gold that normalises
    to the empty string would match anything under that cut, so for such a gold the strict comparison is used.
    """
    norm_pred = normalize_answer(pred)
    best = 0.0
    for gold in golds:
        norm_gold = normalize_answer(gold)
        cut = norm_pred[: len(norm_gold)] if norm_gold else norm_pred
        best = max(best, float(cut == norm_gold))
    return best


def _token_f1(pred: str, gold: str) -> float:
    pred_tokens = normalize_answer(pred).split()
    gold_tokens = normalize_answer(gold).split()
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(pred: str, golds: Sequence[str]) -> float:
    """Token F1 of SQuAD v1.1 (bag-of-tokens overlap after normalisation), max over golds. Neither strict nor lenient:
    partial overlap earns partial credit. Two empty strings score 0, as in the official script."""
    return max((_token_f1(pred, g) for g in golds), default=0.0)


def score_answer(pred: str, golds: Sequence[str]) -> dict[str, float]:
    """All three scores of one prediction: ``em`` (strict), ``lenient_em`` (MAC paper) and ``f1``, each in [0, 1]."""
    return {"em": exact_match(pred, golds), "lenient_em": lenient_exact_match(pred, golds), "f1": f1(pred, golds)}


def aggregate(rows: Iterable[Mapping[str, object]]) -> dict[str, float]:
    """Mean of every numeric field over per-question rows, in percent (e.g. ``{"em": 41.2, "f1": 55.0}``).

    Non-numeric fields (ids, predictions) are ignored. A numeric field missing from some row is an error, and so is
    an empty input: a mean over nothing would silently read as 0.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("aggregate() needs at least one row")
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float))]
    out: dict[str, float] = {}
    for key in keys:
        values = []
        for i, row in enumerate(rows):
            value = row.get(key)
            if not isinstance(value, (int, float)):
                raise ValueError(f"row {i} lacks numeric field {key!r}")
            values.append(float(value))
        out[key] = 100.0 * sum(values) / len(values)
    return out
