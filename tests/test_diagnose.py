"""The fixed ``diagnose`` instrument: what the generator put where, the same-type "other" pairing, the per-piece
bookkeeping, and the control that makes information gain zero for a memory that ignores its document."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_mac

from pipeline.data import synthetic
from pipeline.diagnose import (
    PieceStats,
    answer_pieces,
    article_facts,
    diagnose,
    question_kind,
    same_type_others,
    token_scores,
)


@pytest.fixture(scope="module")
def split():
    docs, qs = synthetic.generate("validation", 12, seed=3)
    by_id = {d.id: d for d in docs}
    return docs, [(q, by_id[q.doc_ids[0]]) for q in qs]


def test_templates_recover_every_fact_and_answer_kind(split) -> None:
    _, items = split
    for q, doc in items:
        facts, kind = article_facts(doc), question_kind(q)
        assert facts["event"] == kind["event"] and facts["entity"] == kind["entity"]
        assert facts["fields"][kind["key"]] == q.answers[0]  # the question's answer is that field of its article
        assert kind["kind"] in ("person", "city", "product", "company", "number")
        assert all(v in doc.text for v in facts["fields"].values())
        assert not {"E", "sector", "date", "trend"} & set(facts["fields"])


def test_other_is_same_event_type_and_another_company(split) -> None:
    docs, items = split
    others, same = same_type_others(items, docs, seed=0)
    assert same == len(items) == len(others)
    for (q, gold), other in zip(items, others):
        g, o = article_facts(gold), article_facts(other)
        assert o["event"] == g["event"] and o["entity"] != g["entity"]
        assert q.answers[0] not in other.text  # the other article cannot answer this question
    # the old pairing (the next article of another company) is usually another event type: this test would catch it
    entity = lambda d: d.id.rsplit("-", 1)[0]
    old = [next(d for d in docs[docs.index(g) + 1:] + docs[:docs.index(g)] if entity(d) != entity(g)) for _, g in items]
    assert sum(article_facts(o)["event"] != article_facts(g)["event"] for o, (_, g) in zip(old, items)) > len(items) / 2
    assert same_type_others(items, docs, seed=0)[0] == others  # deterministic


def test_answer_pieces_roles(tokenizer) -> None:
    ids, roles = answer_pieces(tokenizer, "Draelin Vostrak")
    bare = tokenizer(" Draelin Vostrak", add_special_tokens=False)["input_ids"]
    assert len(bare) > 2 and ids[: len(bare)] == bare
    assert roles[0] == "first" and set(roles[1: len(bare)]) == {"later"}
    assert roles[len(bare):] == ["stop"] * (len(ids) - len(bare))
    assert "\n" in tokenizer.decode(ids[len(bare):])
    ids, roles = answer_pieces(tokenizer, "Rome")
    assert roles[0] == "first" and "later" not in roles and roles[-1] == "stop"


def test_piece_stats_split_first_later_stop_and_gain() -> None:
    st = PieceStats()
    roles = ["first", "later", "later", "stop"]
    st.add("gold", "person", roles, [-1.0, -0.5, -0.5, -0.1], [True, True, False, True])
    st.add("control", "person", roles, [-1.2, -3.0, -2.0, -0.1], [True, False, False, True])
    st.add("gold", "number", ["first", "stop"], [-2.0, -0.2], [False, True])
    st.add("control", "number", ["first", "stop"], [-2.0, -0.2], [False, True])
    t = st.table()
    assert t["person"]["first"]["tokens"] == 1 and t["person"]["later"]["tokens"] == 2
    # the newline is not an answer piece
    assert t["person"]["answer"]["tokens"] == 3 and t["person"]["stop"]["tokens"] == 1
    assert t["person"]["first"]["info_gain"] == pytest.approx(0.2)
    assert t["person"]["later"]["info_gain"] == pytest.approx(2.0)  # mean of (3.0-0.5, 2.0-0.5)
    assert t["person"]["later"]["top1_gold"] == pytest.approx(50.0) and t["person"]["later"]["top1_control"] == 0.0
    assert t["number"]["answer"]["info_gain"] == pytest.approx(0.0) and "later" not in t["number"]
    assert t["all"]["answer"]["tokens"] == 4 and "same_type_gap" not in t["all"]["answer"]
    with pytest.raises(ValueError):
        st.add("gold", "person", roles, [-1.0], [True])


def test_token_scores_match_continuation_logprobs(tiny_llama) -> None:
    tok = tiny_llama.tokenizer
    prompts = [tok("Question: who?\nAnswer:")["input_ids"], tok("Q: a much longer prompt here\nA:")["input_ids"]]
    conts = [answer_pieces(tok, "Draelin Vostrak")[0], answer_pieces(tok, "$345 million")[0]]
    scored = token_scores(tiny_llama, prompts, conts, None)
    sums, _ = tiny_llama.continuation_logprobs(prompts, conts, None)
    for (lps, hits), s, c in zip(scored, sums.tolist(), conts):
        assert len(lps) == len(hits) == len(c) and sum(lps) == pytest.approx(s, abs=1e-3)


def test_diagnose_gain_is_zero_for_a_blind_memory(tiny_llama, minilm) -> None:
    mac = make_tiny_mac(tiny_llama, minilm)
    out = diagnose(mac, entities=6, questions=8, greedy=False)
    assert out["questions"] == 8 and math.isfinite(out["info_gain"]) and out["info_gain"] != 0.0
    assert out["per_token"]["all"]["answer"]["tokens"] >= 8
    original = mac.amortize

    def blind(windows):  # every document gets the same modulation: the control is that one
        mods, vecs = original(windows)
        return torch.zeros_like(mods), vecs

    mac.amortize = blind
    out = diagnose(mac, entities=6, questions=8, greedy=False)
    assert out["info_gain"] == 0.0 and out["nll_gap"] == 0.0
    assert out["per_token"]["all"]["later"]["info_gain"] == 0.0


def test_between_doc_share() -> None:
    from pipeline.diagnose import between_doc_share

    g = torch.Generator().manual_seed(0)
    same = torch.randn(1, 3, 8, generator=g).expand(5, 3, 8)  # every document the same tensor
    assert between_doc_share(same) == (0.0, 0.0)
    slots_alike = torch.randn(5, 1, 8, generator=g).expand(5, 3, 8)  # only documents differ
    share, energy = between_doc_share(slots_alike)
    assert share == pytest.approx(1.0) and 0 < energy <= 1
    offset = slots_alike + 100.0  # a large document-independent part shrinks the energy share, not the share
    assert between_doc_share(offset)[0] == pytest.approx(1.0) and between_doc_share(offset)[1] < 1e-3
