"""The MAC engine around the frozen LM (the readout memory): shapes and gradients, the aggregator's set semantics
and hierarchical bucketing, checkpoints and their versions, stored modulations, document windows, config validation.

Prefix injection into the LM itself is tested in tests/test_lm_injection.py; the readout's own layout, the selector
and the build in tests/test_readout.py.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_mac, tiny_config
from safetensors.torch import load_file

from pipeline.config import ModelConfig, ReadoutTrainConfig, load_config
from pipeline.model.aggregator import Aggregator
from pipeline.model.lm import FrozenLM
from pipeline.model.mac import CONFIG, WEIGHTS, MACModel
from pipeline.model.question import QueryHead
from pipeline.modulation import CheckpointMismatch, Modulation, ensure_compatible
from pipeline.prompts import document_text
from pipeline.schemas import Document

W = 32  # aggregator width in the standalone tests
T = 4  # tokens per modulation


def make_aggregator(bucket_size: int = 4, retrieval_bias: bool = True, blocks: int = 2) -> Aggregator:
    torch.manual_seed(7)
    return Aggregator(W, blocks, heads=2, head_dim=8, ffn_mult=2, bucket_size=bucket_size,
                      retrieval_bias=retrieval_bias).eval()


def aggregator_inputs(B: int, K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, W, generator=g)
    mods = torch.randn(B, K, T, W, generator=g)
    scores = torch.rand(B, K, generator=g) * 0.3  # cosine-like, a moderate spread (bias_scale 10 → 3 nats)
    return q, mods, scores


# ---- 1. shapes -----------------------------------------------------------------------------------------------------
def test_query_head_shapes_and_mask() -> None:
    head = QueryHead(enc_width=24, lm_width=40, num_tokens=5, blocks=2, heads=2, head_dim=8, ffn_mult=2).eval()
    states = torch.randn(3, 7, 24)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    out = head(states, mask)
    assert out.shape == (3, 5, 40)
    # padded encoder positions do not leak into the result
    states2 = states.clone()
    states2[1, 4:] += torch.randn(3, 24) * 10
    torch.testing.assert_close(head(states2, mask), out, atol=1e-5, rtol=0)
    # but real positions do
    states2[1, 0] += torch.randn(24)  # (a constant shift would vanish in the LayerNorm)
    assert (head(states2, mask)[1] - out[1]).abs().max() > 1e-4


def test_aggregator_shapes_and_mass() -> None:
    agg = make_aggregator(bucket_size=8)
    B, K = 2, 5
    q, mods, scores = aggregator_inputs(B, K)
    mask = torch.ones(B, K, dtype=torch.bool)
    mask[0, 3] = mask[1, 0] = mask[1, 4] = False
    phi, mass = agg(q, mods, mask, scores)
    assert phi.shape == (B, T, W) and mass.shape == (B, K)
    torch.testing.assert_close(mass.sum(1), torch.ones(B), atol=1e-5, rtol=0)
    assert (mass[~mask] == 0).all() and (mass[mask] > 0).all()
    with pytest.raises(ValueError, match="expected"):
        agg(q[:, :3], mods, mask)
    with pytest.raises(ValueError, match="expected"):
        agg(q, mods, mask[:, :4])


def test_readout_prefix_shapes_follow_kv_heads(tiny_llama: FrozenLM, tiny_mac: MACModel) -> None:
    lm = tiny_llama
    phi = torch.randn(3, T, lm.hidden_size)  # T stored states per memory
    prefix = tiny_mac.expander(phi)
    assert prefix.keys.shape == (3, lm.num_layers, lm.num_kv_heads, 1 + T, lm.head_dim)  # the sink, then T states
    assert lm.num_kv_heads == 2 < lm.model.config.num_attention_heads  # grouped-query: sized for the KV heads
    assert prefix.values.shape == prefix.keys.shape and prefix.length == tiny_mac.cfg.prefix_tokens == 1 + T
    lm.check_prefix(prefix, 3)
    sums, _ = lm.continuation_logprobs([[500, 600]] * 3, [[700]] * 3, prefix)
    assert torch.isfinite(sums).all()


def test_a_lm_without_rope_is_refused_by_name(tiny_gpt2: FrozenLM, minilm) -> None:
    """The readout rotates its keys with the LM's RoPE: GPT-2 (absolute positions) has none."""
    with pytest.raises(ValueError, match="RoPE"):
        make_tiny_mac(tiny_gpt2, minilm, lm=tiny_gpt2.name)


def test_mac_end_to_end_shapes_and_gradients(tiny_llama: FrozenLM, minilm) -> None:
    """Write → select → read → score. Writing is one forward without gradient; the answer NLL trains the readout
    (the prefix is the top memory's readout, so it does not depend on the pick) and the selection loss trains the
    question encoder and the aggregator; the LM, the encoder and the selector get no gradient from either."""
    mac = make_tiny_mac(tiny_llama, minilm)
    docs = ["The river port of Velmora opened in 1921.", "Kestrel Mining appointed Ana Duarte as its chief executive."]
    mods, vecs = mac.amortize([mac.windows(d)[0] for d in docs])  # (2, T, D), (2, d_enc)
    assert mods.shape == (2, T, tiny_llama.hidden_size) and vecs.shape == (2, minilm.width)
    assert not mods.requires_grad
    torch.testing.assert_close(vecs.norm(dim=-1), torch.ones(2))
    q, qvec = mac.encode_questions(["Who runs Kestrel Mining?", "When did Velmora's port open?", "Where?"])
    assert q.shape == (3, T, tiny_llama.hidden_size) and qvec.shape == (3, minilm.width)
    memory = mods[None].expand(3, -1, -1, -1)  # every question sees both documents
    prefix, mass = mac.prefix(q, memory, scores=qvec @ vecs.T)
    assert prefix.keys.shape == (3, 2, 2, 1 + T, 16) and mass.shape == (3, 2)
    tok = tiny_llama.tokenizer
    s, n = tiny_llama.continuation_logprobs([tok("Question: a\nAnswer:")["input_ids"]] * 3,
                                            [tok(a, add_special_tokens=False)["input_ids"] for a in ("A", "1921", "V")],
                                            prefix)
    assert s.shape == (3,) and (s < 0).all()
    gold = torch.tensor([1, 0, 0])
    (-s.sum() / n.sum() - torch.log(mass[torch.arange(3), gold]).mean()).backward()
    for part in ("question_encoder", "expander"):
        grads = [p.grad for p in getattr(mac, part).parameters()]
        assert all(g is not None for g in grads), f"{part}: parameter without gradient"
        assert sum(float(g.abs().sum()) for g in grads) > 0, f"{part}: zero gradient"
    # the aggregator is trained through its attention mass (its output tokens feed only a deeper level of buckets)
    for p in (mac.aggregator.bias_scale, mac.aggregator.blocks[0].q.weight, mac.aggregator.blocks[-1].kv.weight):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0
    assert all(p.grad is None for p in mac.amortizer.parameters())  # fitted in closed form (train_readout)
    for name, p in itertools.chain(mac.lm.named_parameters(), mac.encoder.named_parameters()):
        assert p.grad is None and not p.requires_grad, name


# ---- 2. permutation invariance (flat path) ------------------------------------------------------------------------
@pytest.mark.parametrize("with_scores", [False, True])
def test_flat_aggregation_is_permutation_invariant(with_scores: bool) -> None:
    agg = make_aggregator(bucket_size=8)
    B, K = 2, 6
    q, mods, scores = aggregator_inputs(B, K, seed=1)
    scores = scores if with_scores else None
    mask = torch.ones(B, K, dtype=torch.bool)
    mask[0, 1] = mask[1, 5] = False
    phi, mass = agg(q, mods, mask, scores)
    for seed in range(3):
        perm = torch.randperm(K, generator=torch.Generator().manual_seed(seed))
        phi_p, mass_p = agg(q, mods[:, perm], mask[:, perm], None if scores is None else scores[:, perm])
        torch.testing.assert_close(phi_p, phi, atol=1e-5, rtol=0)
        torch.testing.assert_close(mass_p, mass[:, perm], atol=1e-6, rtol=0)
    # the rows of a batch are independent sets: swapping the rows swaps the results
    phi_s, _ = agg(q.flip(0), mods.flip(0), mask.flip(0), None if scores is None else scores.flip(0))
    torch.testing.assert_close(phi_s, phi.flip(0), atol=1e-5, rtol=0)


def test_flat_aggregation_sees_every_present_and_no_absent_modulation() -> None:
    agg = make_aggregator(bucket_size=8)
    q, mods, scores = aggregator_inputs(1, 5, seed=2)
    mask = torch.tensor([[True, True, False, True, True]])
    phi, _ = agg(q, mods, mask, scores)
    for i in range(5):
        mods2, scores2 = mods.clone(), scores.clone()
        mods2[0, i] += torch.randn(T, W)
        scores2[0, i] += 0.5
        diff = (agg(q, mods2, mask, scores2)[0] - phi).abs().max()
        assert (diff > 1e-6) if mask[0, i] else (diff <= 1e-7), f"slot {i}: {diff}"


# ---- 3. hierarchical aggregation ---------------------------------------------------------------------------------
K_BIG, M = 20, 4  # 20 modulations, buckets of 4: 5 buckets → 2 → 1 (two levels of recursion)


@torch.no_grad()
def test_hierarchical_every_modulation_reaches_the_output() -> None:
    agg = make_aggregator(bucket_size=M)
    q, mods, scores = aggregator_inputs(1, K_BIG, seed=3)
    for sc in (None, scores):
        phi, mass = agg(q, mods, None, sc)
        assert phi.shape == (1, T, W) and mass.shape == (1, K_BIG)
        torch.testing.assert_close(mass.sum(1), torch.ones(1), atol=1e-5, rtol=0)
        assert (mass > 0).all()
        diffs = []
        for i in range(K_BIG):
            mods2 = mods.clone()
            mods2[0, i] += torch.randn(T, W, generator=torch.Generator().manual_seed(i))
            diffs.append(float((agg(q, mods2, None, sc)[0] - phi).abs().max().detach()))
        silent = [i for i, d in enumerate(diffs) if not d > 1e-6]
        assert not silent, f"modulations {silent} do not influence φ* (max diffs {diffs})"


@pytest.mark.parametrize("with_scores", [False, True])
def test_hierarchical_masked_slots_have_no_influence_and_no_mass(with_scores: bool) -> None:
    agg = make_aggregator(bucket_size=M)
    B = 2
    q, mods, scores = aggregator_inputs(B, K_BIG, seed=4)
    mask = torch.ones(B, K_BIG, dtype=torch.bool)
    mask[0, 5] = mask[0, 18] = False  # single absent slots inside partly filled buckets
    mask[1, 8:12] = False  # a whole absent bucket (without scores nothing down-weights it but the mask)
    mask[1, 19] = False
    sc = scores if with_scores else None
    phi, mass = agg(q, mods, mask, sc)
    assert mass.shape == (B, K_BIG)
    torch.testing.assert_close(mass.sum(1), torch.ones(B), atol=1e-5, rtol=0)
    assert (mass[~mask] == 0).all() and (mass[mask] > 0).all()
    mods2, scores2 = mods.clone(), scores.clone()
    mods2[~mask] = torch.randn(int((~mask).sum()), T, W) * 50
    scores2[~mask] = 1.0  # a masked slot with the best retriever score is still absent
    phi2, mass2 = agg(q, mods2, mask, scores2 if with_scores else None)
    torch.testing.assert_close(phi2, phi, atol=1e-6, rtol=0)
    torch.testing.assert_close(mass2, mass, atol=1e-7, rtol=0)
    # rows of a batch are independent sets, also through the bucketing
    for b in range(B):
        phi_b, mass_b = agg(q[b: b + 1], mods[b: b + 1], mask[b: b + 1], None if sc is None else sc[b: b + 1])
        torch.testing.assert_close(phi_b, phi[b: b + 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(mass_b, mass[b: b + 1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("K", [16, K_BIG])
def test_hierarchical_invariant_to_order_within_and_of_buckets(K: int) -> None:
    """Bucketing is by position, so the hierarchical result is not invariant to arbitrary permutations — but it is
    to shuffling inside each bucket and to reordering buckets that share a parent (K = 16: 4 buckets, one parent;
    K = 20: buckets 0-3 share a parent, bucket 4 has its own), and the masses must follow the documents."""
    agg = make_aggregator(bucket_size=M)
    q, mods, scores = aggregator_inputs(1, K, seed=5)
    phi, mass = agg(q, mods, None, scores)
    g = torch.Generator().manual_seed(0)
    bucket_order = torch.cat([torch.randperm(M, generator=g), torch.arange(M, K // M)])
    assert not torch.equal(bucket_order[:M], torch.arange(M))
    perm = torch.cat([b * M + torch.randperm(M, generator=g) for b in bucket_order])
    phi_p, mass_p = agg(q, mods[:, perm], None, scores[:, perm])
    torch.testing.assert_close(phi_p, phi, atol=1e-5, rtol=0)
    torch.testing.assert_close(mass_p, mass[:, perm], atol=1e-6, rtol=0)


def test_mass_is_product_of_bucket_and_top_level_mass() -> None:
    """K = 8, M = 4: one level. A document's mass = its share in its bucket × its bucket's share at the top."""
    agg = make_aggregator(bucket_size=M)
    q, mods, scores = aggregator_inputs(1, 8, seed=6)
    phi, mass = agg(q, mods, None, scores)
    phi_0, m0 = agg(q, mods[:, :4], None, scores[:, :4])
    phi_1, m1 = agg(q, mods[:, 4:], None, scores[:, 4:])
    top_scores = torch.stack([scores[:, :4].amax(1), scores[:, 4:].amax(1)], 1)
    phi_top, m_top = agg(q, torch.stack([phi_0, phi_1], 1), None, top_scores)
    torch.testing.assert_close(phi, phi_top, atol=1e-5, rtol=0)
    torch.testing.assert_close(mass, torch.cat([m0 * m_top[:, :1], m1 * m_top[:, 1:]], 1), atol=1e-6, rtol=0)


# ---- 5. checkpoints ----------------------------------------------------------------------------------------------
def _sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _outputs(mac: MACModel) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        mods, vecs = mac.amortize([mac.windows("Orla Brandt founded the Tessel Works in Danzig.")[0]])
        q, _ = mac.encode_questions(["Who founded the Tessel Works?"])
        prefix, mass = mac.prefix(q, mods[None], scores=torch.tensor([[0.4]]))
    return mods, vecs, q, prefix.keys, prefix.values, mass


def test_checkpoint_round_trip_and_version(tmp_path: Path, tiny_llama: FrozenLM, minilm) -> None:
    mac = make_tiny_mac(tiny_llama, minilm)
    with torch.no_grad():  # move away from the initialisation, so a silently skipped tensor would show
        for p in mac.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    version = mac.save(tmp_path / "a", train_config={"lr": 1e-3}, metrics={"f1": 1.0})
    assert version == _sha12(tmp_path / "a" / WEIGHTS) == mac.version
    meta = json.loads((tmp_path / "a" / CONFIG).read_text())
    assert meta["version"] == version and meta["model"] == mac.cfg.model_dump()
    with torch.no_grad():  # the reference: the same weights after the fp16 round trip of storage
        for p in mac.parameters():
            if p.requires_grad:
                p.copy_(p.half().float())
    loaded = MACModel.load(tmp_path / "a", lm=tiny_llama, encoder=minilm)
    assert loaded.version == version and loaded.cfg == mac.cfg
    for name, t in mac.trainable_state().items():
        assert torch.equal(loaded.trainable_state()[name], t), name
    for a, b in zip(_outputs(mac), _outputs(loaded)):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    # content-addressed: the same weights give the same version, different weights another one
    assert loaded.save(tmp_path / "b") == version
    with torch.no_grad():
        loaded.expander.proj.weight[0, 0] += 0.5
    assert loaded.save(tmp_path / "c") not in (version, "untrained")
    assert loaded.version == _sha12(tmp_path / "c" / WEIGHTS)


def test_checkpoint_stores_only_trainable_tensors(tmp_path: Path, tiny_llama: FrozenLM, minilm) -> None:
    mac = make_tiny_mac(tiny_llama, minilm)
    mac.save(tmp_path)
    keys = set(load_file(str(tmp_path / WEIGHTS)))
    heads = ("amortizer.", "question_encoder.", "aggregator.", "expander.")
    assert keys and all(k.startswith(heads) for k in keys), sorted(k for k in keys if not k.startswith(heads))[:5]
    expected = {n for part in heads for n, _ in getattr(mac, part[:-1]).named_parameters(prefix=part[:-1])}
    assert keys == expected
    assert all(t.dtype == torch.float16 for t in load_file(str(tmp_path / WEIGHTS)).values())


def test_a_checkpoint_of_the_older_config_format_loads_and_another_memory_is_refused(tmp_path: Path,
                                                                                      tiny_llama: FrozenLM,
                                                                                      minilm) -> None:
    """config.json records written before the engine kept one memory name the readout memory with keys of the
    removed variants (the shipped checkpoint's does): those load, to the same model and version; a record of another
    memory (the slots checkpoint's) is refused naming the git tag where it runs."""
    mac = make_tiny_mac(tiny_llama, minilm)
    version = mac.save(tmp_path / "ok")
    older = {"doc_states": "lm", "standardize_states": False, "amortizer": "select", "expander": "readout",
             "aggregator_output": "select", "unfreeze_encoder_layers": 0, "prefix_len": 2, "amortizer_blocks": 2,
             "expander_hidden": 1024}
    loaded = MACModel.load(_tamper(tmp_path / "ok", tmp_path / "older", **older), lm=tiny_llama, encoder=minilm)
    assert loaded.cfg == mac.cfg and loaded.version == version
    slots = older | {"amortizer": "queries", "expander": "slots", "aggregator_output": "tokens"}
    with pytest.raises(ValueError, match="slots-checkpoint") as err:
        MACModel.load(_tamper(tmp_path / "ok", tmp_path / "slots", **slots), lm=tiny_llama, encoder=minilm)
    assert "'expander': 'slots'" in str(err.value) and str(tmp_path / "slots") in str(err.value)


def _tamper(src: Path, dst: Path, **model_changes) -> Path:
    shutil.copytree(src, dst)
    meta = json.loads((dst / CONFIG).read_text())
    meta["model"].update(model_changes)
    (dst / CONFIG).write_text(json.dumps(meta))
    return dst


def test_checkpoint_that_does_not_fit_is_refused(tmp_path: Path, tiny_llama: FrozenLM, minilm) -> None:
    mac = make_tiny_mac(tiny_llama, minilm)
    mac.save(tmp_path / "ok")
    with pytest.raises(FileNotFoundError):
        MACModel.load(tmp_path / "missing", lm=tiny_llama, encoder=minilm)
    # a tensor the model does not have / lacks (different key set)
    with pytest.raises(ValueError, match="does not fit"):
        MACModel.load(_tamper(tmp_path / "ok", tmp_path / "nobias", retrieval_bias=False), lm=tiny_llama,
                      encoder=minilm)


@pytest.mark.parametrize("case", ["num_tokens", "other_lm"])
def test_checkpoint_with_other_shapes_is_refused_with_value_error(
    case: str, tmp_path: Path, tiny_llama: FrozenLM, tiny_gpt2: FrozenLM, minilm
) -> None:
    mac = make_tiny_mac(tiny_llama, minilm)
    mac.save(tmp_path / "ok")
    if case == "num_tokens":  # weights of T = 4 under a config that says T = 3
        with pytest.raises(ValueError, match="does not fit"):
            MACModel.load(_tamper(tmp_path / "ok", tmp_path / "t3", num_tokens=3), lm=tiny_llama, encoder=minilm)
    else:  # a Llama-GQA checkpoint onto GPT-2 (no RoPE for the readout's keys)
        with pytest.raises(ValueError, match="RoPE"):
            MACModel.load(tmp_path / "ok", lm=tiny_gpt2, encoder=minilm)


# ---- 6. modulations ----------------------------------------------------------------------------------------------
def test_modulation_float16_and_exact_base64_round_trip() -> None:
    arr = np.random.default_rng(0).standard_normal((T, 64)).astype(np.float32) * 3
    arr[0, :4] = [-0.0, 6e-8, 65504.0, -1e-5]  # signed zero, a subnormal, float16 max, a tiny value
    m = Modulation("doc-1", 0, 1, arr, "lm|enc", "abc123")
    assert m.tokens.dtype == np.float16 and m.tokens.shape == (T, 64) and m.nbytes == T * 64 * 2
    b64 = m.tokens_b64()
    assert isinstance(b64, str) and json.loads(json.dumps({"t": b64}))["t"] == b64
    back = Modulation.decode_tokens(b64, T)
    assert back.dtype == np.float16 and back.shape == (T, 64)
    assert np.array_equal(back.view(np.uint16), m.tokens.view(np.uint16))  # bit-exact, -0.0 included
    assert torch.equal(m.tensor(), torch.from_numpy(m.tokens.astype(np.float32)))
    assert m.tensor().dtype == torch.float32
    with pytest.raises(ValueError, match="expected"):
        Modulation("doc-1", 0, 1, arr[0], "lm|enc", "abc123")


def test_ensure_compatible_names_the_document() -> None:
    tok = np.zeros((T, 8), np.float16)
    good = Modulation("good", 0, 1, tok, "lm|enc", "v1")
    ensure_compatible([good, good], "v1", "lm|enc")
    ensure_compatible([], "v1", "lm|enc")
    with pytest.raises(CheckpointMismatch, match="'stale-42'"):
        ensure_compatible([good, Modulation("stale-42", 0, 1, tok, "lm|enc", "v0")], "v1", "lm|enc")
    with pytest.raises(CheckpointMismatch, match="'other-lm'"):
        ensure_compatible([Modulation("other-lm", 0, 1, tok, "gpt2|enc", "v1")], "v1", "lm|enc")
    assert issubclass(CheckpointMismatch, ValueError)


def test_stack_memories_pads_and_refuses_foreign_modulations(tiny_mac: MACModel) -> None:
    docs = [Document(id="a", text="Alpha Corp moved to Lisbon."), Document(id="b", text="Beta Ltd sold its mines.")]
    enc = tiny_mac.encode_documents(docs)
    assert [e.modulation.checkpoint for e in enc] == [tiny_mac.version] * 2
    assert all(e.modulation.model_id == tiny_mac.model_id for e in enc)
    (ma, mb) = (e.modulation for e in enc)
    mods, mask, scores = tiny_mac.stack_memories([[(ma, 0.9), (mb, 0.2)], [(mb, 0.5)]])
    D = tiny_mac.lm.hidden_size
    assert mods.shape == (2, 2, T, D) and mask.tolist() == [[True, True], [True, False]]
    torch.testing.assert_close(scores, torch.tensor([[0.9, 0.2], [0.5, 0.0]]))
    assert torch.equal(mods[1, 0], mb.tensor()) and (mods[1, 1] == 0).all()
    prefix, mass = tiny_mac.memory_prefix(["Where did Alpha Corp move?", "What did Beta sell?"],
                                          [[(ma, 0.9), (mb, 0.2)], [(mb, 0.5)]])
    assert prefix.keys.shape[:2] == (2, tiny_mac.lm.num_layers) and mass[1, 1] == 0
    foreign = Modulation("from-elsewhere", 0, 1, ma.tokens, tiny_mac.model_id, "0123456789ab")
    with pytest.raises(CheckpointMismatch, match="from-elsewhere"):
        tiny_mac.stack_memories([[(ma, 0.9)], [(foreign, 0.3)]])


# ---- 7. encoder windows ------------------------------------------------------------------------------------------
def _single_token_words(minilm, n: int) -> list[str]:
    """n distinct lowercase words that MiniLM's WordPiece keeps as one token each."""
    vocab = sorted(minilm.tokenizer.get_vocab())
    words = [w for w in vocab if w.isascii() and w.isalpha() and w.islower() and len(w) >= 4][:n]
    assert len(words) == n
    return words


def _check_windows(windows: list[list[int]], ids: list[int], span: int, overlap: int) -> None:
    assert windows and all(1 <= len(w) <= span for w in windows)
    rebuilt = list(windows[0])
    for prev, w in zip(windows, windows[1:]):
        assert prev[-overlap:] == w[:overlap] if overlap else True, "consecutive windows must share `overlap` tokens"
        rebuilt += w[overlap:]
    assert rebuilt == ids, "windows minus overlaps must be exactly the text's tokens"


def test_chunk_windows_cover_long_text(minilm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(minilm, "max_tokens", 64)
    monkeypatch.setattr(minilm, "overlap", 8)
    words = _single_token_words(minilm, 1000)
    text = " ".join(words)
    ids = minilm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1000
    windows = minilm.chunk(text)
    _check_windows(windows, ids, span=62, overlap=8)
    assert len(windows) == math.ceil((1000 - 8) / (62 - 8))
    # short texts: one window; boundaries around the span and the step
    for n in [1, 8, 61, 62, 63, 69, 70, 71, 116, 117, 118, 170, 171, 172, 200]:
        ids_n = ids[:n]
        windows = minilm.chunk(" ".join(words[:n]))
        _check_windows(windows, ids_n, span=62, overlap=8)
        if n <= 62:
            assert len(windows) == 1
    # the batch wraps each window with [CLS] ... [SEP] within the encoder's window
    batch_ids, mask = minilm.batch(minilm.chunk(text)[:3])
    assert batch_ids.shape[1] <= 64 and (batch_ids[:, 0] == minilm.tokenizer.cls_token_id).all()


def test_encode_documents_chunks_long_documents(tiny_llama: FrozenLM, minilm) -> None:
    mac = make_tiny_mac(tiny_llama, minilm, max_doc_tokens=32, chunk_overlap=4)
    long_doc = Document(id="long", title="Ledger", text=" ".join(_single_token_words(minilm, 150)))
    short_doc = Document(id="short", text="A short note.")
    out = mac.encode_documents([long_doc, short_doc], batch_size=3)  # batches cut across documents
    n = len(mac.windows(document_text(long_doc)))
    assert n > 1
    long_out = [e for e in out if e.modulation.doc_id == "long"]
    assert [e.modulation.chunk for e in long_out] == list(range(n))
    assert all(e.modulation.n_chunks == n for e in long_out)
    short_out = [e for e in out if e.modulation.doc_id == "short"]
    assert len(short_out) == 1 and short_out[0].modulation.n_chunks == 1 and short_out[0].modulation.chunk == 0
    assert len(out) == n + 1
    for e in out:
        assert e.modulation.tokens.shape == (T, mac.lm.hidden_size) and e.modulation.tokens.dtype == np.float16
        assert e.vector.shape == (minilm.width,) and abs(float(np.linalg.norm(e.vector)) - 1) < 1e-4
    # each window's modulation is its own content (not the first window repeated), and batching changes nothing
    assert not np.array_equal(long_out[0].modulation.tokens, long_out[1].modulation.tokens)
    alone = mac.encode_documents([long_doc], batch_size=64)
    for a, b in zip(alone, long_out):
        np.testing.assert_allclose(a.modulation.tokens.astype(np.float32), b.modulation.tokens.astype(np.float32),
                                   atol=2e-3)
    # each window's text is its own piece of the document, cut where windows() cuts it
    whole, texts = document_text(long_doc), [mac.window_text(long_doc, i) for i in range(n)]
    assert all(t in whole for t in texts) and len(set(texts)) == n
    assert whole.startswith(texts[0]) and whole.endswith(texts[-1])


# ---- 8. config -------------------------------------------------------------------------------------------------
def test_unknown_config_key_is_named() -> None:
    with pytest.raises(ValueError) as err:
        load_config(ModelConfig, {"num_tokenz": 3})
    assert "num_tokenz" in str(err.value) and "unknown key" in str(err.value)
    with pytest.raises(ValueError, match="select_stepz"):
        load_config(ReadoutTrainConfig, {"select_stepz": 2})
    with pytest.raises(ValueError, match="num_tokens"):
        load_config(ModelConfig, {"num_tokens": 0})
    assert load_config(ModelConfig, None) == ModelConfig()


def test_chunk_overlap_must_be_below_half_the_window() -> None:
    assert load_config(ModelConfig, {"max_doc_tokens": 64, "chunk_overlap": 31}).chunk_overlap == 31
    for overlap in (32, 40, 64):
        with pytest.raises(ValueError, match="chunk_overlap"):
            load_config(ModelConfig, {"max_doc_tokens": 64, "chunk_overlap": overlap})
    cfg = tiny_config(max_doc_tokens=64, chunk_overlap=8)
    with pytest.raises(ValueError):
        cfg.chunk_overlap = 32  # assignments are validated too


# ---- writing reads the frozen LM's own hidden states --------------------------------------------------------------
def test_hidden_states_at_matches_full_forward(tiny_llama: FrozenLM, tiny_gpt2: FrozenLM) -> None:
    for lm in (tiny_llama, tiny_gpt2):
        ids = torch.randint(0, 1000, (2, 7))
        mask = torch.ones_like(ids)
        full = lm.model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        # hidden_states[i] is the output of layer i for i < L (the last one has the final norm applied)
        for layer in range(1, lm.num_layers):
            torch.testing.assert_close(lm.hidden_states_at(ids, mask, layer), full[layer])
        with pytest.raises(ValueError, match="layer must be"):
            lm.hidden_states_at(ids, mask, lm.num_layers + 1)


def test_windows_cover_the_document_in_lm_tokens_and_the_layer_is_checked(tiny_llama: FrozenLM, minilm) -> None:
    mac = make_tiny_mac(tiny_llama, minilm, max_doc_tokens=32, chunk_overlap=4)
    text = " ".join(f"word{i}" for i in range(120))
    windows = mac.windows(text)
    ids = tiny_llama.tokenizer(text, add_special_tokens=False)["input_ids"]
    _check_windows(windows, ids, span=32, overlap=4)
    mods, vecs = mac.amortize(windows[:3])
    assert mods.shape == (3, T, tiny_llama.hidden_size) and vecs.shape == (3, minilm.width)
    assert all(p.grad is None for p in tiny_llama.parameters())
    out = mac.encode_documents([Document(id="d", text=text)])
    assert [e.modulation.chunk for e in out] == list(
        range(len(mac.windows(document_text(Document(id="d", text=text))))))
    with pytest.raises(ValueError, match="lm_state_layer"):
        make_tiny_mac(tiny_llama, minilm, lm_state_layer=5)
