"""The shipped checkpoint: present, small, versioned, and its memory carries knowledge on unseen entities.

The knowledge test is the project's core claim at small scale: questions about fictional companies of the test split
(disjoint from training) are answered far better when their articles are in the memory than by the base LM, and
worse again when exactly those articles are taken out of the memory. Thresholds sit well below the measured numbers
(README, Results) so that noise does not fail CI but a broken injection, aggregator or checkpoint does.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from pipeline.config import SHIPPED_CHECKPOINT

pytestmark = pytest.mark.slow


def test_checkpoint_is_small_and_versioned():
    weights = SHIPPED_CHECKPOINT / "weights.safetensors"
    assert weights.stat().st_size <= 25 * 2**20
    meta = json.loads((SHIPPED_CHECKPOINT / "config.json").read_text())
    assert meta["version"] == hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    assert {"model", "train"} <= set(meta)
    metrics = json.loads((SHIPPED_CHECKPOINT / "metrics.json").read_text())
    assert {"em", "f1", "selection", "step"} <= set(metrics)


@pytest.fixture(scope="module")
def shipped():
    from pipeline.mac import MACModel

    model = MACModel.load(SHIPPED_CHECKPOINT)
    model.eval()
    return model


def test_memory_carries_knowledge_of_unseen_entities(shipped):
    from pipeline.data import synthetic
    from pipeline.evaluate import EvalSettings, build_memory, run_questions
    from pipeline.metrics import aggregate

    docs, questions = synthetic.generate("test", 12, seed=3)
    qs = [q for q in questions if q.doc_ids][:32]
    settings = EvalSettings(modes=("base", "mac"), top_k=4, max_new_tokens=12, multiple_choice=False, progress=False)
    full = build_memory(shipped, docs, progress=False)
    rows = run_questions(shipped, full, qs, ("base", "mac"), settings, "knowledge")
    f1 = {m: aggregate({k: v for k, v in r.items() if isinstance(v, float)} for r in rs)["f1"] for m, rs in rows.items()}

    gold = {d for q in qs for d in q.doc_ids}
    without = build_memory(shipped, [d for d in docs if d.id not in gold], progress=False)
    rows_wo = run_questions(shipped, without, qs, ("mac",), settings, "knowledge-without-gold")
    f1_wo = aggregate({k: v for k, v in r.items() if isinstance(v, float)} for r in rows_wo["mac"])["f1"]
    print(f"F1 base {f1['base']:.1f}  mac {f1['mac']:.1f}  mac without the gold articles {f1_wo:.1f}")
    assert f1["mac"] >= f1["base"] + 15
    assert f1["mac"] >= f1_wo + 10
