"""The readout memory's parts (pipeline/model/readout.py): the prefix layout, the RoPE positions and the sink are
checked against the LM's own keys/values; the selection's rules on hand-made scores."""

from __future__ import annotations

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
        states = rms(lm.model.get_input_embeddings()(torch.tensor([ids[1:]])))  # (1, 3, d): what layer 0 reads, pre-gain
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
