"""Expander: the aggregated modulation φ* (T × d_LM) → P prefix key/value tokens for every LM layer.

Each of the L·P prefix slots mixes the T tokens with its own learned weights and adds a slot embedding (which
layer, which position); a shared residual FFN maps the slot to a key and a value sized H_kv × D_h (so GQA models get
num_key_value_heads, not num_attention_heads); each is RMS-normalised and given a per-layer, per-channel gain and
offset initialised from the frozen LM's own key/value statistics, so the prefix starts at the scale of the LM's
keys/values (its V std ranges 0.05 → 1.5 over SmolLM2's layers) instead of swamping attention.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.model.lm import Prefix


class Expander(nn.Module):
    def __init__(self, width: int, num_tokens: int, num_layers: int, prefix_len: int, kv_heads: int, head_dim: int, hidden: int):
        super().__init__()
        self.L, self.P, self.H, self.Dh = num_layers, prefix_len, kv_heads, head_dim
        slots, kvd = num_layers * prefix_len, kv_heads * head_dim
        self.mix = nn.Parameter(torch.full((slots, num_tokens), 1.0 / num_tokens))  # (L·P, T)
        self.slot = nn.Parameter(torch.randn(slots, width) * 0.02)  # (L·P, D)
        self.ln = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.ln_out = nn.LayerNorm(width)
        self.to_kv = nn.Linear(width, 2 * kvd)
        self.gain = nn.Parameter(torch.ones(num_layers, 2, kvd))  # (L, k|v, H_kv·D_h)
        self.offset = nn.Parameter(torch.zeros(num_layers, 2, kvd))

    @torch.no_grad()
    def calibrate(self, k_mean: Tensor, k_std: Tensor, v_mean: Tensor, v_std: Tensor) -> None:
        """Set gain/offset from the LM's per-layer key/value statistics, each (L, H_kv·D_h)."""
        self.gain.copy_(torch.stack([k_std, v_std], 1))
        self.offset.copy_(torch.stack([k_mean, v_mean], 1))

    def forward(self, phi: Tensor) -> Prefix:
        """φ*: (B, T, D) → Prefix with keys/values (B, L, H_kv, P, D_h)."""
        B = phi.shape[0]
        x = torch.einsum("st,btd->bsd", self.mix, phi) + self.slot  # (B, L·P, D)
        x = x + self.ffn(self.ln(x))
        y = self.to_kv(self.ln_out(x)).view(B, self.L, self.P, 2, self.H * self.Dh)  # (B, L, P, 2, H·Dh)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)  # unit RMS per slot
        y = y * self.gain[None, :, None] + self.offset[None, :, None]
        y = y.view(B, self.L, self.P, 2, self.H, self.Dh).permute(3, 0, 1, 4, 2, 5)  # (2, B, L, H_kv, P, D_h)
        return Prefix(y[0], y[1])


class TokenExpander(nn.Module):
    """P-tuning v2 prefix encoder over the aggregated tokens: prefix position p of every layer comes from token p.

    φ* (B, T, D) is first mixed to P tokens (the identity when P == T), then each token goes through one MLP
    D → hidden → L·2·H_kv·D_h (tanh, as in P-tuning v2), so every layer gets its own projection of every token and
    no token is averaged away. Output scale: per-layer, per-channel gain and offset from the LM's k/v statistics.
    """

    def __init__(self, width: int, num_tokens: int, num_layers: int, prefix_len: int, kv_heads: int, head_dim: int, hidden: int):
        super().__init__()
        self.L, self.P, self.H, self.Dh = num_layers, prefix_len, kv_heads, head_dim
        kvd = kv_heads * head_dim
        mix = torch.eye(prefix_len, num_tokens) if prefix_len == num_tokens else torch.full((prefix_len, num_tokens), 1.0 / num_tokens)
        self.mix = nn.Parameter(mix + torch.randn(prefix_len, num_tokens) * 0.01)  # (P, T)
        self.ln = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, num_layers * 2 * kvd))
        self.gain = nn.Parameter(torch.ones(num_layers, 2, kvd))  # (L, k|v, H_kv·D_h)
        self.offset = nn.Parameter(torch.zeros(num_layers, 2, kvd))

    calibrate = Expander.calibrate

    def forward(self, phi: Tensor) -> Prefix:
        """φ*: (B, T, D) → Prefix with keys/values (B, L, H_kv, P, D_h)."""
        B = phi.shape[0]
        x = torch.einsum("pt,btd->bpd", self.mix, phi)  # (B, P, D)
        y = self.mlp(self.ln(x)).view(B, self.P, self.L, 2, self.H * self.Dh)  # (B, P, L, 2, H·Dh)
        y = y * self.gain[None, None] + self.offset[None, None]
        y = y.view(B, self.P, self.L, 2, self.H, self.Dh).permute(3, 0, 2, 4, 1, 5)  # (2, B, L, H_kv, P, D_h)
        return Prefix(y[0], y[1])


class LMExpander(nn.Module):
    """The frozen LM as the expander: φ* (B, T, D) is read as T soft input tokens, and the keys/values the LM computes
    for them in every layer are the prefix (P = T). Nothing to learn here: the amortizer and aggregator learn to write
    in the LM's own input space. The LM is held by reference, not as a submodule (it is the MAC model's, frozen)."""

    def __init__(self, lm):
        super().__init__()
        self._lm = [lm]  # a list: not registered, so the LM is not saved or counted twice

    def calibrate(self, *stats: Tensor) -> None:  # the LM's own statistics apply by construction
        pass

    def forward(self, phi: Tensor) -> Prefix:
        return self._lm[0].soft_prefix(phi)
