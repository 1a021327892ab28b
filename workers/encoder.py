"""Encoder actors: documents → modulations + retrieval vectors, one amortizer forward per chunk, no gradient steps.

Each actor loads the checkpoint once, on the device of what Ray assigned it: the GPU it was given when it asked for
one (``IngestConfig.gpus_per_worker``; the frozen LM then runs in bf16, or fp16 where bf16 is unsupported), else the
CPU. Encoding is a pure function of (checkpoint, document), so a call interrupted by the actor's death is simply
retried on the restarted actor (max_task_retries=-1).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict

import ray
import torch

from pipeline.model.mac import MACModel, assigned_device, checkpoint_dir
from pipeline.schemas import Document, EncodedChunk, EncodeFailure

log = logging.getLogger(__name__)


@ray.remote(max_restarts=-1, max_task_retries=-1)
class EncoderActor:
    def __init__(self, checkpoint: str | None, threads: int = 1):
        torch.set_num_threads(threads)
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        self.device = assigned_device(self.gpu_ids)
        self.model = MACModel.load(checkpoint_dir(checkpoint)).eval()
        if self.device.type != "cpu":
            self.model.to_device(self.device)
        elif self.gpu_ids:
            log.warning("encoder was assigned GPU %s but torch has no CUDA here: encoding on the CPU", self.gpu_ids)

    def identity(self) -> tuple[str, str]:
        return self.model.version, self.model.model_id

    def pid(self) -> int:
        return os.getpid()

    def placement(self) -> dict:
        """Where this actor runs and computes: Ray node id, the GPU ids Ray assigned (CUDA_VISIBLE_DEVICES), the
        torch device and the frozen LM's dtype."""
        return {"node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": self.gpu_ids,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": str(self.device),
                "lm_dtype": str(self.model.lm.model.dtype), "pid": os.getpid()}

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
