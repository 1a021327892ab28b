"""End to end through the CLI with the real frozen LM and encoder: data → eval (all modes) → encode → ask."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from macstream.cli import main
from pipeline.config import DEFAULT_MODE, ModelConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from pipeline.model.mac import MACModel

    d = tmp_path_factory.mktemp("ckpt")
    MACModel(ModelConfig(num_tokens=4)).save(d)  # untrained but real LM/encoder: exercises every path
    return d


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    main(["data", "synthetic", "--split", "test", "--entities", "4", "--out", str(d)])
    return d


def test_eval_reports_every_mode_with_costs(checkpoint, dataset, tmp_path):
    out = tmp_path / "r.json"
    main(["eval", "--data", str(dataset), "--checkpoint", str(checkpoint), "--limit", "6", "--top-k", "3",
          "--max-new-tokens", "4", "--out", str(out)])
    rep = json.loads(out.read_text())
    assert set(rep["metrics"]) == {"base", "rag", "mac", "mac+rag"}
    for m in rep["metrics"].values():
        assert 0 <= m["f1"] <= 100 and 0 <= m["em"] <= m["lenient_em"] + 1e-9 <= 100
        assert 0 <= m["mc_accuracy"] <= 100
    assert rep["metrics"]["rag"]["prompt_tokens"] > rep["metrics"]["mac"]["prompt_tokens"]  # context costs tokens
    assert "selection" in rep["metrics"]["mac"] and "retriever_top1" in rep["metrics"]["mac"]
    assert rep["cost"]["bytes_per_modulation"] == 4 * 576 * 2
    assert len(rep["rows"]["mac"]) == 6 and all(len(r["weights"]) == 3 for r in rep["rows"]["mac"])
    growth = rep["retention"]["growth"]
    assert list(growth) == ["1x", "2x", "4x", "8x"]
    assert [g["documents"] for g in growth.values()] == sorted(g["documents"] for g in growth.values())


def test_encode_then_ask_cites_sources(checkpoint, dataset, tmp_path, capsys):
    mem = tmp_path / "mem.jsonl"
    main(["encode", "--data", str(dataset), "--checkpoint", str(checkpoint), "--out", str(mem)])
    enc = json.loads(capsys.readouterr().out)
    assert enc["documents"] > 0 and enc["chunks"] >= enc["documents"]
    main(["ask", "Who did the company name as chief executive?", "--memory", str(mem), "--checkpoint",
          str(checkpoint), "--top-k", "2", "--max-new-tokens", "3"])
    ans = json.loads(capsys.readouterr().out)
    # the best measured mode by default
    assert ans["mode"] == DEFAULT_MODE == "select+rag@1" and len(ans["sources"]) == 2
    assert sum(s["weight"] for s in ans["sources"]) == pytest.approx(1.0, abs=1e-3)


def test_memory_from_another_checkpoint_is_refused(checkpoint, dataset, tmp_path):
    from pipeline.model.mac import MACModel

    other = tmp_path / "other"
    torch.manual_seed(4242)  # not the autouse seed: a session checkpoint built under it would have the same version
    MACModel(ModelConfig(num_tokens=4)).save(other)  # fresh random init: another version
    mem = tmp_path / "mem.jsonl"
    main(["encode", "--data", str(dataset), "--checkpoint", str(other), "--out", str(mem)])
    with pytest.raises(SystemExit) as err:
        main(["ask", "Who?", "--memory", str(mem), "--checkpoint", str(checkpoint)])
    assert err.value.code == 2


def test_bad_arguments_exit_2_with_a_message(tmp_path):
    r = subprocess.run([sys.executable, "-m", "macstream.cli", "eval", "--data", str(tmp_path), "--top-k", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "top-k" in r.stderr
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"stepz": 3}))
    r = subprocess.run([sys.executable, "-m", "macstream.cli", "train-readout", "--out", str(tmp_path / "o"),
                        "--config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 2 and "stepz" in r.stderr and "unknown key" in r.stderr
    assert not (tmp_path / "o").exists()  # refused before anything was built


def test_ask_mode_is_validated_before_anything_loads(tmp_path):
    """`ask --mode` takes the eval modes, @N included; a wrong one exits 2 naming the rule."""
    r = subprocess.run([sys.executable, "-m", "macstream.cli", "ask", "q", "--memory", str(tmp_path / "m"),
                        "--mode", "mac@1"], capture_output=True, text=True)
    assert r.returncode == 2 and "applies to rag, mac+rag, select+rag only" in r.stderr
