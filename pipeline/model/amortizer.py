"""Amortization network and question encoder: T learned queries cross-attend to encoder token states.

This stands in for T5's decoder fed T learned query embeddings (the reference code): each of the T outputs is
projected to the LM's width. One instance encodes documents into modulations φ_d (question-independent); a second
instance (own weights, same backbone) encodes questions into T query tokens for the aggregator.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.model.attention import CrossAttentionBlock


class QueryHead(nn.Module):
    """Encoder token states (N, S, d_enc) → T tokens of width d_LM: (N, T, d_LM). One forward, no gradient steps."""

    def __init__(self, enc_width: int, lm_width: int, num_tokens: int, blocks: int, heads: int, head_dim: int, ffn_mult: int):
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


class PointerHead(nn.Module):
    """T slots point into the document: (N, S) tokens → (N, T, d_LM) in the frozen LM's input-embedding space.

    Each slot attends over the document's tokens with keys from the LM's (standardised) hidden states, and reads the
    LM's own input embeddings of those tokens, plus a zero-initialised residual of the states and a per-slot bias. A
    learned temperature lets attention start sharp, so a slot carries specific tokens (a name, a number) instead of
    the document's average — the modulation depends on the document from the first step. Slots are put in document
    order (by the position each points at), so the frozen LM, which reads the result as T soft input tokens (expander
    ``lm``), sees the pieces of a name in their order. The per-slot bias follows the slot's rank, not its query.
    """

    def __init__(self, width: int, num_tokens: int, key_dim: int = 128, init_log_scale: float = -1.0):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.key = nn.Linear(width, key_dim)
        self.queries = nn.Parameter(torch.randn(num_tokens, key_dim))  # (T, d_k); unit scale: sharp from the start
        self.log_scale = nn.Parameter(torch.tensor(init_log_scale))
        self.residual = nn.Linear(width, width)
        nn.init.zeros_(self.residual.weight)
        nn.init.zeros_(self.residual.bias)
        self.token_bias = nn.Parameter(torch.zeros(num_tokens, width))

    def forward(self, states: Tensor, embeds: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """states, embeds: (N, S, d_LM); mask: (N, S), 1 = real token. Returns φ (N, T, d_LM) and attention (N, T, S)."""
        k = self.key(self.ln(states))  # (N, S, d_k)
        logits = torch.einsum("td,nsd->nts", self.queries, k) * self.log_scale.exp()  # (N, T, S)
        logits = logits.masked_fill(~mask.bool()[:, None], torch.finfo(logits.dtype).min)
        attn = logits.softmax(-1)
        # slots in document order (by the position each points at), so the LM reads e.g. a name's pieces in order;
        # the permutation carries no gradient, the values it moves do
        where = (attn * torch.arange(attn.shape[-1], device=attn.device, dtype=attn.dtype)).sum(-1)  # (N, T)
        attn = attn.gather(1, where.argsort(1)[..., None].expand_as(attn))
        return attn @ embeds + self.residual(attn @ states) + self.token_bias, attn
