"""The answer prompt: a trained, document-independent soft prompt of the memory's size.

It holds what every answer shares (the answer's form, how to read a text in the prompt). ``select+rag`` answers
behind it instead of behind the memory's prefix (a prompt in front of the memory's prefix is a study that did not
ship: research/two_stream.py). It is stored next to a checkpoint as ``prompt.safetensors`` and is *not* part of the
checkpoint version: it never changes what a stored modulation means, only how answers are read from it, so adding or
retraining it needs no re-encoding of the store. Trained by :mod:`pipeline.train_prompt` (``macstream train-prompt``).

Shapes: the prompt is a :class:`Prefix` of batch 1, keys/values (1, L, H_kv, P, D_h).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.model.lm import Prefix

PROMPT_FILE = "prompt.safetensors"


class LoadedPrompt(NamedTuple):
    prefix: Prefix  # keys/values (1, L, H_kv, P, D_h), float32
    version: str  # 12-hex content hash of the file
    meta: dict  # how it was trained (what save_prompt was given)


def batched(prompt: Prefix, b: int) -> Prefix:
    """(1, ...) → (b, ...) without copying."""
    return Prefix(prompt.keys.expand(b, *prompt.keys.shape[1:]), prompt.values.expand(b, *prompt.values.shape[1:]))


def save_prompt(prompt: Prefix, directory: str | Path, meta: dict) -> str:
    """Write ``directory/prompt.safetensors`` (float16, ``meta`` as JSON metadata); return its 12-hex content hash."""
    path = Path(directory) / PROMPT_FILE
    save_file({"keys": prompt.keys.detach().to(torch.float16).contiguous().cpu(),
               "values": prompt.values.detach().to(torch.float16).contiguous().cpu()},
              str(path), metadata={"meta": json.dumps(meta, default=str)})
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def load_prompt(directory: str | Path, layers: int, kv_heads: int, head_dim: int) -> LoadedPrompt | None:
    """The answer prompt stored in ``directory``, or None when there is none. Refuses (ValueError) a prompt made for
    another LM shape."""
    path = Path(directory) / PROMPT_FILE
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        keys, values = f.get_tensor("keys").float(), f.get_tensor("values").float()
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    shape = tuple(keys.shape)
    if len(shape) != 5 or shape[:3] != (1, layers, kv_heads) or shape[4] != head_dim or values.shape != keys.shape:
        raise ValueError(f"{path}: answer prompt of shape {shape} does not fit this LM "
                         f"(expected (1, {layers}, {kv_heads}, P, {head_dim}))")
    return LoadedPrompt(Prefix(keys, values), hashlib.sha256(path.read_bytes()).hexdigest()[:12], meta)
