"""The question encoder: T learned queries cross-attend to the question's encoder token states.

This stands in for T5's decoder fed T learned query embeddings (the MAC reference code): each of the T outputs is
projected to the LM's width, so the aggregator compares the question with the stored modulations (T × d_LM) in the
same space. The encoder backbone is frozen; this head is trained by the selection stage of ``train-readout``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.model.attention import CrossAttentionBlock


class QueryHead(nn.Module):
    """Encoder token states (N, S, d_enc) → T tokens of width d_LM: (N, T, d_LM). One forward, no gradient steps."""

    def __init__(self, enc_width: int, lm_width: int, num_tokens: int, blocks: int, heads: int, head_dim: int,
                 ffn_mult: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_tokens, enc_width) * 0.02)  # (T, d_enc)
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(enc_width, enc_width, heads, head_dim, ffn_mult) for _ in range(blocks)
        )
        self.ln = nn.LayerNorm(enc_width)
        self.proj = nn.Sequential(nn.Linear(enc_width, lm_width), nn.GELU(), nn.Linear(lm_width, lm_width))
        self.token_bias = nn.Parameter(torch.zeros(num_tokens, lm_width))  # lets each slot specialise cheaply

    def forward(self, states: Tensor, mask: Tensor) -> Tensor:
        x = self.queries.expand(states.shape[0], -1, -1)  # (N, T, d_enc)
        m = mask.bool()
        for block in self.blocks:
            x, _ = block(x, states, m)
        return self.proj(self.ln(x)) + self.token_bias  # (N, T, d_LM)
