"""``macstream``: one command line for the whole system. Subcommands: data, train, eval, encode, ask.

Every subcommand validates its arguments at the edge and exits with status 2 and a one-line reason on bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _model(args):
    from .config import SHIPPED_CHECKPOINT
    from .mac import MACModel

    path = Path(args.checkpoint or SHIPPED_CHECKPOINT)
    if not (path / "weights.safetensors").exists():
        raise SystemExit(f"macstream: no checkpoint at {path}: train one with `macstream train --out DIR` "
                         "and pass --checkpoint DIR/best")
    return MACModel.load(path)


def _read_config(path: str | None) -> dict:
    if not path:
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"macstream: cannot read config {path}: {err}")


def cmd_data(args) -> None:
    if args.source == "synthetic":
        from .data.synthetic import write_synthetic

        out = write_synthetic(args.out, args.split, args.entities, args.seed)
    else:
        from .data import realtimeqa

        if not realtimeqa.available():
            raise SystemExit(f"macstream: RealTimeQA not found at {realtimeqa.default_root()} (set MACSTREAM_RTQA_DIR)")
        out = realtimeqa.write_realtimeqa(args.out, args.years)
    print(f"wrote {out}")


def cmd_train(args) -> None:
    from .config import ModelConfig, TrainConfig, load_config
    from .train import train

    conf = _read_config(args.config)
    unknown = set(conf) - {"model", "train"}
    if unknown:
        raise SystemExit(f"macstream: config: unknown top-level key(s) {sorted(unknown)} (allowed: model, train)")
    try:
        model_cfg = load_config(ModelConfig, conf.get("model"), "model")
        train_cfg = load_config(TrainConfig, conf.get("train"), "train")
    except ValueError as err:
        raise SystemExit(f"macstream: {err}")
    best = train(model_cfg, train_cfg, Path(args.out), resume=not args.no_resume,
                 init=Path(args.init) if args.init else None)
    print(json.dumps({"best_validation": best, "checkpoint": str(Path(args.out) / "best")}, indent=2))


def cmd_eval(args) -> None:
    from .data.portable import read_portable
    from .evaluate import EvalSettings, evaluate

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    docs, questions = read_portable(args.data)
    settings = EvalSettings(modes=modes, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                            retention=not args.no_retention, limit=args.limit)
    report = evaluate(_model(args), docs, questions, settings)
    report["data"] = str(args.data)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    summary = {k: v for k, v in report.items() if k != "rows"}
    print(json.dumps(summary, indent=2, default=str))


def cmd_encode(args) -> None:
    from .data.portable import read_portable
    from .evaluate import build_memory
    from .memory import save_bank

    docs, _ = read_portable(args.data)
    model = _model(args)
    bank = build_memory(model, docs)
    size = save_bank(bank, args.out)
    print(json.dumps({"documents": len(bank), "chunks": bank.num_chunks, "checkpoint": model.version,
                      "bytes_per_modulation": model.cfg.num_tokens * model.lm.hidden_size * 2,
                      "file": str(args.out), "file_bytes": size}, indent=2))


def cmd_ask(args) -> None:
    from .evaluate import EvalSettings, answer_batch
    from .memory import load_bank
    from .schemas import Question

    model = _model(args)
    bank = load_bank(args.memory)
    if not len(bank):
        raise SystemExit(f"macstream: memory {args.memory} is empty")
    q = Question(id="ask", question=args.question, answers=["-"])
    hits = bank.search(model.encoder.embed([q.question]).numpy(), args.top_k)
    row = answer_batch(model, args.mode, [q], hits, EvalSettings(max_new_tokens=args.max_new_tokens, multiple_choice=False))[0]
    weights = row.get("weights", {})
    best: dict[str, object] = {}
    for h in hits[0]:  # hits are chunks, best first: one source per document, at its best chunk's score
        best.setdefault(h.document.id, h)
    print(json.dumps({"answer": row["prediction"], "mode": args.mode, "sources": [
        {"id": h.document.id, "title": h.document.title, "published_at": str(h.document.published_at),
         "score": round(h.score, 4), "weight": weights.get(h.document.id)} for h in best.values()]}, indent=2))


def _positive(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="macstream", description="Keep a frozen LM up to date from news streams (MAC).")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("data", help="write a dataset in the portable eval format")
    d.add_argument("source", choices=["synthetic", "realtimeqa"])
    d.add_argument("--out", required=True)
    d.add_argument("--split", default="test", choices=["train", "validation", "test"])
    d.add_argument("--entities", type=_positive, default=150)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--years", type=int, nargs="+", default=[2024])
    d.set_defaults(fn=cmd_data)

    t = sub.add_parser("train", help="meta-train the amortizer/aggregator/expander (LM frozen)")
    t.add_argument("--out", required=True, help="run directory (last/ and best/ checkpoints, history.jsonl)")
    t.add_argument("--config", help='JSON file {"model": {...}, "train": {...}}; unknown keys are rejected')
    t.add_argument("--init", help="start from this checkpoint's weights")
    t.add_argument("--no-resume", action="store_true", help="ignore <out>/last")
    t.set_defaults(fn=cmd_train)

    for name, fn, hlp in (("eval", cmd_eval, "evaluate modes on a portable dataset"),
                          ("encode", cmd_encode, "amortize a portable dataset's documents into a memory file"),
                          ("ask", cmd_ask, "answer one question from a memory file")):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("--checkpoint", help="checkpoint directory (default: the shipped one)")
        s.set_defaults(fn=fn)
        if name == "eval":
            s.add_argument("--data", required=True)
            s.add_argument("--modes", default="base,mac,rag,mac+rag")
            s.add_argument("--top-k", type=_positive, default=4)
            s.add_argument("--max-new-tokens", type=_positive, default=16)
            s.add_argument("--limit", type=_positive)
            s.add_argument("--no-retention", action="store_true")
            s.add_argument("--out")
        elif name == "encode":
            s.add_argument("--data", required=True)
            s.add_argument("--out", required=True)
        else:
            s.add_argument("question")
            s.add_argument("--memory", required=True, help="file written by `macstream encode`")
            s.add_argument("--mode", default="mac", choices=["base", "rag", "mac", "mac+rag"])
            s.add_argument("--top-k", type=_positive, default=4)
            s.add_argument("--max-new-tokens", type=_positive, default=16)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"macstream: {err}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
