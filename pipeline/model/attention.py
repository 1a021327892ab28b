"""Pre-LN cross-attention block shared by the question encoder and the aggregator.

No positional encoding anywhere: attention over the keys is a set operation, so permuting the key/value set
(with its mask and bias) leaves the output unchanged — the aggregator's permutation invariance rests on this.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CrossAttentionBlock(nn.Module):
    """x ← x + MHA(LN(x), LN(mem)); x ← x + FFN(LN(x)). Returns the new x and the attention probabilities."""

    def __init__(self, width: int, mem_width: int, heads: int, head_dim: int, ffn_mult: int):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.ln_q, self.ln_kv, self.ln_ffn = nn.LayerNorm(width), nn.LayerNorm(mem_width), nn.LayerNorm(width)
        self.q = nn.Linear(width, inner)
        self.kv = nn.Linear(mem_width, 2 * inner)
        self.out = nn.Linear(inner, width)
        self.ffn = nn.Sequential(nn.Linear(width, ffn_mult * width), nn.GELU(), nn.Linear(ffn_mult * width, width))

    def forward(
        self, x: Tensor, mem: Tensor, mem_mask: Tensor | None = None, bias: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """x: (B, Q, width); mem: (B, S, mem_width); mem_mask: (B, S) bool, True = real; bias: (B, S) added to logits.

        Returns x: (B, Q, width) and attention probabilities (B, heads, Q, S).
        """
        B, Q, _ = x.shape
        S = mem.shape[1]
        q = self.q(self.ln_q(x)).view(B, Q, self.heads, self.head_dim).transpose(1, 2)  # (B, h, Q, d)
        # (B, h, S, d) each
        k, v = self.kv(self.ln_kv(mem)).view(B, S, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-1, -2) / self.head_dim**0.5  # (B, h, Q, S)
        if bias is not None:
            logits = logits + bias[:, None, None, :].to(logits.dtype)
        if mem_mask is not None:
            logits = logits.masked_fill(~mem_mask[:, None, None, :], torch.finfo(logits.dtype).min)
        probs = logits.softmax(-1)
        ctx = (probs @ v).transpose(1, 2).reshape(B, Q, self.heads * self.head_dim)  # (B, Q, h·d)
        x = x + self.out(ctx)
        x = x + self.ffn(self.ln_ffn(x))
        return x, probs
