"""A T x d_LM memory with a linear per-layer K/V readout: can the LM's layer-m hidden states at T selected positions
(the MAC modulation's shape, T x 576) stand in for the article's own per-layer K/V there (ceiling (b), which beats
the same tokens as text but stores T x 30 x 384 values)?

Readout (the expander, fitted once, document-independent; no gradient at ingest or query time): for every layer l,
the pre-RoPE key and the value of a token are regressed on the token's layer-m residual state, ``[h_m(s), 1] -> (k_l(s),
v_l(s))`` for all 30 layers at once (one ridge regression, 577 -> 30 x 2 x 192), on every token of the training split's
articles (the first token excluded: it is the attention sink). With ``+ids`` the token's input embedding is a second
input (the memory then also stores the T token ids, 2 bytes each). At query time the predicted keys are rotated (RoPE)
to prefix positions 1..T after a fixed sink (the K/V of ``<|endoftext|>`` alone at position 0: document-independent,
so the memory is exactly the T x 576 states).

Rows (the same unseen questions and selection as ``research.ceilings``; its ``text``/``kv`` rows are rerun here for a
side-by-side reading):
  text:T         the selected tokens as plain text in the RAG prompt
  kv:T     (b)   the article's own per-layer K/V at the selected positions (exact; T x 30 x 384 stored)
  lin@m:T        layer-m states at the selected positions (T x 576 stored) -> readout -> prefix K/V
  lin+ids@m:T    the same with the token ids as a second input

Besides greedy EM/F1 it reports the answer NLL per token (teacher forcing) with the article's own memory and with the
memory of an article of the same event type about another company (``pipeline.diagnose.same_type_others``): the
information gain = NLL(other) - NLL(own) per answer kind, which a memory that teaches only the answer form cannot
raise. And the readout's fit: R^2 of keys and values on held-out (validation) tokens, mean over layers.

This is the ridge-only readout, the form-finding experiment. The product's readout is then tuned end to end on the
answer NLL, with a learned selector: ``pipeline/train_readout.py`` (``macstream train-readout``).

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python -m research.kv_readout --questions 200 --layers 8 12 18 \\
        --budgets 32 48 --out research/results/2026-11-29/kv-readout.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import torch

from pipeline.config import DEFAULT_LM
from pipeline.data import synthetic
from pipeline.diagnose import KINDS, article_facts, fact_core, question_kind, same_type_others
from pipeline.metrics import score_answer
from pipeline.model.lm import FrozenLM, Prefix
from pipeline.model.readout import KVReadout, article_states, kv_targets, rerotate, rms, select
from pipeline.prompts import BASE_PROMPT, RAG_PROMPT, answer_continuation, document_text
from pipeline.train_readout import fit_selector, ridge
from research.ceilings import answer_items, score


def features(lm: FrozenLM, states: torch.Tensor, ids: list[int], with_ids: bool) -> torch.Tensor:
    """Readout inputs for tokens: the RMS-normalised layer-m state (and input embedding): (n, d [+ d])."""
    parts = [rms(states)]
    if with_ids:
        parts.append(rms(lm.model.get_input_embeddings()(torch.tensor(ids))))
    return torch.cat(parts, 1)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entities", type=int, default=120, help="validation entities (questions are drawn from them)")
    ap.add_argument("--train-entities", type=int, default=300,
                    help="training-split entities whose articles fit the readout")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", nargs="+", type=int, default=[8, 12, 18])
    ap.add_argument("--budgets", nargs="+", type=int, default=[32, 48])
    ap.add_argument("--variants", nargs="+", default=["lin", "lin+ids"], choices=["lin", "lin+ids"])
    ap.add_argument("--baselines", nargs="*", default=["text", "kv"], choices=["text", "kv"])
    ap.add_argument("--ridge", type=float, default=1e-3, help="λ as a multiple of the mean diagonal of XᵀX")
    ap.add_argument("--selection", nargs="+", default=["oracle"], choices=["oracle", "learned"],
                    help="learned: also rows whose T positions a token selector picks (logistic regression on the "
                    "layer-m state, trained on the training articles' fact tokens) instead of the generator's fact "
                    "spans")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    lm = FrozenLM.load(DEFAULT_LM)
    tok, rotary = lm.tokenizer, lm.model.base_model.rotary_emb
    cfg = lm.model.config
    shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads)

    # ---- fit the readouts on the training split (sufficient statistics, one pass) ----
    t0 = time.time()
    train_docs, _ = synthetic.generate("train", args.train_entities, seed=args.seed)
    combos = [(v, m) for v in args.variants for m in args.layers]
    acc: dict = {}
    n_tokens = 0
    pending: list[tuple[dict, torch.Tensor]] = []
    sel_data: dict[int, list] = defaultdict(list)

    def flush() -> None:  # sufficient statistics XᵀX, XᵀY in float64, products over a block of articles in float32
        y = torch.cat([p[1] for p in pending])
        for c in combos:
            x = torch.cat([p[0][c] for p in pending])
            x = torch.cat([x, torch.ones(x.shape[0], 1)], 1)  # [features, 1]
            prev = acc.get(c, (0, 0))
            acc[c] = (prev[0] + (x.T @ x).double(), prev[1] + (x.T @ y).double())
        pending.clear()

    for doc in train_docs:
        ids = tok(document_text(doc), add_special_tokens=False)["input_ids"]
        hs, kv = article_states(lm, ids, args.layers)
        y = kv_targets(lm, kv)[1:]  # (S-1, L·2·H·D): the sink (first token) excluded
        n_tokens += y.shape[0]
        pending.append(({(v, m): features(lm, hs[m][1:], ids[1:], v == "lin+ids") for v, m in combos}, y))
        if "learned" in args.selection:
            _, core = fact_core(tok, document_text(doc), article_facts(doc)["fields"])
            label = torch.zeros(len(ids))
            label[core] = 1
            for m in args.layers:
                sel_data[m].append((rms(hs[m][1:]), label[1:]))
        if len(pending) == 32:
            flush()
    if pending:
        flush()
    readouts = {}
    for c in combos:
        readouts[c] = KVReadout(lm, acc[c][0].shape[0] - 1)
        readouts[c].set_linear(ridge(*acc[c], args.ridge))
    selectors = {m: fit_selector(torch.cat([x for x, _ in sel_data[m]]), torch.cat([y for _, y in sel_data[m]]))
                 for m in sel_data}
    fit_s = time.time() - t0
    print(f"fitted {len(combos)} readouts on {len(train_docs)} training articles ({n_tokens} tokens) in {fit_s:.0f} s",
          flush=True)

    # ---- the unseen questions, their articles, selections and memories ----
    docs, qs = synthetic.generate("validation", args.entities, seed=args.seed)
    by_id = {d.id: d for d in docs}
    items = random.Random(args.seed).sample([q for q in qs if q.doc_ids], min(args.questions, len(qs)))
    kinds = [question_kind(q)["kind"] for q in items]
    others, same = same_type_others([(q, by_id[q.doc_ids[0]]) for q in items], docs, seed=args.seed)
    arts: dict[str, dict] = {}
    sel_quality: dict = defaultdict(lambda: [0, 0])
    # combo -> [sse_k, sst_k, sse_v, sst_v] per layer
    r2 = defaultdict(lambda: torch.zeros(4, shape[0], dtype=torch.float64))
    for doc_id in sorted({q.doc_ids[0] for q in items} | {o.id for o in others}):
        text = document_text(by_id[doc_id])
        ids, core = fact_core(tok, text, article_facts(by_id[doc_id])["fields"])
        hs, kv = article_states(lm, ids, args.layers)
        a = {"ids": ids, "sel": {b: select(len(ids), core, b) for b in args.budgets}, "hs": hs, "kv": kv}
        for m, selector in selectors.items():  # the learned, question-independent selection (one per state layer)
            logits = selector(rms(hs[m]))
            for b in args.budgets:
                a["sel"][("learned", m, b)] = selector.positions(logits, len(ids), b)
            hit = set(selector.positions(logits, len(ids), len(core))) & set(core)
            sel_quality[m][0] += len(hit)
            sel_quality[m][1] += len(core)
            for b in args.budgets:  # oracle positions kept by the learned selection at budget b
                sel_quality[(m, b)][0] += len(set(a["sel"][("learned", m, b)]) & set(a["sel"][b]))
                sel_quality[(m, b)][1] += len(a["sel"][b])
        y = kv_targets(lm, kv)[1:].view(len(ids) - 1, shape[0], 2, -1)  # (S-1, L, 2, H·D)
        for c in combos:
            # (L, H, S-1, D)
            pk, pv = (t[0] for t in readouts[c].kv(features(lm, hs[c[1]][1:], ids[1:], c[0] == "lin+ids")[None]))
            for j, pred in ((0, pk), (2, pv)):
                truth = y[:, :, j // 2].permute(1, 0, 2)  # (L, S-1, H·D)
                pred = pred.permute(0, 2, 1, 3).reshape(truth.shape)
                r2[c][j] += ((pred - truth) ** 2).sum((1, 2)).double()
                r2[c][j + 1] += ((truth - truth.mean(1, keepdim=True)) ** 2).sum((1, 2)).double()
        arts[doc_id] = a
    fit_quality = {}
    for v, m in combos:
        e = r2[(v, m)]
        rk, rv = 1 - e[0] / e[1], 1 - e[2] / e[3]  # (L,) each
        fit_quality[f"{v}@{m}"] = {"r2_keys": round(float(1 - e[0].sum() / e[1].sum()), 4),
                                   "r2_values": round(float(1 - e[2].sum() / e[3].sum()), 4),
                                   "r2_keys_by_layer": [round(float(x), 3) for x in rk],
                                   "r2_values_by_layer": [round(float(x), 3) for x in rv]}
    info_sel = {f"layer {k}" if isinstance(k, int) else f"layer {k[0]}, T={k[1]}": round(h / max(1, n), 3)
                for k, (h, n) in sel_quality.items()}
    info = {"learned_selection_recall": info_sel, "train_articles": len(train_docs), "train_tokens": n_tokens,
            "fit_seconds": round(fit_s, 1),
            "ridge": args.ridge, "questions": len(items), "same_type_others": same, "seed": args.seed,
            "kinds": {k: kinds.count(k) for k in KINDS}, "readout_fit_on_validation_tokens": fit_quality,
            "latent_prompt": repr("\n\n" + BASE_PROMPT), "text_prompt": repr(RAG_PROMPT), "threads": args.threads}
    print(json.dumps(info), flush=True)
    results: dict = {"info": info, "items": [[q.id, q.question, q.answers[0], k] for q, k in zip(items, kinds)],
                     "rows": {}}

    memo: dict = {}

    def memory(doc_id: str, key) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix keys/values (L, H, 1+T, D) of an article: its own K/V ("kv") or a readout's, for budget T."""
        if (doc_id, key) not in memo:
            a, (form, b) = arts[doc_id], key
            kv, sel = a["kv"], a["sel"][b]
            src = torch.tensor([0] + sel)
            dst = torch.arange(len(src))
            if form == "kv":
                memo[(doc_id, key)] = (torch.stack([rerotate(k[:, src], src, dst, rotary) for k, _ in kv]),
                                       torch.stack([v[:, src] for _, v in kv]))
            else:
                v, m = form
                pre = readouts[form](features(lm, a["hs"][m][sel], [a["ids"][i] for i in sel], v == "lin+ids")[None])
                memo[(doc_id, key)] = (pre.keys[0], pre.values[0])
        return memo[(doc_id, key)]

    latent_prompt = lambda q: "\n\n" + BASE_PROMPT.format(question=q.question.strip())
    prompts = [tok(latent_prompt(q))["input_ids"] for q in items]
    targets = [tok(answer_continuation(q.answers[0]), add_special_tokens=False)["input_ids"] for q in items]

    def answer_nll(key, doc_of) -> list[float]:
        """Teacher-forced answer NLL per token of each item with the memory ``key`` of article ``doc_of(i)``."""
        out = []
        for i in range(len(items)):
            k, v = memory(doc_of(i), key)
            s, n = lm.continuation_logprobs([prompts[i]], [targets[i]], Prefix(k[None], v[None]))
            out.append(float(-s[0] / n[0]))
        return out

    def run(name: str, key=None, text_sel=None) -> None:
        t0 = time.time()
        if key is None:  # plain text of the selected tokens
            preds = answer_items(lm, items, lambda q: RAG_PROMPT.format(
                context=tok.decode([arts[q.doc_ids[0]]["ids"][i] for i in arts[q.doc_ids[0]]["sel"][text_sel]]),
                question=q.question.strip()), batch=args.batch, max_new_tokens=args.max_new_tokens)
        else:
            mem = lambda q: memory(q.doc_ids[0], key)
            preds = answer_items(lm, items, latent_prompt,
                                 lambda qs_: Prefix(torch.stack([mem(q)[0] for q in qs_]),
                                                    torch.stack([mem(q)[1] for q in qs_])),
                                 lambda q: mem(q)[0].shape[2], args.batch, args.max_new_tokens)
        rows = [score_answer(preds[i], items[i].answers) for i in range(len(items))]
        res = score(rows, kinds) | {"predictions": [preds[i] for i in range(len(items))]}
        if key is not None:
            own = answer_nll(key, lambda i: items[i].doc_ids[0])
            other = answer_nll(key, lambda i: others[i].id)
            gain = {k: round(sum(o - w for o, w, kk in zip(other, own, kinds) if kk == k) / max(1, kinds.count(k)), 3)
                    for k in KINDS}
            res |= {"nll_own": round(sum(own) / len(own), 3), "nll_other_same_type": round(sum(other) / len(other), 3),
                    "info_gain_by_kind": gain, "info_gain_names": round(
                        sum(o - w for o, w, kk in zip(other, own, kinds) if kk != "number") /
                        max(1, sum(kk != "number" for kk in kinds)), 3)}
        res["seconds"] = round(time.time() - t0, 1)
        memo.clear()
        results["rows"][name] = res
        extra = (f"  NLL own {res['nll_own']:.2f} other {res['nll_other_same_type']:.2f}  "
                 f"gain names {res['info_gain_names']:+.2f}" if key is not None else "")
        print(f"{name:>14}  EM {res['em']:5.1f}  F1 {res['f1']:5.1f} ± {res['f1_se']:.1f}{extra}  {res['f1_by_kind']}  "
              f"({res['seconds']:.0f} s)", flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results | {"wall_s": round(time.time() - t_start, 1)}, indent=1))

    for b in args.budgets:
        for m in selectors:
            if "text" in args.baselines:
                run(f"text:{b} learned-sel@{m}", text_sel=("learned", m, b))
            for v, mm in combos:
                if mm == m:
                    run(f"{v}@{m}:{b} learned-sel", ((v, m), ("learned", m, b)))
        if "text" in args.baselines:
            run(f"text:{b}", text_sel=b)
        if "kv" in args.baselines:
            run(f"kv:{b}", ("kv", b))
        for v, m in combos:
            run(f"{v}@{m}:{b}", ((v, m), b))
    print(f"wall {time.time() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
