"""``macstream bench quality``: every answer mode evaluated on the synthetic test split (entities never seen in
training) and on RealTimeQA 2024 (when its data is present)."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import torch

from benchmarks.machine import machine
from pipeline.data import realtimeqa, synthetic
from pipeline.evaluate import evaluate
from pipeline.model.mac import MACModel, checkpoint_dir
from pipeline.scoring import EvalSettings

# base, rag, mac, mac+rag, plus one document's text in the prompt: the retriever's best (rag@1) or the aggregator's, with
# its memory (mac+rag@1) or behind the answer prompt (select+rag@1)
QUALITY_MODES = ("base", "rag", "rag@1", "mac", "mac+rag", "mac+rag@1", "select+rag@1")


def run(checkpoint: str | None = None, entities: int = 60, rtqa_questions: int = 200, top_k: int = 4,
        modes: tuple[str, ...] = QUALITY_MODES) -> dict:
    """``macstream eval`` on the synthetic test split (unseen entities) and on RealTimeQA 2024 (when present)."""
    model = MACModel.load(checkpoint_dir(checkpoint))
    out: dict = {"datasets": {}}
    sets = {"synthetic-test": (*synthetic.generate("test", entities, seed=0), True)}
    if realtimeqa.available():
        sets["realtimeqa-2024"] = (*realtimeqa.load([2024]), False)
    for name, (docs, questions, retention) in sets.items():
        t0 = time.perf_counter()
        limit = rtqa_questions if name.startswith("realtimeqa") else None
        rep = evaluate(model, docs, questions, EvalSettings(modes=modes, top_k=top_k, retention=retention,
                                                           limit=limit))
        rep.pop("rows")
        rep["seconds"] = time.perf_counter() - t0
        out["datasets"][name] = rep
    out["how"] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
                  "threads": torch.get_num_threads(),
                  "checkpoint": model.version, "answer_prompt": model.prompt_version, "modes": list(modes),
                  "top_k": top_k, "synthetic_entities": entities,
                  "realtimeqa_questions": rtqa_questions,
                  "method": "every document of the dataset streamed into an in-process memory in published_at order "
                            "(one amortizer forward per chunk), then every question answered greedily in each mode "
                            "(pipeline/evaluate.py); retention: F1 on the first eighth's questions as the memory grows"}
    return out
