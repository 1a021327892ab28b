"""Question-conditioned aggregation of a *set* of modulations into one, with hierarchical bucketing.

Queries are the question's T tokens; keys/values are the k retrieved modulations flattened to (k·T) tokens with no
positional encoding, so the result is invariant to the order of the set. The attention mass each document receives
(averaged over blocks, heads and query tokens, summed over the document's T tokens) is returned: it is what the
selection loss trains and the citation weight the server reports.

Hierarchical aggregation (sets larger than the bucket size M): split the set into ⌈k/M⌉ buckets, aggregate each
bucket conditioned on the question into one modulation, recurse until ≤ M remain, aggregate once more. Every input
modulation reaches the output (unlike the reference code, which dropped documents past ~150); memory O(M·T) per
bucket. A document's weight is its mass within its bucket times its bucket's mass one level up.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.model.attention import CrossAttentionBlock


class Aggregator(nn.Module):
    def __init__(
        self, width: int, blocks: int, heads: int, head_dim: int, ffn_mult: int, bucket_size: int, retrieval_bias: bool
    ):
        super().__init__()
        self.blocks = nn.ModuleList(CrossAttentionBlock(width, width, heads, head_dim, ffn_mult) for _ in range(blocks))
        self.ln = nn.LayerNorm(width)
        self.bucket_size = bucket_size
        # logit bias = scale · retriever cosine; starts at a useful temperature so the re-ranker begins at the prior
        self.bias_scale = nn.Parameter(torch.tensor(10.0)) if retrieval_bias else None

    def _flat(self, q: Tensor, mods: Tensor, mask: Tensor, scores: Tensor | None) -> tuple[Tensor, Tensor]:
        B, K, T, D = mods.shape
        mem = mods.reshape(B, K * T, D)  # (B, K·T, D): the set, flattened
        mem_mask = mask.repeat_interleave(T, 1)  # (B, K·T)
        bias = None
        if self.bias_scale is not None and scores is not None:
            bias = (self.bias_scale * scores).repeat_interleave(T, 1)  # (B, K·T)
        x, mass = q, 0.0
        for block in self.blocks:
            x, probs = block(x, mem, mem_mask, bias)  # probs: (B, h, T_q, K·T)
            mass = mass + probs.mean((1, 2))
        mass = (mass / len(self.blocks)).view(B, K, T).sum(-1)  # (B, K), rows sum to 1
        return self.ln(x), mass

    def forward(
        self, q: Tensor, mods: Tensor, mask: Tensor | None = None, scores: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """q: (B, T, D) question tokens; mods: (B, K, T, D); mask: (B, K) bool, True = present; scores: (B, K).

        Returns φ*: (B, T, D) and per-document attention mass (B, K) (0 where masked).
        """
        B, K, T, D = mods.shape
        if q.shape != (B, T, D):
            raise ValueError(f"question tokens: expected {(B, T, D)}, got {tuple(q.shape)}")
        mask = torch.ones(B, K, dtype=torch.bool, device=mods.device) if mask is None else mask.bool()
        if mask.shape != (B, K):
            raise ValueError(f"mask: expected {(B, K)}, got {tuple(mask.shape)}")
        if K <= self.bucket_size:
            phi, mass = self._flat(q, mods, mask, scores)
            return phi, mass * mask
        M = self.bucket_size
        G = -(-K // M)  # buckets
        pad = G * M - K
        mods_p = nn.functional.pad(mods, (0, 0, 0, 0, 0, pad))  # (B, G·M, T, D)
        mask_p = nn.functional.pad(mask, (0, pad), value=False)
        scores_p = None if scores is None else nn.functional.pad(scores, (0, pad), value=-1.0)
        phi_g, mass_g = self._flat(
            q.repeat_interleave(G, 0),  # (B·G, T, D): every bucket is conditioned on the same question
            mods_p.view(B * G, M, T, D), mask_p.view(B * G, M),
            None if scores_p is None else scores_p.view(B * G, M),
        )
        group_mask = mask_p.view(B, G, M).any(-1)  # (B, G)
        group_scores = None
        if scores_p is not None:
            group_scores = scores_p.view(B, G, M).masked_fill(~mask_p.view(B, G, M), -1.0).amax(-1)  # best in bucket
        phi, mass_top = self(q, phi_g.view(B, G, T, D), group_mask, group_scores)  # recurse: (B, T, D), (B, G)
        mass = (mass_top[:, :, None] * (mass_g.view(B, G, M) * mask_p.view(B, G, M))).view(B, G * M)[:, :K]
        return phi, mass
