"""The answer prompt (pipeline/model/prompt.py, pipeline/train_prompt.py): stored beside a checkpoint without changing
its version, refused when made for another LM, and trained by ``macstream train-prompt`` on the real checkpoint."""

from __future__ import annotations

import shutil

import pytest
import torch

from pipeline.model.lm import Prefix
from pipeline.model.prompt import PROMPT_FILE, load_prompt, save_prompt


def _prefix(b: int, p: int, fill: float, layers: int = 2, heads: int = 2, dim: int = 16) -> Prefix:
    return Prefix(torch.full((b, layers, heads, p, dim), fill), torch.full((b, layers, heads, p, dim), -fill))


def test_a_saved_prompt_loads_back_and_one_for_another_lm_is_refused(tmp_path):
    assert load_prompt(tmp_path, 2, 2, 16) is None  # no prompt: the checkpoint answers with the memory alone
    digest = save_prompt(_prefix(1, 3, 0.5), tmp_path, {"checkpoint": "abc"})
    prompt, got, meta = load_prompt(tmp_path, 2, 2, 16)
    assert got == digest and meta == {"checkpoint": "abc"} and prompt.keys.shape == (1, 2, 2, 3, 16)
    assert torch.allclose(prompt.keys, torch.tensor(0.5))
    with pytest.raises(ValueError, match="does not fit this LM"):
        load_prompt(tmp_path, 30, 3, 64)


@pytest.mark.slow
def test_train_prompt_writes_a_prompt_the_product_loads_and_keeps_the_version(tmp_path, capsys):
    """`macstream train-prompt` on a copy of the shipped checkpoint (real SmolLM2, toy scale): the prompt file appears,
    the loaded model carries it at the memory's size, the checkpoint version (what stored modulations are stamped
    with) is unchanged, and the prompt moved away from its starting point."""
    import json

    from macstream.cli import main
    from pipeline.config import SHIPPED_CHECKPOINT
    from pipeline.model.mac import MACModel, checkpoint_identity

    ck = tmp_path / "ck"
    ck.mkdir()
    for name in ("weights.safetensors", "config.json"):
        shutil.copy(SHIPPED_CHECKPOINT / name, ck / name)
    (ck / PROMPT_FILE).unlink(missing_ok=True)
    before = checkpoint_identity(ck)
    conf = tmp_path / "p.json"
    conf.write_text(json.dumps({"synthetic_entities": 3, "batch": 2, "lr": 0.05, "threads": 1, "bf16": False}))
    main(["train-prompt", "--checkpoint", str(ck), "--config", str(conf), "--steps", "2"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (ck / PROMPT_FILE).exists() and checkpoint_identity(ck) == before
    model = MACModel.load(ck)
    assert model.version == before[0] and model.prompt_version == out["prompt"]
    lm, p = model.lm, 1 + model.cfg.num_tokens
    assert model.answer_prompt.keys.shape == (1, lm.num_layers, lm.num_kv_heads, p, lm.head_dim)
    # its starting point is the readout of the mean training modulation; two steps at lr 0.05 must have moved it
    from pipeline.data import synthetic
    from pipeline.train_prompt import initial_prompt

    init = initial_prompt(model, synthetic.generate("train", 3, seed=0)[0])
    assert (model.answer_prompt.keys - init.keys).abs().max() > 1e-2

    # refused with status 2: a checkpoint of another memory (a config record of the slots memory), a config key that
    # does not exist
    slots = tmp_path / "slots"
    slots.mkdir()
    shutil.copy(ck / "weights.safetensors", slots / "weights.safetensors")
    meta = json.loads((ck / "config.json").read_text())
    meta["model"] |= {"amortizer": "queries", "expander": "slots", "aggregator_output": "tokens"}
    (slots / "config.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as other:
        main(["train-prompt", "--checkpoint", str(slots), "--steps", "1"])
    conf.write_text('{"stepz": 3}')
    with pytest.raises(SystemExit) as bad_key:
        main(["train-prompt", "--checkpoint", str(ck), "--config", str(conf)])
    assert other.value.code == 2 and bad_key.value.code == 2
    assert not (slots / PROMPT_FILE).exists()
