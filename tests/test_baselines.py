"""Online fine-tuning baselines (the pipeline/baselines/ package) on tiny random LMs: the shared frozen LM never
changes, each run trains its own copy and drops it, the salient mask, retention checkpoints, tuning, and the CLI/bench
paths."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import torch
from conftest import make_tiny_llama

from macstream.cli import main
from pipeline import baselines
from pipeline.baselines import (
    OnlineFinetuner,
    document_tokens,
    finetune_eval,
    run_stream,
    salient_spans,
    tuning,
)
from pipeline.config import FinetuneConfig
from pipeline.modes import FT_MODES
from pipeline.prompts import prompt_for
from pipeline.schemas import Document, Question
from pipeline.scoring import EvalSettings

T0 = datetime(2024, 1, 1, tzinfo=UTC)
SENTENCE = ("On March 19, 2023, Lopeth Robotics moved its headquarters to Gresiport and said revenue rose 12% to "
            "$598 million. The company employs 47,120 people.")
SALIENT = ["March 19, 2023", "Lopeth Robotics", "Gresiport", "12%", "$598 million", "47,120"]


def _doc(i: int, text: str | None = None, day: int | None = None) -> Document:
    return Document(id=f"d{i:02d}",
                    text=text or f"Kekru Aerospace named Foxel Noshax {i} as chief on May {i + 1}, 2024.",
                    published_at=T0 + timedelta(days=i if day is None else day))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


@pytest.fixture()
def lm(tokenizer):
    """A fresh tiny Llama per test: these tests would notice (and must not cause) a change to it."""
    return make_tiny_llama(tokenizer)


def test_a_step_changes_the_copy_and_never_the_shared_lm(lm):
    snap = _snapshot(lm.model)
    with OnlineFinetuner(lm, FinetuneConfig(lr=1e-2, steps=2), salient=False) as ft:
        assert _same(ft.model, snap)  # the copy starts from the shared weights...
        shared_ptrs = {p.data_ptr() for p in lm.model.parameters()}
        assert not shared_ptrs & {p.data_ptr() for p in ft.model.parameters()}  # ...in its own storage
        cost = ft.adapt(_doc(0))
        assert cost["steps"] == 2 and cost["seconds"] > 0 and cost["loss_tokens"] > 0
        assert cost["loss_last"] < cost["loss_first"]  # the second step sees what the first one learned
        changed = [n for n, p in ft.model.named_parameters() if not torch.equal(p, snap[n])]
        assert len(changed) == len(list(ft.model.named_parameters()))  # full fine-tuning: every tensor moved
        assert all(p.requires_grad for p in ft.model.parameters())
    assert _same(lm.model, snap)
    assert all(not p.requires_grad and p.grad is None for p in lm.model.parameters())


def test_the_copy_is_dropped_and_a_second_run_starts_from_the_original_weights(lm):
    snap = _snapshot(lm.model)
    docs = [_doc(i) for i in range(3)]
    seen_at_start = []
    runs = [run_stream(lm, docs, FinetuneConfig(lr=1e-2), False,
                       {0: lambda v: seen_at_start.append(_same(v.model, snap))})
            for _ in range(2)]
    assert seen_at_start == [True, True]
    first, second = ([d["loss_first"] for d in r["per_document"]] for r in runs)
    assert first == second  # identical trajectories: nothing of run 1 survived into run 2
    assert first[0] != first[1]  # (and the trajectory does move)
    ft = OnlineFinetuner(lm, FinetuneConfig(), salient=False)
    with ft:
        pass
    assert ft.model is None and ft.optimizer is None and ft.view is None
    assert _same(lm.model, snap)


def test_salient_spans_of_a_hand_worked_sentence():
    assert [SENTENCE[s:e] for s, e in salient_spans(SENTENCE)] == SALIENT
    assert salient_spans("the board met on a quiet afternoon and said nothing new.") == []
    # a name opening a sentence counts when it has two words; a lone capitalised sentence opener does not
    text = "Shares rose. Foxel Noshax said the Bank of America deal with Beijing closed on Tuesday."
    assert [text[s:e] for s, e in salient_spans(text)] == ["Foxel Noshax", "Bank of America", "Beijing", "Tuesday"]


def test_salient_token_mask_covers_exactly_the_spans(tokenizer):
    ids, mask = document_tokens(tokenizer, SENTENCE, salient=True)
    enc = tokenizer(SENTENCE, return_offsets_mapping=True)
    assert ids == enc["input_ids"] and len(mask) == len(ids)
    spans = salient_spans(SENTENCE)
    covered = set()
    for (s, e), m in zip(enc["offset_mapping"], mask):
        hits = [(ss, se) for ss, se in spans if s < se and e > ss]
        assert m == bool(hits), (SENTENCE[s:e], m)
        if m:
            covered |= set(range(max(s, hits[0][0]), min(e, hits[-1][1])))
    assert all(set(range(s, e)) <= covered for s, e in spans)  # every salient character is under a masked token
    picked = "".join(tokenizer.decode([i]) for i, m in zip(ids, mask) if m)
    for word in ("the", "company", "employs", "people", "headquarters"):
        assert word not in picked.lower()
    assert document_tokens(tokenizer, SENTENCE, salient=False)[1] == [True] * len(ids)


def test_salient_loss_only_on_salient_tokens_and_no_step_without_them(lm):
    snap = _snapshot(lm.model)
    with OnlineFinetuner(lm, FinetuneConfig(lr=1e-2), salient=True) as ft:
        doc = Document(id="s", text=SENTENCE)
        x, att, labels = ft.batch(doc)
        ids, mask = document_tokens(lm.tokenizer, doc, salient=True)
        assert x[0].tolist() == ids
        assert [lab != -100 for lab in labels[0].tolist()] == mask
        plain = Document(id="p", text="the board met on a quiet afternoon and said nothing new.")
        assert ft.batch(plain) is None
        cost = ft.adapt(plain)
        assert cost["steps"] == 0 and _same(ft.model, snap)
        assert ft.adapt(doc)["steps"] == 1 and not _same(ft.model, snap)
    assert _same(lm.model, snap)


def test_retention_checkpoints_at_the_right_stream_positions(lm, monkeypatch):
    """16 documents (given out of order): the first eighth is 2 documents, so the block's questions are answered
    after 2, 4, 8 and 16 documents, and every question after 16 (with multiple choice only there)."""
    docs = [_doc(i) for i in range(16)][::-1]
    qs = [Question(id=f"q{i}", question=f"Who was named in document {i}?", answers=["Foxel Noshax"],
                   doc_ids=[f"d{i:02d}"], choices=["Foxel Noshax", "Reah Drazand"]) for i in range(16)]
    adapted, calls = [], []
    real_adapt = OnlineFinetuner.adapt

    def spy_adapt(self, doc):
        adapted.append(doc.id)
        return real_adapt(self, doc)

    def spy_answer(view, questions, settings):
        calls.append((len(adapted), [q.id for q in questions], settings.multiple_choice))
        return [{"id": q.id, "f1": len(adapted) / 16, "em": 0.0} for q in questions]

    monkeypatch.setattr(OnlineFinetuner, "adapt", spy_adapt)
    monkeypatch.setattr(tuning, "answer_with", spy_answer)
    res = finetune_eval(lm, "ft-uniform", docs, qs, FinetuneConfig(), EvalSettings(progress=False))
    assert adapted == [f"d{i:02d}" for i in range(16)]  # stream (published_at) order
    assert calls == [(2, ["q0", "q1"], False), (4, ["q0", "q1"], False), (8, ["q0", "q1"], False),
                     (16, [q.id for q in qs], True)]
    assert res["retention"] == {"questions": 2, "growth": {
        "1x": {"documents": 2, "f1": 12.5}, "2x": {"documents": 4, "f1": 25.0},
        "4x": {"documents": 8, "f1": 50.0}, "8x": {"documents": 16, "f1": 100.0}}}
    assert [r["id"] for r in res["rows"]] == [q.id for q in qs]
    assert res["cost"]["documents"] == 16 and res["cost"]["documents_trained"] == 16
    assert res["cost"]["peak_rss_mb"] >= 0 and res["cost"]["state_mb"] > 0


def test_tuning_picks_the_best_validation_f1_and_breaks_ties(lm, monkeypatch):
    def fake_eval(lm_, mode, docs, questions, cfg, settings, retention=True, gold_logprob=False):
        assert gold_logprob and not retention and not settings.multiple_choice
        f1 = {(1e-3, 1): 0.2, (1e-3, 2): 0.6, (1e-2, 1): 0.6, (1e-2, 2): 0.1}[(cfg.lr, cfg.steps)]
        lp = -2.0
        if mode == "ft-salient":  # a four-way F1 tie: the gold log-likelihood decides, then the fewest steps
            f1, lp = 0.0, {(1e-3, 1): -3.0, (1e-3, 2): -1.5, (1e-2, 1): -2.0, (1e-2, 2): -1.5}[(cfg.lr, cfg.steps)]
        return {"rows": [{"f1": f1, "em": 0.0, "gold_logprob": lp} for _ in questions],
                "cost": {"seconds_per_document": 0.1}}

    monkeypatch.setattr(tuning, "finetune_eval", fake_eval)
    monkeypatch.setattr(tuning, "answer_with", lambda v, qs, s: [{"f1": 0.05, "em": 0.0} for _ in qs])
    qs = [Question(id="q", question="Who?", answers=["x"])]
    rep = baselines.tune(lm, [_doc(0)], qs, EvalSettings(progress=False), grid={"lr": [1e-3, 1e-2], "steps": [1, 2]})
    assert len(rep["results"]) == 8 and rep["base"]["f1"] == pytest.approx(5.0) and rep["base"]["gold_logprob"] < 0
    # 0.6 tie: fewer steps
    assert (rep["chosen"]["ft-uniform"]["lr"], rep["chosen"]["ft-uniform"]["steps"]) == (1e-2, 1)
    assert (rep["chosen"]["ft-salient"]["lr"], rep["chosen"]["ft-salient"]["steps"]) == (1e-3, 2)  # -1.5 tie: lower lr
    with pytest.raises(ValueError, match="stepz"):
        baselines.tune(lm, [_doc(0)], qs, EvalSettings(), grid={"stepz": [1]})


def test_gold_logprobs_match_continuation_scoring(lm):
    qs = [Question(id="a", question="Who leads Kekru?", answers=["Foxel Noshax"]),
          Question(id="b", question="Where?", answers=["Gresiport"])]
    got = baselines.gold_logprobs(lm, qs, batch_size=1)
    tok = lm.tokenizer
    for q, lp in zip(qs, got):
        a = tok(" " + q.answers[0] + "\n", add_special_tokens=False)["input_ids"]
        s, n = lm.continuation_logprobs([tok(prompt_for("base", q.question))["input_ids"]], [a])
        assert lp == pytest.approx(float(s[0] / n[0]), abs=1e-5) and lp < 0
    assert got == pytest.approx(baselines.gold_logprobs(lm, qs, batch_size=2), abs=1e-5)  # padding changes nothing


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    main(["data", "synthetic", "--split", "test", "--entities", "3", "--out", str(d)])
    return d


def test_eval_cli_runs_the_ft_modes(tiny_checkpoint, tiny_data, tmp_path, capsys):
    out = tmp_path / "r.json"
    main(["eval", "--data", str(tiny_data), "--checkpoint", str(tiny_checkpoint),
          "--modes", "base,ft-uniform,ft-salient", "--ft-steps", "2", "--ft-lr", "1e-3", "--limit", "5",
          "--max-new-tokens", "2", "--out", str(out)])
    rep = json.loads(out.read_text())
    assert set(rep["metrics"]) == {"base", "ft-uniform", "ft-salient"}
    for m in ("ft-uniform", "ft-salient"):
        assert len(rep["rows"][m]) == 5 and 0 <= rep["metrics"][m]["f1"] <= 100 and "mc_accuracy" in rep["metrics"][m]
        cost = rep["adaptation"][m]
        assert cost["config"]["steps"] == 2 and cost["config"]["lr"] == 1e-3 and cost["documents"] == rep["documents"]
        assert rep["prompts"][m] == rep["prompts"]["base"]
    assert all({"ft-uniform", "ft-salient"} <= set(g) for g in rep["retention"]["growth"].values())
    bad = tmp_path / "ft.json"
    bad.write_text(json.dumps({"stepz": 3}))
    for extra in (["--ft-config", str(bad)], ["--modes", "ft-bogus"]):
        with pytest.raises(SystemExit) as err:
            main(["eval", "--data", str(tiny_data), "--checkpoint", str(tiny_checkpoint), "--limit", "1", *extra])
        assert err.value.code == 2
    assert "stepz" in capsys.readouterr().err


def test_bench_writes_table_and_plots_for_every_mode(tiny_checkpoint, tmp_path):
    from benchmarks.baselines import MODES, run
    from pipeline.data.synthetic import generate

    tuning = tmp_path / "tuning.json"
    chosen = {"optimizer": "adamw", "lr": 1e-3, "steps": 1}
    tuning.write_text(json.dumps({"grid": {}, "documents": 1, "questions": 1, "base": {"f1": 0.0, "em": 0.0},
                                  "results": [{"mode": m, "config": FinetuneConfig(**chosen).model_dump(), "f1": 0.0,
                                               "em": 0.0} for m in FT_MODES],
                                  "chosen": {m: chosen for m in FT_MODES}}))
    docs, qs = generate("test", 3)
    res = run(tmp_path / "b.json", checkpoint=str(tiny_checkpoint), tuning=tuning, top_k=2, max_new_tokens=2,
              progress=False, data={"tiny": (docs, qs[:6])}, command="test")
    ds = res["datasets"]["tiny"]
    assert list(ds["modes"]) == list(MODES)
    assert ds["modes"]["base"]["adapt_seconds_per_document"] == 0.0
    for m in ("rag", "mac", "ft-uniform", "ft-salient"):
        assert ds["modes"][m]["adapt_seconds_per_document"] > 0
        assert set(ds["modes"][m]["retention"]) == {"1x", "2x", "4x", "8x"}
    for f in res["files"]:
        assert (tmp_path / f.split("/")[-1]).stat().st_size > 0
    md = (tmp_path / "b.md").read_text()
    assert all(f"| {m} |" in md for m in MODES) and "(chosen)" in md
