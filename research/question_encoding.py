"""What encoding each question once saves: retrieval and aggregation from one MiniLM pass (`encode_questions`),
against the old path (``encoder.embed`` for retrieval, then ``encode_questions`` again for the aggregator).

Measured side by side in one process, the two paths interleaved round by round on the same batches of synthetic test
questions, one torch thread; prints the median milliseconds per batch of each path and their ratio.

    python -m research.question_encoding --rounds 30 --batch 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.machine import machine
from pipeline.data import synthetic
from pipeline.model.mac import MACModel, checkpoint_dir


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--checkpoint")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = MACModel.load(checkpoint_dir(args.checkpoint)).eval()
    _, qs = synthetic.generate("test", 20, seed=0)
    texts = [q.question for q in qs]
    times: dict[str, list[float]] = {"twice (embed + encode_questions)": [], "once (encode_questions)": []}
    with torch.no_grad():
        for r in range(args.rounds + 2):  # the first two rounds warm up and are dropped
            batch = [texts[(r * args.batch + i) % len(texts)] for i in range(args.batch)]
            order = list(times) if r % 2 else list(times)[::-1]  # alternate which path goes first
            for name in order:
                t0 = time.perf_counter()
                if name.startswith("twice"):
                    model.encoder.embed(batch)
                model.encode_questions(batch)
                if r >= 2:
                    times[name].append(1000 * (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"median_ms_per_batch": med,
           "ratio_once_over_twice": med["once (encode_questions)"] / med["twice (embed + encode_questions)"],
           "rounds": args.rounds, "batch": args.batch, "threads": 1, "checkpoint": model.version, "machine": machine()}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
