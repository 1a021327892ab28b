"""Build a readout-memory checkpoint (``macstream train-readout``): the one recipe of the shipped checkpoint.

The memory (pipeline/model/readout.py): a selector keeps T tokens of each document window, the modulation is the
frozen LM's own RMS-normalised layer-m states there (T x d_LM), and a linear readout turns each state into a key and a
value for every layer. Four stages on the synthetic training split (the fourth also on RealTimeQA 2022–23); the LM
stays frozen and nothing here runs at ingest or query time:

1. one forward pass per training article: the ridge statistics of ``[rms(h_m), 1] -> every layer's (pre-RoPE key,
   value)`` over all its tokens, and the selector's labels (the tokens of the article's facts, from the generator);
2. fit the selector (logistic regression) and the readout (ridge regression): closed form, minutes;
3. fine-tune the readout end to end: answer NLL through the frozen LM, each question with its own article's memory at
   the selector's positions, in the product's ``mac`` prompt (and a share in the ``mac+rag`` prompt, so the prefix
   learns not to disturb a document in the context); judged every ``eval_every`` steps on unseen validation
   questions by the information gain on names (NLL with a same-type other article's memory − NLL with its own) and
   gold-only greedy F1; resumable from ``OUT/last.pt``. With ``span_share`` > 0 that share of each batch is span
   recall on real news (pipeline/span_recall.py: a cloze question on a RealTimeQA window, answered from its memory),
   and the judge adds the synthetic style never trained on and held-out-week spans;
4. train the question encoder and the aggregator to pick the gold document's memory among the retriever's top-K
   (selection loss −log mass(gold)), on synthetic questions and RealTimeQA 2022–23 (real news; its last weeks held
   out to judge the pick); the LM is not involved, so this is cheap. ``--selection-from`` reruns only this stage.

``--readout-from`` (:func:`continue_readout`) reruns only stage 3 from a checkpoint: the shipped readout was tuned so,
with span recall, from the checkpoint the defaults build (its config.json records each continuation).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from pipeline.config import ModelConfig, ReadoutTrainConfig
from pipeline.data import synthetic
from pipeline.diagnose import article_facts, fact_core, question_kind, same_type_others
from pipeline.metrics import score_answer
from pipeline.model.mac import MACModel
from pipeline.model.readout import TokenSelector, article_states, kv_targets, rms
from pipeline.prompts import answer_continuation, document_text, prompt_for
from pipeline.schemas import Document, Question
from pipeline.span_recall import SpanItem, span_items


def readout_model_config(cfg: ReadoutTrainConfig) -> ModelConfig:
    """The model a build makes: ModelConfig's defaults, with the recipe's layer m and T."""
    return ModelConfig(lm_state_layer=cfg.layer, num_tokens=cfg.num_tokens)


def ridge(xtx: torch.Tensor, xty: torch.Tensor, lam: float) -> torch.Tensor:
    """Ridge solution of the sufficient statistics of [x, 1] → y; λ as a multiple of the mean diagonal of XᵀX."""
    eye = torch.eye(xtx.shape[0], dtype=xtx.dtype)
    return torch.linalg.solve(xtx + lam * xtx.diagonal().mean() * eye, xty).float()


def fit_selector(x: torch.Tensor, y: torch.Tensor, iters: int = 100) -> TokenSelector:
    """Logistic regression (L-BFGS, full batch) of fact-token labels y (N,) on RMS-normalised states x (N, d)."""
    sel = TokenSelector(x.shape[1])
    opt = torch.optim.LBFGS(sel.parameters(), max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(sel(x), y) + 1e-4 * sel.score.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return sel


@torch.no_grad()
def fit_linear(model: MACModel, docs: list[Document], ridge_lambda: float) -> dict:
    """Stages 1–2: one pass over ``docs`` (synthetic articles, one window each), then the selector and the readout
    are set on ``model`` in place. Returns the fit's statistics."""
    lm, layer = model.lm, model.cfg.lm_state_layer
    xtx = xty = 0
    xs, ys, block, n_tokens = [], [], [], 0

    def flush() -> None:
        nonlocal xtx, xty
        x = torch.cat([b[0] for b in block])
        x = torch.cat([x, torch.ones(x.shape[0], 1)], 1)  # [features, 1]
        y = torch.cat([b[1] for b in block])
        xtx, xty = xtx + (x.T @ x).double(), xty + (x.T @ y).double()  # float64 sums of float32 block products
        block.clear()

    for doc in docs:
        text = document_text(doc)
        ids, core = fact_core(lm.tokenizer, text, article_facts(doc)["fields"])
        hs, kv = article_states(lm, ids, [layer])
        x = rms(hs[layer][1:].float())  # (S-1, d): the sink excluded
        block.append((x, kv_targets(lm, kv)[1:]))
        label = torch.zeros(len(ids))
        label[core] = 1
        xs.append(x)
        ys.append(label[1:])
        n_tokens += x.shape[0]
        if len(block) == 32:
            flush()
    if block:
        flush()
    model.expander.set_linear(ridge(xtx, xty, ridge_lambda))
    sel = fit_selector(torch.cat(xs), torch.cat(ys))
    model.amortizer.load_state_dict(sel.state_dict())
    p = sel(torch.cat(xs)) > 0  # probability above 0.5
    y = torch.cat(ys).bool()
    return {"articles": len(docs), "tokens": n_tokens, "selector_recall": round(float((p & y).sum() / y.sum()), 3),
            "selector_precision": round(float((p & y).sum() / p.sum().clamp(min=1)), 3)}


@torch.no_grad()
def modulations(model: MACModel, docs: list[Document]) -> dict[str, torch.Tensor]:
    """Each document's first-window modulation (T, d), as ingest computes it."""
    out = {}
    for s in range(0, len(docs), 16):
        part = docs[s: s + 16]
        mods, _ = model.modulate([model.windows(document_text(d))[0] for d in part])
        out.update({d.id: m for d, m in zip(part, mods)})
    return out


def _mac_prompt(model: MACModel, q: Question, doc: Document | None) -> list[int]:
    """The product's prompt: ``mac`` (question only) or, with ``doc``, ``mac+rag`` (its text in the context)."""
    text = prompt_for("mac", q.question) if doc is None else prompt_for("mac+rag", q.question, [doc])
    return model.lm.tokenizer(text)["input_ids"]


@torch.no_grad()
def greedy_f1(model: MACModel, questions: list[str], answers: list[list[str]], memories: list[torch.Tensor],
              batch: int = 16) -> dict:
    """Greedy ``mac`` answers, each question with its own memory (T, D) as the only one: EM and F1 (%)."""
    tok, rows, dev = model.lm.tokenizer, [], model.lm.device
    batch = batch if dev.type == "cpu" else 8 * batch  # one accelerator batch costs about what one CPU row does
    for s in range(0, len(questions), batch):
        prompts = [tok(prompt_for("mac", q))["input_ids"] for q in questions[s: s + batch]]
        prefix = model.expander(torch.stack([m.to(dev, torch.float32) for m in memories[s: s + batch]]))
        outs = model.lm.generate(prompts, prefix, 16)
        rows += [score_answer(tok.decode(o).strip(), a) for o, a in zip(outs, answers[s: s + batch])]
    return {"em": round(100 * sum(r["em"] for r in rows) / max(1, len(rows)), 1),
            "f1": round(100 * sum(r["f1"] for r in rows) / max(1, len(rows)), 1), "n": len(rows)}


@torch.no_grad()
def judge(model: MACModel, items: list[tuple[Question, Document]], others: list[Document],
          mods: dict[str, torch.Tensor], extra: dict[str, tuple[list[str], list[list[str]], list]] | None = None
          ) -> dict:
    """Information gain on names (NLL per answer token with a same-type other article's memory − with the article's
    own), overall, and gold-only greedy F1 in the ``mac`` prompt; plus, per ``extra`` set (name → questions, answers,
    memories), gold-only greedy EM/F1 (``<name>_em``, ``<name>_f1``)."""
    tok = model.lm.tokenizer
    prompts = [_mac_prompt(model, q, None) for q, _ in items]
    targets = [tok(answer_continuation(q.answers[0]), add_special_tokens=False)["input_ids"] for q, _ in items]
    nll = {}
    for name, docs in (("own", [d for _, d in items]), ("other", others)):
        s, n = model.lm.continuation_logprobs(prompts, targets, model.expander(torch.stack([mods[d.id] for d in docs])))
        nll[name] = (-s / n).tolist()
    names = [i for i, (q, _) in enumerate(items) if question_kind(q)["kind"] != "number"]
    gain_names = sum(nll["other"][i] - nll["own"][i] for i in names) / max(1, len(names))
    outs = model.lm.generate(prompts, model.expander(torch.stack([mods[d.id] for _, d in items])), 16)
    f1 = [score_answer(tok.decode(o).strip(), q.answers)["f1"] for (q, _), o in zip(items, outs)]
    row = {"nll_own": round(sum(nll["own"]) / len(items), 3), "nll_other": round(sum(nll["other"]) / len(items), 3),
           "info_gain": round(sum(o - w for o, w in zip(nll["other"], nll["own"])) / len(items), 3),
           "info_gain_names": round(gain_names, 3), "f1": round(100 * sum(f1) / len(f1), 1), "n": len(items)}
    for name, (questions, answers, memories) in (extra or {}).items():
        scored = greedy_f1(model, questions, answers, memories)
        row |= {f"{name}_em": scored["em"], f"{name}_f1": scored["f1"], f"{name}_n": scored["n"]}
    return row


def finetune_readout(model: MACModel, cfg: ReadoutTrainConfig, train: tuple[list[Document], list[Question]],
                     val: tuple[list[Document], list[Question]], mods: dict[str, torch.Tensor], out: Path,
                     log=print, spans: tuple[list[SpanItem], dict[str, torch.Tensor]] | None = None,
                     extra: dict[str, tuple] | None = None) -> list[dict]:
    """Stage 3 (see the module docstring); ``mods``: every train and validation document's modulation. ``spans``:
    span-recall items and their memories; ``round(span_share · batch)`` of each batch are drawn from them (the rest
    are synthetic questions). ``extra``: more sets judged with :func:`judge`. Resumes from ``out/last.pt``; returns
    the judged rows."""
    n_span = round(cfg.span_share * cfg.batch) if spans and spans[0] else 0  # no items found: synthetic only
    dev = model.lm.device
    docs, qs = train
    by_id = {d.id: d for d in docs}
    pool = [q for q in qs if q.doc_ids and q.doc_ids[0] in by_id]
    vdocs, vqs = val
    vby = {d.id: d for d in vdocs}
    items = [(q, vby[q.doc_ids[0]])
             for q in random.Random(cfg.seed).sample([q for q in vqs if q.doc_ids], min(cfg.eval_questions, len(vqs)))]
    others, _ = same_type_others(items, vdocs, seed=cfg.seed)
    opt = torch.optim.Adam(model.expander.parameters(), lr=cfg.lr)
    start, rows = 0, []
    last = out / "last.pt"
    if last.exists():
        saved = torch.load(last, map_location=dev)
        model.expander.load_state_dict(saved["readout"])
        opt.load_state_dict(saved["opt"])
        start, rows = saved["step"], saved["rows"]
        log(f"readout: resumed at step {start}")
    rng = random.Random(f"{cfg.seed}:{start}")
    tok = model.lm.tokenizer
    if start == 0:
        rows.append({"step": 0} | judge(model, items, others, mods, extra))
        log(f"readout step 0: {rows[-1]}")
    t0 = time.time()
    for step in range(start + 1, cfg.steps + 1):
        batch = rng.sample(pool, cfg.batch - n_span)
        with_doc = [rng.random() < cfg.rag_share for _ in batch]
        prompts = [_mac_prompt(model, q, by_id[q.doc_ids[0]] if w else None) for q, w in zip(batch, with_doc)]
        answers = [q.answers[0] for q in batch]
        memory = [mods[q.doc_ids[0]] for q in batch]
        for item in rng.sample(spans[0], n_span) if n_span else []:  # cloze questions on real news windows
            prompts.append(tok(prompt_for("mac", item.question))["input_ids"])
            answers.append(item.answer)
            memory.append(spans[1][item.doc_id])
        targets = [tok(answer_continuation(a), add_special_tokens=False)["input_ids"] for a in answers]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            prefix = model.expander(torch.stack([m.to(dev, torch.float32) for m in memory]))  # (B, L, H, 1+T, D)
            s, n = model.lm.continuation_logprobs(prompts, targets, prefix)
            loss = -s.sum() / n.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            rate = (step - start) / (time.time() - t0)
            log(f"readout step {step}/{cfg.steps} loss {float(loss):.3f} {rate:.2f} steps/s "
                f"ETA {(cfg.steps - step) / rate / 60:.1f} min")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            rows.append({"step": step, "loss": round(float(loss.detach()), 3)}
                        | judge(model, items, others, mods, extra))
            log(f"readout step {step}: {rows[-1]}")
            torch.save({"readout": model.expander.state_dict(), "opt": opt.state_dict(), "step": step, "rows": rows},
                       last)
    return rows


def retrieved_with_gold(model: MACModel, docs: list[Document], qs: list[Question], k: int) -> list[tuple]:
    """Per question whose gold document is in ``docs``: (question, the retriever's top-``k`` document indices over
    ``docs``, their cosines (k,), the gold's index among them). The gold is forced in (last slot) when the retriever
    misses it, so a selection loss always has a target; accuracy on these lists is therefore an upper bound of the
    product's, for any picker and the retriever alike."""
    vecs = model.encoder.embed([document_text(d) for d in docs])  # (N, d_enc), unit norm
    row = {d.id: i for i, d in enumerate(docs)}
    qs = [q for q in qs if q.doc_ids and q.doc_ids[0] in row]
    out = []
    for q, scores in zip(qs, model.encoder.embed([q.question for q in qs]) @ vecs.T):  # (N,) cosines per question
        top = scores.topk(min(k, len(docs))).indices.tolist()
        gold = row[q.doc_ids[0]]
        if gold not in top:
            top[-1] = gold
        out.append((q, top, scores[top], top.index(gold)))
    return out


def selection_rows(model: MACModel, docs: list[Document], qs: list[Question], mods: dict[str, torch.Tensor],
                   k: int) -> list[tuple]:
    """:func:`retrieved_with_gold` as stage 4 trains on it: (question text, the top-k memories (k, T, d), their
    scores (k,), the gold's index)."""
    return [(q.question, torch.stack([mods[docs[i].id] for i in top]), scores, gold)
            for q, top, scores, gold in retrieved_with_gold(model, docs, qs, k)]


def realtimeqa_selection_data(cfg: ReadoutTrainConfig) -> tuple[tuple, tuple] | None:
    """RealTimeQA quizzes of ``cfg.selection_realtimeqa_years`` (never 2024 or later: those are test years) as
    (train, validation) ``(documents, questions)`` pairs, split by week: the last ``selection_validation_share`` of
    the quiz dates (the last weeks of the last year) are held out. ``None`` when the data folder is absent or no year
    is configured."""
    from pipeline.data import realtimeqa

    if not cfg.selection_realtimeqa_years or not realtimeqa.available():
        return None
    docs, qs = realtimeqa.load(cfg.selection_realtimeqa_years)
    by_id = {d.id: d for d in docs}
    qs = [q for q in qs if q.doc_ids and q.doc_ids[0] in by_id and q.asked_at is not None]
    dates = sorted({q.asked_at.date() for q in qs})
    held = set(dates[len(dates) - max(1, round(cfg.selection_validation_share * len(dates))):])
    train = [q for q in qs if q.asked_at.date() not in held]
    val = [q for q in qs if q.asked_at.date() in held]
    return ([by_id[q.doc_ids[0]] for q in train], train), ([by_id[q.doc_ids[0]] for q in val], val)


def train_selection(model: MACModel, cfg: ReadoutTrainConfig, pools: dict[str, tuple[list, list]], log=print) -> dict:
    """Stage 4: the question encoder and aggregator learn to put the most mass on the gold document among the
    retriever's top ``select_k`` (gold forced in), as serve retrieves them. ``pools``: name → (train rows, validation
    rows) of :func:`selection_rows` (synthetic; RealTimeQA 2022–23 when present, so the selection meets real news);
    each step draws from one pool, RealTimeQA with probability ``selection_realtimeqa_share``. Returns, per pool,
    validation selection accuracy before and after next to the retriever's top-1."""
    bias = [model.aggregator.bias_scale] if model.aggregator.bias_scale is not None else []
    rest = [p for p in [*model.question_encoder.parameters(), *model.aggregator.parameters()]
            if all(p is not b for b in bias)]
    # the weight of the retriever's score (init 10) gets its own rate: at the shared 1e-3, 600 Adam steps can move
    # it by 0.6 at most, and on real news the selection needed it at ~26
    opt = torch.optim.Adam([{"params": rest}, {"params": bias, "lr": cfg.select_bias_lr}], lr=cfg.select_lr)
    rng = random.Random(cfg.seed)

    def masses(rows) -> torch.Tensor:  # (B, k) aggregator mass per memory
        q = model.encode_questions([r[0] for r in rows]).tokens
        return model.aggregator(q, torch.stack([r[1] for r in rows]), None, torch.stack([r[2] for r in rows]))[1]

    def accuracy(rows) -> tuple[float, float]:
        hit = top1 = 0
        with torch.no_grad():
            for s in range(0, len(rows), 64):
                part = rows[s: s + 64]
                hit += sum(int(m.argmax()) == r[3] for m, r in zip(masses(part), part))
                top1 += sum(int(r[2].argmax()) == r[3] for r in part)
        return 100 * hit / max(1, len(rows)), 100 * top1 / max(1, len(rows))

    before = {name: accuracy(va)[0] for name, (_, va) in pools.items()}
    for step in range(1, cfg.select_steps + 1):
        name = "realtimeqa" if "realtimeqa" in pools and rng.random() < cfg.selection_realtimeqa_share else "synthetic"
        tr = pools[name][0]
        part = rng.sample(tr, min(cfg.batch * 2, len(tr)))
        mass = masses(part)
        loss = -torch.log(mass[torch.arange(len(part)), torch.tensor([r[3] for r in part])] + 1e-6).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            log(f"selection step {step}/{cfg.select_steps} loss {loss.item():.3f}")
    out = {"k": cfg.select_k, "steps": cfg.select_steps, "retriever_weight": round(bias[0].item(), 2) if bias else None}
    for name, (tr, va) in pools.items():
        after, retriever = accuracy(va)
        out[name] = {"selection_before": round(before[name], 1), "selection_after": round(after, 1),
                     "retriever_top1": round(retriever, 1), "train_questions": len(tr), "validation_questions": len(va)}
    return out


def selection_pools(model: MACModel, cfg: ReadoutTrainConfig, train: tuple, val: tuple,
                    mods: dict[str, torch.Tensor], log=print) -> dict[str, tuple[list, list]]:
    """The rows stage 4 trains and judges on: synthetic (retrieval over the split's articles) and, when the data
    are here, RealTimeQA (retrieval over the split's evidence documents); RealTimeQA modulations computed here."""
    pools = {"synthetic": (selection_rows(model, *train, mods, cfg.select_k),
                           selection_rows(model, *val, mods, cfg.select_k))}
    rtqa = realtimeqa_selection_data(cfg)
    if rtqa is not None:
        (rtd, rtq), (rvd, rvq) = rtqa
        mods = mods | modulations(model, rtd + rvd)
        pools["realtimeqa"] = (selection_rows(model, rtd, rtq, mods, cfg.select_k),
                               selection_rows(model, rvd, rvq, mods, cfg.select_k))
        log(f"selection: RealTimeQA {cfg.selection_realtimeqa_years}: {len(pools['realtimeqa'][0])} train, "
            f"{len(pools['realtimeqa'][1])} held-out questions (the last weeks)")
    return pools


def span_data(model: MACModel, cfg: ReadoutTrainConfig, log=print) -> tuple[tuple, tuple] | None:
    """Span recall's (train, judge) pairs of (items, memories) (pipeline/span_recall.py): ``span_items`` items from
    the training weeks' evidence texts of ``span_years`` and, for 2022, the stored search-result articles (full
    length), none when ``span_share`` is 0; ``eval_questions`` judge items from the held-out weeks' evidence texts
    (never trained on). None when the RealTimeQA folder is absent."""
    from pipeline.data import realtimeqa

    if not realtimeqa.available():
        return None
    (train_docs, _), (held_docs, _) = realtimeqa_selection_data(
        cfg.model_copy(update={"selection_realtimeqa_years": cfg.span_years}))
    articles = ([d for d in realtimeqa.load([2022], with_search_results=True)[0] if "-gcs" in d.id]
                if 2022 in cfg.span_years else [])
    train_docs = list({d.id: d for d in train_docs + articles}.values())
    held_docs = list({d.id: d for d in held_docs}.values())
    t0 = time.time()
    train = span_items(model, train_docs, cfg.span_items, seed=cfg.seed) if cfg.span_share > 0 else ([], {})
    held = span_items(model, held_docs, cfg.eval_questions, seed=cfg.seed)
    log(f"span recall: {len(train[0])} training items from {len(train_docs)} documents, {len(held[0])} judge items "
        f"from {len(held_docs)} held-out documents ({time.time() - t0:.0f} s)")
    return train, held


def other_style_judge(model: MACModel, cfg: ReadoutTrainConfig) -> tuple[list[str], list[list[str]], list]:
    """``eval_questions`` questions of the synthetic validation split in the style never trained on, each with its
    own article's memory: the judged set ``other`` (does the readout spell outside its generator?)."""
    docs, qs = synthetic.generate("validation", max(20, cfg.synthetic_entities // 5), seed=cfg.seed, style="other")
    by_id = {d.id: d for d in docs}
    qs = random.Random(cfg.seed).sample([q for q in qs if q.doc_ids and q.doc_ids[0] in by_id],
                                        min(cfg.eval_questions, len(qs)))
    mods = modulations(model, [by_id[i] for i in sorted({q.doc_ids[0] for q in qs})])
    return [q.question for q in qs], [q.answers for q in qs], [mods[q.doc_ids[0]] for q in qs]


def continue_readout(cfg: ReadoutTrainConfig, start: Path, out: Path, log=print, device: str = "cpu") -> str:
    """Stage 3 again from the checkpoint in ``start``: its readout tuned ``cfg.steps`` more steps (with span recall
    when ``span_share`` > 0); its selector, question encoder and aggregator kept, and so are its answer prompt and
    pick rule (copied): the modulations are the LM's states at the selector's positions and none of those depends on
    the readout. A new version (the readout's weights change). Resumes from ``out/last.pt``."""
    import shutil

    from pipeline.model.pick import PICK_FILE
    from pipeline.model.prompt import PROMPT_FILE

    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    model = MACModel.load(start).to_device(device)
    if model.cfg != readout_model_config(cfg):
        raise ValueError(f"{start}: not a readout checkpoint of this config's shape (layer, num_tokens)")
    metrics = json.loads((start / "metrics.json").read_text()) if (start / "metrics.json").exists() else {}
    train = synthetic.generate("train", cfg.synthetic_entities, seed=cfg.seed)
    val = synthetic.generate("validation", max(20, cfg.synthetic_entities // 5), seed=cfg.seed)
    mods = modulations(model, train[0] + val[0])
    spans = span_data(model, cfg, log)
    extra = {"other": other_style_judge(model, cfg)}
    if spans is not None:
        extra["span"] = ([i.question for i in spans[1][0]], [[i.answer] for i in spans[1][0]],
                         [spans[1][1][i.doc_id] for i in spans[1][0]])
    rows = finetune_readout(model, cfg, train, val, mods, out, log, spans[0] if spans else None, extra)
    metrics |= {"readout_continued_from": model.version, "readout_continued": rows,
                "readout_continued_seconds": round(time.time() - t0, 1)}
    meta = json.loads((start / "config.json").read_text())
    where = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    version = model.to_device("cpu").save(out, train_config=meta.get("train", {}), metrics=metrics)
    # the base recipe stays the ``train`` record; each continuation is recorded after it, in order
    meta = json.loads((out / "config.json").read_text()) | {"continued": meta.get("continued", []) + [
        {"from": metrics["readout_continued_from"], "train": cfg.model_dump(), "device": where}]}
    (out / "config.json").write_text(json.dumps(meta, indent=2, default=str))
    for name in (PICK_FILE, PROMPT_FILE):
        if (start / name).exists():
            shutil.copy(start / name, out / name)
    (out / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics.get("readout", []) + rows))
    return version


def build(cfg: ReadoutTrainConfig, out: Path, log=print, start_from: Path | None = None) -> str:
    """All four stages → a checkpoint in ``out`` (config.json, weights.safetensors, metrics.json). Returns its version.
    ``start_from``: an existing readout checkpoint whose selector and readout are kept; only stage 4 runs again (its
    synthetic split is regenerated from ``cfg``: give the entities and seed it was built with)."""
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    train = synthetic.generate("train", cfg.synthetic_entities, seed=cfg.seed)
    val = synthetic.generate("validation", max(20, cfg.synthetic_entities // 5), seed=cfg.seed)
    if start_from is not None:
        model = MACModel.load(start_from)
        if model.cfg != readout_model_config(cfg):
            raise ValueError(f"{start_from}: not a readout checkpoint of this config's shape (layer, num_tokens)")
        metrics = (json.loads((start_from / "metrics.json").read_text()) if (start_from / "metrics.json").exists()
                   else {})
        metrics["selection_retrained_from"] = model.version
        rows = metrics.get("readout", [])
    else:
        # trainable (and saved): selector, readout, question encoder, aggregator
        model = MACModel(readout_model_config(cfg))
        fit = fit_linear(model, train[0], cfg.ridge)
        log(f"fitted the selector and the readout: {fit} ({time.time() - t0:.0f} s)")
        metrics = {"fit": fit}
    mods = modulations(model, train[0] + val[0])  # the selector is fixed from here on: ingest's modulations, once
    if start_from is None:
        rows = finetune_readout(model, cfg, train, val, mods, out, log)
    selection = train_selection(model, cfg, selection_pools(model, cfg, train, val, mods, log), log)
    log(f"selection: {selection}")
    metrics |= {"readout": rows, "selection": selection,
                "selection_seconds" if start_from is not None else "seconds": round(time.time() - t0, 1)}
    version = model.save(out, train_config=cfg.model_dump(), metrics=metrics)
    (out / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return version
