"""``macstream diagnose``: does the memory carry the document? Two cheap, decisive measurements of a checkpoint.

1. **Document dependence**: mean answer NLL with the gold document as the only memory, against the same questions with
   another entity's document as the only memory. Equal numbers mean the prefix ignores the document (whatever the
   answers look like); the gap is how much of the answer the memory carries.
2. **Gold-only answers**: greedy EM/F1 with the gold document as the only memory (no retrieval, no selection): the
   ceiling of what the modulation carries, next to the same questions answered by the base LM and by RAG-1 (the gold
   text in the prompt).
Run on the synthetic validation split (entities never seen in training) unless ``--split test``.
"""

from __future__ import annotations

import random

import torch

from pipeline.answering import answer
from pipeline.data import synthetic
from pipeline.metrics import aggregate, score_answer
from pipeline.model.mac import MACModel
from pipeline.prompts import MAC_PROMPT
from pipeline.schemas import Hit


@torch.no_grad()
def diagnose(model: MACModel, split: str = "validation", entities: int = 30, questions: int = 60, seed: int = 0) -> dict:
    model.eval()
    docs, qs = synthetic.generate(split, entities, seed=seed)
    by_id = {d.id: d for d in docs}
    items = [(q, by_id[q.doc_ids[0]]) for q in qs if q.doc_ids and q.doc_ids[0] in by_id]
    items = random.Random(seed).sample(items, min(questions, len(items)))
    chunks = {c.modulation.doc_id: c for c in model.encode_documents(docs) if c.modulation.chunk == 0}
    entity = lambda doc_id: doc_id.rsplit("-", 1)[0]  # noqa: E731
    others = []  # for each question: the next article in the split about another company
    for _, doc in items:
        i = docs.index(doc)
        others.append(next(d for d in docs[i + 1:] + docs[:i] if entity(d.id) != entity(doc.id)))
    out: dict = {"split": split, "questions": len(items), "checkpoint": model.version}
    nll = {}
    for name, mem_docs in (("gold", [d for _, d in items]), ("other", others)):
        vals = []
        for s in range(0, len(items), 16):
            part = items[s: s + 16]
            memories = [[(chunks[d.id].modulation, 1.0)] for d in mem_docs[s: s + 16]]
            prefix, _ = model.memory_prefix([q.question for q, _ in part], memories)
            lp = model.answer_logprobs([MAC_PROMPT.format(question=q.question) for q, _ in part],
                                       [q.answers[0] for q, _ in part], prefix)
            vals += (-lp).tolist()
        nll[name] = sum(vals) / len(vals)
    out["nll_gold_memory"], out["nll_other_memory"] = nll["gold"], nll["other"]
    out["nll_gap"] = nll["other"] - nll["gold"]
    for mode in ("base", "mac", "rag"):
        rows = []
        for s in range(0, len(items), 16):
            part = items[s: s + 16]
            hits = [[Hit(chunks[d.id], d, 1.0)] for _, d in part]
            for (q, _), a in zip(part, answer(model, mode, [q.question for q, _ in part], hits, 16)):
                rows.append(score_answer(a.text, q.answers))
        out[f"gold_only_{mode}"] = aggregate(rows)
    return out
