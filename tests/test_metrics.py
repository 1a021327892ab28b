"""Hand-worked checks of the SQuAD v1.1 metrics and the MAC paper's lenient EM."""

from __future__ import annotations

import pytest

from pipeline.metrics import aggregate, exact_match, f1, lenient_exact_match, normalize_answer, score_answer


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  An apple, a day! ", "apple day"),
        ("U.S.A.", "usa"),
        ("theater", "theater"),  # articles are removed as whole words only
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


def test_exact_match_ignores_articles_case_and_punctuation() -> None:
    assert exact_match("the Eiffel Tower", ["Eiffel Tower"]) == 1.0
    assert exact_match("Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0


def test_exact_match_takes_best_gold() -> None:
    assert exact_match("NYC", ["New York City", "NYC"]) == 1.0


def test_f1_hand_worked() -> None:
    # pred tokens {in, paris, france}, gold {paris}: precision 1/3, recall 1 -> 2*(1/3)/(4/3) = 0.5
    assert f1("in Paris France", ["Paris"]) == pytest.approx(0.5)
    # pred {paris}, gold {paris, france}: precision 1, recall 1/2 -> 2/3
    assert f1("Paris", ["Paris, France"]) == pytest.approx(2 / 3)
    assert f1("Lyon", ["Paris"]) == 0.0


def test_f1_counts_repeated_tokens_once_per_match() -> None:
    # Counter overlap: pred {new: 2, york: 1}, gold {new: 1, york: 1} -> 2 common of 3 / 2 -> P 2/3, R 1 -> 0.8
    assert f1("new new york", ["New York"]) == pytest.approx(0.8)


def test_f1_max_over_golds() -> None:
    assert f1("in Paris France", ["Lyon", "Paris France"]) == pytest.approx(0.8)


def test_lenient_em_cuts_prediction_to_gold_length() -> None:
    assert lenient_exact_match("Paris is the capital", ["Paris"]) == 1.0
    assert exact_match("Paris is the capital", ["Paris"]) == 0.0
    assert lenient_exact_match("The capital is Paris", ["Paris"]) == 0.0
    # The reference code cuts by characters, not tokens.
    assert lenient_exact_match("Parisian cafes", ["Paris"]) == 1.0


def test_empty_prediction_scores_zero() -> None:
    for metric in (exact_match, lenient_exact_match, f1):
        assert metric("", ["Paris"]) == 0.0


def test_gold_that_normalizes_to_empty_does_not_match_everything() -> None:
    assert lenient_exact_match("Paris", ["The"]) == 0.0
    assert lenient_exact_match("a", ["The"]) == 1.0  # both normalise to ""


def test_punctuation_only_differences() -> None:
    assert exact_match("$1,200", ["1200"]) == 1.0
    assert f1("Smith-Jones", ["SmithJones"]) == 1.0


def test_score_and_aggregate_in_percent() -> None:
    rows = [
        {"id": "q0", "prediction": "Paris is nice", **score_answer("Paris is nice", ["Paris"])},
        {"id": "q1", "prediction": "Paris", **score_answer("Paris", ["Paris"])},
    ]
    means = aggregate(rows)
    assert set(means) == {"em", "lenient_em", "f1"}
    assert means["em"] == pytest.approx(50.0)
    assert means["lenient_em"] == pytest.approx(100.0)
    assert means["f1"] == pytest.approx((50.0 + 100.0) / 2)


def test_aggregate_rejects_empty_and_ragged_rows() -> None:
    with pytest.raises(ValueError):
        aggregate([])
    with pytest.raises(ValueError, match="em"):
        aggregate([{"em": 1.0}, {"f1": 0.5}])
