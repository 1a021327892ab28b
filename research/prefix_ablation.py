"""Is what the prefix adds to mac+rag specific to the retrieved documents? Same prompts (``--mode mac+rag``: the
top-k retrieved texts, retriever order; ``--mode mac+rag@1``: the one text the aggregator weighs most), three
prefixes: the aggregation of the retrieved documents' modulations, the aggregation of k random other documents'
modulations, and none. Synthetic test split: unseen companies.

    HF_HUB_OFFLINE=1 .venv/bin/python -m research.prefix_ablation [--checkpoint DIR] [--mode mac+rag@1] [--questions 96]

If the two prefixes score alike, the prefix works as a learned, document-independent soft prompt, not as memory.
"""

from __future__ import annotations

import argparse
import random

import torch

from benchmarks.machine import machine
from pipeline.answering import prepare
from pipeline.data import synthetic
from pipeline.evaluate import build_memory
from pipeline.metrics import aggregate, score_answer
from pipeline.model.mac import MACModel, checkpoint_dir


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="default: the shipped checkpoint")
    ap.add_argument("--entities", type=int, default=20)
    ap.add_argument("--questions", type=int, default=96)
    ap.add_argument("--top-k", dest="top_k", type=int, default=4)
    ap.add_argument("--mode", default="mac+rag", help="mac+rag or mac+rag@N: what the prompts hold")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = MACModel.load(checkpoint_dir(args.checkpoint)).eval()
    docs, questions = synthetic.generate("test", args.entities)
    questions = [q for q in questions if q.doc_ids][: args.questions]
    bank = build_memory(model, docs, progress=False)
    hits = bank.search(model.encoder.embed([q.question for q in questions]).numpy(), args.top_k)
    rng = random.Random(0)
    tok = model.lm.tokenizer
    rows: dict[str, list[dict]] = {f"retrieved documents' prefix ({args.mode})": [], "random documents' prefix": [],
                                   "no prefix": []}
    for s in range(0, len(questions), 16):
        qs, hs = questions[s: s + 16], hits[s: s + 16]
        prompts, prefix, _ = prepare(model, args.mode, [q.question for q in qs], hs)
        others = []
        for h in hs:
            mine = {x.document.id for x in h}
            pick = rng.sample([d for d in bank.document_ids() if d not in mine], args.top_k)
            others.append([(bank.chunks(d)[0].modulation, 0.0) for d in pick])
        random_prefix, _ = model.memory_prefix([q.question for q in qs], others)
        ids = [tok(p)["input_ids"] for p in prompts]
        for name, pre in zip(rows, (prefix, random_prefix, None)):
            for q, out in zip(qs, model.lm.generate(ids, pre, 16)):
                rows[name].append(score_answer(tok.decode(out).strip(), q.answers))
    print(f"machine: {machine()}; checkpoint {model.version}; synthetic test, {args.entities} companies, "
          f"{len(questions)} questions, top-{args.top_k}, mode {args.mode}, greedy, 16 new tokens; "
          "identical prompts in every row")
    for name, r in rows.items():
        a = aggregate(r)
        print(f"  {name}: F1 {a['f1']:.1f}, EM {a['em']:.1f}")


if __name__ == "__main__":
    main()
