"""The second synthetic style (never trained on) and the spelling instrument's pure parts."""

from __future__ import annotations

import re

import pytest

from pipeline.data import synthetic
from pipeline.diagnose import answer_coverage, death_stage


def test_the_other_style_is_another_style_with_the_same_guarantees() -> None:
    docs, qs = synthetic.generate("test", 30, seed=0, style="other")
    house_docs, house_qs = synthetic.generate("test", 30, seed=0)
    assert docs and qs and all(d.id.startswith("syn-other-test-") for d in docs)
    by_id = {d.id: d for d in docs}
    for q in qs:  # the answer is a span of its only gold article, never in the question; four choices with the gold
        gold = q.answers[0]
        assert gold in by_id[q.doc_ids[0]].text and gold.lower() not in q.question.lower()
        assert len(q.choices) == 4 and gold in q.choices
    # other templates: no house article or question template matches
    house_q = {t.split("{")[0] for kinds in synthetic._QUESTIONS.values() for _, _, ts in kinds for t in ts}
    assert not any(q.question.startswith(p) for q in qs for p in house_q if len(p) > 8)
    from pipeline.diagnose import article_facts

    with pytest.raises(ValueError, match="template"):
        article_facts(docs[0])
    # longer multi-piece names, codes with digits, euro amounts
    answers = [q.answers[0] for q in qs]
    assert any(re.fullmatch(r"\S+ \S+-\S+", a) for a in answers)  # three-piece person names
    assert any(re.search(r" [A-Z]{2}-\d{3,4}$", a) for a in answers)  # product codes
    assert any(a.startswith("€") for a in answers)
    mean_len = lambda xs: sum(len(x.answers[0]) for x in xs) / len(xs)  # noqa: E731
    assert mean_len([q for q in qs if not q.answers[0][0].isdigit()]) > mean_len(
        [q for q in house_qs if not q.answers[0][0].isdigit()])
    # split discipline holds in the other style too: no invented name word is shared between two splits
    fixed = set(synthetic._O_COMPANY_SUFFIXES) | {w.strip() for pair in synthetic._O_CITY_PARTS for w in pair}

    def words(split: str) -> set[str]:
        return {w for q in synthetic.generate(split, 20, style="other")[1] for w in re.split(r"[ -]", q.answers[0])
                if w[:1].isupper() and not w.isupper() and w not in fixed}

    assert words("test") and not words("test") & words("validation")
    # deterministic, and the house style is untouched by the style parameter
    assert synthetic.generate("test", 30, seed=0, style="other") == (docs, qs)
    assert synthetic.generate("test", 30, seed=0, style="house") == (house_docs, house_qs)
    with pytest.raises(ValueError, match="style"):
        synthetic.generate("test", 3, style="nope")


def test_answer_coverage_counts_the_kept_tokens_of_the_best_occurrence(tokenizer) -> None:
    text = "Vexa Labs named Tavrek Olunde as chief. Later, Tavrek Olunde spoke."
    window = tokenizer(text, add_special_tokens=False)["input_ids"]
    offs = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    second = text.rindex("Tavrek Olunde")
    span2 = [i for i, (a, b) in enumerate(offs) if b > second and a < second + len("Tavrek Olunde")]
    assert answer_coverage(tokenizer, text, window, "Tavrek Olunde", span2) == 1.0  # the second occurrence, whole
    assert answer_coverage(tokenizer, text, window, "Tavrek Olunde", span2[:1]) == pytest.approx(1 / len(span2))
    assert answer_coverage(tokenizer, text, window, "Tavrek Olunde", []) == 0.0
    assert answer_coverage(tokenizer, text, window, "Nowhere Name", span2) == 0.0
    assert answer_coverage(tokenizer, text, window[: span2[0]], "Tavrek Olunde", span2) == 0.0  # cut off the window


def test_death_stage_names_the_first_stage_that_failed() -> None:
    assert death_stage(False, [True, True]) == "selector"
    assert death_stage(True, [True, False]) == "readout"
    assert death_stage(True, [True, True]) == "generation"
