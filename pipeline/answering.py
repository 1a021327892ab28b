"""Answer questions from retrieved memory in one :class:`~pipeline.modes.Mode`. Shared by ``eval`` and the server.

Same frozen LM in every mode, greedy decoding, stop at newline. Citation weights: for the aggregator's modes, its
attention mass per document (its chunks' mass summed). ``rag@N`` / ``mac+rag@N`` put only N of the retrieved
documents' texts in the prompt (for ``mac+rag@N`` the N the aggregator weighs most, heaviest first); every retrieved
chunk still enters the aggregation (the prefix is the same as in ``mac``). ``select+rag@N`` reads the same N texts as
``mac+rag@N`` behind the checkpoint's answer prompt instead of the memory's prefix.

The text-only modes (``base``, ``rag``) need only the LM: ``model`` may then be a bare :class:`FrozenLM` (the online
fine-tuning baselines answer through a fine-tuned copy). The modes that use the aggregator (``mac``, ``mac+rag``,
``select+rag``) need the :class:`MACModel`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from pipeline.model.lm import FrozenLM, Prefix
from pipeline.model.mac import MACModel, QuestionEncoding
from pipeline.model.pick import pick_order
from pipeline.model.prompt import batched
from pipeline.modes import Mode
from pipeline.prompts import document_text, prompt_with
from pipeline.schemas import Document, Hit


@dataclass
class Answer:
    """One answer and what it cost, counted with the LM's own tokenizer.

    ``prompt_tokens``: the token ids fed to the LM as text — the mode's prompt template with the question and, in the
    text modes, the context texts (what :func:`prepare` builds, tokenized). The memory prefix (``mac``, ``mac+rag``:
    the aggregated modulation; ``select+rag``: the checkpoint's answer prompt) is **not** counted: its positions are
    key/value vectors, not tokens, and their number is fixed by the checkpoint, not by the request.
    ``completion_tokens``: the token ids the LM generated for the answer, before whitespace is stripped from its text;
    the stop token (newline or EOS) that ended it is not counted, as it is not part of the answer.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    weights: dict[str, float] = field(default_factory=dict)  # document id → attention mass (the aggregator's modes)
    seconds: dict[str, float] = field(default_factory=dict)  # aggregate / generate, this question's share
    picked: str | None = None  # the aggregator's modes: the document the pick rule reads first (pipeline/model/pick.py)


def unique_docs(hits: list[Hit]) -> list[Document]:
    seen, out = set(), []
    for h in hits:
        if h.document.id not in seen:
            seen.add(h.document.id)
            out.append(h.document)
    return out


def lm_of(model: MACModel | FrozenLM) -> FrozenLM:
    return model if isinstance(model, FrozenLM) else model.lm


@torch.no_grad()
def prepare(model: MACModel | FrozenLM, mode: Mode | str, questions: list[str], hits: list[list[Hit]],
            encoded: QuestionEncoding | None = None) -> tuple[list[str], Prefix | None, torch.Tensor | None]:
    """Prompts, the prefix (``mac``, ``mac+rag``: the aggregated memory; ``select+rag``: the answer prompt, if any) and,
    for the aggregator's modes, the per-chunk attention mass (B, K). ``encoded``: the
    questions' encoding already made for retrieval (:meth:`MACModel.encode_questions`), reused, not recomputed."""
    mode = Mode.parse(mode)
    if mode.uses_memory and not all(hits):
        raise ValueError(f"mode {str(mode)!r} needs a non-empty memory for every question")
    prefix = mass = None
    if mode.uses_aggregator:
        if not isinstance(model, MACModel):
            raise TypeError(f"mode {str(mode)!r} needs a MACModel, got {type(model).__name__}")
        memories = [[(x.chunk.modulation, x.score) for x in h] for h in hits]
        if mode.uses_mac:
            prefix, mass = model.memory_prefix(encoded or questions, memories)
        else:  # select+rag: the aggregator picks the texts; the answer prompt (if any) is the whole prefix
            mass = model.selection(encoded or questions, memories)
            if model.answer_prompt is not None:
                prefix = batched(model.answer_prompt, len(questions))
    prompts = []
    for i, (q, h) in enumerate(zip(questions, hits)):
        texts = context_texts(model, mode, h, mass[i] if mass is not None else None) if mode.uses_text else []
        prompts.append(prompt_with(mode.kind, q, texts))
    return prompts, prefix, mass


def context_texts(model: MACModel | FrozenLM, mode: Mode, hits: list[Hit], mass: torch.Tensor | None) -> list[str]:
    """What a text mode puts in the prompt for one question.

    Without ``context_docs``: every retrieved document's whole text, in retrieval order. With it (``rag@N``,
    ``mac+rag@N``): N documents — the retriever's best N, or the aggregator's pick and then the documents it weighs
    most (``mass`` per chunk, summed per document; the pick follows the checkpoint's rule, ``model.pick``: the
    heaviest document, or with a floor the retriever's top-1 unless the aggregator's beats it by the rule's margin) —
    and of each only its **best window**, the retrieved chunk the aggregator weighed most (or the retriever ranked
    first). A window is at most ``max_doc_tokens`` tokens, so the prompt stays within N windows however long the
    articles are; a one-window document is its whole text, as before.
    """
    docs = unique_docs(hits)
    if mode.context_docs is None:
        return [document_text(d) for d in docs]
    if mass is not None:  # the aggregator's pick first (the checkpoint's rule: pipeline/model/pick.py), then by weight
        by_id = {d.id: d for d in docs}
        rule = model.pick if isinstance(model, MACModel) else None
        docs = [by_id[d] for d in pick_order([h.document.id for h in hits], mass[: len(hits)].tolist(), rule)]
    out = []
    for doc in docs[: mode.context_docs]:
        mine = [(j, x) for j, x in enumerate(hits) if x.document.id == doc.id]  # retriever order: best first
        j, best = max(mine, key=lambda jx: float(mass[jx[0]])) if mass is not None else mine[0]
        mod = best.chunk.modulation
        one_window = mod.n_chunks == 1 or not isinstance(model, MACModel)  # no need to re-tokenize the document
        out.append(document_text(doc) if one_window else model.window_text(doc, mod.chunk))
    return out


def citation_weights(hits: list[Hit], mass: torch.Tensor) -> dict[str, float]:
    weights: dict[str, float] = defaultdict(float)
    for h, w in zip(hits, mass.tolist()):
        weights[h.document.id] += w
    return {d: round(w, 4) for d, w in weights.items()}


@torch.no_grad()
def answer(model: MACModel | FrozenLM, mode: Mode | str, questions: list[str], hits: list[list[Hit]],
           max_new_tokens: int, encoded: QuestionEncoding | None = None) -> list[Answer]:
    """Answer a batch of questions in one mode (one batched generation)."""
    lm = lm_of(model)
    tok = lm.tokenizer
    t0 = time.perf_counter()
    prompts, prefix, mass = prepare(model, mode, questions, hits, encoded)
    t_agg = time.perf_counter() - t0
    ids = [tok(p)["input_ids"] for p in prompts]
    outs = lm.generate(ids, prefix, max_new_tokens)
    t_gen = time.perf_counter() - t0 - t_agg
    n = max(1, len(questions))
    return [Answer(tok.decode(o).strip(), len(ids[i]), len(o),
                   citation_weights(hits[i], mass[i]) if mass is not None else {},
                   {"aggregate": t_agg / n, "generate": t_gen / n},
                   picked_document(model, hits[i], mass[i]) if mass is not None else None) for i, o in enumerate(outs)]


def picked_document(model: MACModel, hits: list[Hit], mass: torch.Tensor) -> str:
    """The document the checkpoint's pick rule reads first among ``hits`` (per-chunk ``mass``)."""
    return pick_order([h.document.id for h in hits], mass[: len(hits)].tolist(), model.pick)[0]
