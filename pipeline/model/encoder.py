"""The pretrained text encoder shared by the question encoder and retrieval.

One frozen backbone (default all-MiniLM-L6-v2) gives (1) a question's token states for the question encoder's query
head and (2) the mean-pooled, L2-normalised sentence embedding that the store uses as the retrieval vector (the
sentence-transformers recipe for this model) of a question or of a document window. ``window_spans`` and
``split_windows`` also cut documents into the overlapping LM-token windows the memory stores one modulation each of.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer

from pipeline.model.lm import pad_batch
from pipeline.model.weights import resolve_encoder


def window_spans(n: int, span: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) token ranges of windows of at most ``span`` tokens covering all ``n``; consecutive windows share
    ``overlap`` tokens."""
    if n <= span:
        return [(0, n)]
    step = span - overlap
    return [(s, min(s + span, n)) for s in range(0, max(1, n - overlap), step)]


def split_windows(ids: list[int], span: int, overlap: int) -> list[list[int]]:
    """Windows of at most ``span`` tokens covering every token; consecutive windows share ``overlap`` tokens."""
    return [ids[a:b] for a, b in window_spans(len(ids), span, overlap)]


class TextEncoder(nn.Module):
    """Frozen pretrained encoder; its top ``unfreeze`` layers can be made trainable (the product never does)."""

    def __init__(self, name: str, max_tokens: int = 256, overlap: int = 32, unfreeze: int = 0):
        super().__init__()
        path = resolve_encoder(name)
        self.backbone = AutoModel.from_pretrained(path, dtype=torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.max_tokens, self.overlap = max_tokens, overlap
        self.width: int = self.backbone.config.hidden_size
        self.backbone.requires_grad_(False)
        layers = self.backbone.encoder.layer
        for layer in layers[len(layers) - unfreeze:] if unfreeze else []:
            layer.requires_grad_(True)
        self.backbone.eval()

    def train(self, mode: bool = True) -> TextEncoder:  # no dropout in the backbone, ever
        return super().train(False)

    def chunk(self, text: str) -> list[list[int]]:
        """Token windows (without special tokens) covering the whole text; consecutive windows overlap."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return split_windows(ids, self.max_tokens - 2, self.overlap)  # room for [CLS] and [SEP]

    def batch(self, pieces: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Wrap token windows with special tokens and right-pad them. Returns ids, mask: (N, S)."""
        tok = self.tokenizer
        return pad_batch(
            [[tok.cls_token_id, *p, tok.sep_token_id] for p in pieces], tok.pad_token_id, self.backbone.device
        )

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """(N, S) token ids → (N, S, d_enc) token states."""
        return self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state

    @staticmethod
    def sentence_embedding(states: Tensor, mask: Tensor) -> Tensor:
        """Mean over real tokens, L2-normalised: (N, S, d_enc) → (N, d_enc) (cosine = dot product)."""
        m = mask.unsqueeze(-1).to(states.dtype)
        return nn.functional.normalize((states * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 64) -> Tensor:
        """Retrieval vectors of texts (first window of each): (N, d_enc), unit norm."""
        out = []
        for i in range(0, len(texts), batch_size):
            ids, mask = self.batch([self.chunk(t)[0] for t in texts[i: i + batch_size]])
            out.append(self.sentence_embedding(self(ids, mask), mask))
        return torch.cat(out) if out else torch.zeros(0, self.width)
