"""``macstream diagnose``: does the memory carry the document? A confound-free measurement of a checkpoint.

Every sampled question is answered (teacher-forced) with one memory of three:

- **gold**: the question's own article as the only memory;
- **other**: an article of the *same event type* (so it can answer the same question kind) about *another company*.
  The old instrument took the next article of another company, usually a different kind of event, so most of its
  gap was the wrong article *hurting*, not the right one helping;
- **control**: no document at all: the mean modulation over the split's documents (what the memory says when it
  knows nothing in particular).

Reported per answer token, split by answer kind (person, city, product, company, number) and by answer piece (the
first BPE piece of the answer, the later pieces, and the closing newline that stops decoding):

- **information gain** = NLL(control) - NLL(gold): how much the gold article lowers the NLL of the answer beyond the
  document-free prior. ~0 on names means the memory carries the answer type, not the answer;
- **same-type gap** = NLL(other) - NLL(gold);
- teacher-forced **top-1 accuracy** per piece (is the answer's next piece the LM's argmax?).

Plus greedy gold-only answers (no retrieval, no selection): EM/F1 of ``base`` (the LM alone), ``mac`` (the gold
article's modulation as the only memory), ``rag`` (the gold text in the prompt), and ``mac`` with the control
memory (the prior), each with its standard error. Run on the synthetic validation split (entities never seen in
training) unless ``--split test``.

:func:`spelling` (``diagnose --spelling [--style other]``): for the ``mac`` answers that are wrong with the gold
article as the only memory, where exact recall dies: the selector did not keep the answer's tokens, the readout did
not make each of its pieces the LM's argmax (teacher-forced), or generation went astray after right pieces.

Legacy keys kept: ``nll_gold_memory``, ``nll_other_memory``, ``nll_gap`` (mean per-token answer NLL, now with the
same-type "other"), ``gold_only_{base,mac,rag}``.
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict

import numpy as np
import torch

from pipeline.answering import answer
from pipeline.data import synthetic
from pipeline.metrics import aggregate, score_answer
from pipeline.model.lm import Prefix, pad_batch
from pipeline.model.mac import MACModel
from pipeline.modulation import Modulation
from pipeline.prompts import MAC_PROMPT, answer_continuation, document_text, prompt_with
from pipeline.schemas import Document, Hit, Question

# the generator's fine answer kinds -> the kinds we report
ANSWER_KINDS = {"person": "person", "city": "city", "product": "product", "company": "company",
                "price": "number", "revenue": "number", "employees": "number", "deal": "number"}
KINDS = ("person", "city", "product", "company", "number")
PIECES = ("first", "later", "stop")
CONDITIONS = ("gold", "other", "control")


# ---- what the synthetic generator put where (derived from its own templates, no change to the generator) --------
_SLOT = {  # slots whose values come from a closed set: pinned, so a lazy neighbour cannot swallow their words
    "E": r"[A-Z][a-z]+ (?:" + "|".join(synthetic._COMPANY_SUFFIXES) + ")",
    "sector": "|".join(map(re.escape, synthetic._COMPANY_SUFFIXES.values())),
    "trend": "up from|down from",
    "date": r"[A-Z][a-z]+ \d{1,2}, \d{4}",
    "when": r"[A-Z][a-z]+ \d{4}",
}


def _template_regex(template: str) -> re.Pattern:
    """A ``str.format`` template → a full-match regex: the first ``{slot}`` captures, repeats must be equal."""
    out, seen, pos = [], set(), 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos:m.start()]))
        name = m.group(1)
        out.append(f"(?P={name})" if name in seen else f"(?P<{name}>{_SLOT.get(name, '.+?')})")
        seen.add(name)
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out), re.DOTALL)


_TEXT_RE = [(event, _template_regex(t)) for event, ts in synthetic._TEXTS.items() for t in ts]
_QUESTION_RE = [(event, kind, key, i, _template_regex(t))
                for event, kinds in synthetic._QUESTIONS.items() for kind, key, ts in kinds for i, t in enumerate(ts)]


def article_facts(doc: Document) -> dict:
    """Event type, company and fact fields of a synthetic article, parsed with the generator's templates.

    Returns ``{"event", "entity", "fields": {field: value}}``; ``fields`` holds the article's facts (new/old value,
    price, revenue, head counts, partner, deal), not the company, sector, date or trend words."""
    for event, rx in _TEXT_RE:
        m = rx.fullmatch(doc.text)
        if m:
            g = m.groupdict()
            facts = {k: v for k, v in g.items() if k not in ("E", "sector", "date", "trend")}
            return {"event": event, "entity": g["E"], "fields": facts}
    raise ValueError(f"{doc.id}: not a synthetic article (no template matches)")


def fact_core(tokenizer, text: str, facts: dict[str, str]) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and the positions of its fact tokens (first occurrence of each fact value, each span with
    the piece before it), sorted."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    core: set[int] = set()
    for value in facts.values():
        m = re.search(r"(?<![\w$])" + re.escape(value) + r"(?![\w])", text)
        if m is None:
            raise ValueError(f"fact {value!r} not in text")
        span = [i for i, (a, b) in enumerate(offs) if b > m.start() and a < m.end()]
        core |= set(span) | ({span[0] - 1} if span[0] > 0 else set())
    return ids, sorted(core)


def question_kind(q: Question) -> dict:
    """Event type, fine kind, answer field, template index and reported kind of a synthetic question."""
    for event, kind, key, i, rx in _QUESTION_RE:
        m = rx.fullmatch(q.question)
        if m:
            return {"event": event, "fine_kind": kind, "key": key, "template": i, "kind": ANSWER_KINDS[kind],
                    "entity": m.group("E")}
    raise ValueError(f"{q.id}: not a synthetic question (no template matches): {q.question!r}")


def same_type_others(items: list[tuple[Question, Document]], docs: list[Document],
                     seed: int = 0) -> tuple[list[Document], int]:
    """For each (question, gold article): an article of the same event type about another company (so it states
    the same kind of fact with another value), drawn with a seeded generator. Falls back to any other company's
    article when the split has no same-type one; returns the others and how many are same-type."""
    rng = random.Random(f"diagnose-other:{seed}")
    meta = {d.id: article_facts(d) for d in docs}
    by_event: dict[str, list[Document]] = defaultdict(list)
    for d in docs:
        by_event[meta[d.id]["event"]].append(d)
    others, same = [], 0
    for _, gold in items:
        g = meta[gold.id]
        pool = [d for d in by_event[g["event"]] if meta[d.id]["entity"] != g["entity"]]
        if pool:
            same += 1
        else:
            pool = [d for d in docs if meta[d.id]["entity"] != g["entity"]]
        others.append(rng.choice(pool))
    return others, same


# ---- per-token scoring ------------------------------------------------------------------------------------------
def answer_pieces(tokenizer, answer_text: str) -> tuple[list[int], list[str]]:
    """Token ids of the training target (" answer\\n") and each token's role: "first" (the answer's first BPE
    piece), "later" (its other pieces), "stop" (tokens past the answer: the newline that ends decoding)."""
    ids = tokenizer(answer_continuation(answer_text), add_special_tokens=False)["input_ids"]
    bare = tokenizer(" " + answer_text.strip(), add_special_tokens=False)["input_ids"]
    n = len(bare) if ids[: len(bare)] == bare else len(ids) - 1  # if the newline merged, all but the last
    n = max(1, min(n, len(ids)))
    return ids, ["first" if i == 0 else "later" if i < n else "stop" for i in range(len(ids))]


@torch.no_grad()
def token_scores(lm, prompts: list[list[int]], continuations: list[list[int]],
                 prefix: Prefix | None) -> list[tuple[list[float], list[bool]]]:
    """Per continuation token: log p(token | prompt, prefix, earlier tokens) and whether it is the argmax (teacher
    forcing). The same forward as :meth:`FrozenLM.continuation_logprobs`, kept per token."""
    dev, B = lm.device, len(prompts)
    ids, mask = pad_batch([p + c for p, c in zip(prompts, continuations)], lm.pad_id, dev)
    S = ids.shape[1]
    P = prefix.length if prefix is not None else 0
    full_mask = torch.cat([torch.ones((B, P), dtype=torch.long, device=dev), mask], 1)
    hidden = lm._body(ids, full_mask, (P + torch.arange(S, device=dev)).expand(B, S), lm._cache(prefix, B))
    out = []
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        cols = torch.arange(len(p) - 1, len(p) - 1 + len(c), device=dev)
        logp = torch.log_softmax(lm.model.get_output_embeddings()(hidden[i, cols]).float(), -1)
        tgt = torch.tensor(c, device=dev)
        out.append((logp.gather(1, tgt[:, None])[:, 0].tolist(), (logp.argmax(-1) == tgt).tolist()))
    return out


class PieceStats:
    """Accumulates per-token NLL and top-1 hits by (condition, kind, piece); kind "all" and piece "answer" (first +
    later, the answer without its newline) are added on the fly."""

    def __init__(self) -> None:
        self.nll: dict[tuple, float] = defaultdict(float)
        self.hit: dict[tuple, float] = defaultdict(float)
        self.n: dict[tuple, int] = defaultdict(int)

    def add(self, condition: str, kind: str, roles: list[str], logps: list[float], hits: list[bool]) -> None:
        if not (len(roles) == len(logps) == len(hits)):
            raise ValueError("roles, log-probs and hits must align token for token")
        for role, lp, h in zip(roles, logps, hits):
            for k in (kind, "all"):
                for piece in ((role, "answer") if role != "stop" else (role,)):
                    key = (condition, k, piece)
                    self.nll[key] += -lp
                    self.hit[key] += float(h)
                    self.n[key] += 1

    def mean_nll(self, condition: str, kind: str = "all", piece: str = "answer") -> float:
        key = (condition, kind, piece)
        return self.nll[key] / self.n[key] if self.n[key] else float("nan")

    def top1(self, condition: str, kind: str = "all", piece: str = "answer") -> float:
        key = (condition, kind, piece)
        return 100.0 * self.hit[key] / self.n[key] if self.n[key] else float("nan")

    def table(self) -> dict:
        """{kind: {piece: {tokens, nll_<cond>, top1_<cond>, info_gain, same_type_gap}}} over every kind seen."""
        kinds = [k for k in (*KINDS, "all") if self.n[("gold", k, "answer")]]
        out: dict = {}
        for k in kinds:
            out[k] = {}
            for piece in ("first", "later", "answer", "stop"):
                if not self.n[("gold", k, piece)]:
                    continue
                row = {"tokens": self.n[("gold", k, piece)]}
                for c in CONDITIONS:
                    if self.n[(c, k, piece)]:
                        row[f"nll_{c}"] = round(self.mean_nll(c, k, piece), 4)
                        row[f"top1_{c}"] = round(self.top1(c, k, piece), 2)
                if "nll_control" in row:
                    row["info_gain"] = round(row["nll_control"] - row["nll_gold"], 4)
                if "nll_other" in row:
                    row["same_type_gap"] = round(row["nll_other"] - row["nll_gold"], 4)
                out[k][piece] = row
        return out


def _se(rows: list[dict], key: str = "f1") -> float:
    v = np.array([r[key] for r in rows], dtype=float) * 100
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def mean_modulation(chunks: dict[str, object], model: MACModel) -> Modulation:
    """The document-free control: the mean of the split's modulations (first chunks), stamped like any other."""
    mean = np.mean([c.modulation.tokens.astype(np.float32) for c in chunks.values()], 0)
    return Modulation("control-mean", 0, 1, mean.astype(np.float16), model.model_id, model.version)


def between_doc_share(x: torch.Tensor) -> tuple[float, float]:
    """x (N documents, S slots, C channels) → (share, energy): the variance over documents (per slot and channel,
    summed) over the total variance around each channel's mean (over documents and slots), and over the mean squared
    value. share ~1: slots are alike and only documents differ; energy ~0: every document gives nearly the same
    tensor (the document part is a tiny fraction of each vector)."""
    x = x.double()
    between = x.var(0, unbiased=False).sum()
    total = x.reshape(-1, x.shape[-1]).var(0, unbiased=False).sum() * x.shape[1]
    energy = x.pow(2).mean(0).sum()
    return (float(between / total) if total > 0 else 0.0, float(between / energy) if energy > 0 else 0.0)


@torch.no_grad()
def document_signal(model: MACModel, mods: list[Modulation], question: str) -> dict:
    """Where the document signal dies: :func:`between_doc_share` of the modulations, of φ* (the aggregator's
    output, every document alone as the memory of one fixed question) and of each layer's prefix keys/values."""
    X = torch.stack([m.tensor() for m in mods])  # (N, T, D)
    N = X.shape[0]
    q_tokens, _ = model.encode_questions([question] * N)
    prefix, _ = model.prefix(q_tokens, X[:, None], torch.ones(N, 1, dtype=torch.bool), torch.ones(N, 1))
    phi, _ = model.aggregator(q_tokens, X[:, None], torch.ones(N, 1, dtype=torch.bool), torch.ones(N, 1))
    per_layer = {}
    for name, t in (("keys", prefix.keys), ("values", prefix.values)):  # (N, L, H, P, Dh)
        t = t.permute(1, 0, 3, 2, 4).reshape(t.shape[1], N, t.shape[3], -1)  # (L, N, P, H·Dh)
        per_layer[name] = [[float(f"{v:.3g}") for v in between_doc_share(t[layer])] for layer in range(t.shape[0])]
    r = lambda pair: [float(f"{v:.3g}") for v in pair]
    return {"documents": N, "question": question, "columns": ["share", "energy"],
            "modulation": r(between_doc_share(X)), "phi_star": r(between_doc_share(phi)),
            "prefix_keys_mean": r(np.mean(per_layer["keys"], 0)),
            "prefix_values_mean": r(np.mean(per_layer["values"], 0)),
            "prefix_per_layer": per_layer}


@torch.no_grad()
def diagnose(model: MACModel, split: str = "validation", entities: int = 120, questions: int = 240, seed: int = 0,
             batch: int = 16, greedy: bool = True, max_new_tokens: int = 16) -> dict:
    """The measurement described in the module docstring. ``greedy=False`` skips the greedy answers (NLLs only)."""
    model.eval()
    tok = model.lm.tokenizer
    docs, qs = synthetic.generate(split, entities, seed=seed)
    by_id = {d.id: d for d in docs}
    items = [(q, by_id[q.doc_ids[0]]) for q in qs if q.doc_ids and q.doc_ids[0] in by_id]
    items = random.Random(seed).sample(items, min(questions, len(items)))
    kinds = [question_kind(q)["kind"] for q, _ in items]
    chunks = {c.modulation.doc_id: c for c in model.encode_documents(docs) if c.modulation.chunk == 0}
    control = mean_modulation(chunks, model)
    others, same = same_type_others(items, docs, seed)
    out: dict = {"split": split, "questions": len(items), "entities": entities, "checkpoint": model.version,
                 "other": f"same event type, another company ({same}/{len(items)}; rest: any other company)",
                 "control": f"mean modulation over the split's {len(chunks)} documents",
                 "kinds": {k: kinds.count(k) for k in KINDS if k in kinds}}
    memories = {"gold": [chunks[d.id].modulation for _, d in items], "other": [chunks[d.id].modulation for d in others],
                "control": [control] * len(items)}
    stats = PieceStats()
    per_q: dict[str, list[float]] = {c: [] for c in CONDITIONS}  # mean per-token NLL per question (legacy metric)
    targets = [answer_pieces(tok, q.answers[0]) for q, _ in items]
    prompts = [tok(MAC_PROMPT.format(question=q.question))["input_ids"] for q, _ in items]
    prefixes: dict[str, list[Prefix]] = {c: [] for c in CONDITIONS}
    for cond in CONDITIONS:
        for s in range(0, len(items), batch):
            part = items[s: s + batch]
            prefix, _ = model.memory_prefix([q.question for q, _ in part],
                                            [[(m, 1.0)] for m in memories[cond][s: s + batch]])
            prefixes[cond].append(prefix)
            scored = token_scores(model.lm, prompts[s: s + batch], [t[0] for t in targets[s: s + batch]], prefix)
            for j, (lps, hits) in enumerate(scored):
                stats.add(cond, kinds[s + j], targets[s + j][1], lps, hits)
                per_q[cond].append(-sum(lps) / len(lps))
    nll = {c: sum(v) / len(v) for c, v in per_q.items()}
    out["nll_gold_memory"], out["nll_other_memory"] = nll["gold"], nll["other"]
    out["nll_control_memory"] = nll["control"]
    out["nll_gap"] = nll["other"] - nll["gold"]
    out["info_gain"] = nll["control"] - nll["gold"]
    out["per_token"] = stats.table()
    audit = [chunks[d.id].modulation for d in docs[:64]]
    out["document_signal"] = document_signal(model, audit, items[0][0].question)
    if not greedy:
        return out
    for mode in ("base", "mac", "rag"):
        rows = []
        for s in range(0, len(items), batch):
            part = items[s: s + batch]
            hits = [[Hit(chunks[d.id], d, 1.0)] for _, d in part]
            for (q, _), a in zip(part, answer(model, mode, [q.question for q, _ in part], hits, max_new_tokens)):
                rows.append(score_answer(a.text, q.answers))
        out[f"gold_only_{mode}"] = aggregate(rows) | {"f1_se": _se(rows)}
        out[f"gold_only_{mode}_by_kind"] = {k: aggregate([r for r, kk in zip(rows, kinds) if kk == k])
                                            for k in KINDS if k in kinds}
    rows = []  # the same tokens the memory stores, as plain text in the RAG prompt
    for s in range(0, len(items), batch):
        part = items[s: s + batch]
        kept = model.selected_tokens([model.windows(document_text(d))[0] for _, d in part])
        texts = [prompt_with("rag", q.question, [tok.decode(k)]) for (q, _), k in zip(part, kept)]
        outs = model.lm.generate([tok(t)["input_ids"] for t in texts], None, max_new_tokens)
        rows += [score_answer(tok.decode(o).strip(), q.answers) for (q, _), o in zip(part, outs)]
    out["gold_only_selected_text"] = aggregate(rows) | {"f1_se": _se(rows)}
    out["gold_only_selected_text_by_kind"] = {k: aggregate([r for r, kk in zip(rows, kinds) if kk == k])
                                              for k in KINDS if k in kinds}
    rows = []  # mac with the control memory: what the prefix says about no document in particular
    for b, s in enumerate(range(0, len(items), batch)):
        part = items[s: s + batch]
        outs = model.lm.generate(prompts[s: s + batch], prefixes["control"][b], max_new_tokens)
        rows += [score_answer(tok.decode(o).strip(), q.answers) for (q, _), o in zip(part, outs)]
    out["control_mac"] = aggregate(rows) | {"f1_se": _se(rows)}
    return out


# ---- spelling: where exact recall dies -----------------------------------------------------------------------------
STAGES = ("selector", "readout", "generation")


def answer_coverage(tokenizer, text: str, window: list[int], answer: str, kept: list[int]) -> float:
    """The share of the answer's tokens that the selector keeps (``kept``: positions in ``window``, the first window of
    ``text``), at the answer's best-kept occurrence in the window; 0.0 when the answer is not in the window."""
    offs = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"][: len(window)]
    kept_set, best = set(kept), 0.0
    for m in re.finditer(re.escape(answer.strip()), text):
        span = [i for i, (a, b) in enumerate(offs) if b > m.start() and a < m.end()]
        if span:
            best = max(best, sum(i in kept_set for i in span) / len(span))
    return best


def death_stage(covered: bool, answer_hits: list[bool]) -> str:
    """Where a wrong ``mac`` answer's exact recall died, first failing stage first: the ``selector`` did not keep
    every token of the answer; else the ``readout`` did not make every answer piece the LM's argmax (teacher-forced);
    else ``generation`` (every piece was the argmax: the stop, or what greedy decoding did after it, went wrong)."""
    if not covered:
        return "selector"
    return "readout" if not all(answer_hits) else "generation"


@torch.no_grad()
def spelling(model: MACModel, split: str = "test", entities: int = 60, questions: int = 240, seed: int = 0,
             style: str = "house", batch: int = 16, max_new_tokens: int = 16) -> dict:
    """For each sampled question of a synthetic split (``style``: the training style or the other one,
    :data:`pipeline.data.synthetic.STYLES`), its own article's first-window modulation as the only memory: the greedy
    ``mac`` answer; the teacher-forced top-1 of each piece of the gold answer (first piece, later pieces, the stop);
    and whether the selector kept every token of the answer in the window. For the wrong answers (strict EM 0):
    per-piece accuracy, selector coverage, and the first stage that failed (:func:`death_stage`)."""
    model.eval()
    tok = model.lm.tokenizer
    docs, qs = synthetic.generate(split, entities, seed=seed, style=style)
    by_id = {d.id: d for d in docs}
    items = [(q, by_id[q.doc_ids[0]]) for q in qs if q.doc_ids and q.doc_ids[0] in by_id]
    items = random.Random(seed).sample(items, min(questions, len(items)))
    gold = sorted({d.id for _, d in items})
    mods = {c.modulation.doc_id: c.modulation for c in model.encode_documents([by_id[i] for i in gold])
            if c.modulation.chunk == 0}
    windows = {i: model.windows(document_text(by_id[i]))[0] for i in gold}
    kept = dict(zip(gold, model.selected_positions([windows[i] for i in gold])))
    rows = []
    for s in range(0, len(items), batch):
        part = items[s: s + batch]
        prompts = [tok(MAC_PROMPT.format(question=q.question))["input_ids"] for q, _ in part]
        targets = [answer_pieces(tok, q.answers[0]) for q, _ in part]
        prefix, _ = model.memory_prefix([q.question for q, _ in part], [[(mods[d.id], 1.0)] for _, d in part])
        scored = token_scores(model.lm, prompts, [t[0] for t in targets], prefix)
        outs = model.lm.generate(prompts, prefix, max_new_tokens)
        for (q, d), (_, roles), (_, hits), o in zip(part, targets, scored, outs):
            text = tok.decode(o).strip()
            cov = answer_coverage(tok, document_text(d), windows[d.id], q.answers[0], kept[d.id])
            rows.append({"score": score_answer(text, q.answers), "roles": roles, "hits": hits, "coverage": cov,
                         "starts_right": text[:3].lower() == q.answers[0].strip()[:3].lower()})
    wrong = [r for r in rows if not r["score"]["em"]]

    def piece_accuracy(rs: list[dict]) -> dict:
        out = {}
        for piece in ("first", "later", "stop"):
            h = [hit for r in rs for role, hit in zip(r["roles"], r["hits"]) if role == piece]
            out[piece] = round(100 * sum(h) / len(h), 1) if h else None
        ans = [hit for r in rs for role, hit in zip(r["roles"], r["hits"]) if role != "stop"]
        out["answer"] = round(100 * sum(ans) / len(ans), 1) if ans else None
        return out

    def pct(xs) -> float | None:
        xs = list(xs)
        return round(100 * sum(xs) / len(xs), 1) if xs else None

    stages = [death_stage(r["coverage"] == 1.0, [h for role, h in zip(r["roles"], r["hits"]) if role != "stop"])
              for r in wrong]
    return {"split": split, "style": style, "entities": entities, "questions": len(rows), "checkpoint": model.version,
            "memory": "the question's own article's first window as the only memory (no retrieval, no selection)",
            "mac": aggregate([r["score"] for r in rows]),
            "starts_right": pct(r["starts_right"] for r in rows),
            "teacher_forced_top1": {"all": piece_accuracy(rows), "wrong": piece_accuracy(wrong),
                                    "right": piece_accuracy([r for r in rows if r["score"]["em"]])},
            "selector_keeps_whole_answer": {"all": pct(r["coverage"] == 1.0 for r in rows),
                                            "wrong": pct(r["coverage"] == 1.0 for r in wrong),
                                            "right": pct(r["coverage"] == 1.0 for r in rows if r["score"]["em"])},
            "selector_answer_token_share": {"wrong": round(100 * float(np.mean([r["coverage"] for r in wrong])), 1)
                                            if wrong else None},
            "wrong": len(wrong),
            "wrong_all_pieces_right": pct(all(h for role, h in zip(r["roles"], r["hits"]) if role != "stop")
                                          for r in wrong),
            "where_recall_dies": {k: stages.count(k) for k in STAGES}}
