"""Train a checkpoint's answer prompt (``macstream train-prompt``; what it is: :mod:`pipeline.model.prompt`).

Everything but the prompt is frozen: the LM, the readout, the stored modulations' meaning (the checkpoint version
does not change). Each step samples ``batch`` synthetic training questions (the readout's own split) and puts the
gold article's text in the product's ``mac+rag`` prompt (the template ``select+rag`` shares); the loss is the
answer's NLL through the frozen LM behind the prompt. The prompt starts at the readout of the mean training
modulation (a memory of no document in particular), so step 0 is a prefix the LM has seen the like of.
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
from pipeline.model.prompt import batched, save_prompt
from pipeline.prompts import answer_continuation, prompt_for
from pipeline.schemas import Document, Question
from pipeline.train_readout import modulations


def prompt_data(cfg: PromptTrainConfig) -> tuple[dict[str, Document], list[Question]]:
    """The synthetic training split: documents by id, and the questions whose gold document is among them."""
    docs, qs = synthetic.generate("train", cfg.synthetic_entities, seed=0)
    by_id = {d.id: d for d in docs}
    return by_id, [q for q in qs if q.doc_ids and q.doc_ids[0] in by_id]


@torch.no_grad()
def initial_prompt(model: MACModel, docs: list[Document]) -> Prefix:
    """The readout of the mean modulation of ``docs``: keys/values (1, L, H, 1+T, D), float32."""
    init = model.expander(torch.stack(list(modulations(model, docs).values())).mean(0, keepdim=True))
    return Prefix(init.keys.float(), init.values.float())


def answer_nll(model: MACModel, questions: list[Question], by_id: dict[str, Document], prefix: Prefix,
               bf16: bool = True) -> torch.Tensor:
    """Mean answer NLL per token of ``questions``, each with its gold article in the ``mac+rag`` prompt, behind
    ``prefix`` (batch B = len(questions)); bf16 autocast on CPU when ``bf16``."""
    tok = model.lm.tokenizer
    prompts = [tok(prompt_for("mac+rag", q.question, [by_id[q.doc_ids[0]]]))["input_ids"] for q in questions]
    targets = [tok(answer_continuation(q.answers[0]), add_special_tokens=False)["input_ids"] for q in questions]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        s, n = model.lm.continuation_logprobs(prompts, targets, prefix)
        return -s.sum() / n.sum()


def train_prompt(model: MACModel, cfg: PromptTrainConfig, log: Callable[[str], None] = print) -> Prefix:
    """The trained prompt, keys/values (1, L, H_kv, 1+T, D_h) in float32."""
    by_id, pool = prompt_data(cfg)
    init = initial_prompt(model, list(by_id.values())[:256])
    keys, values = (torch.nn.Parameter(t.detach().clone()) for t in (init.keys, init.values))
    opt = torch.optim.Adam([keys, values], lr=cfg.lr)
    rng, t0 = random.Random(cfg.seed), time.time()
    for step in range(1, cfg.steps + 1):
        loss = answer_nll(model, rng.sample(pool, cfg.batch), by_id, batched(Prefix(keys, values), cfg.batch),
                          cfg.bf16)
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
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    prompt = train_prompt(model, cfg, log)
    return save_prompt(prompt, checkpoint, {"checkpoint": model.version, "config": cfg.model_dump(),
                                            "seconds": round(time.time() - t0)})
