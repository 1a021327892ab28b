"""The meta-training loop end to end on a tiny LM: validation history (with the gold-only measurement), checkpoints
of trainable weights only, and resume from ``last`` at the step it stopped."""

from __future__ import annotations

import json
import math

import torch

from pipeline.config import StageConfig, TrainConfig
from pipeline.model.mac import MACModel
from tests.conftest import tiny_config


def test_train_validates_saves_and_resumes(tiny_checkpoint, tmp_path) -> None:
    from pipeline.train import train

    model_cfg = tiny_config(lm=str(tiny_checkpoint.parent / "lm"))
    cfg = TrainConfig(stages=[StageConfig(steps=2, memory_size=1), StageConfig(steps=2, memory_size=2, select_weight=1.0)],
                      batch_docs=4, synthetic_entities=6, realtimeqa_share=0.0, eval_every=2, eval_questions=4, threads=1)
    out = tmp_path / "run"
    best = train(model_cfg, cfg, out)
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and [r["memory_size"] for r in rows] == [1, 2]
    for r in rows:  # memory of 8 (selection) and the gold document alone (does the modulation carry facts?)
        assert {"em", "f1", "selection", "gold_only_em", "gold_only_f1"} <= set(r)
        assert 0.0 <= r["gold_only_f1"] <= 100.0
    assert best["step"] == 4  # only the last stage competes for best
    first = MACModel.load(out / "last")
    assert json.loads((out / "last" / "metrics.json").read_text())["step"] == 4

    # resume: a longer curriculum continues from step 4 (no validation is repeated), and the weights move on
    # (the added stage also trains with the autoencoding loss and mac+rag prompts)
    more = cfg.model_copy(update={"stages": [*cfg.stages, StageConfig(steps=2, memory_size=2, select_weight=1.0,
                                                                      reconstruct_weight=1.0, rag_share=0.5)]})
    train(model_cfg, more, out)
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    after = MACModel.load(out / "last")
    moved = [n for n, t in after.trainable_state().items() if not torch.equal(t, first.trainable_state()[n])]
    assert moved, "resumed training did not change any trainable weight"

    # fine-tuning from a checkpoint records, with every checkpoint it writes, where its weights came from
    train(model_cfg, cfg.model_copy(update={"stages": [StageConfig(steps=2, memory_size=1)]}), tmp_path / "ft",
          init=out / "last")
    meta = json.loads((tmp_path / "ft" / "last" / "config.json").read_text())
    assert meta["train"]["init"]["checkpoint"] == after.version
    assert len(meta["train"]["init"]["train"]["stages"]) == 3


def test_reconstruct_loss_reads_the_document_through_its_modulation(tiny_llama, minilm) -> None:
    """Autoencoding: the document's text is scored from its own modulation, so the gradient reaches the amortizer,
    and the loss depends on which modulation is in memory (a different document's one scores the text differently)."""
    from pipeline.data import synthetic
    from pipeline.prompts import document_text
    from pipeline.train import reconstruct_loss
    from tests.conftest import make_tiny_mac

    model = make_tiny_mac(tiny_llama, minilm, aggregator_output="mixture")
    docs, _ = synthetic.generate("train", 2)
    docs = docs[:2]
    mods, _ = model.amortize([model.windows(document_text(d))[0] for d in docs])  # (2, T, D)
    loss = reconstruct_loss(model, docs, mods)
    value = float(loss.detach())
    assert loss.ndim == 0 and math.isfinite(value) and value > 0
    loss.backward()
    grads = [p.grad for p in model.amortizer.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    with torch.no_grad():
        swapped = reconstruct_loss(model, docs, mods.flip(0))  # each text read from the other document's memory
    assert abs(float(swapped) - value) > 1e-6


def test_rag_share_puts_the_gold_document_in_the_prompt(tiny_llama, minilm) -> None:
    """rag_share=1: every question is trained in the mac+rag format, its gold document's text among the context."""
    import random

    from pipeline.data import synthetic
    from pipeline.prompts import document_text
    from pipeline.train import Pool, sample_batch, step_loss
    from tests.conftest import make_tiny_mac

    model = make_tiny_mac(tiny_llama, minilm)
    pool = Pool.build(*synthetic.generate("train", 4))
    seen = []
    real = model.answer_logprobs
    model.answer_logprobs = lambda prompts, answers, prefix: seen.append(prompts) or real(prompts, answers, prefix)
    rng = random.Random(0)
    step_loss(model, pool, sample_batch(pool, 4, 2, rng), 3, 1.0, 1.0, 1, rng, rag_share=1.0)
    gold_of = {q.question: q.doc_ids[0] for qs in pool.questions.values() for q in qs}
    assert seen and all(p.count("Question:") == 2 for p in seen[0])  # the one-shot example + the question
    for p in seen[0]:
        question = p.rsplit("Question: ", 1)[1].split("\n")[0]
        assert document_text(pool.docs[gold_of[question]]) in p
