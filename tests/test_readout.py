"""The readout memory's parts (pipeline/model/readout.py): the prefix layout, the RoPE positions and the sink are
checked against the LM's own keys/values; the selection's rules on hand-made scores."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.model.readout import KVReadout, TokenSelector, rms, select


def test_readout_reproduces_the_lms_own_first_layer_keys_values_at_prefix_positions(tiny_llama):
    """A readout set to layer 0's own projections (RMSNorm gain folded in) must give, at prefix position 1 + i, the
    exact keys/values the LM computes for token i of the sequence [sink, x_0, x_1, ...]: checks the output layout
    (B, L, H_kv, 1 + N, D), the RoPE positions 1..N and the sink at position 0."""
    lm = tiny_llama
    ro = KVReadout(lm, lm.hidden_size)
    attn, norm = lm.decoder_layers()[0].self_attn, lm.decoder_layers()[0].input_layernorm
    H, D = lm.num_kv_heads, lm.head_dim
    with torch.no_grad():
        w = torch.zeros_like(ro.proj.weight).view(lm.num_layers, 2, H * D, lm.hidden_size)
        w[0, 0] = attn.k_proj.weight * norm.weight[None]
        w[0, 1] = attn.v_proj.weight * norm.weight[None]
        ro.proj.weight.copy_(w.view_as(ro.proj.weight))
        ro.proj.bias.zero_()
    sink = lm.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = [sink, 1000, 2000, 3000]
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([ids]), use_cache=True)
        ref = out.past_key_values.layers
        # (1, 3, d): what layer 0 reads, pre-gain
        states = rms(lm.model.get_input_embeddings()(torch.tensor([ids[1:]])))
        prefix = ro(states)
    assert prefix.keys.shape == (1, lm.num_layers, H, 1 + 3, D) == prefix.values.shape
    torch.testing.assert_close(prefix.keys[0, 0], ref[0].keys[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(prefix.values[0, 0], ref[0].values[0], atol=1e-5, rtol=1e-4)
    for layer in range(lm.num_layers):  # the sink is the LM's own, in every layer
        torch.testing.assert_close(prefix.keys[0, layer, :, 0], ref[layer].keys[0, :, 0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(prefix.values[0, layer, :, 0], ref[layer].values[0, :, 0], atol=1e-5, rtol=1e-4)
    assert prefix.keys[0, 1, :, 1:].abs().max() == 0  # other layers: exactly what the (zero) readout says


def test_readout_prefix_is_accepted_by_the_lm_and_carries_gradients(tiny_llama):
    lm = tiny_llama
    ro = KVReadout(lm, 8)
    phi = torch.randn(2, 5, 8)
    prefix = ro(phi)
    lm.check_prefix(prefix, 2)
    sums, _ = lm.continuation_logprobs([[5, 6], [7, 8]], [[9], [10]], prefix)
    sums.sum().backward()
    assert ro.proj.weight.grad is not None and ro.proj.weight.grad.abs().sum() > 0


def test_select_widens_the_core_with_its_nearest_tokens_left_first():
    assert select(10, [4], 3) == [3, 4, 5]
    assert select(10, [4], 2) == [3, 4]  # the token before a core token first
    assert select(10, [2, 7], None) == [2, 7]
    assert select(10, [1, 2, 3, 4], 2) == [1, 2]  # a core longer than the budget is cut in document order
    assert select(3, [1], 8) == [0, 1, 2]  # never more than the window
    assert select(5, [], 3) == [0, 1, 2]


def test_selector_keeps_high_scoring_tokens_never_the_sink_and_exactly_the_budget():
    sel = TokenSelector(4, min_core=2)
    logits = torch.tensor([9.0, -1, -1, 5, -1, -1, -1, 3, -1, -1])  # the sink (position 0) scores highest
    assert sel.positions(logits, 10, 4) == [2, 3, 6, 7]  # core 3 and 7, each widened left first
    assert sel.positions(logits, 10, 2) == [3, 7]
    low = torch.full((10,), -5.0)
    low[5] = -1.0
    low[8] = -2.0
    assert sel.positions(low, 10, 2) == [5, 8]  # nothing above 0.5: the min_core best
    assert sel.positions(logits, 4, 8) == [1, 2, 3]  # padding beyond n_valid is ignored
    rising = torch.arange(10.0) + 1  # every token scores above 0.5, more than the budget: the best, not the first
    assert sel.positions(rising, 10, 3) == [7, 8, 9]


# ---- the readout memory inside MACModel ---------------------------------------------------------------------------
def test_the_readout_prefix_is_the_sink_then_the_stored_states():
    from pipeline.config import ModelConfig

    assert ModelConfig(num_tokens=4).prefix_tokens == 5  # the sink + T


def test_readout_mac_model_stores_the_lms_own_states_and_answers_with_the_top_document(tiny_llama, minilm, tmp_path):
    """Ingest: each modulation is the window's RMS-normalised layer-m states at the selector's positions, zero-padded
    when the window is shorter than T. Query: the prefix comes from the document the aggregator weighs most."""
    from conftest import make_tiny_mac

    from pipeline.model.mac import MACModel
    from pipeline.schemas import Document

    model = make_tiny_mac(tiny_llama, minilm)
    long = Document(id="a",
                    text="Zorvex Labs named Dara Quill as chief executive on March 3, 2025, replacing Ovo Tann.")
    short = Document(id="b", text="Hi there.")
    (ca, cb) = model.encode_documents([long, short])
    ids = model.windows("Zorvex Labs named Dara Quill as chief executive on March 3, 2025, replacing Ovo Tann.")[0]
    assert len(ids) > 4
    with torch.no_grad():
        states = rms(tiny_llama.hidden_states_at(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                                                 1).float())[0]
        pos = model.amortizer.positions(model.amortizer(states), len(ids), 4)
    assert len(pos) == 4 and 0 not in pos
    torch.testing.assert_close(ca.modulation.tensor().float(), states[pos], atol=2e-3, rtol=2e-3)  # stored as float16
    n_short = len(model.windows("Hi there.")[0])
    tail = cb.modulation.tensor()[n_short - 1:]
    assert n_short - 1 < 4 and tail.abs().max() == 0  # the sink dropped, the missing slots zero

    prefix, mass = model.memory_prefix(["Who is the new chief executive of Zorvex Labs?"] * 2,
                                       [[(ca.modulation, 0.9), (cb.modulation, 0.1)],
                                        [(cb.modulation, 0.9), (ca.modulation, 0.1)]])
    assert prefix.keys.shape == (2, tiny_llama.num_layers, tiny_llama.num_kv_heads, 5, tiny_llama.head_dim)
    order = [[ca, cb], [cb, ca]]
    for row in range(2):  # the prefix is exactly the readout of the document with the most mass
        top = order[row][int(mass[row].argmax())]
        torch.testing.assert_close(prefix.keys[row], model.expander(top.modulation.tensor()[None].float()).keys[0])

    version = model.save(tmp_path / "ck")
    loaded = MACModel.load(tmp_path / "ck", lm=tiny_llama, encoder=minilm)
    assert loaded.version == version
    torch.testing.assert_close(loaded.encode_documents([long])[0].modulation.tensor(), ca.modulation.tensor())


def test_fit_linear_recovers_the_next_layers_keys_values(tiny_llama, minilm):
    """On the tiny 2-layer Llama, with the memory at layer 1, the second layer's keys/values are exactly linear in the
    RMS-normalised layer-1 state: the ridge fit must reproduce them on an unseen article (the first layer's are not
    linear in it and are only approximated)."""
    from conftest import make_tiny_mac

    from pipeline.data import synthetic
    from pipeline.diagnose import article_facts, fact_core
    from pipeline.model.readout import article_states, kv_targets
    from pipeline.prompts import document_text
    from pipeline.train_readout import fit_linear

    model = make_tiny_mac(tiny_llama, minilm)
    train, _ = synthetic.generate("train", 12, seed=0)
    fit = fit_linear(model, train, ridge_lambda=1e-7)
    assert fit["articles"] == len(train) and fit["tokens"] > 20 * len(train)
    doc = synthetic.generate("validation", 2, seed=0)[0][0]
    ids, _ = fact_core(tiny_llama.tokenizer, document_text(doc), article_facts(doc)["fields"])
    hs, kv = article_states(tiny_llama, ids, [1])
    truth = kv_targets(tiny_llama, kv)[1:].view(len(ids) - 1, 2, 2, -1)  # (S-1, L, k|v, H·D)
    with torch.no_grad():
        k, v = model.expander.kv(rms(hs[1][1:])[None])  # (1, L, H, S-1, D)
    pred_k = k[0].permute(0, 2, 1, 3).reshape(2, len(ids) - 1, -1)  # (L, S-1, H·D)
    pred_v = v[0].permute(0, 2, 1, 3).reshape(2, len(ids) - 1, -1)
    rel = lambda p, t: float((p - t).norm() / t.norm())
    assert rel(pred_k[1], truth[:, 1, 0]) < 1e-2 and rel(pred_v[1], truth[:, 1, 1]) < 1e-2
    assert rel(pred_k[0], truth[:, 0, 0]) > 1e-2  # layer 1 reads the embedding, not h_1: not exact (the test can fail)


def _fake_realtimeqa(root, dates: list[str]) -> None:
    """A RealTimeQA folder with two questions per quiz date, each with its own evidence article."""
    for n, date in enumerate(dates):
        year, rows = date[:4], []
        for i in range(2):
            rows.append(json.dumps({
                "question_id": f"{date.replace('/', '')}_{i}", "question_date": date, "question_source": "CNN",
                "question_url": "https://quiz.example/1", "question_sentence": f"Which city hosted summit {n}-{i}?",
                "choices": ["Oslo", "Rome", "Lima", "Kyiv"], "answer": [str(i)],
                "evidence": f"<p>Summit {n}-{i} was hosted by {['Oslo', 'Rome'][i]} this week.</p>"}))
        path = root / "past" / year / f"{date.replace('/', '')}_qa.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(rows) + "\n")


def test_selection_trains_on_realtimeqa_training_years_and_holds_out_their_last_weeks(tmp_path, monkeypatch):
    from pipeline.config import ReadoutTrainConfig
    from pipeline.train_readout import realtimeqa_selection_data

    _fake_realtimeqa(tmp_path, ["2022/03/04", "2022/09/09", "2023/01/06", "2023/05/05", "2023/11/03", "2024/02/02"])
    monkeypatch.setenv("MACSTREAM_RTQA_DIR", str(tmp_path))
    (train_docs, train_qs), (val_docs, val_qs) = realtimeqa_selection_data(
        ReadoutTrainConfig(selection_realtimeqa_years=[2022, 2023], selection_validation_share=0.4))
    assert {q.asked_at.date().isoformat() for q in val_qs} == {"2023-05-05", "2023-11-03"}  # the last 2 of 5 dates
    assert {q.asked_at.year for q in train_qs} == {2022, 2023} and len(train_qs) == 6  # 2024 never read
    assert [d.id for d in val_docs] == [q.doc_ids[0] for q in val_qs]
    assert not {d.id for d in val_docs} & {d.id for d in train_docs}
    assert realtimeqa_selection_data(ReadoutTrainConfig(selection_realtimeqa_years=[])) is None
    with pytest.raises(ValueError, match="test years"):
        ReadoutTrainConfig(selection_realtimeqa_years=[2023, 2024])


@pytest.mark.slow
def test_train_readout_builds_a_checkpoint_the_product_loads_and_resumes(tmp_path, monkeypatch):
    """`macstream train-readout` at toy scale on the real SmolLM2 + MiniLM: every stage runs (the selection on
    synthetic and a small RealTimeQA folder), the checkpoint loads as a MACModel whose modulations are T x 576 and
    whose prefix has 1 + T positions; a second call resumes the fine-tuning from last.pt instead of starting again;
    ``--selection-from`` trains the selection again and keeps the selector and readout; ``--readout-from`` tunes the
    readout again and keeps the rest. (What the full-scale build measures is in its metrics.)"""
    from macstream.cli import main
    from pipeline.model.mac import MACModel
    from pipeline.schemas import Document

    _fake_realtimeqa(tmp_path / "rtqa", ["2022/03/04", "2022/09/09", "2023/01/06", "2023/05/05"])
    monkeypatch.setenv("MACSTREAM_RTQA_DIR", str(tmp_path / "rtqa"))
    conf = tmp_path / "c.json"
    conf.write_text('{"synthetic_entities": 4, "steps": 2, "eval_every": 1, "eval_questions": 4, "select_steps": 2, '
                    '"batch": 2, "num_tokens": 8, "threads": 1, "selection_validation_share": 0.25, "bf16": false}')
    out = tmp_path / "ck"
    main(["train-readout", "--out", str(out), "--config", str(conf)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in metrics["readout"]] == [0, 1, 2]
    assert metrics["fit"]["articles"] > 0 and 0 <= metrics["selection"]["synthetic"]["selection_after"] <= 100
    assert metrics["selection"]["realtimeqa"]["validation_questions"] == 2  # the last quiz date's two questions
    model = MACModel.load(out)
    chunk = model.encode_documents(
        [Document(id="d", text="Kelvo Labs named Aru Penn as chief executive on May 2, 2025.")])[0]
    assert tuple(chunk.modulation.tensor().shape) == (8, 576)
    prefix, _ = model.memory_prefix(["Who leads Kelvo Labs?"], [[(chunk.modulation, 0.5)]])
    assert prefix.length == 9
    logs = []
    from pipeline.config import ReadoutTrainConfig
    from pipeline.train_readout import build

    build(ReadoutTrainConfig.model_validate(json.loads(conf.read_text()) | {"steps": 3}), out, log=logs.append)
    assert "readout: resumed at step 2" in logs
    assert [r["step"] for r in json.loads((out / "metrics.json").read_text())["readout"]] == [0, 1, 2, 3]

    first = MACModel.load(out)
    main(["train-readout", "--out", str(tmp_path / "sel"), "--config", str(conf), "--selection-from", str(out)])
    again = MACModel.load(tmp_path / "sel")
    assert json.loads((tmp_path / "sel" / "metrics.json").read_text())["selection_retrained_from"] == first.version
    assert again.version != first.version
    for part in ("expander", "amortizer"):  # the memory itself is untouched: stored modulations stay valid
        for (name, a), (_, b) in zip(getattr(first, part).state_dict().items(),
                                     getattr(again, part).state_dict().items()):
            assert torch.equal(a, b), name

    # --readout-from: only the readout is tuned further (here with span recall on the RealTimeQA folder's news); the
    # selector, the selection, the base recipe and the answer prompt stay, and the continuation is recorded
    conf2 = tmp_path / "c2.json"
    conf2.write_text(json.dumps(json.loads(conf.read_text()) | {"span_share": 0.5, "span_items": 4}))
    main(["train-readout", "--out", str(tmp_path / "cont"), "--config", str(conf2), "--readout-from", str(out)])
    tuned = MACModel.load(tmp_path / "cont")
    meta = json.loads((tmp_path / "cont" / "config.json").read_text())
    assert meta["continued"][0]["from"] == first.version and meta["continued"][0]["train"]["span_share"] == 0.5
    assert meta["train"] == json.loads((out / "config.json").read_text())["train"]
    rows = json.loads((tmp_path / "cont" / "metrics.json").read_text())["readout_continued"]
    assert [r["step"] for r in rows] == [0, 1, 2] and {"other_f1", "span_f1"} <= set(rows[0])
    assert tuned.version != first.version
    for part in ("amortizer", "question_encoder", "aggregator"):
        for (name, a), (_, b) in zip(getattr(first, part).state_dict().items(),
                                     getattr(tuned, part).state_dict().items()):
            assert torch.equal(a, b), name
    assert not torch.equal(first.expander.proj.weight, tuned.expander.proj.weight)


def test_diagnose_of_a_readout_memory_adds_its_own_tokens_as_text(tiny_llama, minilm):
    """For a selecting memory, diagnose answers also from the very tokens the memory stores, as plain text: the bar
    the memory must clear. Those tokens are the selector's."""
    from conftest import make_tiny_mac

    from pipeline.diagnose import diagnose

    model = make_tiny_mac(tiny_llama, minilm)
    out = diagnose(model, entities=4, questions=6, max_new_tokens=4)
    assert 0 <= out["gold_only_selected_text"]["f1"] <= 100 and math.isfinite(out["info_gain"])
    w = model.windows("Kelvo Labs named Aru Penn as chief executive on May 2, 2025, replacing Ibo Ranz.")[0]
    kept = model.selected_tokens([w])[0]
    assert len(kept) == 4 and all(t in w[1:] for t in kept)


def test_train_readout_refuses_a_missing_start_checkpoint_and_test_years_with_status_2(tmp_path):
    from macstream.cli import main

    with pytest.raises(SystemExit) as missing:
        main(["train-readout", "--out", str(tmp_path / "o"), "--selection-from", str(tmp_path / "none")])
    conf = tmp_path / "c.json"
    conf.write_text('{"selection_realtimeqa_years": [2023, 2024]}')
    with pytest.raises(SystemExit) as test_years:
        main(["train-readout", "--out", str(tmp_path / "o"), "--config", str(conf)])
    assert missing.value.code == 2 and test_years.value.code == 2
    assert not (tmp_path / "o").exists()  # refused before anything was built
