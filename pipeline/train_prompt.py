"""Train a checkpoint's answer prompt (``macstream train-prompt``; what it is: :mod:`pipeline.model.prompt`).

Everything but the prompt is frozen: the LM, the readout, the stored modulations' meaning (the checkpoint version
does not change). Each step samples ``batch`` synthetic training questions (the readout's own split), puts the gold
article's text in the product's ``mac+rag`` prompt (the template ``select+rag`` shares) and, only for the
two-stream benchmark, the gold article's memory behind the prompt; the loss is the answer's NLL through the frozen
LM. The prompt starts at the readout of the mean training modulation (a memory of no document in particular), so
step 0 is a prefix the LM has seen the like of.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.config import PromptTrainConfig
from pipeline.data import synthetic
from pipeline.model.lm import Prefix
from pipeline.model.mac import MACModel
from pipeline.model.prompt import batched, save_prompt, two_stream
from pipeline.prompts import answer_continuation, prompt_for
from pipeline.train_readout import modulations


def train_prompt(model: MACModel, cfg: PromptTrainConfig, log: Callable[[str], None] = print,
                 with_memory: bool = False) -> Prefix:
    """The trained prompt, keys/values (1, L, H_kv, 1+T, D_h) in float32. ``with_memory``: trained in front of the
    gold article's frozen memory (the two-stream prefix ``benchmarks/two_stream.py`` measures); the product's
    ``select+rag`` reads the prompt alone, so the shipped prompt is trained without it."""
    docs, qs = synthetic.generate("train", cfg.synthetic_entities, seed=0)
    by_id = {d.id: d for d in docs}
    pool = [q for q in qs if q.doc_ids and q.doc_ids[0] in by_id]
    with torch.no_grad():
        mods = modulations(model, docs[:256])  # (T, d) per article; the rest on first use (frozen: computed once)
        init = model.expander(torch.stack(list(mods.values())).mean(0, keepdim=True))  # (1, L, H, 1+T, D)
    keys, values = (torch.nn.Parameter(t.detach().float().clone()) for t in (init.keys, init.values))
    opt = torch.optim.Adam([keys, values], lr=cfg.lr)
    tok, rng, t0 = model.lm.tokenizer, random.Random(cfg.seed), time.time()
    for step in range(1, cfg.steps + 1):
        part = rng.sample(pool, cfg.batch)
        prompts = [tok(prompt_for("mac+rag", q.question, [by_id[q.doc_ids[0]]]))["input_ids"] for q in part]
        targets = [tok(answer_continuation(q.answers[0]), add_special_tokens=False)["input_ids"] for q in part]
        prefix = batched(Prefix(keys, values), cfg.batch)
        if with_memory:
            with torch.no_grad():
                missing = {q.doc_ids[0]: by_id[q.doc_ids[0]] for q in part if q.doc_ids[0] not in mods}
                mods.update(modulations(model, list(missing.values())))
                memory = model.expander(torch.stack([mods[q.doc_ids[0]] for q in part]))  # (B, L, H, 1+T, D)
            prefix = two_stream(prefix, memory)  # (B, L, H, 2(1+T), D)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s, n = model.lm.continuation_logprobs(prompts, targets, prefix)
            loss = -s.sum() / n.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == cfg.steps:
            rate = step / (time.time() - t0)
            log(f"answer prompt step {step}/{cfg.steps} loss {loss.item():.3f} {rate:.2f} steps/s "
                f"ETA {(cfg.steps - step) / rate / 60:.1f} min")
    return Prefix(keys.detach(), values.detach())


def build(model: MACModel, checkpoint: Path, cfg: PromptTrainConfig, log: Callable[[str], None] = print) -> str:
    """Train and write ``checkpoint/prompt.safetensors``; return its content hash."""
    if model.cfg.expander != "readout":
        raise ValueError(f"{checkpoint}: an answer prompt is trained for a readout-memory checkpoint (expander="
                         f"'readout'), this one has expander={model.cfg.expander!r}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    prompt = train_prompt(model, cfg, log)
    return save_prompt(prompt, checkpoint, {"checkpoint": model.version, "config": cfg.model_dump(),
                                            "seconds": round(time.time() - t0)})
