"""The MAC model with the readout memory: a frozen LM, and around it the four parts a checkpoint trains and stores.

- **write** (ingest; one forward, question-independent, no gradient step): the frozen LM reads a document window up
  to layer m; the **amortizer**, a token selector, keeps T of its tokens; the modulation is the LM's own
  RMS-normalised layer-m states there, (T, d_LM), stored with the window's MiniLM retrieval vector;
- **select** (query time): the **question encoder** turns the question into T query tokens and the **aggregator**
  attends over the retrieved modulations; its attention mass per document is the citation weight, and the document
  with the most mass is the one whose memory is read (and, in ``select+rag``, whose text the LM reads);
- **read**: the **expander**, a linear K/V readout, maps each stored state to a key and a value for every layer of
  the LM, behind a fixed sink: a prefix of 1 + T positions per layer (pipeline/model/readout.py).

Only these four parts are trainable and stored in a checkpoint (``macstream train-readout``). The checkpoint version
is the content hash of their weights file; every modulation is stamped with it and refused by any other version.
The memories tried before this one (the slots checkpoint among them) are at git tag ``slots-checkpoint``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pipeline.config import ModelConfig
from pipeline.model.aggregator import Aggregator
from pipeline.model.encoder import TextEncoder, split_windows, window_spans
from pipeline.model.lm import FrozenLM, Prefix, pad_batch
from pipeline.model.pick import DocumentPick, load_pick
from pipeline.model.prompt import load_prompt
from pipeline.model.question import QueryHead
from pipeline.model.readout import KVReadout, TokenSelector, rms
from pipeline.modulation import Modulation, ensure_compatible
from pipeline.prompts import document_text
from pipeline.schemas import Document, EncodedChunk


class QuestionEncoding(NamedTuple):
    """One encoder pass over a batch of questions gives both what retrieval needs and what aggregation needs."""

    tokens: Tensor  # (B, T, D) query tokens for the aggregator
    vectors: Tensor  # (B, d_enc) unit-norm retrieval vectors

    def select(self, rows: list[int]) -> QuestionEncoding:
        idx = torch.tensor(rows, dtype=torch.long)
        return QuestionEncoding(self.tokens[idx], self.vectors[idx])


WEIGHTS, CONFIG, METRICS = "weights.safetensors", "config.json", "metrics.json"

# A checkpoint written before the engine kept one memory names it with these ModelConfig keys: accepted with exactly
# these values (the readout memory) and dropped; any other value is a memory that runs at git tag slots-checkpoint.
_READOUT_MEMORY = {"doc_states": "lm", "standardize_states": False, "amortizer": "select", "expander": "readout",
                   "aggregator_output": "select", "unfreeze_encoder_layers": 0}
_UNUSED_KEYS = ("prefix_len", "amortizer_blocks", "expander_hidden")  # sizes of parts the readout memory lacks


def model_config(stored: dict) -> ModelConfig:
    """The ModelConfig of a checkpoint's config.json ``model`` record, older records included; a ValueError naming
    the keys when the record is another memory than the readout memory (e.g. the slots checkpoint)."""
    other = {k: stored[k] for k, v in _READOUT_MEMORY.items() if k in stored and stored[k] != v}
    if other:
        raise ValueError(f"{other}: not the readout memory, the one memory this engine runs; the memories tried "
                         "before it run at git tag slots-checkpoint (`git checkout slots-checkpoint`)")
    return ModelConfig.model_validate({k: v for k, v in stored.items() if k not in (*_READOUT_MEMORY, *_UNUSED_KEYS)})


def assigned_device(gpu_ids: list | tuple = ()) -> torch.device:
    """The device a worker computes on, from the GPUs its scheduler assigned (``ray.get_gpu_ids()``; Ray also sets
    CUDA_VISIBLE_DEVICES to them, so the first assigned GPU is ``cuda`` in the process): CUDA when a GPU was
    assigned and torch can use it, else CPU (no GPU asked for, or a node that declares GPUs without CUDA)."""
    return torch.device("cuda") if gpu_ids and torch.cuda.is_available() else torch.device("cpu")


class MACModel(nn.Module):
    """The frozen LM and the encoder backbone (neither trained nor stored) with the four trainable parts: amortizer
    (:class:`TokenSelector`), question encoder (:class:`QueryHead`), aggregator (:class:`Aggregator`) and expander
    (:class:`KVReadout`). Shapes: T = ``cfg.num_tokens``, D = d_LM, d_enc = the encoder's width."""

    def __init__(self, cfg: ModelConfig, lm: FrozenLM | None = None, encoder: TextEncoder | None = None):
        super().__init__()
        self.cfg = cfg
        self.lm = lm if lm is not None else FrozenLM.load(cfg.lm)
        if encoder is None:
            encoder = TextEncoder(cfg.encoder, cfg.max_doc_tokens, cfg.chunk_overlap)
        self.encoder = encoder
        D, E, T = self.lm.hidden_size, self.encoder.width, cfg.num_tokens
        if cfg.lm_state_layer > self.lm.num_layers:
            raise ValueError(f"lm_state_layer={cfg.lm_state_layer} but {cfg.lm} has {self.lm.num_layers} layers")
        head = {"heads": cfg.heads, "head_dim": cfg.head_dim, "ffn_mult": cfg.ffn_mult}
        self.amortizer = TokenSelector(D)  # write: which T tokens of a window a modulation keeps
        self.question_encoder = QueryHead(E, D, T, cfg.question_blocks, **head)  # select: the question's T tokens
        self.aggregator = Aggregator(D, cfg.aggregator_blocks, bucket_size=cfg.bucket_size,
                                     retrieval_bias=cfg.retrieval_bias, **head)  # select: mass per memory
        self.expander = KVReadout(self.lm, D)  # read: stored states → every layer's keys/values
        self.version = "untrained"
        # the checkpoint's answer prompt (pipeline/model/prompt.py), when it ships one: not part of the version
        self.answer_prompt: Prefix | None = None
        self.prompt_version: str | None = None
        # the checkpoint's document-pick rule (pipeline/model/pick.py: the retriever's top-1 as a floor), when it
        # ships one (pick.json): not part of the version; None picks the heaviest document by summed mass
        self.pick: DocumentPick | None = None

    @property
    def model_id(self) -> str:
        return f"{self.cfg.lm}|{self.cfg.encoder}"

    def to_device(self, device: str | torch.device) -> MACModel:
        """Move every part (frozen LM, encoder, heads) to ``device``. On CUDA the frozen LM runs in bf16 (fp16 where
        bf16 is unsupported); the heads and the encoder stay float32. Moving to CPU changes nothing else."""
        device = torch.device(device)
        self.to(device)
        self.lm.to_device(device)
        if self.answer_prompt is not None:
            self.answer_prompt = Prefix(self.answer_prompt.keys.to(device), self.answer_prompt.values.to(device))
        return self

    # ---- trainable state ------------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, Tensor]:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {n: t for n, t in self.state_dict().items() if n in names}

    def save(self, directory: str | Path, train_config: dict | None = None, metrics: dict | None = None) -> str:
        """Write fp16 trainable weights + config (+ metrics); return the version (hash of the weights file)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {n: t.detach().to(torch.float16).contiguous().cpu() for n, t in self.trainable_state().items()}
        save_file(state, str(d / WEIGHTS))
        version = hashlib.sha256((d / WEIGHTS).read_bytes()).hexdigest()[:12]
        meta = {"version": version, "model": self.cfg.model_dump(), "train": train_config or {}}
        (d / CONFIG).write_text(json.dumps(meta, indent=2, default=str))
        if metrics is not None:
            (d / METRICS).write_text(json.dumps(metrics, indent=2))
        self.version = version
        return version

    @classmethod
    def load(cls, directory: str | Path, lm: FrozenLM | None = None, encoder: TextEncoder | None = None) -> MACModel:
        """The checkpoint in ``directory`` with its answer prompt and document-pick rule, when it has them.
        FileNotFoundError without one; ValueError when its config is not the readout memory, its weights do not fit
        the config, or its ``pick.json`` is not a valid rule."""
        d = Path(directory)
        if not (d / WEIGHTS).exists():
            raise FileNotFoundError(f"no checkpoint at {d} (expected {WEIGHTS} and {CONFIG})")
        meta = json.loads((d / CONFIG).read_text())
        try:
            cfg = model_config(meta["model"])
        except ValueError as err:
            raise ValueError(f"checkpoint {d}: {err}") from None
        model = cls(cfg, lm=lm, encoder=encoder)
        state = load_file(str(d / WEIGHTS))
        expected = set(model.trainable_state())
        if set(state) != expected:
            raise ValueError(f"checkpoint {d} does not fit this model: missing {sorted(expected - set(state))[:5]}, "
                             f"unexpected {sorted(set(state) - expected)[:5]}")
        shapes = {k: tuple(v.shape) for k, v in model.trainable_state().items()}
        bad = [f"{k}: {tuple(v.shape)} vs {shapes[k]}" for k, v in state.items() if tuple(v.shape) != shapes[k]]
        if bad:
            raise ValueError(f"checkpoint {d} does not fit this model: shape mismatch {bad[:5]}")
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        model.version = hashlib.sha256((d / WEIGHTS).read_bytes()).hexdigest()[:12]
        found = load_prompt(d, model.lm.num_layers, model.lm.num_kv_heads, model.lm.head_dim)
        if found is not None:
            model.answer_prompt, model.prompt_version = found.prefix, found.version
        model.pick = load_pick(d)
        return model

    # ---- write: documents → modulations ---------------------------------------------------------------------------
    def windows(self, text: str) -> list[list[int]]:
        """LM-token windows of a document (``max_doc_tokens``, consecutive ones share ``chunk_overlap``); every token
        is covered."""
        ids = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        return split_windows(ids, self.cfg.max_doc_tokens, self.cfg.chunk_overlap)

    def window_text(self, doc: Document, index: int) -> str:
        """The original text of window ``index`` of ``doc``, cut where :meth:`windows` cuts it (by character offsets,
        so case and spacing survive the tokenizer); a one-window document is its whole text."""
        text = document_text(doc)
        offsets = self.lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        spans = window_spans(len(offsets), self.cfg.max_doc_tokens, self.cfg.chunk_overlap)
        if len(spans) == 1:
            return text
        a, b = spans[min(index, len(spans) - 1)]
        return text[offsets[a][0]: offsets[b - 1][1]]

    @torch.no_grad()
    def amortize(self, windows: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Token windows → modulations (N, T, D) and retrieval vectors (N, d_enc). One forward, no gradient."""
        vecs = self.encoder.embed(self.lm.tokenizer.batch_decode(windows))  # (N, d_enc)
        return self.modulate(windows)[0], vecs

    @torch.no_grad()
    def modulate(self, windows: list[list[int]]) -> tuple[Tensor, list[list[int]]]:
        """Token windows → modulations (N, T, D) and, per window, the positions their states were taken at (sorted
        indices into the window). One forward of the LM up to layer m; no retrieval vector."""
        ids, mask = pad_batch(windows, self.lm.pad_id, self.lm.device)
        states = self.lm.hidden_states_at(ids, mask, self.cfg.lm_state_layer).float()  # (N, S, D)
        return self._select(rms(states), [len(w) for w in windows])

    @torch.no_grad()
    def selected_tokens(self, windows: list[list[int]]) -> list[list[int]]:
        """The token ids whose states each window's modulation stores, in document order (what the same memory would
        be as plain text: the bar it must clear)."""
        return [[w[p] for p in pos] for w, pos in zip(windows, self.selected_positions(windows))]

    @torch.no_grad()
    def selected_positions(self, windows: list[list[int]]) -> list[list[int]]:
        """The positions (indices into each window, sorted) whose states each window's modulation stores."""
        return self.modulate(windows)[1]

    def _select(self, states: Tensor, lengths: list[int]) -> tuple[Tensor, list[list[int]]]:
        """RMS-normalised states (N, S, d) → the selector's T states per window (N, T, d), in document order, and
        their positions. A window of at most T real tokens keeps all of them but the sink; the missing slots stay
        zero."""
        logits = self.amortizer(states)  # (N, S)
        T = self.cfg.num_tokens
        out = states.new_zeros(states.shape[0], T, states.shape[2])
        kept = []
        for i, n in enumerate(lengths):
            pos = self.amortizer.positions(logits[i], n, T)
            out[i, : len(pos)] = states[i, pos]
            kept.append(pos)
        return out, kept

    @torch.no_grad()
    def encode_documents(self, docs: list[Document], batch_size: int = 32) -> list[EncodedChunk]:
        """Every window of every document → a stamped float16 modulation and its retrieval vector."""
        jobs = []  # (doc, chunk index, n_chunks, tokens)
        for doc in docs:
            windows = self.windows(document_text(doc))
            jobs += [(doc, i, len(windows), w) for i, w in enumerate(windows)]
        out = []
        for s in range(0, len(jobs), batch_size):
            part = jobs[s: s + batch_size]
            mods, vecs = self.amortize([j[3] for j in part])
            for (doc, i, n, _), m, v in zip(part, mods.float().cpu().numpy(), vecs.float().cpu().numpy()):
                out.append(EncodedChunk(Modulation(doc.id, i, n, m.astype(np.float16), self.model_id, self.version), v))
        return out

    # ---- select and read: question + memories → prefix ------------------------------------------------------------
    def encode_questions(self, questions: list[str]) -> QuestionEncoding:
        """Questions → query tokens (B, T, D) and retrieval vectors (B, d_enc), from one encoder pass: retrieve with
        ``.vectors``, then hand the whole encoding to :meth:`memory_prefix` (the question is never encoded twice)."""
        ids, mask = self.encoder.batch([self.encoder.chunk(q)[0] for q in questions])
        with torch.no_grad():  # the backbone is frozen; the question encoder's head trains on its states
            states = self.encoder(ids, mask)
        # retrieval vectors on the CPU (a no-op there): they go to the store as numpy, whatever device computed them
        return QuestionEncoding(self.question_encoder(states, mask),
                                self.encoder.sentence_embedding(states, mask).cpu())

    def prefix(self, q_tokens: Tensor, mods: Tensor, mask: Tensor | None = None,
               scores: Tensor | None = None) -> tuple[Prefix, Tensor]:
        """q_tokens (B, T, D), mods (B, K, T, D) → the readout of the memory with the most aggregator mass, a prefix
        (B, L, H_kv, 1 + T, D_h), and the mass per memory (B, K)."""
        _, mass = self.aggregator(q_tokens, mods, mask, scores)
        top = mods[torch.arange(mods.shape[0], device=mods.device), mass.argmax(1)]  # (B, T, D), unmixed
        return self.expander(top), mass

    def stack_memories(self, memories: list[list[tuple[Modulation, float]]]) -> tuple[Tensor, Tensor, Tensor]:
        """Per-question lists of (modulation, retriever score) → mods (B, K, T, D), mask (B, K), scores (B, K)."""
        ensure_compatible([m for mem in memories for m, _ in mem], self.version, self.model_id)
        if not memories:
            raise ValueError("stack_memories needs at least one question's memory")
        B, K = len(memories), max(1, max(map(len, memories)))
        T, D = self.cfg.num_tokens, self.lm.hidden_size
        dev = self.lm.device  # where the aggregator runs (CPU unless moved with to_device)
        mods = torch.zeros(B, K, T, D, device=dev)
        mask = torch.zeros(B, K, dtype=torch.bool, device=dev)
        scores = torch.zeros(B, K, device=dev)
        for i, mem in enumerate(memories):
            for j, (m, s) in enumerate(mem):
                mods[i, j], mask[i, j], scores[i, j] = m.tensor(), True, s
        return mods, mask, scores

    @torch.no_grad()
    def memory_prefix(self, questions: list[str] | QuestionEncoding,
                      memories: list[list[tuple[Modulation, float]]]) -> tuple[Prefix, Tensor]:
        """Questions (texts, or their encoding from retrieval) + per-question memories → prefix, mass (B, K)."""
        return self.prefix(*self._aggregator_inputs(questions, memories))

    @torch.no_grad()
    def selection(self, questions: list[str] | QuestionEncoding,
                  memories: list[list[tuple[Modulation, float]]]) -> Tensor:
        """The aggregator's attention mass over each question's memories, (B, K), without building a prefix."""
        return self.aggregator(*self._aggregator_inputs(questions, memories))[1]

    def _aggregator_inputs(self, questions: list[str] | QuestionEncoding,
                           memories: list[list[tuple[Modulation, float]]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q_tokens (B, T, D), mods (B, K, T, D), mask (B, K), scores (B, K)."""
        q_tokens = (questions if isinstance(questions, QuestionEncoding) else self.encode_questions(questions)).tokens
        return (q_tokens, *self.stack_memories(memories))


def checkpoint_dir(path: str | Path | None = None) -> Path:
    """``path`` or the shipped checkpoint; a clear error when there is none."""
    from pipeline.config import SHIPPED_CHECKPOINT

    d = Path(path) if path else SHIPPED_CHECKPOINT
    if not (d / WEIGHTS).exists():
        raise FileNotFoundError(f"no checkpoint at {d}: build one with `macstream train-readout --out DIR` and pass "
                                "DIR")
    return d


def checkpoint_identity(path: str | Path | None = None) -> tuple[str, str]:
    """(version, model_id) of a checkpoint without loading any model: what its modulations will be stamped with."""
    d = checkpoint_dir(path)
    cfg = json.loads((d / CONFIG).read_text())["model"]
    version = hashlib.sha256((d / WEIGHTS).read_bytes()).hexdigest()[:12]
    return version, f"{cfg.get('lm', ModelConfig().lm)}|{cfg.get('encoder', ModelConfig().encoder)}"
