"""The online fine-tuner: a private, trainable copy of the frozen LM that takes K optimiser steps on each document of a
stream (the shared LM is never touched)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import numpy as np
import torch

from pipeline.baselines.memory_use import PeakRSS, release_memory, rss_bytes
from pipeline.baselines.salient import document_tokens
from pipeline.config import FinetuneConfig
from pipeline.model.lm import FrozenLM, pad_batch
from pipeline.schemas import Document
from pipeline.scoring import stream_order


def config_for(finetune, mode: str) -> FinetuneConfig:
    """The config of ``mode`` from ``None`` (defaults), one :class:`FinetuneConfig` for every mode, or a dict
    {mode: FinetuneConfig | dict}."""
    if finetune is None:
        return FinetuneConfig()
    if isinstance(finetune, FinetuneConfig):
        return finetune
    got = finetune.get(mode)
    if got is None:
        return FinetuneConfig()
    return got if isinstance(got, FinetuneConfig) else FinetuneConfig.model_validate(got)


def _optimizer(params, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    try:  # fused AdamW: one kernel for all parameters (on this CPU 0.1 s per step vs 0.3-0.7 s for foreach)
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class OnlineFinetuner:
    """A private, trainable copy of a frozen LM for one pass over a stream. Use it as a context manager: the copy
    and its optimiser are dropped on exit, so every run starts from the shared LM's unchanged weights.

    ``view`` is a :class:`FrozenLM` over the copy: the same generation and choice scoring as the shared LM.
    """

    def __init__(self, lm: FrozenLM, cfg: FinetuneConfig, salient: bool):
        if lm.tokenizer is None:
            raise ValueError("online fine-tuning needs the LM's tokenizer")
        self.lm, self.cfg, self.salient = lm, cfg, salient
        self.documents_seen = 0
        self.model = copy.deepcopy(lm.model)  # the shared model is only read, here and never again
        self.view = FrozenLM(self.model, lm.tokenizer, name=f"{lm.name}+{'ft-salient' if salient else 'ft-uniform'}")
        self.view._stop_ids = lm.stop_ids()  # same tokenizer: skip rescanning the vocabulary
        self.model.requires_grad_(True)  # FrozenLM froze the copy; train it (it stays in eval mode: no dropout)
        self.optimizer = _optimizer([p for p in self.model.parameters()], cfg)

    def __enter__(self) -> OnlineFinetuner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Drop the copy, its gradients and the optimiser state."""
        self.model = self.view = self.optimizer = None
        release_memory()

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def state_bytes(self) -> int:
        """Bytes of the copy's parameters + their gradients + the optimiser state (tensors counted once)."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        opt = {t.data_ptr(): t.numel() * t.element_size() for st in self.optimizer.state.values()
               for t in st.values() if torch.is_tensor(t) and t.dim() > 0}
        return 2 * params + sum(opt.values())

    def batch(self, doc: Document) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(ids, attention mask, labels) of a document's windows; labels are -100 where the loss does not look.
        None when no token after a window's first is in the loss (nothing to learn from)."""
        ids, mask = document_tokens(self.lm.tokenizer, doc, self.salient)
        n = self.cfg.max_tokens
        wins = [(ids[s: s + n], mask[s: s + n]) for s in range(0, len(ids), n)]
        wins = [(i, m) for i, m in wins if any(m[1:])]  # the first token of a window is never predicted
        if not wins:
            return None
        dev = self.view.device
        x, att = pad_batch([i for i, _ in wins], self.lm.pad_id, dev)
        keep, _ = pad_batch([[int(b) for b in m] for _, m in wins], 0, dev)
        labels = torch.where((keep > 0) & (att > 0), x, torch.full_like(x, -100))
        return x, att, labels

    def adapt(self, doc: Document) -> dict:
        """K optimiser steps on one document. Returns its costs: seconds, peak RSS (bytes), steps, loss before/after."""
        t0 = time.perf_counter()
        out = {"steps": 0, "loss_tokens": 0}
        with PeakRSS() as mem:
            batch = self.batch(doc)
            if batch is not None:
                x, att, labels = batch
                out["loss_tokens"] = int((labels[:, 1:] != -100).sum())
                with torch.enable_grad():
                    for k in range(self.cfg.steps):
                        loss = self.model(input_ids=x, attention_mask=att, labels=labels, use_cache=False).loss
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                        out["loss_first" if k == 0 else "loss_last"] = float(loss.detach())
                out["steps"] = self.cfg.steps
        self.documents_seen += 1
        return out | {"seconds": time.perf_counter() - t0, "peak_rss": mem.peak}


def run_stream(lm: FrozenLM, docs: list[Document], cfg: FinetuneConfig, salient: bool,
               evaluate_at: dict[int, Callable[[FrozenLM], None]] | None = None, progress: bool = False) -> dict:
    """Fine-tune a fresh copy of ``lm`` online over ``docs`` (sorted into stream order). After the n-th document
    (n = 1..len; n = 0 is before the first) calls ``evaluate_at[n](view)`` with the copy as it is then. The copy is
    dropped at the end. Returns the adaptation costs (per document and summarised)."""
    from tqdm import tqdm

    docs, evaluate_at = stream_order(docs), evaluate_at or {}
    bad = [n for n in evaluate_at if not 0 <= n <= len(docs)]
    if bad:
        raise ValueError(f"evaluate_at positions {bad} are outside 0..{len(docs)}")
    release_memory()
    baseline = rss_bytes()  # before the copy: the copy is part of what fine-tuning costs
    per_doc = []
    with OnlineFinetuner(lm, cfg, salient) as ft:
        if 0 in evaluate_at:
            evaluate_at[0](ft.view)
        for n, doc in enumerate(tqdm(docs, desc="ft-salient" if salient else "ft-uniform", disable=not progress), 1):
            per_doc.append(ft.adapt(doc) | {"id": doc.id})
            if n in evaluate_at:
                evaluate_at[n](ft.view)
        state, trainable = ft.state_bytes(), ft.trainable_parameters
    secs = [d["seconds"] for d in per_doc]
    return {
        "method": "full fine-tuning (every LM parameter; no LoRA: peft is not installed and the 135M LM fits)",
        "config": cfg.model_dump(),
        "trainable_parameters": trainable,
        "documents": len(docs),
        "documents_trained": sum(1 for d in per_doc if d["steps"]),
        "seconds_per_document": float(np.mean(secs)) if secs else 0.0,
        "seconds_per_document_max": float(np.max(secs)) if secs else 0.0,
        "seconds_total": float(np.sum(secs)),
        "peak_rss_mb": max((d["peak_rss"] for d in per_doc), default=baseline) / 2**20 - baseline / 2**20,
        "state_mb": state / 2**20,
        "loss_tokens_per_document": float(np.mean([d["loss_tokens"] for d in per_doc])) if per_doc else 0.0,
        "per_document": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items() if k != "peak_rss"}
                         | {"peak_rss_mb": round((d["peak_rss"] - baseline) / 2**20, 1)} for d in per_doc],
    }


# ---- evaluation of one mode over one stream --------------------------------------------------------------------------
