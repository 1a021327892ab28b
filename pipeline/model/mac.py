"""The MAC model: frozen LM + encoder backbone + amortizer, question encoder, aggregator, expander.

Only the four heads (and any unfrozen encoder layers) are trainable and stored in a checkpoint. The checkpoint
version is the content hash of those weights; every modulation is stamped with it and refused by any other version.
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
from pipeline.model.amortizer import PointerHead, QueryHead
from pipeline.model.encoder import TextEncoder, split_windows, window_spans
from pipeline.model.expander import Expander, LMExpander, TokenExpander
from pipeline.model.lm import FrozenLM, Prefix, pad_batch
from pipeline.model.prompt import load_prompt
from pipeline.model.readout import KVReadout, TokenSelector, rms
from pipeline.modulation import Modulation, ensure_compatible
from pipeline.prompts import answer_continuation, document_text
from pipeline.schemas import Document, EncodedChunk


class QuestionEncoding(NamedTuple):
    """One encoder pass over a batch of questions gives both what retrieval needs and what aggregation needs."""

    tokens: Tensor  # (B, T, D) query tokens for the aggregator
    vectors: Tensor  # (B, d_enc) unit-norm retrieval vectors

    def select(self, rows: list[int]) -> "QuestionEncoding":
        idx = torch.tensor(rows, dtype=torch.long)
        return QuestionEncoding(self.tokens[idx], self.vectors[idx])


WEIGHTS, CONFIG, METRICS = "weights.safetensors", "config.json", "metrics.json"


def assigned_device(gpu_ids: list | tuple = ()) -> torch.device:
    """The device a worker computes on, from the GPUs its scheduler assigned (``ray.get_gpu_ids()``; Ray also sets
    CUDA_VISIBLE_DEVICES to them, so the first assigned GPU is ``cuda`` in the process): CUDA when a GPU was
    assigned and torch can use it, else CPU (no GPU asked for, or a node that declares GPUs without CUDA)."""
    return torch.device("cuda") if gpu_ids and torch.cuda.is_available() else torch.device("cpu")
_CALIBRATION = (
    "The city council met on Tuesday to approve a new budget for public transport, after months of debate. "
    "Officials said the plan would add three bus lines and extend service hours across the northern districts."
)


class MACModel(nn.Module):
    def __init__(self, cfg: ModelConfig, lm: FrozenLM | None = None, encoder: TextEncoder | None = None, calibrate: bool = True):
        super().__init__()
        self.cfg = cfg
        self.lm = lm if lm is not None else FrozenLM.load(cfg.lm)
        self.encoder = encoder if encoder is not None else TextEncoder(
            cfg.encoder, cfg.max_doc_tokens, cfg.chunk_overlap, cfg.unfreeze_encoder_layers
        )
        D, E, T = self.lm.hidden_size, self.encoder.width, cfg.num_tokens
        if cfg.doc_states == "lm" and cfg.lm_state_layer > self.lm.num_layers:
            raise ValueError(f"lm_state_layer={cfg.lm_state_layer} but {cfg.lm} has {self.lm.num_layers} layers")
        head = dict(heads=cfg.heads, head_dim=cfg.head_dim, ffn_mult=cfg.ffn_mult)
        A = D if cfg.doc_states == "lm" else E  # width of the token states the amortizer reads
        if cfg.amortizer == "select":
            self.amortizer = TokenSelector(D)
        else:
            self.amortizer = PointerHead(D, T) if cfg.amortizer == "pointer" else QueryHead(A, D, T, cfg.amortizer_blocks, **head)
        self.question_encoder = QueryHead(E, D, T, cfg.question_blocks, **head)
        self.aggregator = Aggregator(D, cfg.aggregator_blocks, bucket_size=cfg.bucket_size, retrieval_bias=cfg.retrieval_bias, **head)
        if cfg.expander == "lm":
            self.expander = LMExpander(self.lm)
        elif cfg.expander == "readout":
            self.expander = KVReadout(self.lm, D)
        else:
            self.expander = (TokenExpander if cfg.expander == "tokens" else Expander)(
                D, T, self.lm.num_layers, cfg.prefix_len, self.lm.num_kv_heads, self.lm.head_dim, cfg.expander_hidden)
        self.version = "untrained"
        # the checkpoint's answer prompt (pipeline/model/prompt.py), when it ships one: not part of the version
        self.answer_prompt: Prefix | None = None
        self.prompt_version: str | None = None
        if calibrate and self.lm.tokenizer is not None and cfg.expander not in ("lm", "readout"):  # these need no scale
            self._calibrate_expander()
        if cfg.doc_states == "lm" and cfg.standardize_states:
            self._state_stats()  # fixed statistics, recomputed on load (deterministic), never stored

    @property
    def model_id(self) -> str:
        return f"{self.cfg.lm}|{self.cfg.encoder}"

    @torch.no_grad()
    def _calibrate_expander(self) -> None:
        """Initialise the prefix scale from the LM's own per-layer key/value statistics on a fixed text."""
        ids = self.lm.tokenizer(_CALIBRATION)["input_ids"]
        t = torch.tensor([ids], device=self.lm.device)
        cache = self.lm._cache(None, 1)
        self.lm._body(t, torch.ones_like(t), torch.arange(len(ids), device=t.device)[None], cache)
        stats = []
        for layer in cache.layers:
            k = layer.keys[0].transpose(0, 1).reshape(len(ids), -1)  # (S, H_kv·D_h)
            v = layer.values[0].transpose(0, 1).reshape(len(ids), -1)
            stats.append((k.mean(0), k.std(0), v.mean(0), v.std(0)))
        self.expander.calibrate(*(torch.stack(s).float() for s in zip(*stats)))

    @torch.no_grad()
    def _state_stats(self) -> None:
        """Per-channel mean/std of the amortizer's LM states on a fixed text (first token excluded: the sink)."""
        ids = self.lm.tokenizer(_CALIBRATION + " " + _CALIBRATION.lower(), add_special_tokens=False)["input_ids"]
        t = torch.tensor([ids], device=self.lm.device)
        st = self.lm.hidden_states_at(t, torch.ones_like(t), self.cfg.lm_state_layer).float()[0, 1:]  # (S-1, d_LM)
        self.register_buffer("state_mean", st.mean(0), persistent=False)
        self.register_buffer("state_std", st.std(0).clamp(min=1e-3), persistent=False)

    def to_device(self, device: str | torch.device) -> "MACModel":
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
    def load(cls, directory: str | Path, lm: FrozenLM | None = None, encoder: TextEncoder | None = None) -> "MACModel":
        d = Path(directory)
        if not (d / WEIGHTS).exists():
            raise FileNotFoundError(f"no checkpoint at {d} (expected {WEIGHTS} and {CONFIG})")
        meta = json.loads((d / CONFIG).read_text())
        model = cls(ModelConfig.model_validate(meta["model"]), lm=lm, encoder=encoder, calibrate=False)
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
        return model

    # ---- encoding -------------------------------------------------------------------------------------------------
    def _states(self, pieces: list[list[int]]) -> tuple[Tensor, Tensor]:
        ids, mask = self.encoder.batch(pieces)  # on the encoder's device
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.unfreeze_encoder_layers > 0):
            return self.encoder(ids, mask), mask

    def windows(self, text: str) -> list[list[int]]:
        """Token windows of a document in the tokenizer of whatever the amortizer reads; every token is covered."""
        if self.cfg.doc_states == "encoder":
            return self.encoder.chunk(text)
        ids = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        return split_windows(ids, self.cfg.max_doc_tokens, self.cfg.chunk_overlap)

    def window_text(self, doc: Document, index: int) -> str:
        """The original text of window ``index`` of ``doc``, cut where :meth:`windows` cuts it (by character offsets,
        so case and spacing survive any tokenizer); a one-window document is its whole text."""
        text = document_text(doc)
        if self.cfg.doc_states == "encoder":
            tok, span, overlap = self.encoder.tokenizer, self.encoder.max_tokens - 2, self.encoder.overlap
        else:
            tok, span, overlap = self.lm.tokenizer, self.cfg.max_doc_tokens, self.cfg.chunk_overlap
        offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        spans = window_spans(len(offsets), span, overlap)
        if len(spans) == 1:
            return text
        a, b = spans[min(index, len(spans) - 1)]
        return text[offsets[a][0]: offsets[b - 1][1]]

    def amortize(self, windows: list[list[int]], with_attention: bool = False):
        """Token windows → modulations (N, T, D) and retrieval vectors (N, d_enc). One forward, no gradient steps.
        ``with_attention`` (pointer amortizer): also the slots' attention over the window's tokens (N, T, S)."""
        if self.cfg.doc_states == "encoder":
            states, mask = self._states(windows)  # (N, S, d_enc)
            return self.amortizer(states, mask), self.encoder.sentence_embedding(states.detach(), mask)
        ids, mask = pad_batch(windows, self.lm.pad_id, self.lm.device)
        with torch.no_grad():
            states = self.lm.hidden_states_at(ids, mask, self.cfg.lm_state_layer).float()  # (N, S, d_LM)
            vecs = self.encoder.embed(self.lm.tokenizer.batch_decode(windows))  # (N, d_enc)
            if self.cfg.amortizer == "select":
                if with_attention:
                    raise ValueError("with_attention needs the pointer amortizer")
                return self._select(rms(states), [len(w) for w in windows]), vecs
            if self.cfg.standardize_states:
                # z-scored channels (outliers clipped); the first token is the LM's attention sink: drop it
                states = ((states - self.state_mean) / self.state_std).clamp(-8, 8)
                if states.shape[1] > 1:
                    mask = mask.clone()
                    mask[:, 0] = 0
            if self.cfg.amortizer == "pointer":
                embeds = self.lm.model.get_input_embeddings()(ids).float()  # (N, S, d_LM)
        if self.cfg.amortizer == "pointer":
            mods, attn = self.amortizer(states, embeds, mask)
            return (mods, vecs, attn) if with_attention else (mods, vecs)
        if with_attention:
            raise ValueError("with_attention needs the pointer amortizer")
        return self.amortizer(states, mask), vecs

    @torch.no_grad()
    def selected_tokens(self, windows: list[list[int]]) -> list[list[int]]:
        """amortizer='select': the token ids whose states each window's modulation stores, in document order (what
        the same memory would be as plain text: the bar it must clear)."""
        ids, mask = pad_batch(windows, self.lm.pad_id, self.lm.device)
        logits = self.amortizer(rms(self.lm.hidden_states_at(ids, mask, self.cfg.lm_state_layer).float()))
        return [[w[p] for p in self.amortizer.positions(logits[i], len(w), self.cfg.num_tokens)] for i, w in enumerate(windows)]

    def _select(self, states: Tensor, lengths: list[int]) -> Tensor:
        """RMS-normalised states (N, S, d) → the selector's T states per window (N, T, d), in document order. A
        window of at most T real tokens keeps all of them but the sink; the missing slots stay zero."""
        logits = self.amortizer(states)  # (N, S)
        T = self.cfg.num_tokens
        out = states.new_zeros(states.shape[0], T, states.shape[2])
        for i, n in enumerate(lengths):
            pos = self.amortizer.positions(logits[i], n, T)
            out[i, : len(pos)] = states[i, pos]
        return out

    def encode_questions(self, questions: list[str]) -> QuestionEncoding:
        """Questions → query tokens (B, T, D) and retrieval vectors (B, d_enc), from one encoder pass: retrieve with
        ``.vectors``, then hand the whole encoding to :meth:`memory_prefix` (the question is never encoded twice)."""
        states, mask = self._states([self.encoder.chunk(q)[0] for q in questions])
        # retrieval vectors on the CPU (a no-op there): they go to the store as numpy, whatever device computed them
        return QuestionEncoding(self.question_encoder(states, mask), self.encoder.sentence_embedding(states.detach(), mask).cpu())

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

    # ---- aggregation and answering ------------------------------------------------------------------------------
    def prefix(self, q_tokens: Tensor, mods: Tensor, mask: Tensor | None = None, scores: Tensor | None = None) -> tuple[Prefix, Tensor]:
        """q_tokens (B, T, D), mods (B, K, T, D) → per-layer prefix and per-document attention mass (B, K)."""
        phi, mass = self.aggregator(q_tokens, mods, mask, scores)  # φ*: (B, T, D)
        if self.cfg.aggregator_output == "mixture":
            phi = torch.einsum("bk,bktd->btd", mass.to(mods.dtype), mods)  # convex mix of the documents' modulations
        elif self.cfg.aggregator_output == "select":
            phi = mods[torch.arange(mods.shape[0], device=mods.device), mass.argmax(1)]  # (B, T, D): the top document
        return self.expander(phi), mass

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
    def memory_prefix(self, questions: "list[str] | QuestionEncoding",
                      memories: list[list[tuple[Modulation, float]]]) -> tuple[Prefix, Tensor]:
        """Questions (texts, or their encoding from retrieval) + per-question memories → prefix, mass (B, K)."""
        return self.prefix(*self._aggregator_inputs(questions, memories))

    @torch.no_grad()
    def selection(self, questions: "list[str] | QuestionEncoding", memories: list[list[tuple[Modulation, float]]]) -> Tensor:
        """The aggregator's attention mass over each question's memories, (B, K), without building a prefix."""
        return self.aggregator(*self._aggregator_inputs(questions, memories))[1]

    def _aggregator_inputs(self, questions: "list[str] | QuestionEncoding",
                           memories: list[list[tuple[Modulation, float]]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q_tokens (B, T, D), mods (B, K, T, D), mask (B, K), scores (B, K)."""
        q_tokens = (questions if isinstance(questions, QuestionEncoding) else self.encode_questions(questions)).tokens
        return (q_tokens, *self.stack_memories(memories))

    def answer_logprobs(self, prompts: list[str], answers: list[str], prefix: Prefix | None) -> Tensor:
        """Mean per-token log p(answer | prompt, prefix): (B,). The training loss is its negative."""
        tok = self.lm.tokenizer
        p_ids = [tok(p)["input_ids"] for p in prompts]
        a_ids = [tok(answer_continuation(a), add_special_tokens=False)["input_ids"] for a in answers]
        sums, counts = self.lm.continuation_logprobs(p_ids, a_ids, prefix)
        return sums / counts


def checkpoint_dir(path: str | Path | None = None) -> Path:
    """``path`` or the shipped checkpoint; a clear error when there is none."""
    from pipeline.config import SHIPPED_CHECKPOINT

    d = Path(path) if path else SHIPPED_CHECKPOINT
    if not (d / WEIGHTS).exists():
        raise FileNotFoundError(f"no checkpoint at {d}: train one with `macstream train --out DIR` and pass DIR/best")
    return d


def checkpoint_identity(path: str | Path | None = None) -> tuple[str, str]:
    """(version, model_id) of a checkpoint without loading any model: what its modulations will be stamped with."""
    d = checkpoint_dir(path)
    cfg = json.loads((d / CONFIG).read_text())["model"]
    version = hashlib.sha256((d / WEIGHTS).read_bytes()).hexdigest()[:12]
    return version, f"{cfg.get('lm', ModelConfig().lm)}|{cfg.get('encoder', ModelConfig().encoder)}"
