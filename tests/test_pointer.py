"""The pointer amortizer, the LM expander and the mixture readout (ModelConfig amortizer='pointer', expander='lm',
aggregator_output='mixture'): the memory lives in the frozen LM's own input space."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_tiny_mac
from test_lm_injection import naive_logprob_sum, rand_ids

from pipeline.model.lm import FrozenLM, Prefix

POINTER = dict(doc_states="lm", amortizer="pointer", expander="lm", aggregator_output="mixture", standardize_states=True)


def test_soft_prefix_of_real_token_embeddings_is_those_tokens(any_lm: FrozenLM) -> None:
    """Reading the input embeddings of tokens x as a soft prefix == putting x in front of the prompt."""
    x, prompt, cont = rand_ids(any_lm, 3, 1), rand_ids(any_lm, 4, 2), rand_ids(any_lm, 3, 3)
    with torch.no_grad():
        prefix = any_lm.soft_prefix(any_lm.model.get_input_embeddings()(torch.tensor([x])))
        got, n = any_lm.continuation_logprobs([prompt], [cont], prefix)
    assert prefix.keys.shape == (1, any_lm.num_layers, any_lm.num_kv_heads, 3, any_lm.head_dim)
    assert int(n) == 3
    assert abs(float(got) - naive_logprob_sum(any_lm, x + prompt, cont)) < 1e-3


def test_pointer_mac_end_to_end_gradients_and_document_dependence(tiny_llama: FrozenLM, minilm) -> None:
    mac = make_tiny_mac(tiny_llama, minilm, **POINTER)
    tok = tiny_llama.tokenizer
    docs = ["The river port of Velmora opened in 1921.", "Kestrel Mining appointed Ana Duarte as its chief executive."]
    mods, vecs = mac.amortize([tok(d, add_special_tokens=False)["input_ids"] for d in docs])  # (2, T, D)
    assert mods.shape == (2, 4, tiny_llama.hidden_size)
    # sharp pointers from the first step: two different documents give clearly different modulations
    assert float((mods[0] - mods[1]).detach().norm() / mods.detach().norm(dim=(1, 2)).mean()) > 0.3
    q, qvec = mac.encode_questions(["Who runs Kestrel Mining?", "When did Velmora's port open?"])
    prefix, mass = mac.prefix(q, mods[None].expand(2, -1, -1, -1), scores=qvec @ vecs.T)
    assert isinstance(prefix, Prefix) and prefix.keys.shape == (2, 2, 2, 4, 16)  # P = T for the LM expander
    torch.testing.assert_close(mass.sum(1), torch.ones(2))
    lp = mac.answer_logprobs(["Question: a\nAnswer:"] * 2, ["Ana Duarte", "1921"], prefix)
    (-lp.mean()).backward()
    assert mac.amortizer.queries.grad is not None and float(mac.amortizer.queries.grad.abs().sum()) > 0
    assert mac.aggregator.bias_scale.grad is not None  # the mixture weights are trained by the answer loss
    assert list(mac.expander.parameters()) == []  # the LM expander learns nothing and stores nothing
    for name, p in itertools.chain(mac.lm.named_parameters(), mac.encoder.named_parameters()):
        assert p.grad is None and not p.requires_grad, name


def test_mixture_is_the_mass_weighted_modulation(tiny_llama: FrozenLM, minilm) -> None:
    mac = make_tiny_mac(tiny_llama, minilm, **POINTER)
    torch.manual_seed(0)
    mods = torch.randn(1, 3, 4, tiny_llama.hidden_size)
    q = torch.randn(1, 4, tiny_llama.hidden_size)
    seen = {}
    mac.expander.register_forward_pre_hook(lambda _m, args: seen.setdefault("phi", args[0]))
    with torch.no_grad():
        _, mass = mac.prefix(q, mods)
    torch.testing.assert_close(seen["phi"], torch.einsum("bk,bktd->btd", mass, mods))


def test_pointer_needs_lm_states() -> None:
    from pipeline.config import ModelConfig

    with pytest.raises(ValueError, match="doc_states='lm'"):
        ModelConfig(amortizer="pointer", doc_states="encoder")


def test_pointer_loss_targets_the_answer_tokens(tiny_llama: FrozenLM, minilm) -> None:
    """The coverage loss finds the answers' tokens in the document and is low only when the slots attend to them."""
    from datetime import datetime, timezone

    from pipeline.schemas import Document, Question
    from pipeline.train import Pool, answer_positions, pointer_loss

    mac = make_tiny_mac(tiny_llama, minilm, **POINTER)
    doc = Document(id="d-a0", title="Change at Kestrel", text="Kestrel Mining appointed Ana Duarte as chief executive.",
                   published_at=datetime(2024, 3, 1, tzinfo=timezone.utc))
    q = Question(id="q", question="Who leads Kestrel Mining?", answers=["Ana Duarte"], doc_ids=["d-a0"])
    pool = Pool.build([doc], [q])
    window = mac.windows(__import__("pipeline.prompts", fromlist=["document_text"]).document_text(doc))[0]
    pos = answer_positions(mac, doc, ["Ana Duarte"], len(window))
    assert tiny_llama.tokenizer.decode([window[i] for i in pos]).strip() == "Ana Duarte"
    S = len(window)
    on = torch.zeros(1, 4, S)
    on[0, :, pos] = 1.0 / len(pos)
    off = torch.full((1, 4, S), 1.0 / S)
    assert float(pointer_loss(mac, pool, ["d-a0"], on)) + 1.0 < float(pointer_loss(mac, pool, ["d-a0"], off))


def test_diagnose_measures_document_dependence(tiny_llama: FrozenLM, minilm) -> None:
    """A pointer memory depends on its document (gap != 0); one whose modulations ignore the document has gap 0."""
    import math

    from pipeline.diagnose import diagnose

    mac = make_tiny_mac(tiny_llama, minilm, **POINTER)
    out = diagnose(mac, entities=3, questions=6)
    assert out["questions"] == 6 and math.isfinite(out["nll_gold_memory"])
    assert out["nll_gap"] == out["nll_other_memory"] - out["nll_gold_memory"] and out["nll_gap"] != 0.0
    assert {"f1", "em"} <= set(out["gold_only_mac"]) and {"f1", "em"} <= set(out["gold_only_rag"])
    original = mac.amortize

    def blind(windows, with_attention=False):  # every document gets the same modulation
        mods, vecs = original(windows)
        return torch.zeros_like(mods), vecs

    mac.amortize = blind
    assert diagnose(mac, entities=3, questions=6)["nll_gap"] == 0.0
