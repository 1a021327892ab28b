"""The stored unit: one modulation φ ∈ R^{T × d_LM} per document chunk, float16 on disk.

A modulation is only meaningful to the checkpoint that produced it: :func:`ensure_compatible` refuses to aggregate
modulations of another checkpoint version (or of another LM) with a :class:`CheckpointMismatch`.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np


class CheckpointMismatch(ValueError):
    """A modulation produced by one checkpoint was handed to another."""


@dataclass(frozen=True)
class Modulation:
    doc_id: str
    chunk: int  # index of this window within its document
    n_chunks: int  # windows the document was split into
    tokens: np.ndarray  # (T, d_LM) float16
    model_id: str  # "<lm>|<encoder>"
    checkpoint: str  # checkpoint version (content hash of its weights)

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2:
            raise ValueError(f"modulation tokens: expected (T, d_LM), got {self.tokens.shape}")
        if self.tokens.dtype != np.float16:
            object.__setattr__(self, "tokens", self.tokens.astype(np.float16))

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes

    def tokens_b64(self) -> str:
        """Raw little-endian float16 bytes, base64 (JSON-safe payloads)."""
        return base64.b64encode(self.tokens.astype("<f2").tobytes()).decode()

    @staticmethod
    def decode_tokens(b64: str, num_tokens: int) -> np.ndarray:
        return np.frombuffer(base64.b64decode(b64), dtype="<f2").reshape(num_tokens, -1)

    def tensor(self):
        """The tokens as a float32 torch tensor (T, d_LM). torch is imported here only: the record stays light."""
        import torch

        return torch.from_numpy(self.tokens.astype(np.float32))


def ensure_compatible(mods: list[Modulation], checkpoint: str, model_id: str) -> None:
    """Raise :class:`CheckpointMismatch` naming the first modulation not produced by this checkpoint/model."""
    for m in mods:
        if m.checkpoint != checkpoint or m.model_id != model_id:
            raise CheckpointMismatch(
                f"modulation of document {m.doc_id!r} was produced by checkpoint {m.checkpoint!r} ({m.model_id}); "
                f"this model is checkpoint {checkpoint!r} ({model_id}). Re-encode the documents with this checkpoint."
            )
