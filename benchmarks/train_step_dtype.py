"""Training step time, fp32 vs bf16 autocast, measured side by side: the steps alternate between the two in one
process, so both see the same machine load. Default ModelConfig/TrainConfig, memory of 8, synthetic train split.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_step_dtype.py [--steps 10] [--threads 1]

It decides TrainConfig.bf16's default: the faster one on a plain CPU.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from benchmarks.machine import machine
from pipeline.config import ModelConfig, TrainConfig
from pipeline.model.mac import MACModel
from pipeline.train import load_training_data, sample_batch, step_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="measured steps per dtype (after one warm-up step each)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(realtimeqa_share=0.0, synthetic_entities=100)
    model = MACModel(ModelConfig())
    model.train()
    pool, _, _ = load_training_data(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    rng = random.Random(0)
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(2 * (args.steps + 1)):
        bf16 = bool(i % 2)
        ids = sample_batch(pool, cfg.batch_docs, 2, rng)
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            res = step_loss(model, pool, ids, 8, 1.0, cfg.backprop_fraction, cfg.questions_per_doc, rng)
        res["loss"].backward()
        for p in params:
            p.grad = None
        if i >= 2:
            times[bf16].append(time.perf_counter() - t)
    print(f"machine: {machine()}; {args.threads} torch thread(s); default configs, memory 8, "
          f"{cfg.batch_docs} documents per step; forward + backward, no optimiser step; steps interleaved")
    for bf16, ts in times.items():
        print(f"  {'bf16 autocast' if bf16 else 'fp32'}: {sum(ts) / len(ts):.2f} s/step (mean of {len(ts)})")
    print(f"  ratio fp32 / bf16: {sum(times[False]) / sum(times[True]):.2f}")


if __name__ == "__main__":
    main()
