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

Rows (the same unseen questions and selection as ``benchmarks.ceilings``; its ``text``/``kv`` rows are rerun here for a
side-by-side reading):
  text:T         the selected tokens as plain text in the RAG prompt
  kv:T     (b)   the article's own per-layer K/V at the selected positions (exact; T x 30 x 384 stored)
  lin@m:T        layer-m states at the selected positions (T x 576 stored) -> readout -> prefix K/V
  lin+ids@m:T    the same with the token ids as a second input

Besides greedy EM/F1 it reports the answer NLL per token (teacher forcing) with the article's own memory and with the
memory of an article of the same event type about another company (``pipeline.diagnose.same_type_others``): the
information gain = NLL(other) - NLL(own) per answer kind, which a memory that teaches only the answer form cannot
raise. And the readout's fit: R^2 of keys and values on held-out (validation) tokens, mean over layers.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python -m benchmarks.kv_readout --questions 200 --layers 8 12 18 \\
        --budgets 32 48 --out benchmarks/results/2026-11-29/kv-readout.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from benchmarks.ceilings import SINK, answer_items, article_states, fact_core, rerotate, score, select
from pipeline.config import DEFAULT_LM
from pipeline.data import synthetic
from pipeline.diagnose import KINDS, article_facts, question_kind, same_type_others
from pipeline.metrics import score_answer
from pipeline.model.lm import FrozenLM, Prefix
from pipeline.prompts import BASE_PROMPT, RAG_PROMPT, answer_continuation, document_text


def _targets(lm: FrozenLM, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Every layer's (pre-RoPE key, value) of each token, flattened: (S, L x 2 x H x D)."""
    rotary = lm.model.base_model.rotary_emb
    S = kv[0][0].shape[1]
    pos = torch.arange(S)
    keys = torch.stack([rerotate(k, pos, torch.zeros_like(pos), rotary) for k, _ in kv])  # (L, H, S, D)
    vals = torch.stack([v for _, v in kv])
    return torch.stack([keys, vals], 1).permute(3, 0, 1, 2, 4).reshape(S, -1)  # (S, L·2·H·D)


def features(lm: FrozenLM, states: torch.Tensor, ids: list[int], with_ids: bool) -> torch.Tensor:
    """Readout inputs for tokens: [h_m, (input embedding), 1]: (n, d [+ d] + 1), each part RMS-normalised as the LM's
    own RMSNorm does before attention (mid-layer states have a few tokens of huge norm; the next layer's K/V are
    linear in the normalised state, not in the raw one)."""
    rms = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    parts = [rms(states)]
    if with_ids:
        parts.append(rms(lm.model.get_input_embeddings()(torch.tensor(ids))))
    parts.append(torch.ones(states.shape[0], 1))
    return torch.cat(parts, 1)


class KVReadout:
    """Ridge regression from per-token features to every layer's (pre-RoPE key, value). ``W``: (F, L·2·H·D)."""

    def __init__(self, W: torch.Tensor, layers: int, kv_heads: int, head_dim: int):
        self.W, self.L, self.H, self.D = W, layers, kv_heads, head_dim

    @classmethod
    def fit(cls, xtx: torch.Tensor, xty: torch.Tensor, ridge: float, shape: tuple[int, int, int]) -> KVReadout:
        lam = ridge * xtx.diagonal().mean()
        W = torch.linalg.solve(xtx + lam * torch.eye(xtx.shape[0], dtype=xtx.dtype), xty)
        return cls(W.float(), *shape)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, F) → pre-RoPE keys and values, each (L, H, T, D)."""
        y = (x @ self.W).view(x.shape[0], self.L, 2, self.H, self.D).permute(2, 1, 3, 0, 4)  # (2, L, H, T, D)
        return y[0], y[1]


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entities", type=int, default=120, help="validation entities (questions are drawn from them)")
    ap.add_argument("--train-entities", type=int, default=300, help="training-split entities whose articles fit the readout")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", nargs="+", type=int, default=[8, 12, 18])
    ap.add_argument("--budgets", nargs="+", type=int, default=[32, 48])
    ap.add_argument("--variants", nargs="+", default=["lin", "lin+ids"], choices=["lin", "lin+ids"])
    ap.add_argument("--baselines", nargs="*", default=["text", "kv"], choices=["text", "kv"])
    ap.add_argument("--ridge", type=float, default=1e-3, help="λ as a multiple of the mean diagonal of XᵀX")
    ap.add_argument("--train-steps", type=int, default=0,
                    help="then fine-tune each readout end to end (answer NLL through the frozen LM) for this many steps")
    ap.add_argument("--train-budget", type=int, default=48, help="T of the training memories")
    ap.add_argument("--train-batch", type=int, default=16, help="questions per fine-tuning step")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-questions", type=int, default=40, help="held-out questions judged every --eval-every steps")
    ap.add_argument("--save", help="directory: the fine-tuned readouts (resumable: a saved readout is loaded)")
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
    _, sink_kv = article_states(lm, [tok.convert_tokens_to_ids(SINK)], [])
    sink_k = torch.stack([k for k, _ in sink_kv])  # (L, H, 1, D): the fixed sink's K/V at position 0
    sink_v = torch.stack([v for _, v in sink_kv])

    # ---- fit the readouts on the training split (sufficient statistics, one pass) ----
    t0 = time.time()
    train_docs, train_qs = synthetic.generate("train", args.train_entities, seed=args.seed)
    train_arts: dict[str, dict] = {}
    combos = [(v, m) for v in args.variants for m in args.layers]
    acc: dict = {}
    n_tokens = 0
    pending: list[tuple[dict, torch.Tensor]] = []

    def flush() -> None:  # sufficient statistics XᵀX, XᵀY in float64, products over a block of articles in float32
        y = torch.cat([p[1] for p in pending])
        for c in combos:
            x = torch.cat([p[0][c] for p in pending])
            prev = acc.get(c, (0, 0))
            acc[c] = (prev[0] + (x.T @ x).double(), prev[1] + (x.T @ y).double())
        pending.clear()

    for doc in train_docs:
        ids = tok(document_text(doc), add_special_tokens=False)["input_ids"]
        hs, kv = article_states(lm, ids, args.layers)
        y = _targets(lm, kv)[1:]  # (S-1, L·2·H·D): the sink (first token) excluded
        n_tokens += y.shape[0]
        pending.append(({(v, m): features(lm, hs[m][1:], ids[1:], v == "lin+ids") for v, m in combos}, y))
        if args.train_steps:
            _, core = fact_core(tok, document_text(doc), article_facts(doc)["fields"])
            sel = select(len(ids), core, args.train_budget)
            train_arts[doc.id] = {(v, m): features(lm, hs[m][sel], [ids[i] for i in sel], v == "lin+ids") for v, m in combos}
        if len(pending) == 32:
            flush()
    if pending:
        flush()
    readouts = {c: KVReadout.fit(*acc[c], args.ridge, shape) for c in combos}
    fit_s = time.time() - t0
    print(f"fitted {len(combos)} readouts on {len(train_docs)} training articles ({n_tokens} tokens) in {fit_s:.0f} s", flush=True)

    # ---- the unseen questions, their articles, selections and memories ----
    docs, qs = synthetic.generate("validation", args.entities, seed=args.seed)
    by_id = {d.id: d for d in docs}
    items = random.Random(args.seed).sample([q for q in qs if q.doc_ids], min(args.questions, len(qs)))
    kinds = [question_kind(q)["kind"] for q in items]
    others, same = same_type_others([(q, by_id[q.doc_ids[0]]) for q in items], docs, seed=args.seed)
    arts: dict[str, dict] = {}
    r2 = defaultdict(lambda: torch.zeros(4, shape[0], dtype=torch.float64))  # combo -> [sse_k, sst_k, sse_v, sst_v] per layer
    for doc_id in sorted({q.doc_ids[0] for q in items} | {o.id for o in others}):
        text = document_text(by_id[doc_id])
        ids, core = fact_core(tok, text, article_facts(by_id[doc_id])["fields"])
        hs, kv = article_states(lm, ids, args.layers)
        a = {"ids": ids, "sel": {b: select(len(ids), core, b) for b in args.budgets}, "hs": hs, "kv": kv}
        y = _targets(lm, kv)[1:].view(len(ids) - 1, shape[0], 2, -1)  # (S-1, L, 2, H·D)
        for c in combos:
            pk, pv = readouts[c].kv(features(lm, hs[c[1]][1:], ids[1:], c[0] == "lin+ids"))  # (L, H, S-1, D)
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
    info = {"train_articles": len(train_docs), "train_tokens": n_tokens, "fit_seconds": round(fit_s, 1),
            "ridge": args.ridge, "questions": len(items), "same_type_others": same, "seed": args.seed,
            "kinds": {k: kinds.count(k) for k in KINDS}, "readout_fit_on_validation_tokens": fit_quality,
            "latent_prompt": repr("\n\n" + BASE_PROMPT), "text_prompt": repr(RAG_PROMPT), "threads": args.threads}
    print(json.dumps(info), flush=True)
    results: dict = {"info": info, "items": [[q.id, q.question, q.answers[0], k] for q, k in zip(items, kinds)], "rows": {}}

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
                pk, pv = readouts[form].kv(features(lm, a["hs"][m][sel], [a["ids"][i] for i in sel], v == "lin+ids"))
                pk = torch.stack([rerotate(pk[layer], torch.zeros(len(sel)), dst[1:], rotary) for layer in range(shape[0])])
                memo[(doc_id, key)] = (torch.cat([sink_k, pk], 2), torch.cat([sink_v, pv], 2))
        return memo[(doc_id, key)]

    latent_prompt = lambda q: "\n\n" + BASE_PROMPT.format(question=q.question.strip())
    prompts = [tok(latent_prompt(q))["input_ids"] for q in items]
    targets = [tok(answer_continuation(q.answers[0]), add_special_tokens=False)["input_ids"] for q in items]

    def answer_nll(key, doc_of, which=None) -> list[float]:
        """Teacher-forced answer NLL per token of each item (or of items ``which``) with the memory ``key`` of
        article ``doc_of(i)``."""
        out = []
        for i in range(len(items)) if which is None else which:
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
                                 lambda qs_: Prefix(torch.stack([mem(q)[0] for q in qs_]), torch.stack([mem(q)[1] for q in qs_])),
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
        extra = f"  NLL own {res['nll_own']:.2f} other {res['nll_other_same_type']:.2f}  gain names {res['info_gain_names']:+.2f}" \
            if key is not None else ""
        print(f"{name:>14}  EM {res['em']:5.1f}  F1 {res['f1']:5.1f} ± {res['f1_se']:.1f}{extra}  {res['f1_by_kind']}  "
              f"({res['seconds']:.0f} s)", flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results | {"wall_s": round(time.time() - t_start, 1)}, indent=1))

    def finetune(c) -> list[dict]:
        """Adam on the readout ``c``'s W, loss = answer NLL per token through the frozen LM (bf16 autocast) on the
        training split's questions, each with its own article's memory (budget --train-budget); judged every
        --eval-every steps on the first --eval-questions held-out items (information gain on names, greedy F1)."""
        name = f"{c[0]}@{c[1]}"
        path = Path(args.save, f"{name}.pt") if args.save else None
        start, log = 0, []
        if path and path.exists():  # resume (Adam's moments start afresh)
            saved = torch.load(path)
            readouts[c].W, start, log = saved["W"], saved["steps"], saved["log"]
            print(f"{name}: resumed from {path} at step {start}", flush=True)
        W = torch.nn.Parameter(readouts[c].W.clone())
        opt = torch.optim.Adam([W], lr=args.lr)
        pool = [q for q in train_qs if q.doc_ids and q.doc_ids[0] in train_arts]
        rng = random.Random(args.seed)
        L, H, D = shape
        T = args.train_budget
        pos = torch.arange(1, T + 1)[None]
        held = list(range(min(args.eval_questions, len(items))))
        t0 = time.time()

        def judge(step: int) -> None:
            readouts[c].W = W.detach().clone()
            memo.clear()
            key = (c, args.train_budget)
            own = answer_nll(key, lambda i: items[i].doc_ids[0], held)
            other = answer_nll(key, lambda i: others[i].id, held)
            names = [i for i in held if kinds[i] != "number"]
            gain = sum(other[j] - own[j] for j, i in enumerate(held) if i in names) / max(1, len(names))
            sub = [items[i] for i in held]
            mem = lambda q: memory(q.doc_ids[0], key)
            preds = answer_items(lm, sub, latent_prompt,
                                 lambda qs_: Prefix(torch.stack([mem(q)[0] for q in qs_]), torch.stack([mem(q)[1] for q in qs_])),
                                 lambda q: mem(q)[0].shape[2], args.batch, args.max_new_tokens)
            f1 = 100 * sum(score_answer(preds[j], q.answers)["f1"] for j, q in enumerate(sub)) / len(sub)
            memo.clear()
            row = {"step": step, "nll_own": round(sum(own) / len(own), 3), "nll_other": round(sum(other) / len(other), 3),
                   "info_gain_names": round(gain, 3), "f1": round(f1, 1), "elapsed_s": round(time.time() - t0, 1)}
            log.append(row)
            print(f"{name} step {step}: {row}", flush=True)

        if start == 0:
            judge(0)
        for step in range(start + 1, args.train_steps + 1):
            batch = rng.sample(pool, args.train_batch)
            with torch.enable_grad():  # main() runs under no_grad
                x = torch.stack([train_arts[q.doc_ids[0]][c] for q in batch])  # (B, T, F)
                y = (x @ W).view(len(batch), T, L, 2, H, D).permute(3, 0, 2, 4, 1, 5)  # (2, B, L, H, T, D)
                k = y[0].reshape(-1, H, T, D)
                cos, sin = rotary(k, pos)
                k = apply_rotary_pos_emb(k, k, cos, sin)[1].view(len(batch), L, H, T, D)  # keys at positions 1..T
                B = len(batch)
                prefix = Prefix(torch.cat([sink_k.expand(B, *sink_k.shape), k], 3),
                                torch.cat([sink_v.expand(B, *sink_v.shape), y[1]], 3))
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    sums, counts = lm.continuation_logprobs(
                        [tok(latent_prompt(q))["input_ids"] for q in batch],
                        [tok(answer_continuation(q.answers[0]), add_special_tokens=False)["input_ids"] for q in batch], prefix)
                    loss = -sums.sum() / counts.sum()
                    opt.zero_grad()
                    loss.backward()
            opt.step()
            if step % 10 == 0:
                el = time.time() - t0
                rate = (step - start) / el
                print(f"{name} step {step}/{args.train_steps} loss {float(loss):.3f}  {rate:.2f} steps/s  "
                      f"ETA {(args.train_steps - step) / rate / 60:.1f} min", flush=True)
            if step % args.eval_every == 0 or step == args.train_steps:
                judge(step)
                if path:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    torch.save({"W": W.detach().clone(), "steps": step, "log": log}, path)
        readouts[c].W = W.detach().clone()
        memo.clear()
        return log

    for b in args.budgets:
        for v, m in combos if args.train_steps else []:
            run(f"{v}@{m}:{b} ridge", ((v, m), b))
    if args.train_steps:
        results["finetune"] = {f"{v}@{m}": finetune((v, m)) for v, m in combos}
    for b in args.budgets:
        if "text" in args.baselines:
            run(f"text:{b}", text_sel=b)
        if "kv" in args.baselines:
            run(f"kv:{b}", ("kv", b))
        for v, m in combos:
            run(f"{v}@{m}:{b}" + (" tuned" if args.train_steps else ""), ((v, m), b))
    print(f"wall {time.time() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
