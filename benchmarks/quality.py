"""``macstream bench quality``: every answer mode evaluated on the synthetic test split (entities never seen in
training) in the training style and in the other style (never trained on), and on RealTimeQA 2024 (when its data is
present); and the document pick on real news with full-length articles in the memory."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import torch

from benchmarks.machine import machine
from pipeline import news_selection
from pipeline.data import realtimeqa, synthetic
from pipeline.evaluate import evaluate
from pipeline.model.mac import MACModel, checkpoint_dir
from pipeline.scoring import EvalSettings

# base, rag, mac, mac+rag, plus one document's text in the prompt: the retriever's best (rag@1) or the aggregator's,
# with its memory (mac+rag@1) or behind the answer prompt (select+rag@1)
QUALITY_MODES = ("base", "rag", "rag@1", "mac", "mac+rag", "mac+rag@1", "select+rag@1")


def run(checkpoint: str | None = None, entities: int = 60, rtqa_questions: int = 200, top_k: int = 4,
        modes: tuple[str, ...] = QUALITY_MODES, news: bool = True) -> dict:
    """``macstream eval`` on the synthetic test split (unseen entities) and on RealTimeQA 2024 (when present); with
    ``news`` (and the data present) also the document pick on real news with full-length articles in the memory
    (``news_selection``: aggregator vs retriever top-1, pipeline/news_selection.py, its default sizes)."""
    model = MACModel.load(checkpoint_dir(checkpoint))
    out: dict = {"datasets": {}}
    sets = {"synthetic-test": (*synthetic.generate("test", entities, seed=0), True),
            # the other synthetic style: templates, name sounds and number formats the project never trains on
            "synthetic-other-test": (*synthetic.generate("test", entities, seed=0, style="other"), False)}
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
    if news and realtimeqa.available():
        sel = news_selection.run(model, top_ks=(top_k,))
        out["news_selection"] = {"pick_rule": sel["pick_rule"], "articles_from": sel["articles_from"], "top_k": top_k,
                                 "sets": {n: {k: v for k, v in r.items() if k not in ("records", "by_k")}
                                          | r["by_k"][str(top_k)] for n, r in sel["sets"].items()}}
    out["how"] = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
                  "threads": torch.get_num_threads(),
                  "checkpoint": model.version, "answer_prompt": model.prompt_version, "modes": list(modes),
                  "top_k": top_k, "synthetic_entities": entities,
                  "realtimeqa_questions": rtqa_questions,
                  "method": "every document of the dataset streamed into an in-process memory in published_at order "
                            "(one amortizer forward per chunk), then every question answered greedily in each mode "
                            "(pipeline/evaluate.py); retention: F1 on the first eighth's questions as the memory grows"}
    return out
