"""Encoder actors: documents → modulations + retrieval vectors, one amortizer forward per chunk, no gradient steps.

Each actor loads the checkpoint once. Encoding is a pure function of (checkpoint, document), so a call interrupted
by the actor's death is simply retried on the restarted actor (max_task_retries=-1).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict

import ray
import torch

from pipeline.model.mac import MACModel, checkpoint_dir
from pipeline.schemas import Document, EncodedChunk, EncodeFailure

log = logging.getLogger(__name__)


@ray.remote(max_restarts=-1, max_task_retries=-1)
class EncoderActor:
    def __init__(self, checkpoint: str | None, threads: int = 1):
        torch.set_num_threads(threads)
        self.model = MACModel.load(checkpoint_dir(checkpoint)).eval()

    def identity(self) -> tuple[str, str]:
        return self.model.version, self.model.model_id

    def pid(self) -> int:
        return os.getpid()

    def encode(self, docs: list[Document]) -> list[list[EncodedChunk] | EncodeFailure]:
        """Per document, in order: its chunks, or why it failed (the document is then dead-lettered)."""
        try:
            by_doc = defaultdict(list)
            for c in self.model.encode_documents(docs):
                by_doc[c.modulation.doc_id].append(c)
            return [by_doc[d.id] for d in docs]
        except Exception:  # isolate the document that fails; the others still go through
            out = []
            for d in docs:
                try:
                    out.append(self.model.encode_documents([d]))
                except Exception as err:  # noqa: BLE001 - any failure of one document is that document's problem
                    log.warning("encode failed for %s: %s", d.id, err)
                    out.append(EncodeFailure(d.id, f"{type(err).__name__}: {err}"[:500]))
            return out
