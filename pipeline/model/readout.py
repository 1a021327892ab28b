"""The readout memory: a modulation made of the frozen LM's own token states, and a linear per-layer K/V readout.

Write (ingest, one forward, question-independent): the LM runs over the document window up to layer m; a token
selector scores every token and keeps T positions (the highest-scoring ones widened by their neighbours, in document
order); the modulation is the RMS-normalised layer-m states there, (T, d_LM) — the MAC modulation's shape.

Read (query time): the readout maps each stored state to a key and a value for every layer of the LM (one linear map
d_LM → L·2·H_kv·D_h, fitted by ridge regression on the LM's own keys/values, then fine-tuned end to end); the keys
get RoPE at prefix positions 1..N after a fixed sink (``<|endoftext|>`` at position 0). Why this shape
(research/results/2026-11-29/memory-ceilings.md): the article's own K/V at selected positions beat the same tokens
as text, while every form that runs the frozen LM over a compressed input did not; the readout predicts those K/V
from a state the memory can afford to store.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from pipeline.model.lm import FrozenLM, Prefix

SINK = "<|endoftext|>"


def rms(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Unit root-mean-square along the last axis, as the LM's RMSNorm does before attention (without its gain). A
    few tokens have huge mid-layer norms; the next layer's keys/values are linear in the normalised state only."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def select(n_tokens: int, core: list[int], budget: int | None) -> list[int]:
    """``core`` alone (budget None), else exactly min(budget, n_tokens) positions: the core, then the nearest tokens
    (left of a core token first), in document order; a core longer than the budget is cut in document order."""
    if budget is None:
        return list(core)
    if len(core) >= budget:
        return list(core[:budget])
    if not core:
        return list(range(min(budget, n_tokens)))
    idx = np.arange(n_tokens)
    gap = np.asarray(core)[None, :] - idx[:, None]  # (n, |core|): how far each core token sits after each token
    d = np.abs(gap).min(1)
    left = (gap == d[:, None]).any(1)  # the nearest core token is to the right: this token precedes it
    order = np.lexsort((idx, ~left, d))  # by distance, then left of a core token first, then position
    return sorted(order[:budget].tolist())


def rerotate(keys: Tensor, src: Tensor, dst: Tensor, rotary) -> Tensor:
    """Post-RoPE keys (H, n, D) computed at positions ``src`` (n,) → the same keys at positions ``dst`` (n,)."""
    cos, sin = rotary(keys, (dst - src)[None].long())
    _, k = apply_rotary_pos_emb(keys[None], keys[None], cos, sin)
    return k[0]


@torch.no_grad()
def article_states(
    lm: FrozenLM, ids: list[int], layers: list[int]
) -> tuple[dict[int, Tensor], list[tuple[Tensor, Tensor]]]:
    """One forward over the article: residual stream after each layer in ``layers`` (S, d) and every layer's post-RoPE
    (keys, values) (H, S, D_h)."""
    t = torch.tensor([ids])
    cache = DynamicCache(config=lm.model.config)
    out = lm.model.base_model(input_ids=t, attention_mask=torch.ones_like(t), position_ids=torch.arange(len(ids))[None],
                              cache=cache, use_cache=True, output_hidden_states=True)
    hs = {m: out.hidden_states[m][0] for m in layers}  # hidden_states[m]: after decoder layer m (m < num_layers)
    kv = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
    return hs, kv


def kv_targets(lm: FrozenLM, kv: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Every layer's post-RoPE (keys, values) of one sequence (``article_states``) → each token's pre-RoPE keys and
    values of every layer, flattened in the readout's output order: (S, L·2·H·D)."""
    rotary = lm.model.base_model.rotary_emb
    S = kv[0][0].shape[1]
    pos = torch.arange(S)
    keys = torch.stack([rerotate(k, pos, torch.zeros_like(pos), rotary) for k, _ in kv])  # (L, H, S, D)
    vals = torch.stack([v for _, v in kv])
    return torch.stack([keys, vals], 1).permute(3, 0, 1, 2, 4).reshape(S, -1)  # (S, L·2·H·D)


class TokenSelector(nn.Module):
    """Which T tokens of a window a modulation keeps: a logistic score per token on its RMS-normalised layer-m state
    (trained on the tokens of known facts); tokens scoring above 0.5 are the core (:meth:`positions`), widened to T by
    their nearest neighbours (:func:`select`). Position 0, the LM's attention sink, is never kept."""

    def __init__(self, width: int, min_core: int = 4):
        super().__init__()
        self.score = nn.Linear(width, 1)
        self.min_core = min_core

    def forward(self, states: Tensor) -> Tensor:
        """RMS-normalised states (N, S, d) → fact logits (N, S)."""
        return self.score(states)[..., 0]

    def positions(self, logits: Tensor, n_valid: int, budget: int) -> list[int]:
        """One window's logits (S,) over ``n_valid`` real tokens → ``min(budget, n_valid - 1)`` positions, sorted. The
        core is every token scoring above 0.5, or the ``min_core`` best when fewer do, or the ``budget`` best when more
        do (so a long window keeps its best tokens, not its first ones)."""
        lg = logits[1:n_valid]  # the sink excluded
        core = (lg > 0).nonzero()[:, 0]
        if len(core) < self.min_core:
            core = lg.topk(min(self.min_core, len(lg))).indices
        elif len(core) > budget:
            core = lg.topk(budget).indices
        return [1 + i for i in select(len(lg), sorted(core.tolist()), budget)]


class KVReadout(nn.Module):
    """Stored states (B, N, d) → a prefix of 1 + N key/value tokens in every layer: a fixed sink, then one linear
    readout per state (keys pre-RoPE, rotated here to positions 1..N). The LM is held by reference (frozen, not a
    submodule); the sink's keys/values are computed from it, not stored."""

    def __init__(self, lm: FrozenLM, width: int):
        super().__init__()
        if getattr(lm.model.base_model, "rotary_emb", None) is None:
            raise ValueError(f"the readout memory rotates its keys with the LM's RoPE; {lm.name} "
                             f"({type(lm.model).__name__}) has none: use a RoPE LM (Llama, Qwen2, SmolLM2, ...)")
        self._lm = [lm]
        self.L, self.H, self.D = lm.num_layers, lm.num_kv_heads, lm.head_dim
        self.proj = nn.Linear(width, self.L * 2 * self.H * self.D)  # d → L·2·H·D
        ids = torch.tensor([[lm.tokenizer.convert_tokens_to_ids(SINK)]], device=lm.device)
        cache = lm._cache(None, 1)
        with torch.no_grad():
            lm._body(ids, torch.ones_like(ids), torch.zeros_like(ids), cache)
        # (L, H, 1, D)
        self.register_buffer("sink_k", torch.stack([la.keys[0] for la in cache.layers]).float(), persistent=False)
        self.register_buffer("sink_v", torch.stack([la.values[0] for la in cache.layers]).float(), persistent=False)

    @torch.no_grad()
    def set_linear(self, W: Tensor) -> None:
        """From a ridge solution on [features, 1]: W (d + 1, L·2·H·D)."""
        self.proj.weight.copy_(W[:-1].T)
        self.proj.bias.copy_(W[-1])

    def kv(self, phi: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N, d) → pre-RoPE keys and values, each (B, L, H, N, D)."""
        B, N = phi.shape[:2]
        y = self.proj(phi).view(B, N, self.L, 2, self.H, self.D).permute(3, 0, 2, 4, 1, 5)  # (2, B, L, H, N, D)
        return y[0], y[1]

    def forward(self, phi: Tensor) -> Prefix:
        """(B, N, d) → Prefix with keys/values (B, L, H, 1 + N, D)."""
        k, v = self.kv(phi)
        B, N = phi.shape[:2]
        flat = k.reshape(B * self.L, self.H, N, self.D)
        pos = torch.arange(1, N + 1, device=phi.device)[None]
        cos, sin = self._lm[0].model.base_model.rotary_emb(flat, pos)
        k = apply_rotary_pos_emb(flat, flat, cos.to(flat.dtype), sin.to(flat.dtype))[1].view_as(k)
        sk, sv = (s.to(k.dtype).expand(B, *s.shape) for s in (self.sink_k, self.sink_v))
        return Prefix(torch.cat([sk, k], 3), torch.cat([sv, v], 3))
