"""Prefix injection into a frozen LM, checked against naive full forwards without any cache.

The reference for a prefix is *the key/values of real tokens*: run the LM on a token sequence x (length P) and take
its per-layer keys/values as the Prefix. Injecting that prefix must then be exactly equivalent to putting x in front
of the prompt — same log-probs, same greedy tokens, same beams — for a grouped-query Llama and a multi-head GPT-2,
with eager and SDPA attention. That checks the (B, L, H_kv, P, D_h) layout, the KV-head count, the positions the real
tokens get (RoPE / absolute embeddings), the extended attention mask and left padding, all at once.
"""

from __future__ import annotations

import random

import pytest
import torch

from pipeline.model.lm import FrozenLM, Prefix

P = 3  # prefix length of the real-token reference prefixes
TOL = 1e-4  # logit tolerance for "is an argmax" (float reordering between cached and uncached paths)


# ---- helpers ------------------------------------------------------------------------------------------------------
def rand_ids(lm: FrozenLM, n: int, seed: int) -> list[int]:
    """n random ordinary token ids (no stop/special tokens), reproducible."""
    rng, stop = random.Random(seed), lm.stop_ids()
    out = []
    while len(out) < n:
        t = rng.randrange(300, len(lm.tokenizer))
        if t not in stop:
            out.append(t)
    return out


def kv_prefix(lm: FrozenLM, rows: list[list[int]]) -> Prefix:
    """Per-layer keys/values of real token rows (all of length P), laid out as a Prefix (B, L, H_kv, P, D_h)."""
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor(rows), use_cache=True)
    layers = out.past_key_values.layers
    return Prefix(torch.stack([layer.keys for layer in layers], 1).clone(),
                  torch.stack([layer.values for layer in layers], 1).clone())


@torch.no_grad()
def naive_logits(lm: FrozenLM, seq: list[int]) -> torch.Tensor:
    """Next-token logits after ``seq``: the whole sequence through the model, no cache, default positions."""
    return lm.model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].float()


@torch.no_grad()
def naive_logprob_sum(lm: FrozenLM, context: list[int], cont: list[int]) -> float:
    logits = lm.model(input_ids=torch.tensor([context + cont]), use_cache=False).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return float(sum(lp[len(context) - 1 + i, t] for i, t in enumerate(cont)))


def assert_greedy(lm: FrozenLM, context: list[int], generated: list[int], max_new: int) -> None:
    """Each generated token is an argmax of the naive forward; an early end is a stop token being the argmax."""
    stop = lm.stop_ids()
    seq = list(context)
    for step, t in enumerate(generated):
        logits = naive_logits(lm, seq)
        assert t not in stop, f"step {step}: a stop token was returned"
        assert logits[t] >= logits.max() - TOL, f"step {step}: generated {t} but naive argmax is {int(logits.argmax())}"
        seq.append(t)
    if len(generated) < max_new:  # stopped early: some stop token must be (tied for) the argmax
        logits = naive_logits(lm, seq)
        best_stop = max(float(logits[s]) for s in stop)
        assert best_stop >= float(logits.max()) - TOL, "generation ended early without a stop token being the argmax"


def reference_beam(lm: FrozenLM, context: list[int], k: int, steps: int) -> tuple[list[int], bool]:
    """Textbook beam search on naive full forwards, with generate's documented stop semantics.

    Returns the best sequence (cut at its first stop token) and whether its lineage ever moved between beam slots
    after the first step (new slot != source slot): only then does a missing/wrong cache reorder show in the output.
    """
    stop, pad = lm.stop_ids(), lm.tokenizer.pad_token_id
    beams = [([], 0.0, False, [])]  # (tokens, log-prob, finished, slot of each ancestor)
    for _ in range(steps):
        cands = []
        for j, (toks, score, done, slots) in enumerate(beams):
            if done:
                cands.append((toks + [pad], score, True, slots + [j]))
                continue
            lp = torch.log_softmax(naive_logits(lm, context + toks), -1)
            top = lp.topk(k)
            cands += [(toks + [int(t)], score + float(v), int(t) in stop, slots + [j])
                      for v, t in zip(top.values, top.indices)]
        beams = sorted(cands, key=lambda c: -c[1])[:k]
        if all(b[2] for b in beams):
            break
    best, slots = beams[0][0], beams[0][3] + [0]  # slots[t]: the ancestor's slot after step t (the last is the winner)
    moved = any(slots[t] != slots[t + 1] for t in range(1, len(slots) - 1))
    return best[: next((i for i, t in enumerate(best) if t in stop), len(best))], moved


# ---- shape checks -------------------------------------------------------------------------------------------------
def test_head_counts(tiny_llama: FrozenLM, tiny_gpt2: FrozenLM) -> None:
    assert (tiny_llama.num_heads, tiny_llama.num_kv_heads, tiny_llama.head_dim) == (4, 2, 16)
    assert (tiny_gpt2.num_heads, tiny_gpt2.num_kv_heads, tiny_gpt2.head_dim) == (4, 4, 16)
    assert kv_prefix(tiny_llama, [rand_ids(tiny_llama, P, 0)]).keys.shape == (1, 2, 2, P, 16)


def test_check_prefix_rejects_wrong_shape(tiny_llama: FrozenLM) -> None:
    L, D = tiny_llama.num_layers, tiny_llama.head_dim
    good = Prefix(torch.zeros(2, L, 2, P, D), torch.zeros(2, L, 2, P, D))
    tiny_llama.check_prefix(good, 2)
    mha = Prefix(torch.zeros(2, L, 4, P, D), torch.zeros(2, L, 4, P, D))  # query heads instead of KV heads
    with pytest.raises(ValueError, match="expected"):
        tiny_llama.check_prefix(mha, 2)
    with pytest.raises(ValueError, match="expected"):
        tiny_llama.check_prefix(good, 3)  # batch mismatch
    bad_values = Prefix(torch.zeros(2, L, 2, P, D), torch.zeros(2, L, 2, P + 1, D))
    with pytest.raises(ValueError, match="expected"):
        tiny_llama.check_prefix(bad_values, 2)
    with pytest.raises(ValueError, match="expected"):
        tiny_llama.continuation_logprobs([[5, 6], [7]], [[8], [9]], mha)


# ---- (b) scoring: injected prefix == real tokens in context -------------------------------------------------------
def test_continuation_logprobs_prefix_equals_tokens_in_context(any_lm: FrozenLM) -> None:
    lm = any_lm
    xs = [rand_ids(lm, P, 1), rand_ids(lm, P, 2)]
    prompts = [rand_ids(lm, 5, 3), rand_ids(lm, 2, 4)]  # different lengths: right padding inside the batch
    conts = [rand_ids(lm, 3, 5), rand_ids(lm, 4, 6)]
    sums, counts = lm.continuation_logprobs(prompts, conts, kv_prefix(lm, xs))
    assert counts.tolist() == [3, 4]
    ref = torch.tensor([naive_logprob_sum(lm, x + p, c) for x, p, c in zip(xs, prompts, conts)])
    torch.testing.assert_close(sums, ref, atol=1e-4, rtol=1e-5)
    # and the batch does not mix rows: each row alone gives the same value
    for i in range(2):
        alone, _ = lm.continuation_logprobs([prompts[i]], [conts[i]], kv_prefix(lm, [xs[i]]))
        torch.testing.assert_close(alone[0], sums[i], atol=1e-4, rtol=1e-5)
    # without a prefix it is the plain conditional log-prob
    plain, _ = lm.continuation_logprobs(prompts, conts)
    torch.testing.assert_close(plain, torch.tensor([naive_logprob_sum(lm, p, c) for p, c in zip(prompts, conts)]),
                               atol=1e-4, rtol=1e-5)


# ---- (c) a prefix matters, receives gradients, the LM does not ----------------------------------------------------
def test_prefix_changes_logprobs_and_gets_gradients_lm_does_not(any_lm: FrozenLM) -> None:
    lm = any_lm
    prompts, conts = [rand_ids(lm, 4, 7), rand_ids(lm, 6, 8)], [rand_ids(lm, 2, 9), rand_ids(lm, 3, 10)]
    shape = (2, lm.num_layers, lm.num_kv_heads, 2, lm.head_dim)
    keys = torch.randn(shape, requires_grad=True)
    values = torch.randn(shape, requires_grad=True)
    base, _ = lm.continuation_logprobs(prompts, conts)
    with_prefix, _ = lm.continuation_logprobs(prompts, conts, Prefix(keys, values))
    assert (with_prefix - base).abs().min() > 1e-4, "a random prefix did not change the log-probs"
    zero, _ = lm.continuation_logprobs(prompts, conts, Prefix(torch.zeros(shape), torch.zeros(shape)))
    assert (zero - base).abs().min() > 1e-6, "a zero prefix takes attention mass: it is not a no-op"
    with_prefix.sum().backward()
    assert keys.grad is not None and keys.grad.abs().sum() > 0
    assert values.grad is not None and values.grad.abs().sum() > 0
    # every layer's prefix is used
    assert all(keys.grad[:, i].abs().sum() > 0 for i in range(lm.num_layers))
    for name, p in lm.named_parameters():
        assert not p.requires_grad, f"LM parameter {name} is trainable"
        assert p.grad is None, f"LM parameter {name} received a gradient"
    lm.train()
    assert not lm.model.training, "the frozen LM must stay in eval mode"


# ---- (a) greedy generation == naive argmax loop ------------------------------------------------------------------
@pytest.mark.parametrize("with_prefix", [False, True])
def test_greedy_matches_uncached_argmax_loop(any_lm: FrozenLM, with_prefix: bool) -> None:
    lm, n = any_lm, 6
    prompt = rand_ids(lm, 5, 11)
    x = rand_ids(lm, P, 12) if with_prefix else []
    prefix = kv_prefix(lm, [x]) if with_prefix else None
    (gen,) = lm.generate([prompt], prefix, max_new_tokens=n)
    assert len(gen) >= 2, "degenerate: stopped at once (pick another prompt seed)"
    assert_greedy(lm, x + prompt, gen, n)


# ---- (d) batched left-padded generation == one by one -----------------------------------------------------------
@pytest.mark.parametrize("with_prefix", [False, True])
def test_batched_generation_equals_one_by_one(any_lm: FrozenLM, with_prefix: bool) -> None:
    lm, n = any_lm, 5
    prompts = [rand_ids(lm, 2, 13), rand_ids(lm, 7, 14), rand_ids(lm, 4, 15)]
    xs = [rand_ids(lm, P, 16 + i) for i in range(3)]
    prefix = kv_prefix(lm, xs) if with_prefix else None
    batched = lm.generate(prompts, prefix, max_new_tokens=n)
    for i, p in enumerate(prompts):
        single = lm.generate([p], prefix.index(torch.tensor([i])) if with_prefix else None, max_new_tokens=n)[0]
        assert batched[i] == single, f"row {i} (prompt length {len(p)}) differs in the left-padded batch"
        assert_greedy(lm, (xs[i] if with_prefix else []) + p, batched[i], n)


# ---- (e) beam search ---------------------------------------------------------------------------------------------
def test_one_beam_is_greedy(any_lm: FrozenLM) -> None:
    lm = any_lm
    prompts = [rand_ids(lm, 3, 20), rand_ids(lm, 6, 21)]
    prefix = kv_prefix(lm, [rand_ids(lm, P, 22), rand_ids(lm, P, 23)])
    assert lm.generate(prompts, prefix, 5, num_beams=1) == lm.generate(prompts, prefix, 5)
    with pytest.raises(ValueError):
        lm.generate(prompts, prefix, 5, num_beams=0)


def test_beam_search_matches_reference(any_lm: FrozenLM) -> None:
    """Three beams, four steps, a batch of three prompts of different lengths with per-row prefixes: the cache and
    the prefix must follow each beam within its row. The reference re-runs every beam's full sequence without a cache.
    The seeds are chosen so that some winning beam changes slot after the first step (else a missing cache reorder,
    or beams of one row reading another row's prefix, could go unnoticed)."""
    lm, k, n = any_lm, 3, 4
    prompts = [rand_ids(lm, 3, 30), rand_ids(lm, 6, 31), rand_ids(lm, 4, 34)]
    xs = [rand_ids(lm, P, 130), rand_ids(lm, P, 131), rand_ids(lm, P, 134)]
    got = lm.generate(prompts, kv_prefix(lm, xs), n, num_beams=k)
    moved = []
    for i in range(3):
        ref, m = reference_beam(lm, xs[i] + prompts[i], k, n)
        assert got[i] == ref, f"row {i}"
        moved.append(m)
    assert any(moved), "precondition: no winning beam changed slot; pick other seeds"
    # the batch does not mix rows
    assert lm.generate([prompts[1]], kv_prefix(lm, [xs[1]]), n, num_beams=k)[0] == got[1]


def test_two_step_beam_at_least_as_likely_as_greedy(any_lm: FrozenLM) -> None:
    """Over two steps beam search provably contains greedy's sequence among its candidates (greedy's first token is
    the top-1 first token), so its answer is at least as likely. (Beyond two steps no such guarantee exists.)"""
    lm = any_lm
    prompt, x = rand_ids(lm, 5, 28), rand_ids(lm, P, 29)
    prefix = kv_prefix(lm, [x])
    (greedy,) = lm.generate([prompt], prefix, 2)
    (beam,) = lm.generate([prompt], prefix, 2, num_beams=3)
    if len(greedy) < 2 or len(beam) < 2:
        pytest.skip("a stop token ended a sequence early; the comparison would be unsound")
    lp, _ = lm.continuation_logprobs([prompt, prompt], [greedy, beam], prefix.repeat_interleave(2))
    assert float(lp[1]) >= float(lp[0]) - 1e-5


# ---- early stop ----------------------------------------------------------------------------------------------------
def test_stop_token_ends_generation_greedy_batched_and_beam(tokenizer) -> None:
    """Rig a fresh tiny Llama (LM head × 30: peaked, near-deterministic continuations) so that after the first
    generated token of prompt ``a`` the newline token narrowly beats the greedy second token. Greedy then returns
    that single token (the stop token is dropped); the other row of a batch is not disturbed by the finished row; and
    in beam search the finished beam [t1, newline] keeps its score while the alive beam [t1, t2, ...] pays for every
    further token, so the finished one wins — as in the reference."""
    from conftest import make_tiny_llama

    lm = make_tiny_llama(tokenizer)
    newline = tokenizer.encode("\n")[0]
    assert newline in lm.stop_ids()
    head = lm.model.get_output_embeddings().weight
    with torch.no_grad():
        head.mul_(30.0)
    a, b = rand_ids(lm, 4, 40), rand_ids(lm, 6, 41)
    (before,) = lm.generate([a], None, 5)
    assert len(before) == 5
    with torch.no_grad():  # newline's logit := the second greedy token's logit + 0.1 at that step
        h = lm.model.base_model(input_ids=torch.tensor([a + before[:1]])).last_hidden_state[0, -1]
        head[newline] = head[before[1]] + 0.1 * h / h.pow(2).sum()
    (after,) = lm.generate([a], None, 5)
    assert after == before[:1]
    assert_greedy(lm, a, after, 5)
    (alone_b,) = lm.generate([b], None, 5)
    assert len(alone_b) == 5
    assert lm.generate([a, b], None, 5) == [after, alone_b]
    assert lm.generate([b, a], None, 5) == [alone_b, after]
    ref, _ = reference_beam(lm, a, 3, 4)
    assert ref == after, "precondition: the finished beam should win the reference beam search"
    assert lm.generate([a, b], None, 4, num_beams=3)[0] == ref


# ---- the real frozen LM ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_smollm2_prefix_injection() -> None:
    """SmolLM2-135M (30 layers, 9 query heads sharing 3 KV heads, SDPA, tied embeddings) as the pipeline loads it:
    the KV prefix of real tokens is equivalent to those tokens in the context, for scoring and for greedy decoding."""
    lm = FrozenLM.load("smollm2-135m-instruct")
    assert (lm.num_layers, lm.num_heads, lm.num_kv_heads, lm.head_dim) == (30, 9, 3, 64)
    tok = lm.tokenizer
    x = tok("The capital of France is Paris.")["input_ids"]
    prompt = tok(" Question: What is the capital of France?\nAnswer:", add_special_tokens=False)["input_ids"]
    cont = tok(" Paris\n", add_special_tokens=False)["input_ids"]
    prefix = kv_prefix(lm, [x])
    assert prefix.keys.shape == (1, 30, 3, len(x), 64)
    sums, _ = lm.continuation_logprobs([prompt], [cont], prefix)
    assert abs(float(sums[0]) - naive_logprob_sum(lm, x + prompt, cont)) < 1e-3
    (gen,) = lm.generate([prompt], prefix, max_new_tokens=3)
    assert_greedy(lm, x + prompt, gen, 3)  # (this instruct model may well stop at once on a bare prompt)
    story = tok(" Berlin is the capital of", add_special_tokens=False)["input_ids"]
    (gen,) = lm.generate([story], prefix, max_new_tokens=3)
    assert gen, "a plain-text continuation should not stop at once"
    assert_greedy(lm, x + story, gen, 3)
    wrong = Prefix(torch.zeros(1, 30, 9, 2, 64), torch.zeros(1, 30, 9, 2, 64))  # num_attention_heads, not KV heads
    with pytest.raises(ValueError, match="expected"):
        lm.continuation_logprobs([prompt], [cont], wrong)


def test_choice_logprobs_equal_continuation_logprobs(tiny_llama, tiny_gpt2) -> None:
    """Sharing the prompt's cache across choices gives the same scores as scoring each (prompt, choice) alone."""
    for lm in (tiny_llama, tiny_gpt2):
        g = torch.Generator().manual_seed(5)
        prompts = [[5, 6, 7, 8, 9], [11, 12]]
        choices = [[[20], [21, 22, 23], [24, 25]], [[30, 31], [32], [33, 34, 35, 36]]]
        H, Dh = lm.num_kv_heads, lm.head_dim
        prefix = Prefix(torch.randn(2, lm.num_layers, H, 3, Dh, generator=g),
                        torch.randn(2, lm.num_layers, H, 3, Dh, generator=g))
        for pre in (None, prefix):
            got = lm.choice_logprobs(prompts, choices, pre)
            flat_p = [p for p, cs in zip(prompts, choices) for _ in cs]
            flat_c = [c for cs in choices for c in cs]
            rep = None if pre is None else pre.repeat_interleave(3)
            sums, counts = lm.continuation_logprobs(flat_p, flat_c, rep)
            torch.testing.assert_close(got, (sums / counts).view(2, 3), atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="same number"):
            lm.choice_logprobs(prompts, [[[1]], [[1], [2]]])


def test_stream_yields_what_generate_returns(any_lm: FrozenLM, tokenizer) -> None:
    torch.manual_seed(3)
    prefix = Prefix(torch.randn(1, any_lm.num_layers, any_lm.num_kv_heads, 2, any_lm.head_dim),
                    torch.randn(1, any_lm.num_layers, any_lm.num_kv_heads, 2, any_lm.head_dim))
    for pre in (None, prefix):
        prompt = tokenizer("Question: who runs Acme?\nAnswer:")["input_ids"]
        assert list(any_lm.stream(prompt, pre, 8)) == any_lm.generate([prompt], pre, 8)[0]
