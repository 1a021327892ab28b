"""Approximation gap vs amortization gap: can *any* memory in a given form make the frozen LM answer an unseen
article's questions when the memory is optimised directly for that article (no amortizer)?

For each of a few unseen synthetic articles (validation split, an equal number per event type), every fact of the
article is asked with the generator's question templates. Question kinds with two templates are **fit on template
A and tested on template B** (a paraphrase never seen while fitting); single-template kinds are fit only. Per article,
one memory is optimised with Adam on the summed answer NLL (teacher forcing, the bare MAC prompt) of its template-A
questions, then used to answer its template-B questions greedily (16 new tokens):

  phi      phi* (T x 576), fed through the slots checkpoint's frozen expander (P = 2; shipped until 2026-11-29); initialised at the
           shipped aggregator's phi* for the article's own modulation and first fit question;
  kv@P     raw per-layer prefix keys/values (30 layers x P x 3 KV heads x 64, keys and values), P = 2 and 8,
           initialised from the LM's own key/value statistics (per-channel mean + std * N(0, 1)).

Reported per form: test-template EM/F1 (and the fit-template EM/F1, to see that the fit worked), test NLL per answer
token with the article's own optimised memory and with the optimised memory of *another* article of the same event
type (the control: a memory that only teaches the answer format scores alike on both).

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python -m benchmarks.approx_gap --articles 10 --steps 150 \\
        --out benchmarks/results/2026-11-29/approx-gap.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from pipeline.config import PREVIOUS_CHECKPOINT
from pipeline.data import synthetic
from pipeline.diagnose import article_facts
from pipeline.metrics import aggregate, score_answer
from pipeline.model.lm import Prefix
from pipeline.model.mac import _CALIBRATION, MACModel, checkpoint_dir
from pipeline.prompts import MAC_PROMPT, answer_continuation


def article_questions(doc, facts: dict) -> list[dict]:
    """Every fact of the article as questions: one per (kind, template)."""
    when = f"{synthetic._MONTHS[doc.published_at.month - 1]} {doc.published_at.year}"
    out = []
    for kind, key, templates in synthetic._QUESTIONS[facts["event"]]:
        for i, t in enumerate(templates):
            out.append({"kind": kind, "template": i, "n_templates": len(templates), "answer": facts["fields"][key],
                        "question": t.format(E=facts["entity"], when=when)})
    return out


@torch.no_grad()
def kv_stats(lm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-layer, per-channel mean/std of the LM's keys and values on a fixed text (first token excluded): (L, H, D)."""
    ids = lm.tokenizer(_CALIBRATION)["input_ids"]
    t = torch.tensor([ids])
    cache = lm._cache(None, 1)
    lm._body(t, torch.ones_like(t), torch.arange(len(ids))[None], cache)
    k = torch.stack([layer.keys[0, :, 1:] for layer in cache.layers])  # (L, H, S-1, D)
    v = torch.stack([layer.values[0, :, 1:] for layer in cache.layers])
    return k.mean(2), k.std(2), v.mean(2), v.std(2)


def nll_per_token(lm, prompts, targets, prefix: Prefix) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer NLL per question (B,) and token counts (B,)."""
    sums, counts = lm.continuation_logprobs(prompts, targets, prefix)
    return -sums, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="default: the slots checkpoint this study measured (PREVIOUS_CHECKPOINT)")
    ap.add_argument("--entities", type=int, default=60)
    ap.add_argument("--articles", type=int, default=10)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--forms", nargs="+", default=["phi", "kv@2", "kv@8"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()
    model = MACModel.load(checkpoint_dir(args.checkpoint or PREVIOUS_CHECKPOINT)).eval()
    model.requires_grad_(False)
    lm, tok = model.lm, model.lm.tokenizer
    docs, _ = synthetic.generate("validation", args.entities, seed=args.seed)
    rng = random.Random(args.seed)
    by_event: dict[str, list] = {}
    for d in docs:
        by_event.setdefault(article_facts(d)["event"], []).append(d)
    per_event = max(1, args.articles // len(by_event))
    chosen = []
    for e in sorted(by_event):  # per event type, articles of distinct companies (so the partner is another company)
        pool, picked = rng.sample(by_event[e], len(by_event[e])), []
        for d in pool:
            if len(picked) < per_event and all(article_facts(d)["entity"] != article_facts(x)["entity"] for x in picked):
                picked.append(d)
        chosen += picked
    partner = {d.id: chosen[(i // per_event) * per_event + ((i % per_event) + 1) % per_event].id
               for i, d in enumerate(chosen)}  # same event type, another article (another company)
    k_mean, k_std, v_mean, v_std = kv_stats(lm)
    chunks = {c.modulation.doc_id: c for c in model.encode_documents(chosen)}
    results: dict = {"info": {"articles": len(chosen), "steps": args.steps, "lr": args.lr, "checkpoint": model.version,
                              "prompt": repr(MAC_PROMPT), "started": datetime.now(UTC).isoformat()}, "forms": {}}

    for form in args.forms:
        t0 = time.time()
        memories, fit_rows, test_rows, per_article = {}, [], [], []
        test_sets = {}
        for doc in chosen:
            qs = article_questions(doc, article_facts(doc))
            fit = [q for q in qs if q["template"] == 0]
            test = [q for q in qs if q["template"] == 1]
            test_sets[doc.id] = test
            fp = [tok(MAC_PROMPT.format(question=q["question"]))["input_ids"] for q in fit]
            ft = [tok(answer_continuation(q["answer"]), add_special_tokens=False)["input_ids"] for q in fit]
            if form == "phi":
                q_tokens, _ = model.encode_questions([fit[0]["question"]])
                mods, mask, scores = model.stack_memories([[(chunks[doc.id].modulation, 1.0)]])
                with torch.no_grad():
                    phi0, _ = model.aggregator(q_tokens, mods, mask, scores)
                param = phi0.detach().clone().requires_grad_(True)  # (1, T, D)
                make = lambda p: model.expander(p)
            else:
                P = int(form.split("@")[1])
                L, H, D = k_mean.shape
                keys = k_mean[None, :, :, None] + k_std[None, :, :, None] * torch.randn(1, L, H, P, D)
                vals = v_mean[None, :, :, None] + v_std[None, :, :, None] * torch.randn(1, L, H, P, D)
                param = torch.stack([keys, vals]).requires_grad_(True)  # (2, 1, L, H, P, D)
                make = lambda p: Prefix(p[0], p[1])
            opt = torch.optim.Adam([param], lr=args.lr)
            first = last = None
            for step in range(args.steps):
                nll, n = nll_per_token(lm, fp, ft, make(param).repeat_interleave(len(fit)))
                loss = nll.sum() / len(fit)
                opt.zero_grad()
                loss.backward()
                opt.step()
                first = float(nll.detach().sum() / n.sum()) if first is None else first
                last = float(nll.detach().sum() / n.sum())
            memories[doc.id] = param.detach()
            with torch.no_grad():
                pre = make(param.detach())
                for qset, rows in ((fit, fit_rows), (test, test_rows)):
                    if not qset:
                        continue
                    outs = lm.generate([tok(MAC_PROMPT.format(question=q["question"]))["input_ids"] for q in qset],
                                       pre.repeat_interleave(len(qset)), 16)
                    for q, o in zip(qset, outs):
                        rows.append(score_answer(tok.decode(o).strip(), [q["answer"]]) |
                                    {"pred": tok.decode(o).strip(), "gold": q["answer"], "kind": q["kind"]})
            per_article.append({"doc": doc.id, "fit_nll_first": round(first, 3), "fit_nll_last": round(last, 3)})
        # test NLL with the own memory and with a same-type partner's memory
        own_s = other_s = count = 0.0
        with torch.no_grad():
            for doc in chosen:
                test = test_sets[doc.id]
                if not test:
                    continue
                tp = [tok(MAC_PROMPT.format(question=q["question"]))["input_ids"] for q in test]
                tt = [tok(answer_continuation(q["answer"]), add_special_tokens=False)["input_ids"] for q in test]
                for mem, acc in ((memories[doc.id], "own"), (memories[partner[doc.id]], "other")):
                    pre = (model.expander(mem) if form == "phi" else Prefix(mem[0], mem[1])).repeat_interleave(len(test))
                    nll, n = nll_per_token(lm, tp, tt, pre)
                    if acc == "own":
                        own_s += float(nll.sum())
                        count += float(n.sum())
                    else:
                        other_s += float(nll.sum())
        res = {"fit": aggregate([{k: r[k] for k in ("em", "f1")} for r in fit_rows]) | {"n": len(fit_rows)},
               "test": aggregate([{k: r[k] for k in ("em", "f1")} for r in test_rows]) | {"n": len(test_rows)},
               "test_nll_own": round(own_s / count, 4), "test_nll_other_same_type": round(other_s / count, 4),
               "seconds": round(time.time() - t0, 1), "per_article": per_article,
               "test_predictions": [[r["kind"], r["gold"], r["pred"]] for r in test_rows]}
        results["forms"][form] = res
        print(f"{form:>6}: fit EM {res['fit']['em']:.1f} F1 {res['fit']['f1']:.1f} (n={len(fit_rows)})  "
              f"test EM {res['test']['em']:.1f} F1 {res['test']['f1']:.1f} (n={len(test_rows)})  "
              f"test NLL own {res['test_nll_own']:.3f} vs other {res['test_nll_other_same_type']:.3f}  "
              f"({res['seconds']:.0f} s)", flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results | {"wall_s": round(time.time() - t_start, 1)}, indent=1))


if __name__ == "__main__":
    main()
