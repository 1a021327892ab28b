"""The frozen language model and P-tuning-v2 prefix injection through transformers' Cache API.

A :class:`Prefix` holds P key/value tokens for every layer, sized for the LM's *KV* heads, so grouped-query models
(Llama, Qwen2, SmolLM2: ``num_key_value_heads < num_attention_heads``) and multi-head models (GPT-2) both work.
Injection: a fresh ``DynamicCache`` pre-filled with the prefix (the cache grows in place on every forward, so it is
never reused), the attention mask extended by P ones, and real tokens at explicit positions P, P+1, ... Cached keys
are post-RoPE, so prefix keys carry no rotation. The LM's parameters never receive gradients; the prefix does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel

from pipeline.model.weights import resolve_lm


class _StopForward(Exception):
    """Raised by a forward hook to skip the layers above the one whose states we need."""


def pad_batch(seqs: list[list[int]], pad: int, device=None, left: bool = False) -> tuple[Tensor, Tensor]:
    """Token lists → ids and attention mask (N, S_max), padded on the right (or the left, for generation)."""
    S = max(map(len, seqs))
    ids = torch.full((len(seqs), S), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), S), dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        span = slice(S - len(s), S) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long, device=device)
        mask[i, span] = 1
    return ids, mask


@dataclass
class Prefix:
    """Per-layer prefix key/values. ``keys``, ``values``: (B, L, H_kv, P, D_h)."""

    keys: Tensor
    values: Tensor

    @property
    def length(self) -> int:
        return self.keys.shape[3]

    def repeat_interleave(self, n: int) -> Prefix:
        """(B, ...) → (B·n, ...): each row repeated n times (beams, choices, questions of one memory)."""
        return Prefix(self.keys.repeat_interleave(n, 0), self.values.repeat_interleave(n, 0))

    def index(self, idx: Tensor) -> Prefix:
        return Prefix(self.keys[idx], self.values[idx])


class FrozenLM(nn.Module):
    """A causal LM with frozen parameters that accepts a :class:`Prefix` on every call."""

    def __init__(self, model: PreTrainedModel, tokenizer=None, name: str = "custom"):
        super().__init__()
        model.eval()
        model.requires_grad_(False)
        self.model, self.tokenizer, self.name = model, tokenizer, name
        cfg = model.config
        self.num_layers: int = cfg.num_hidden_layers
        self.num_heads: int = cfg.num_attention_heads
        self.num_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.hidden_size: int = cfg.hidden_size
        self.head_dim: int = getattr(cfg, "head_dim", None) or self.hidden_size // self.num_heads
        if tokenizer is not None and tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._stop_ids: set[int] | None = None

    @classmethod
    def load(cls, name: str, dtype: torch.dtype = torch.float32) -> FrozenLM:
        path = resolve_lm(name)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return cls(model, AutoTokenizer.from_pretrained(path), name=name)

    def to_device(self, device: str | torch.device) -> FrozenLM:
        """Move the frozen LM to ``device``. On CUDA its weights become bf16 (fp16 where the GPU lacks bf16): it is
        never trained, and the code around it already casts prefixes to its dtype and reads logits as float. On CPU
        it is only moved (its dtype is left as loaded)."""
        device = torch.device(device)
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            self.model.to(device=device, dtype=dtype)
        else:
            self.model.to(device=device)
        return self

    def train(self, mode: bool = True) -> FrozenLM:  # the LM never leaves eval mode (no dropout)
        return super().train(False)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer is not None else 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- injection -------------------------------------------------------------------------------------------
    def check_prefix(self, prefix: Prefix, batch: int) -> None:
        want = (batch, self.num_layers, self.num_kv_heads, prefix.length, self.head_dim)
        for name, t in (("keys", prefix.keys), ("values", prefix.values)):
            if tuple(t.shape) != want:
                raise ValueError(f"prefix {name}: expected (B, L, H_kv, P, D_h) = {want}, got {tuple(t.shape)}")

    def _cache(self, prefix: Prefix | None, batch: int) -> DynamicCache:
        if prefix is None:
            return DynamicCache(config=self.model.config)
        self.check_prefix(prefix, batch)
        dtype = self.model.dtype
        layers = [(prefix.keys[:, i].to(dtype), prefix.values[:, i].to(dtype)) for i in range(self.num_layers)]
        return DynamicCache(ddp_cache_data=layers, config=self.model.config)

    def _body(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache: DynamicCache) -> Tensor:
        """Run the transformer body (no LM head). Returns hidden states (B, S, d_LM)."""
        out = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            use_cache=True,
        )
        return out.last_hidden_state

    def decoder_layers(self) -> nn.ModuleList:
        body = self.model.base_model
        for name in ("layers", "h"):  # Llama/Qwen/Mistral, GPT-2
            if isinstance(getattr(body, name, None), nn.ModuleList):
                return getattr(body, name)
        raise ValueError(f"cannot find the decoder layers of {type(self.model).__name__}")

    def hidden_states_at(self, input_ids: Tensor, attention_mask: Tensor, layer: int) -> Tensor:
        """Residual stream after decoder layer ``layer`` (1-based): (B, S, d_LM). Layers above it are not run."""
        layers = self.decoder_layers()
        if not 1 <= layer <= len(layers):
            raise ValueError(f"layer must be in 1..{len(layers)}, got {layer}")
        captured: list[Tensor] = []

        def stop(_module, _inputs, output):
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _StopForward

        handle = layers[layer - 1].register_forward_hook(stop)
        try:
            self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured[0]

    # ---- scoring (training loss, multiple choice) ---------------------------------------------------------------
    def continuation_logprobs(
        self, prompts: list[list[int]], continuations: list[list[int]], prefix: Prefix | None = None
    ) -> tuple[Tensor, Tensor]:
        """Sum of log p(continuation | prompt, prefix) per row, and the continuation's token count.

        Rows are right-padded; the LM head runs only at the continuation's positions (cheap for a 49k vocabulary).
        Returns (B,) log-prob sums (differentiable w.r.t. the prefix) and (B,) token counts.
        """
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        if any(len(c) == 0 for c in continuations) or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts and continuations must be non-empty")
        dev, B = self.device, len(prompts)
        ids, mask = pad_batch([p + c for p, c in zip(prompts, continuations)], self.pad_id, dev)
        S = ids.shape[1]
        P = prefix.length if prefix is not None else 0
        full_mask = torch.cat([torch.ones((B, P), dtype=torch.long, device=dev), mask], 1)  # (B, P+S)
        pos = (P + torch.arange(S, device=dev)).expand(B, S)
        hidden = self._body(ids, full_mask, pos, self._cache(prefix, B))  # (B, S, d_LM)
        rows, cols, targets = [], [], []
        for i, (p, c) in enumerate(zip(prompts, continuations)):
            n = len(c)
            rows += [i] * n
            cols += range(len(p) - 1, len(p) - 1 + n)  # position t predicts token t+1
            targets += c
        rows_t = torch.tensor(rows, device=dev)
        logits = self.model.get_output_embeddings()(hidden[rows_t, torch.tensor(cols, device=dev)])  # (N, V)
        lp = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(targets, device=dev)[:, None])[:, 0]
        sums = torch.zeros(B, device=dev, dtype=lp.dtype).index_add(0, rows_t, lp)
        counts = torch.tensor([len(c) for c in continuations], device=dev)
        return sums, counts

    @torch.no_grad()
    def choice_logprobs(
        self, prompts: list[list[int]], choices: list[list[list[int]]], prefix: Prefix | None = None
    ) -> Tensor:
        """Mean per-token log p(choice | prompt, prefix) for every choice of every prompt: (B, C).

        Same numbers as :meth:`continuation_logprobs`, but each prompt runs once: its cache is shared by its C
        choices (C must be equal across prompts), so a long RAG prompt is not re-read per choice.
        """
        C = len(choices[0]) if choices else 0
        if any(len(c) != C for c in choices) or C == 0 or any(len(x) == 0 for c in choices for x in c):
            raise ValueError("every prompt needs the same number (>= 1) of non-empty choices")
        dev, B = self.device, len(prompts)
        # right padding: pads sit between prompt and choice, masked out
        ids, mask = pad_batch(prompts, self.pad_id, dev)
        S = ids.shape[1]
        P = prefix.length if prefix is not None else 0
        full_mask = torch.cat([torch.ones((B, P), dtype=torch.long, device=dev), mask], 1)
        cache = self._cache(prefix, B)
        hidden = self._body(ids, full_mask, (P + torch.arange(S, device=dev)).expand(B, S), cache)  # (B, S, d)
        last = hidden[torch.arange(B, device=dev), torch.tensor([len(p) - 1 for p in prompts], device=dev)]  # (B, d)
        cache.batch_repeat_interleave(C)
        flat = [c for cs in choices for c in cs]  # (B·C) choices, prompt-major
        cids, cmask = pad_batch(flat, self.pad_id, dev)
        L = cids.shape[1]
        start = torch.tensor([P + len(p) for p in prompts], device=dev).repeat_interleave(C)  # first choice position
        ch_hidden = self._body(cids, torch.cat([full_mask.repeat_interleave(C, 0), cmask], 1),
                               start[:, None] + torch.arange(L, device=dev), cache)  # (B·C, L, d)
        # predictors of choice token j: the prompt's last state for j = 0, the choice's state j-1 after that
        pred = torch.cat([last.repeat_interleave(C, 0)[:, None], ch_hidden[:, :-1]], 1)  # (B·C, L, d)
        logp = torch.log_softmax(self.model.get_output_embeddings()(pred).float(), -1)
        tok = logp.gather(2, cids[..., None])[..., 0] * cmask  # (B·C, L)
        return (tok.sum(1) / cmask.sum(1)).view(B, C)

    # ---- generation ---------------------------------------------------------------------------------------------
    def stop_ids(self) -> set[int]:
        """Token ids that end an answer: EOS and every token whose text contains a newline."""
        if self._stop_ids is None:
            tok = self.tokenizer
            ids = {i for t, i in tok.get_vocab().items() if "\n" in tok.convert_tokens_to_string([t])}
            ids |= {i for i in (tok.eos_token_id, *(tok.all_special_ids or [])) if i is not None}
            self._stop_ids = ids
        return self._stop_ids

    @torch.no_grad()
    def stream(self, prompt: list[int], prefix: Prefix | None = None, max_new_tokens: int = 16):
        """Greedy decoding of one prompt, yielding each new token id as it is chosen (stops before a stop token).
        Yields exactly what :meth:`generate` returns for the same prompt with num_beams=1."""
        dev, stop = self.device, self.stop_ids()
        ids = torch.tensor([prompt], device=dev)
        P = prefix.length if prefix is not None else 0
        cache = self._cache(prefix, 1)
        mask = torch.ones((1, P + len(prompt)), dtype=torch.long, device=dev)
        pos = torch.arange(P, P + len(prompt), device=dev)[None]
        hidden = self._body(ids, mask, pos, cache)[:, -1]
        for step in range(max_new_tokens):
            tok = int(self.model.get_output_embeddings()(hidden).float().argmax(-1))
            if tok in stop:
                return
            yield tok
            mask = torch.cat([mask, torch.ones((1, 1), dtype=torch.long, device=dev)], 1)
            hidden = self._body(torch.tensor([[tok]], device=dev), mask, pos[:, -1:] + 1 + step, cache)[:, -1]

    def _greedy(self, hidden: Tensor, mask: Tensor, next_pos: Tensor, cache: DynamicCache, max_new_tokens: int,
                stop_t: Tensor) -> list[list[int]]:
        """Greedy decoding after the prompt forward. A row that emits a stop token leaves the batch (its cache rows
        are dropped), so a batch costs what its live rows need, not max_new_tokens steps for every row."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)  # original row of each live row
        out: list[list[int]] = [[] for _ in range(hidden.shape[0])]
        for step in range(max_new_tokens):
            tok = self.model.get_output_embeddings()(hidden).float().argmax(-1)  # (A,)
            live = ~torch.isin(tok, stop_t)
            for r, t in zip(rows[live].tolist(), tok[live].tolist()):
                out[r].append(t)
            if not bool(live.any()) or step == max_new_tokens - 1:
                break
            if not bool(live.all()):
                keep = live.nonzero()[:, 0]
                cache.reorder_cache(keep)
                rows, tok, mask, next_pos = rows[keep], tok[keep], mask[keep], next_pos[keep]
            mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=mask.device)], 1)
            hidden = self._body(tok[:, None], mask, next_pos, cache)[:, -1]
            next_pos = next_pos + 1
        return out

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], prefix: Prefix | None = None, max_new_tokens: int = 16, num_beams: int = 1
    ) -> list[list[int]]:
        """Decode each prompt (greedy when num_beams == 1, else beam search) until a stop token.

        Returns the new token ids per prompt, without the stop token. Prompts are left-padded into one batch.
        """
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        dev, B, K = self.device, len(prompts), num_beams
        stop = self.stop_ids()
        pad = self.pad_id
        ids, mask = pad_batch(prompts, pad, dev, left=True)
        ids, mask = ids.repeat_interleave(K, 0), mask.repeat_interleave(K, 0)  # (B·K, S)
        prefix = prefix.repeat_interleave(K) if prefix is not None and K > 1 else prefix
        P = prefix.length if prefix is not None else 0
        cache = self._cache(prefix, B * K)
        full_mask = torch.cat([torch.ones((B * K, P), dtype=torch.long, device=dev), mask], 1)
        pos = P + (mask.cumsum(1) - 1).clamp(min=0)  # left padding: real tokens at P, P+1, ...
        hidden = self._body(ids, full_mask, pos, cache)[:, -1]  # (B·K, d_LM)
        next_pos = pos[:, -1:] + 1
        stop_t = torch.tensor(sorted(stop), device=dev)
        if K == 1:
            return self._greedy(hidden, full_mask, next_pos, cache, max_new_tokens, stop_t)
        scores = torch.zeros(B, K, device=dev)
        scores[:, 1:] = float("-inf")  # all beams start identical: keep one alive
        tokens = torch.zeros((B * K, 0), dtype=torch.long, device=dev)
        done = torch.zeros(B * K, dtype=torch.bool, device=dev)
        for _ in range(max_new_tokens):
            logp = torch.log_softmax(self.model.get_output_embeddings()(hidden).float(), -1)  # (B·K, V)
            V = logp.shape[1]
            # finished rows only extend with a zero-cost pad so their score stays fixed
            logp = torch.where(done[:, None], torch.full_like(logp, float("-inf")), logp)
            logp[done, pad] = 0.0
            cand = (scores.view(B * K, 1) + logp).view(B, K * V)
            top, idx = cand.topk(K, dim=1)  # (B, K)
            beam = idx // V + torch.arange(B, device=dev)[:, None] * K  # source row per new beam
            beam, tok = beam.view(-1), (idx % V).view(-1)
            scores = top
            tokens = torch.cat([tokens[beam], tok[:, None]], 1)
            was_done = done[beam]
            done = was_done | torch.isin(tok, stop_t)
            if K > 1:
                cache.reorder_cache(beam)
            full_mask = torch.cat([full_mask[beam], torch.ones((B * K, 1), dtype=torch.long, device=dev)], 1)
            next_pos = next_pos[beam]
            if bool(done.all()):
                break
            hidden = self._body(tok[:, None], full_mask, next_pos, cache)[:, -1]
            next_pos = next_pos + 1
        best = scores.argmax(1) + torch.arange(B, device=dev) * K  # (B,)
        out = []
        for row in tokens[best].tolist():
            ans = []
            for t in row:
                if t in stop:
                    break
                ans.append(t)
            out.append(ans)
        return out
