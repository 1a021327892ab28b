"""Best window vs whole article in the prompt of ``mac+rag@1`` on real-length news: accuracy, prompt tokens, time.

How it is measured (printed with the results): RealTimeQA 2022 questions that come with the news articles a search
engine returned for them (whole articles, ~1,500 tokens, several 256-token windows) plus their evidence snippets, all
in one in-process memory; top-k 4. For each batch of questions the aggregator picks the document it weighs most
(``mac+rag@1``); the prompt then holds either that document's best window (what the product does) or its whole text
(what it did before), with the same prefix. Both variants run on the same batches one after the other, alternating
which goes first; greedy answers are scored by token F1 against the correct choice, and multiple-choice accuracy by
the choices' likelihood. One torch thread.

    python -m benchmarks.context_window --questions 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.machine import machine
from benchmarks.serve import _corpus
from pipeline.answering import prepare
from pipeline.evaluate import build_memory
from pipeline.metrics import score_answer
from pipeline.model.mac import MACModel, checkpoint_dir
from pipeline.prompts import document_text
from pipeline.scoring import choice_accuracy


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--checkpoint")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = MACModel.load(checkpoint_dir(args.checkpoint)).eval()
    docs, questions = _corpus("realtimeqa", args.questions)
    bank = build_memory(model, docs, progress=False)
    tok = model.lm.tokenizer
    rows: dict[str, list[dict]] = {"best window": [], "whole article": []}
    for s in range(0, len(questions), args.batch):
        qs = questions[s: s + args.batch]
        hits = bank.search(model.encoder.embed([q.question for q in qs]).numpy(), 4)
        with torch.no_grad():
            prompts, prefix, mass = prepare(model, "mac+rag@1", [q.question for q in qs], hits)
        whole = []
        for p, h, m in zip(prompts, hits, mass):  # same document, its whole text instead of its best window
            doc = max({x.document.id: x.document for x in h}.values(),
                      key=lambda d: sum(float(w) for x, w in zip(h, m) if x.document.id == d.id))
            chosen = next(model.window_text(doc, x.chunk.modulation.chunk) for x in h if x.document.id == doc.id
                          and model.window_text(doc, x.chunk.modulation.chunk) in p)
            whole.append(p.replace(chosen, document_text(doc), 1))
        variants = {"best window": prompts, "whole article": whole}
        for name in (list(variants) if (s // args.batch) % 2 == 0 else list(variants)[::-1]):
            ids = [tok(p)["input_ids"] for p in variants[name]]
            t0 = time.perf_counter()
            outs = model.lm.generate(ids, prefix, 16)
            secs = (time.perf_counter() - t0) / len(qs)
            mc = choice_accuracy(model, qs, variants[name], prefix)
            for q, o, i, acc in zip(qs, outs, ids, mc):
                rows[name].append({"f1": score_answer(tok.decode(o).strip(), q.answers)["f1"], "mc": acc,
                                   "prompt_tokens": len(i), "seconds": secs})
    out = {name: {"f1": 100 * statistics.mean(r["f1"] for r in rs), "mc_accuracy": 100 * statistics.mean(r["mc"] for r in rs),
                  "prompt_tokens": statistics.mean(r["prompt_tokens"] for r in rs),
                  "generate_seconds_per_question": statistics.mean(r["seconds"] for r in rs)} for name, rs in rows.items()}
    out["how"] = {"questions": len(questions), "documents": len(docs), "chunks": bank.num_chunks, "top_k": 4,
                  "checkpoint": model.version, "machine": machine(), "threads": 1,
                  "method": __doc__.split("How it is measured (printed with the results): ")[1].split("\n\n")[0]}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
