"""Shared fixtures: offline model loading, a real SmolLM2 tokenizer, tiny random LMs (Llama-GQA, GPT-2-MHA),
the real MiniLM encoder and a tiny MAC model on top of them.

Environment is fixed *before* ``pipeline`` is imported: no hub access, and a test-only data home under
``<repo>/.cache/test-home`` so the dequantised SmolLM2 copy is made once (~14 s) and reused by every later run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_HOME = REPO / ".cache" / "test-home"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["MACSTREAM_HOME"] = str(TEST_HOME)  # never the user's ~/.macstream: tests own their state
TEST_HOME.mkdir(parents=True, exist_ok=True)
if str(REPO) not in sys.path:  # `pytest` (not `python -m pytest`) does not put the repo root on sys.path
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.config import DEFAULT_ENCODER, DEFAULT_LM, ModelConfig  # noqa: E402
from pipeline.model.lm import FrozenLM  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP spin-waiting against another
# busy process made a 3-token forward ~15x slower (0.25 s vs 6 ms). MACSTREAM_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("MACSTREAM_TEST_THREADS", "1")))

TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
TINY_GPT2 = dict(n_embd=64, n_layer=2, n_head=4)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers",
                            "slow: loads real model weights or runs longer than a second (deselect with -m 'not slow')")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (49,152 tokens)."""
    from transformers import AutoTokenizer

    from pipeline.model.weights import resolve_lm

    return AutoTokenizer.from_pretrained(resolve_lm(DEFAULT_LM))


def make_tiny_llama(tokenizer, attn: str = "eager") -> FrozenLM:
    """2-layer Llama with grouped-query attention (4 query heads share 2 KV heads), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=512, initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        attn_implementation=attn, **TINY_LLAMA,
    )
    return FrozenLM(LlamaForCausalLM(cfg), tokenizer, name=f"tiny-llama-{attn}")


def make_tiny_gpt2(tokenizer, attn: str = "eager") -> FrozenLM:
    """2-layer GPT-2 (multi-head attention, absolute positions), random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(4321)
    cfg = GPT2Config(
        vocab_size=len(tokenizer), n_positions=512, initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        attn_implementation=attn, **TINY_GPT2,
    )
    return FrozenLM(GPT2LMHeadModel(cfg), tokenizer, name=f"tiny-gpt2-{attn}")


@pytest.fixture(scope="session")
def tiny_llama(tokenizer) -> FrozenLM:
    return make_tiny_llama(tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2(tokenizer) -> FrozenLM:
    return make_tiny_gpt2(tokenizer)


_LM_CACHE: dict[str, FrozenLM] = {}


@pytest.fixture(scope="session", params=["llama-eager", "llama-sdpa", "gpt2-eager", "gpt2-sdpa"])
def any_lm(request, tokenizer) -> FrozenLM:
    """Every tiny LM family × attention implementation that prefix injection must support."""
    key = request.param
    if key not in _LM_CACHE:
        family, attn = key.split("-")
        _LM_CACHE[key] = (make_tiny_llama if family == "llama" else make_tiny_gpt2)(tokenizer, attn)
    return _LM_CACHE[key]


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 encoder (frozen), default window 256 tokens / overlap 32."""
    from pipeline.model.encoder import TextEncoder

    return TextEncoder(DEFAULT_ENCODER)


def tiny_config(**overrides) -> ModelConfig:
    """The shipped memory (the readout memory) at a tiny size: T = 4 states of layer 1 of the 2-layer LM."""
    base = {"lm": "tiny-llama", "num_tokens": 4, "lm_state_layer": 1, "head_dim": 16, "heads": 2, "bucket_size": 4,
            "question_blocks": 1, "aggregator_blocks": 2, "ffn_mult": 1, "max_doc_tokens": 256, "chunk_overlap": 32}
    return ModelConfig(**(base | overrides))


def make_tiny_mac(frozen_lm: FrozenLM, encoder, **overrides):
    """A tiny MAC model (the readout memory, untrained); ``overrides`` are ModelConfig fields."""
    from pipeline.model.mac import MACModel

    torch.manual_seed(99)
    return MACModel(tiny_config(**overrides), lm=frozen_lm, encoder=encoder)


@pytest.fixture(scope="session")
def tiny_mac(tiny_llama, minilm):
    """A tiny MAC model on the tiny Llama and the real MiniLM. Read-only: tests that mutate weights build their own."""
    return make_tiny_mac(tiny_llama, minilm)


@pytest.fixture(scope="session")
def tiny_checkpoint(tokenizer, minilm) -> Path:
    """A tiny MAC checkpoint on disk (the readout memory of :func:`tiny_config` on the tiny Llama, saved as a local
    model, + the real MiniLM), loadable by other processes (Ray encoder actors) by path, with an answer prompt (3
    positions) that ``select+rag`` reads through. Untrained: for pipeline semantics, not for answers. Rebuilt when a
    cached one is not this memory (e.g. one made before the engine kept one memory)."""
    import json
    import shutil

    from filelock import FileLock

    from pipeline.model.lm import Prefix
    from pipeline.model.mac import MACModel
    from pipeline.model.prompt import PROMPT_FILE, save_prompt

    root = TEST_HOME / "tiny-checkpoint"
    ckpt = root / "ckpt"
    wanted = tiny_config(lm=str(root / "lm")).model_dump()
    with FileLock(str(root) + ".lock"):  # one builder at a time when several test runs share the test home
        config = ckpt / "config.json"
        if not (ckpt / "weights.safetensors").exists() or json.loads(config.read_text())["model"] != wanted:
            shutil.rmtree(root, ignore_errors=True)
            lm = make_tiny_llama(tokenizer)
            lm.model.save_pretrained(root / "lm")
            tokenizer.save_pretrained(root / "lm")
            torch.manual_seed(7)
            MACModel(tiny_config(lm=str(root / "lm")), lm=lm, encoder=minilm).save(ckpt)
        if not (ckpt / PROMPT_FILE).exists():
            t = TINY_LLAMA
            shape = (1, t["num_hidden_layers"], t["num_key_value_heads"], 3,
                     t["hidden_size"] // t["num_attention_heads"])
            gen = torch.Generator().manual_seed(8)
            save_prompt(Prefix(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)), ckpt,
                        {"test": True})
    return ckpt
