"""``make demo`` (engine stage): a news stream updates what a frozen LM knows, with no gradient step.

1. Generate a synthetic dated news stream about fictional companies the LM has never seen (test split: entities
   disjoint from training). 2. Stream all but a few articles into the memory and ask those articles' questions:
   the answers cannot be known yet. 3. Stream the missing articles in (one amortizer forward each) and ask again.
4. A short quality table: base LM vs MAC vs RAG on held-out questions. Runs on 2 CPU cores in a few minutes.
"""

from __future__ import annotations

import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .config import SHIPPED_CHECKPOINT  # noqa: E402
from .data import synthetic  # noqa: E402
from .evaluate import EvalSettings, answer_batch, build_memory, run_questions  # noqa: E402
from .mac import MACModel  # noqa: E402
from .metrics import aggregate  # noqa: E402


def _ask(model, bank, questions, mode):
    hits = bank.search(model.encoder.embed([q.question for q in questions]).numpy(), 4)
    return answer_batch(model, mode, questions, hits, EvalSettings(multiple_choice=False)), hits


def main() -> None:
    t0 = time.time()
    print(f"loading the frozen LM and the MAC checkpoint {SHIPPED_CHECKPOINT.name} ...")
    model = MACModel.load(SHIPPED_CHECKPOINT)
    model.eval()
    docs, questions = synthetic.generate("test", 40, seed=7)
    rng = random.Random(7)
    late = rng.sample(docs, 4)  # the articles that arrive later in the stream
    late_ids = {d.id for d in late}
    asked = [next(q for q in questions if q.doc_ids == [d.id]) for d in late]
    print(f"stream: {len(docs)} articles about {len({d.id.rsplit('-', 1)[0] for d in docs})} fictional companies")

    bank = build_memory(model, [d for d in docs if d.id not in late_ids], progress=False)
    before, _ = _ask(model, bank, asked, "mac")
    base, _ = _ask(model, bank, asked, "base")
    t = time.time()
    for d in late:  # the new articles arrive: one forward pass each, no fine-tuning
        bank.upsert(d, model.encode_documents([d]))
    print(f"streamed {len(late)} new articles into memory in {time.time() - t:.2f}s")
    after, hits = _ask(model, bank, asked, "mac")

    print()
    for q, b0, m0, m1, h in zip(asked, base, before, after, hits):
        print(f"Q: {q.question}\n   gold: {q.answers[0]}")
        print(f"   base LM              : {b0['prediction']!r}")
        print(f"   MAC, before arrival  : {m0['prediction']!r}")
        print(f"   MAC, after arrival   : {m1['prediction']!r}  ({'correct' if m1['em'] else 'wrong'})")
        top = max(h, key=lambda x: m1.get('weights', {}).get(x.document.id, 0))
        print(f"   cited: {top.document.title!r} ({top.document.published_at:%Y-%m-%d}), weight "
              f"{m1.get('weights', {}).get(top.document.id, 0):.2f}\n")

    held = [q for q in questions if q.doc_ids and q.doc_ids[0] not in late_ids][:48]
    rows = run_questions(model, bank, held, ("base", "rag", "mac"), EvalSettings(multiple_choice=False), "quality")
    print(f"{'mode':8} {'EM':>6} {'F1':>6} {'s/question':>11}   ({len(held)} questions, top-k 4, all {len(docs)} articles in memory)")
    for mode, rs in rows.items():
        m = aggregate({k: v for k, v in r.items() if isinstance(v, float)} for r in rs)
        print(f"{mode:8} {m['em']:6.1f} {m['f1']:6.1f} {sum(r['seconds'] for r in rs) / len(rs):11.3f}")
    print(f"\ndone in {time.time() - t0:.0f}s. Evaluate at scale: macstream eval --data DIR (see README).")


if __name__ == "__main__":
    main()
