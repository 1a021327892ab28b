"""Extractive ceilings with the frozen LM: how well can SmolLM2 answer from an article's *fact tokens* alone, given as
text, as input embeddings, as its own K/V, or as its own mid-layer hidden states? No trained memory is involved.

Unseen synthetic articles (validation split by default); every question is answered greedily (16 new tokens, stop at a
newline) and scored with the project's metrics (pipeline/metrics.py: strict EM, token F1).

Selection (question-independent; the same for every question of an article): the tokens of every fact span of the
article (first occurrence of each fact value: new/old person, city or product, price, revenue, head counts, partner,
deal; parsed from the generator's templates), each with the piece before it, in document order ("facts"; its length
varies per article). Budget T in 16/32/48: the fact tokens, then the tokens nearest to them (left first) until T;
truncated in document order if the facts alone exceed T. Tokens are those of ``document_text(doc)`` (title, date,
body), i.e. exactly what RAG reads.

Rows:
  base            the LM alone (one-shot prompt, no document)
  rag1            the whole article as text in the prompt (RAG-1, the project's RAG prompt)
  text:T          the selected tokens as plain text in the same RAG prompt (extractive text compression)
  emb:T     (a)   [sink] + the selected tokens' input embeddings as a soft prefix (:func:`soft_prefix`)
  kv:T      (b)   the article's own per-layer K/V at [its first token (sink)] + the selected positions, keys re-rotated
                  (RoPE) to prefix positions 0..T (SnapKV-style; stores T x 30 layers x 2 x 192 values)
  hid@m:T   (c)   [sink] + T filler tokens through ``soft_prefix``, with a forward hook on decoder layer m that
                  overwrites the T positions' residual stream with the article's layer-m hidden states at the selected
                  positions (from one forward pass over the full article); layers <= m see the filler, layers > m the
                  states. Stored: T x 576.
  hid+ids@m:T (c') the same, but layers <= m see the selected tokens themselves (ids + states stored).
Latent rows (emb/kv/hid) use the prompt "\\n\\n" + the base one-shot prompt after the prefix, so emb:T is text:T up
to the sink token and re-tokenisation. The sink is <|endoftext|>; the filler is the single-space token.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python -m research.ceilings --questions 200 \\
        --rows base rag1 text emb kv hid --budgets facts 16 32 48 --layers 4 8 12 18 \\
        --out research/results/2026-11-29/ceilings.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from pipeline.config import DEFAULT_LM
from pipeline.data import synthetic
from pipeline.diagnose import KINDS, article_facts, fact_core, question_kind
from pipeline.metrics import aggregate, score_answer
from pipeline.model.lm import FrozenLM, Prefix
from pipeline.model.readout import article_states, rerotate, select
from pipeline.prompts import BASE_PROMPT, RAG_PROMPT, document_text, prompt_for

SINK, FILLER = "<|endoftext|>", " "


# ---- latent forms -------------------------------------------------------------------------------------------------
def soft_prefix(lm: FrozenLM, embeds: torch.Tensor) -> Prefix:
    """T soft input tokens (B, T, d_LM), in the LM's input-embedding space → the per-layer keys/values the LM
    itself computes for them at positions 0..T-1: a Prefix (B, L, H_kv, T, D_h). Differentiable w.r.t. ``embeds``
    (the LM's weights stay frozen). Real tokens then continue at positions T, T+1, ..., as for any prefix."""
    B, T, _ = embeds.shape
    dev = embeds.device
    cache = DynamicCache(config=lm.model.config)
    lm.model.base_model(inputs_embeds=embeds.to(lm.model.dtype), attention_mask=torch.ones((B, T), dtype=torch.long,
                                                                                           device=dev),
                        position_ids=torch.arange(T, device=dev).expand(B, T), cache=cache, use_cache=True)
    keys = torch.stack([layer.keys for layer in cache.layers], 1)  # (B, L, H_kv, T, D_h)
    values = torch.stack([layer.values for layer in cache.layers], 1)
    return Prefix(keys, values)


@torch.no_grad()
def spliced_prefix(lm: FrozenLM, lower_ids: torch.Tensor, states: torch.Tensor | None, layer: int | None) -> Prefix:
    """soft_prefix of the input embeddings of ``lower_ids`` (B, 1+T); with ``states`` (B, T, d), the residual stream
    of positions 1..T after decoder layer ``layer`` (1-based) is replaced by ``states``."""
    embeds = lm.model.get_input_embeddings()(lower_ids)
    if states is None:
        return soft_prefix(lm, embeds)

    def hook(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        h = torch.cat([h[:, :1], states.to(h.dtype)], 1)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = lm.decoder_layers()[layer - 1].register_forward_hook(hook)
    try:
        return soft_prefix(lm, embeds)
    finally:
        handle.remove()


def selftest(lm: FrozenLM, ids: list[int]) -> float:
    """Keys of the article computed at positions shifted by +7, re-rotated by -7, must equal the unshifted keys."""
    rotary = lm.model.base_model.rotary_emb
    t = torch.tensor([ids])
    caches = []
    for shift in (0, 7):
        cache = DynamicCache(config=lm.model.config)
        lm.model.base_model(input_ids=t, attention_mask=torch.ones_like(t),
                            position_ids=shift + torch.arange(len(ids))[None], cache=cache, use_cache=True)
        caches.append(cache)
    pos = torch.arange(len(ids))
    err = 0.0
    for a, b in zip(caches[0].layers, caches[1].layers):
        k = rerotate(b.keys[0], pos + 7, pos, rotary)
        err = max(err, float((k - a.keys[0]).abs().max() / a.keys[0].abs().max()))
    return err


# ---- evaluation ---------------------------------------------------------------------------------------------------
def answer_items(lm: FrozenLM, items: list, prompt_of, prefix_of=None, length_of=None, batch: int = 16,
                 max_new_tokens: int = 16) -> dict[int, str]:
    """Greedy answers {item index: text}. With a prefix, items are batched by prefix length (a Prefix has no padding
    mask): ``length_of(item)`` gives it, ``prefix_of(items)`` builds the batch's prefix."""
    tok = lm.tokenizer
    order = sorted(range(len(items)), key=lambda i: (length_of(items[i]) if length_of else 0, i))
    preds: dict[int, str] = {}
    s = 0
    while s < len(order):
        L = length_of(items[order[s]]) if length_of else 0
        part = [order[s]]
        while len(part) < batch and s + len(part) < len(order) and \
                (length_of(items[order[s + len(part)]]) if length_of else 0) == L:
            part.append(order[s + len(part)])
        s += len(part)
        qs_ = [items[i] for i in part]
        prefix = prefix_of(qs_) if prefix_of else None
        outs = lm.generate([tok(prompt_of(q))["input_ids"] for q in qs_], prefix, max_new_tokens)
        for i, o in zip(part, outs):
            preds[i] = tok.decode(o).strip()
    return preds


def score(rows: list[dict], kinds: list[str]) -> dict:
    f1s = [r["f1"] * 100 for r in rows]
    mean = sum(f1s) / len(f1s)
    se = math.sqrt(sum((x - mean) ** 2 for x in f1s) / (len(f1s) - 1) / len(f1s)) if len(f1s) > 1 else float("nan")
    out = aggregate(rows) | {"f1_se": se, "n": len(rows)}
    out["f1_by_kind"] = {k: round(aggregate([r for r, kk in zip(rows, kinds) if kk == k])["f1"], 1)
                         for k in KINDS if k in kinds}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="validation", choices=synthetic.SPLITS)
    ap.add_argument("--entities", type=int, default=120)
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", nargs="+", default=["base", "rag1", "text", "emb", "kv", "hid"],
                    choices=["base", "rag1", "text", "emb", "kv", "hid", "hid+ids"])
    ap.add_argument("--budgets", nargs="+", default=["facts", "16", "32", "48"], help="'facts' and/or token counts")
    ap.add_argument("--layers", nargs="+", type=int, default=[4, 8, 12, 18], help="splice layers m for hid rows")
    ap.add_argument("--hid-budgets", nargs="+", default=None, help="budgets for hid rows (default: --budgets)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="JSON results (rewritten after every row)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    lm = FrozenLM.load(DEFAULT_LM)
    tok = lm.tokenizer
    docs, qs = synthetic.generate(args.split, args.entities, seed=args.seed)
    by_id = {d.id: d for d in docs}
    items = random.Random(args.seed).sample([q for q in qs if q.doc_ids], min(args.questions, len(qs)))
    kinds = [question_kind(q)["kind"] for q in items]
    budgets = [None if b == "facts" else int(b) for b in args.budgets]
    hid_budgets = budgets if args.hid_budgets is None else [None if b == "facts" else int(b) for b in args.hid_budgets]
    all_budgets = list(dict.fromkeys(budgets + hid_budgets))
    need_layers = sorted(set(args.layers)) if {"hid", "hid+ids"} & set(args.rows) else []
    sink, filler = tok.convert_tokens_to_ids(SINK), tok(FILLER, add_special_tokens=False)["input_ids"]
    assert len(filler) == 1, filler
    filler = filler[0]
    rotary = lm.model.base_model.rotary_emb

    # per article: ids, selections, and the stored forms at the selected positions
    arts: dict[str, dict] = {}
    with torch.no_grad():
        for doc_id in sorted({q.doc_ids[0] for q in items}):
            doc = by_id[doc_id]
            text = document_text(doc)
            ids, core = fact_core(tok, text, article_facts(doc)["fields"])
            a = {"ids": ids, "core": len(core), "sel": {b: select(len(ids), core, b) for b in all_budgets}}
            if {"kv", "hid", "hid+ids"} & set(args.rows):
                hs, kv = article_states(lm, ids, need_layers)
                a["hid"] = {(m, b): hs[m][a["sel"][b]] for m in need_layers for b in hid_budgets}
                if "kv" in args.rows:
                    a["kv"] = {}
                    for b in budgets:
                        src = torch.tensor([0] + a["sel"][b])
                        dst = torch.arange(len(src))
                        keys = torch.stack([rerotate(k[:, src], src, dst, rotary) for k, _ in kv])  # (L, H, 1+T, D)
                        vals = torch.stack([v[:, src] for _, v in kv])
                        a["kv"][b] = (keys, vals)
            arts[doc_id] = a
        err = selftest(lm, arts[items[0].doc_ids[0]]["ids"])
    core_lens = [arts[q.doc_ids[0]]["core"] for q in items]
    info = {
        "machine_threads": args.threads, "split": args.split, "entities": args.entities, "questions": len(items),
        "seed": args.seed, "kinds": {k: kinds.count(k) for k in KINDS},
        "fact_tokens_per_article_mean": round(sum(core_lens) / len(core_lens), 1),
        "fact_tokens_per_article_min_max": [min(core_lens), max(core_lens)],
        "rerotation_selftest_max_rel_err": err,
        "sink": SINK, "filler": repr(FILLER), "greedy_max_new_tokens": args.max_new_tokens,
        "latent_prompt": repr("\n\n" + BASE_PROMPT), "text_prompt": repr(RAG_PROMPT),
    }
    print(json.dumps(info), flush=True)
    results: dict = {"info": info, "items": [[q.id, q.question, q.answers[0], k] for q, k in zip(items, kinds)],
                     "rows": {}}

    def bname(b):
        return "facts" if b is None else str(b)

    def run(name: str, prompt_of, prefix_of=None, length_of=None) -> None:
        t0 = time.time()
        preds = answer_items(lm, items, prompt_of, prefix_of, length_of, args.batch, args.max_new_tokens)
        rows = [score_answer(preds[i], items[i].answers) for i in range(len(items))]
        res = score(rows, kinds) | {"seconds": round(time.time() - t0, 1),
                                    "predictions": [preds[i] for i in range(len(items))]}
        results["rows"][name] = res
        print(f"{name:>18}  EM {res['em']:5.1f}  F1 {res['f1']:5.1f} ± {res['f1_se']:.1f}  "
              f"by kind {res['f1_by_kind']}  ({res['seconds']:.0f} s)", flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results | {"wall_s": round(time.time() - t_start, 1)}, indent=1))

    latent_prompt = lambda q: "\n\n" + BASE_PROMPT.format(question=q.question.strip())
    art = lambda q: arts[q.doc_ids[0]]
    if "base" in args.rows:
        run("base", lambda q: prompt_for("base", q.question))
    if "rag1" in args.rows:
        run("rag1", lambda q: prompt_for("rag", q.question, [by_id[q.doc_ids[0]]]))
    for b in budgets:
        sel = lambda q, b=b: art(q)["sel"][b]
        length = lambda q, sel=sel: len(sel(q))
        if "text" in args.rows:
            run(f"text:{bname(b)}",
                lambda q, sel=sel: RAG_PROMPT.format(context=tok.decode([art(q)["ids"][i] for i in sel(q)]),
                                                     question=q.question.strip()))
        if "emb" in args.rows:
            run(f"emb:{bname(b)}", latent_prompt,
                lambda qs_, sel=sel: spliced_prefix(
                    lm, torch.tensor([[sink] + [art(q)["ids"][i] for i in sel(q)] for q in qs_]), None, None),
                length)
        if "kv" in args.rows:
            run(f"kv:{bname(b)}", latent_prompt,
                lambda qs_, b=b: Prefix(torch.stack([art(q)["kv"][b][0] for q in qs_]),
                                        torch.stack([art(q)["kv"][b][1] for q in qs_])),
                length)
    for b in hid_budgets:
        sel = lambda q, b=b: art(q)["sel"][b]
        length = lambda q, sel=sel: len(sel(q))
        for m in args.layers:
            for variant in ("hid", "hid+ids"):
                if variant not in args.rows:
                    continue
                lower = ((lambda q, sel=sel: [filler] * len(sel(q))) if variant == "hid"
                         else (lambda q, sel=sel: [art(q)["ids"][i] for i in sel(q)]))
                run(f"{variant}@{m}:{bname(b)}", latent_prompt,
                    lambda qs_, m=m, b=b, lower=lower: spliced_prefix(
                        lm, torch.tensor([[sink] + lower(q) for q in qs_]),
                        torch.stack([art(q)["hid"][(m, b)] for q in qs_]), m),
                    length)
    print(f"wall {time.time() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
