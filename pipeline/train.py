"""Meta-training (amortization-based): answer NLL given question + aggregated prefix, the LM frozen.

Each step draws a batch of documents (grouped so that documents of the same entity or news week land together: hard
distractors) and up to ``questions_per_doc`` of their questions. Each question's memory is its gold document plus
``memory_size - 1`` distractors from the batch, in random order. Backpropagation dropout: only a random share of the
batch's documents is amortized with gradients; the rest are encoded under no_grad but still sit in the memory.
The selection loss −log(attention mass on the gold document) gives the aggregator the routing signal that the answer
loss alone does not (docs/design.md §5). Curriculum: stages of growing memory size. Per stage, optionally: the autoencoding
loss (``reconstruct_weight``: each article's text from its own modulation) and ``rag_share`` (questions trained in the
mac+rag format, with the gold article and a distractor as text in the prompt, so the prefix cooperates with a context).

Checkpoints: ``<out>/last`` (every validation, with optimiser state for resume) and ``<out>/best`` (best validation
F1; trainable weights only, fp16, what ships).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.config import ModelConfig, TrainConfig
from pipeline.data import realtimeqa, synthetic
from pipeline.metrics import aggregate, score_answer
from pipeline.model.mac import CONFIG, MACModel
from pipeline.prompts import MAC_PROMPT, RECALL_PROMPT, document_text, prompt_for
from pipeline.schemas import Document, Question

log = logging.getLogger(__name__)


@dataclass
class Pool:
    """Documents with their questions, grouped for hard-distractor batches."""

    docs: dict[str, Document]
    questions: dict[str, list[Question]]  # doc id → questions it answers
    groups: list[list[str]]  # doc ids that make good distractors for each other

    @classmethod
    def build(cls, docs: list[Document], questions: list[Question]) -> "Pool":
        by_id = {d.id: d for d in docs}
        qs: dict[str, list[Question]] = defaultdict(list)
        for q in questions:
            if q.doc_ids and q.doc_ids[0] in by_id:
                qs[q.doc_ids[0]].append(q)
        groups: dict[str, list[str]] = defaultdict(list)
        for d in docs:
            if d.id in qs:
                groups[group_key(d.id)].append(d.id)
        return cls(by_id, dict(qs), list(groups.values()))

    def __len__(self) -> int:
        return sum(map(len, self.groups))


def group_key(doc_id: str) -> str:
    """Synthetic: the entity ("syn-train-e0012-a1" → "syn-train-e0012"); RealTimeQA: the quiz week."""
    if doc_id.startswith("rtqa-"):
        return doc_id.split("_")[0]
    return doc_id.rsplit("-", 1)[0]


def sample_batch(pool: Pool, n_docs: int, per_group: int, rng: random.Random) -> list[str]:
    ids: list[str] = []
    n_docs = min(n_docs, len(pool))  # a pool smaller than the batch would otherwise never fill it
    while len(ids) < n_docs:
        group = rng.choice(pool.groups)
        ids += [d for d in rng.sample(group, min(per_group, len(group))) if d not in ids][: n_docs - len(ids)]
    return ids


def load_training_data(cfg: TrainConfig) -> tuple[Pool, Pool | None, Pool]:
    """Synthetic train split (+ RealTimeQA years, when present) and the synthetic validation split."""
    train = Pool.build(*synthetic.generate("train", cfg.synthetic_entities, seed=cfg.seed))
    rtqa = None
    if cfg.realtimeqa_years and cfg.realtimeqa_share > 0 and realtimeqa.available():
        if any(y >= 2024 for y in cfg.realtimeqa_years):
            raise ValueError("RealTimeQA 2024 is the held-out test year: train on earlier years only")
        rtqa = Pool.build(*realtimeqa.load(cfg.realtimeqa_years))
    val = Pool.build(*synthetic.generate("validation", max(20, cfg.synthetic_entities // 10), seed=cfg.seed))
    return train, rtqa, val


def answer_positions(model: MACModel, doc: Document, answers: list[str], window: int) -> list[int]:
    """Positions in the document's first LM-token window of every token that overlaps an occurrence of an answer."""
    text = document_text(doc)
    spans = []
    for a in {a.strip() for a in answers if a.strip()}:
        start = text.find(a)
        while start >= 0:
            spans.append((start, start + len(a)))
            start = text.find(a, start + 1)
    offsets = model.lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"][:window]
    return [i for i, (s, e) in enumerate(offsets) if any(s < b and e > a for a, b in spans)]


def pointer_loss(model: MACModel, pool: Pool, doc_ids: list[str], attn: torch.Tensor) -> torch.Tensor:
    """−mean log(slot-averaged attention) over the answer tokens found in each document: the slots must cover the
    tokens the document's questions ask about. attn: (N, T, S), rows in ``doc_ids`` order."""
    terms = []
    for row, d in enumerate(doc_ids):
        pos = answer_positions(model, pool.docs[d], [a for q in pool.questions.get(d, []) for a in q.answers[:1]],
                               attn.shape[-1])
        if pos:
            terms.append(-(attn[row].mean(0)[pos] + 1e-6).log().mean())
    return torch.stack(terms).mean() if terms else attn.sum() * 0.0


def step_loss(model: MACModel, pool: Pool, doc_ids: list[str], memory_size: int, select_weight: float,
              backprop_fraction: float, questions_per_doc: int, rng: random.Random,
              pointer_weight: float = 0.0, reconstruct_weight: float = 0.0, rag_share: float = 0.0) -> dict[str, torch.Tensor]:
    docs = [pool.docs[i] for i in doc_ids]
    pieces = [model.windows(document_text(d))[0] for d in docs]  # training docs fit one window
    n_grad = max(1, round(backprop_fraction * len(docs)))
    with_grad = set(rng.sample(range(len(docs)), n_grad))
    order = sorted(with_grad) + [i for i in range(len(docs)) if i not in with_grad]
    point = None
    if pointer_weight > 0:
        mods_g, vecs_g, attn = model.amortize([pieces[i] for i in order[:n_grad]], with_attention=True)
        point = pointer_loss(model, pool, [doc_ids[i] for i in order[:n_grad]], attn)
    else:
        mods_g, vecs_g = model.amortize([pieces[i] for i in order[:n_grad]])
    with torch.no_grad():
        mods_n, vecs_n = model.amortize([pieces[i] for i in order[n_grad:]]) if len(order) > n_grad else (mods_g[:0], vecs_g[:0])
    inv = torch.tensor(sorted(range(len(order)), key=lambda k: order[k]))
    mods = torch.cat([mods_g, mods_n])[inv]  # (N_docs, T, D), back in batch order
    vecs = torch.cat([vecs_g, vecs_n])[inv]

    qs, gold = [], []
    for j, d in enumerate(doc_ids):
        for q in rng.sample(pool.questions[d], min(questions_per_doc, len(pool.questions[d]))):
            qs.append(q)
            gold.append(j)
    m = min(memory_size, len(docs))
    memory, gold_pos = [], []
    for g in gold:
        others = rng.sample([k for k in range(len(docs)) if k != g], m - 1)
        slots = [g] + others
        rng.shuffle(slots)
        memory.append(slots)
        gold_pos.append(slots.index(g))
    mem = torch.tensor(memory)  # (Q, m)
    q_tokens, q_vecs = model.encode_questions([q.question for q in qs])  # (Q, T, D), (Q, d_enc)
    scores = torch.einsum("qe,qme->qm", q_vecs, vecs[mem])  # retriever cosine per memory slot
    prefix, mass = model.prefix(q_tokens, mods[mem], None, scores)  # mass: (Q, m)
    # mac+rag: a share of the questions also read the gold document and one distractor of their memory as text, so the
    # prefix learns to leave the LM's reading of a context intact instead of being tuned for the bare prompt only
    prompts = []
    for q, g, row in zip(qs, gold, memory):
        if rag_share > 0 and rng.random() < rag_share:
            context = [docs[g]] + [docs[k] for k in row if k != g][:1]
            rng.shuffle(context)
            prompts.append(prompt_for("mac+rag", q.question, context))
        else:
            prompts.append(MAC_PROMPT.format(question=q.question))
    lp = model.answer_logprobs(prompts, [q.answers[0] for q in qs], prefix)
    gp = torch.tensor(gold_pos)
    gold_mass = mass.float()[torch.arange(len(qs)), gp]
    nll = -lp.mean()
    sel = -(gold_mass + 1e-6).log().mean()
    loss = nll + select_weight * sel if select_weight > 0 else nll
    if point is not None:
        loss = loss + pointer_weight * point
    rec = torch.tensor(0.0)
    if reconstruct_weight > 0:
        rec = reconstruct_loss(model, [docs[i] for i in order[:n_grad]], mods_g)
        loss = loss + reconstruct_weight * rec
    return {"loss": loss, "nll": nll.detach(), "sel_loss": sel.detach(), "rec": rec.detach(),
            "point_loss": point.detach() if point is not None else torch.tensor(0.0),
            "sel_acc": (mass.argmax(1) == gp).float().mean(), "questions": torch.tensor(len(qs))}


def reconstruct_loss(model: MACModel, docs: list[Document], mods: torch.Tensor) -> torch.Tensor:
    """Autoencoding: each document's text from a memory holding only its own modulation. mods: (N, T, D) in ``docs``
    order. Returns the mean per-token NLL (scalar)."""
    q_tokens, _ = model.encode_questions([RECALL_PROMPT] * len(docs))  # (N, T, D)
    prefix, _ = model.prefix(q_tokens, mods[:, None], None, torch.ones(len(docs), 1))  # memory of one: (N, 1, T, D)
    lp = model.answer_logprobs([RECALL_PROMPT] * len(docs), [document_text(d) for d in docs], prefix)
    return -lp.mean()


@torch.no_grad()
def validate(model: MACModel, pool: Pool, n_questions: int, memory_size: int, seed: int = 1234) -> dict[str, float]:
    """Greedy answers with memory = gold + (memory_size-1) documents of the same/other entities; EM/F1/selection."""
    rng = random.Random(seed)
    all_docs = list(pool.docs)
    items = [(q, d) for d, qs in pool.questions.items() for q in qs]
    items = rng.sample(items, min(n_questions, len(items)))
    model.eval()
    rows = []
    chunk_of = {c.modulation.doc_id: c for c in model.encode_documents([pool.docs[d] for d in all_docs])}
    for s in range(0, len(items), 16):
        part = items[s: s + 16]
        memories, golds = [], []
        for q, d in part:
            near = [x for grp in pool.groups if d in grp for x in grp if x != d]
            far = rng.sample([x for x in all_docs if x != d and x not in near], memory_size)
            mem = ([d] + near + far)[:memory_size]
            rng.shuffle(mem)
            q_vec = model.encoder.embed([q.question])[0].numpy()
            memories.append([(chunk_of[x].modulation, float(q_vec @ chunk_of[x].vector)) for x in mem])
            golds.append(mem.index(d))
        prefix, mass = model.memory_prefix([q.question for q, _ in part], memories)
        tok = model.lm.tokenizer
        outs = model.lm.generate([tok(MAC_PROMPT.format(question=q.question))["input_ids"] for q, _ in part], prefix, 12)
        for (q, _), o, g, ms in zip(part, outs, golds, mass):
            row = score_answer(tok.decode(o).strip(), q.answers)
            row["selection"] = float(int(ms.argmax()) == g)
            rows.append(row)
    model.train()
    return aggregate(rows)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup_frac * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def train(model_cfg: ModelConfig, cfg: TrainConfig, out: Path, resume: bool = True, init: Path | None = None) -> dict:
    """Run the curriculum; return the best validation metrics. Resumes from ``<out>/last`` when present."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    start, best, lineage = 0, {"f1": -1.0}, None
    if resume and (out / "last" / "trainer.pt").exists():
        model = MACModel.load(out / "last")
        state = torch.load(out / "last" / "trainer.pt", weights_only=False)
        start, best, lineage = state["step"], state["best"], state.get("init")
        rng.setstate(state["rng"])
        log.info("resuming from step %d", start)
    elif init is not None:
        model = MACModel.load(init)
        # what the weights were trained on before this run: saved with every checkpoint of it
        lineage = {"checkpoint": model.version, "train": json.loads((Path(init) / CONFIG).read_text()).get("train", {})}
        state = None
    else:
        model = MACModel(model_cfg)
        state = None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if state is not None:
        opt.load_state_dict(state["opt"])
    train_pool, rtqa_pool, val_pool = load_training_data(cfg)
    log.info("train: %d synthetic docs, %d RealTimeQA docs, %d validation docs",
             len(train_pool), len(rtqa_pool) if rtqa_pool else 0, len(val_pool))
    saved_cfg = cfg.model_dump() | ({"init": lineage} if lineage else {})
    total = sum(s.steps for s in cfg.stages)
    bounds = [sum(s.steps for s in cfg.stages[: i + 1]) for i in range(len(cfg.stages))]
    model.train()
    bar = tqdm(range(start, total), initial=start, total=total, desc="train", dynamic_ncols=True)
    t0, seen, ema = time.time(), 0, None
    for step in bar:
        stage = cfg.stages[next(i for i, b in enumerate(bounds) if step < b)]
        pool = rtqa_pool if rtqa_pool is not None and rng.random() < cfg.realtimeqa_share else train_pool
        ids = sample_batch(pool, cfg.batch_docs, 2, rng)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            res = step_loss(model, pool, ids, stage.memory_size, stage.select_weight, cfg.backprop_fraction,
                            cfg.questions_per_doc, rng, stage.pointer_weight, stage.reconstruct_weight,
                            stage.rag_share)
        opt.zero_grad(set_to_none=True)
        res["loss"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        seen += int(res["questions"])
        vals = {k: float(v.detach()) for k, v in res.items() if k != "questions"}
        ema = vals if ema is None else {k: 0.95 * ema[k] + 0.05 * vals[k] for k in vals}
        bar.set_postfix(mem=stage.memory_size, nll=f"{ema['nll']:.3f}", sel=f"{ema['sel_acc']:.2f}", pt=f"{ema['point_loss']:.2f}", rec=f"{ema['rec']:.2f}",
                        gn=f"{float(gnorm):.1f}", qps=f"{seen / (time.time() - t0):.1f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == total:
            metrics = validate(model, val_pool, cfg.eval_questions, memory_size=8)
            # with the gold document alone: does the modulation carry the facts at all (apart from selection)?
            gold = validate(model, val_pool, cfg.eval_questions, memory_size=1)
            metrics.update(gold_only_em=gold["em"], gold_only_f1=gold["f1"])
            metrics.update(step=step + 1, memory_size=stage.memory_size, train_nll=ema["nll"], train_sel=ema["sel_acc"])
            log.info("validation @%d: %s", step + 1, json.dumps(metrics))
            bar.write(f"validation @{step + 1}: " + json.dumps({k: round(v, 2) for k, v in metrics.items()}))
            with open(out / "history.jsonl", "a") as fh:
                fh.write(json.dumps(metrics) + "\n")
            # the best is judged on the final curriculum stage only: earlier stages see an easier memory
            if stage is cfg.stages[-1] and metrics["f1"] > best["f1"]:
                best = metrics
                model.save(out / "best", saved_cfg, best)
            model.save(out / "last", saved_cfg, metrics)
            torch.save({"step": step + 1, "best": best, "rng": rng.getstate(), "opt": opt.state_dict(), "init": lineage},
                       out / "last" / "trainer.pt")
    return best
