"""Does the memory add anything once the prefix also holds a trained soft prompt? The two-stream prefix, measured.

``research/mac_rag_baselines.py`` found that with the gold-or-retrieved text in the prompt, a soft prompt of the
memory's size (no document in it) beats the document's memory as the prefix on real news. That leaves one question
open: is the memory worse than *text*, or only worse than a prompt that learned the answer form? The two-stream prefix
separates the two: a soft prompt trained in front of the (frozen) document memory — prefix = soft prompt ⧺ memory —
against the same soft prompt trained alone (:mod:`pipeline.train_prompt`, the product's answer prompt), same data,
steps, seed and learning rate. The product does not ship the two-stream prefix: :func:`two_stream` and
:func:`train_two_stream` live here.

Two steps (the trainings are independent: run them side by side, one core each):

    HF_HUB_OFFLINE=1 .venv/bin/python -m research.two_stream train --variant soft --out soft/ --threads 1
    HF_HUB_OFFLINE=1 .venv/bin/python -m research.two_stream train --variant two-stream --out two/ --threads 1
    HF_HUB_OFFLINE=1 .venv/bin/python -m research.two_stream compare --soft soft/ --two-stream two/ --out r.json

Rows (greedy, 16 new tokens, the product's retrieval over the test memory, top-k 4, the ``mac+rag`` prompt):
the retriever's top text with (a) the soft prompt, (b) the two-stream prompt ⧺ that document's memory, (c) the
two-stream prompt alone (does it lean on the memory?); the aggregator's pick (as ``mac+rag@1``) with (d) the soft
prompt, (e) the two-stream prompt ⧺ the aggregated memory, (f) the memory alone (``mac+rag@1`` today); and without
text (the ``mac`` prompt), (g) the aggregated memory alone (``mac`` today), (h) the two-stream prompt ⧺ it (the prompt
was trained with text).
(b) − (a) and (e) − (d) are what the memory adds with identical text.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.machine import machine
from pipeline.answering import citation_weights, context_texts, prepare
from pipeline.config import PromptTrainConfig
from pipeline.model.lm import Prefix
from pipeline.model.mac import MACModel
from pipeline.model.prompt import PROMPT_FILE, LoadedPrompt, batched, load_prompt, save_prompt
from pipeline.modes import Mode
from pipeline.prompts import prompt_with
from pipeline.train_prompt import answer_nll, prompt_data, train_prompt
from pipeline.train_readout import modulations
from research.mac_rag_baselines import eval_sets, load_readout_model, side_by_side


def two_stream(prompt: Prefix, memory: Prefix) -> Prefix:
    """The prompt's positions, then the memory's: (1 or B, L, H, P, D) ⧺ (B, L, H, P_m, D) → (B, L, H, P+P_m, D)."""
    if prompt.keys.shape[0] == 1 and memory.keys.shape[0] != 1:
        prompt = batched(prompt, memory.keys.shape[0])
    return Prefix(torch.cat([prompt.keys, memory.keys.to(prompt.keys.dtype)], 3),
                  torch.cat([prompt.values, memory.values.to(prompt.values.dtype)], 3))


def train_two_stream(model: MACModel, cfg: PromptTrainConfig, log: Callable[[str], None] = print) -> Prefix:
    """The product's answer-prompt training (:func:`pipeline.train_prompt.train_prompt`: same data, start, sampling
    and loss) with each question's gold article's frozen memory behind the prompt: keys/values (1, L, H, 1+T, D)."""
    by_id, pool = prompt_data(cfg)
    with torch.no_grad():
        mods = modulations(model, list(by_id.values())[:256])  # the rest on first use (frozen: computed once)
        init = model.expander(torch.stack(list(mods.values())).mean(0, keepdim=True))  # (1, L, H, 1+T, D)
    keys, values = (torch.nn.Parameter(t.detach().float().clone()) for t in (init.keys, init.values))
    opt = torch.optim.Adam([keys, values], lr=cfg.lr)
    rng, t0 = random.Random(cfg.seed), time.time()
    for step in range(1, cfg.steps + 1):
        part = rng.sample(pool, cfg.batch)
        with torch.no_grad():
            missing = {q.doc_ids[0]: by_id[q.doc_ids[0]] for q in part if q.doc_ids[0] not in mods}
            mods.update(modulations(model, list(missing.values())))
            memory = model.expander(torch.stack([mods[q.doc_ids[0]] for q in part]))  # (B, L, H, 1+T, D)
        loss = answer_nll(model, part, by_id, two_stream(batched(Prefix(keys, values), cfg.batch), memory))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == cfg.steps:
            log(f"two-stream prompt step {step}/{cfg.steps} loss {loss.item():.3f} "
                f"{step / (time.time() - t0):.2f} steps/s")
    return Prefix(keys.detach(), values.detach())


def _load(model: MACModel, directory: str) -> LoadedPrompt:
    found = load_prompt(directory, model.lm.num_layers, model.lm.num_kv_heads, model.lm.head_dim)
    if found is None:
        raise SystemExit(f"two_stream: no {PROMPT_FILE} in {directory} (write one with `train --out {directory}`)")
    return found


def compare(model: MACModel, soft: Prefix, two: Prefix, docs, questions, top_k: int) -> dict:
    one_text = Mode.parse("mac+rag@1")

    def runs_of(qs, hs):
        texts, b = [q.question for q in qs], len(qs)
        mac_prompts, mac_prefix, mass = prepare(model, "mac+rag@1", texts, hs)
        bare_prompts, _, _ = prepare(model, "mac", texts, hs)  # no text: the same prefix, the question alone
        top_prompts = [prompt_with("mac+rag", q, [context_texts(model, one_text, h, None)[0]])
                       for q, h in zip(texts, hs)]
        own, _ = model.memory_prefix(texts, [[(h[0].chunk.modulation, h[0].score)] for h in hs])  # the top hit's memory
        top_doc = [h[0].document.id for h in hs]
        agg_doc = [max(w, key=w.get) for w in (citation_weights(h, m) for h, m in zip(hs, mass))]
        soft_b, two_b = batched(soft, b), batched(two, b)
        return {  # name: (prompts, prefix, the document whose text is in the prompt)
            "retriever text + soft prompt": (top_prompts, soft_b, top_doc),
            "retriever text + two-stream (prompt + its memory)": (top_prompts, two_stream(two_b, own), top_doc),
            "retriever text + two-stream prompt, no memory": (top_prompts, two_b, top_doc),
            "aggregator's text + soft prompt": (mac_prompts, soft_b, agg_doc),
            "aggregator's text + two-stream (mac+rag@1 + prompt)": (mac_prompts, two_stream(two_b, mac_prefix),
                                                                    agg_doc),
            "mac+rag@1": (mac_prompts, mac_prefix, agg_doc),
            "mac (no text)": (bare_prompts, mac_prefix, agg_doc),
            "mac (no text) + two-stream prompt": (bare_prompts, two_stream(two_b, mac_prefix), agg_doc),
        }

    return side_by_side(model, docs, questions, top_k, runs_of)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train one soft prompt (alone, or in front of the gold memory) and save it")
    tr.add_argument("--variant", choices=["soft", "two-stream"], required=True)
    tr.add_argument("--steps", type=int, default=100)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--batch", type=int, default=16)
    tr.add_argument("--out", required=True, help=f"directory to write {PROMPT_FILE} in (the product's prompt format)")
    co = sub.add_parser("compare", help="the rows of the module docstring on the synthetic test and RealTimeQA 2024")
    co.add_argument("--soft", required=True, help="directory of the soft prompt (`train --variant soft --out DIR`)")
    co.add_argument("--two-stream", dest="two_stream", required=True, help="directory of the two-stream prompt")
    co.add_argument("--entities", type=int, default=60, help="synthetic test companies (as `bench quality`)")
    co.add_argument("--rtqa-questions", dest="rtqa_questions", type=int, default=100, help="0: skip RealTimeQA 2024")
    co.add_argument("--top-k", dest="top_k", type=int, default=4)
    co.add_argument("--out", help="write the result JSON here")
    for p in (tr, co):
        p.add_argument("--checkpoint", help="a readout-memory checkpoint (default: the shipped one)")
        p.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    model = load_readout_model(args.checkpoint, args.threads)
    if args.cmd == "train":
        t0 = time.time()
        cfg = PromptTrainConfig(steps=args.steps, batch=args.batch, lr=args.lr)
        prompt = (train_two_stream if args.variant == "two-stream" else train_prompt)(model, cfg)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        save_prompt(prompt, args.out, {"variant": args.variant, "checkpoint": model.version, "config": cfg.model_dump(),
                                       "seconds": round(time.time() - t0), "machine": machine()})
        return
    soft, two = _load(model, args.soft), _load(model, args.two_stream)
    result = {"how": {"machine": machine(), "checkpoint": model.version, "top_k": args.top_k,
                      "soft": soft.meta, "two_stream": two.meta,
                      "command": "python -m research.two_stream compare " + " ".join(
                          f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                          if v is not None and k not in ("out", "cmd"))}}
    for name, (docs, qs) in eval_sets(args.entities, args.rtqa_questions).items():
        result[name] = compare(model, soft.prefix, two.prefix, docs, qs, args.top_k)
        print(f"{name}: {json.dumps(result[name])}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
