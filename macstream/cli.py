"""``macstream``: one command line for the whole system.

Subcommands: data, train-readout, train-prompt, eval, encode, ask, diagnose, calibrate-pick (the engine); broker,
produce, feeds, ingest, stats, migrate-store, carry, replay (streaming); serve (HTTP API); up (ingest + serve, always
on); backfill, export, import (archives in, memory snapshots out); bench TARGET (one subcommand per benchmark, and
the report); demo.

Every subcommand validates its arguments at the edge and exits with status 2 and a one-line reason on bad input. The
ingest, serve, feeds and backfill flags are generated from their pydantic configs (:mod:`macstream.flags`), each
``bench`` target's from its own config (:mod:`benchmarks.config`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

LONG_RUNNING = ("up", "ingest", "serve")
if sys.argv[1:2] and sys.argv[1] in LONG_RUNNING:  # asked to stop while still importing: nothing started yet, so a
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # clean exit; the command's GracefulStop takes over later

from benchmarks import config as bench_config
from macstream import flags
from pipeline.config import DEFAULT_MODE, BackfillConfig, FeedsConfig, IngestConfig, ServeConfig, read_json_object
from pipeline.placement import Unplaceable
from pipeline.store.actor import StoreBusy

# Model, Ray and Kafka code is imported inside each command: `macstream --help` and a bad flag answer at once.


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _news_flags(p) -> None:
    """The news-selection memory's sizes (diagnose --news, calibrate-pick)."""
    p.add_argument("--news-questions", dest="news_questions", type=_positive, default=100,
                   help="questions per set (their evidence texts are in the memory)")
    p.add_argument("--news-articles", dest="news_articles", type=_positive, default=200,
                   help="full-length search-result articles in the memory beside the evidence texts")
    p.add_argument("--news-top-k", dest="news_top_k", type=_positive, nargs="+", default=[4, 8],
                   help="retrieved windows per question")
    p.add_argument("--threads", type=_positive, default=2, help="torch threads")


def _model(args):
    from pipeline.model.mac import MACModel, checkpoint_dir

    try:
        return MACModel.load(checkpoint_dir(args.checkpoint))
    except FileNotFoundError as err:
        raise SystemExit(f"macstream: {err}") from None


def _read_config(path: str | None) -> dict:
    try:
        return read_json_object(path)
    except ValueError as err:
        raise SystemExit(f"macstream: {err}") from None


def cmd_data(args) -> None:
    if args.source == "synthetic":
        from pipeline.data.synthetic import write_synthetic

        out = write_synthetic(args.out, args.split, args.entities, args.seed, args.style)
    else:
        from pipeline.data import realtimeqa

        if not realtimeqa.available():
            raise SystemExit(f"macstream: RealTimeQA not found at {realtimeqa.default_root()} (set MACSTREAM_RTQA_DIR)")
        out = realtimeqa.write_realtimeqa(args.out, args.years)
    print(f"wrote {out}")


def cmd_train_readout(args) -> None:
    from pipeline.config import ReadoutTrainConfig, load_config
    from pipeline.model.mac import checkpoint_dir
    from pipeline.train_readout import build, continue_readout

    conf = _read_config(args.config)
    if args.steps is not None:
        conf["steps"] = args.steps
    cfg = load_config(ReadoutTrainConfig, conf, "train-readout")  # ValueError naming the bad key: exit 2 (main)
    log = lambda m: print(m, flush=True)  # noqa: E731
    if args.readout_from and args.selection_from:
        raise ValueError("--readout-from and --selection-from each keep what the other trains: give one")
    if args.readout_from:
        start = checkpoint_dir(args.readout_from)  # FileNotFoundError: exit 2
        version = continue_readout(cfg, start, Path(args.out), log=log, device=args.device)
    else:
        start = checkpoint_dir(args.selection_from) if args.selection_from else None  # FileNotFoundError: exit 2
        version = build(cfg, Path(args.out), log=log, start_from=start)
    print(json.dumps({"checkpoint": args.out, "version": version}))


def cmd_train_prompt(args) -> None:
    from pipeline.config import PromptTrainConfig, load_config
    from pipeline.model.mac import MACModel, checkpoint_dir
    from pipeline.train_prompt import build

    conf = _read_config(args.config)
    if args.steps is not None:
        conf["steps"] = args.steps
    cfg = load_config(PromptTrainConfig, conf, "train-prompt")  # ValueError naming the bad key: exit 2 (main)
    d = checkpoint_dir(args.checkpoint)  # FileNotFoundError: exit 2
    model = MACModel.load(d).eval()  # ValueError (not the readout memory): exit 2
    prompt = build(model, d, cfg, log=lambda m: print(m, flush=True))
    print(json.dumps({"checkpoint": str(d), "version": model.version, "prompt": prompt}))


def _finetune_configs(args) -> dict:
    """Per ft mode: --ft-config (a FinetuneConfig object, {mode: object}, or the tuning report `bench baselines`
    writes, whose "chosen" is used), then the --ft-* flags on top."""
    from pipeline.config import FinetuneConfig, load_config
    from pipeline.modes import FT_MODES

    conf = _read_config(args.ft_config)
    conf = conf.get("chosen", conf) if isinstance(conf, dict) else conf
    if not isinstance(conf, dict):
        raise SystemExit(f"macstream: --ft-config {args.ft_config}: expected a JSON object")
    per_mode = conf if conf and set(conf) <= set(FT_MODES) else {m: conf for m in FT_MODES}
    flags = {k: v for k, v in (("steps", args.ft_steps), ("lr", args.ft_lr), ("optimizer", args.ft_optimizer))
             if v is not None}
    return {m: load_config(FinetuneConfig, (per_mode.get(m) or {}) | flags, f"ft-config {m}") for m in FT_MODES}


def cmd_eval(args) -> None:
    from pipeline.data.portable import read_portable
    from pipeline.evaluate import evaluate
    from pipeline.scoring import EvalSettings

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    docs, questions = read_portable(args.data)
    settings = EvalSettings(modes=modes, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                            retention=not args.no_retention, limit=args.limit, finetune=_finetune_configs(args))
    model = _model(args)
    if args.ignore_pick:
        model.pick = None
    report = evaluate(model, docs, questions, settings)
    report["data"] = str(args.data)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    summary = {k: v for k, v in report.items() if k != "rows"}
    print(json.dumps(summary, indent=2, default=str))


def cmd_encode(args) -> None:
    from pipeline.data.portable import read_portable
    from pipeline.evaluate import build_memory
    from pipeline.store.bank import save_bank

    docs, _ = read_portable(args.data)
    model = _model(args)
    bank = build_memory(model, docs)
    size = save_bank(bank, args.out)
    print(json.dumps({"documents": len(bank), "chunks": bank.num_chunks, "checkpoint": model.version,
                      "bytes_per_modulation": model.cfg.num_tokens * model.lm.hidden_size * 2,
                      "file": str(args.out), "file_bytes": size}, indent=2))


def cmd_ask(args) -> None:
    from pipeline.schemas import Question
    from pipeline.scoring import EvalSettings, answer_batch
    from pipeline.store.bank import load_bank

    model = _model(args)
    bank = load_bank(args.memory)
    if not len(bank):
        raise SystemExit(f"macstream: memory {args.memory} is empty")
    q = Question(id="ask", question=args.question, answers=["-"])
    hits = bank.search(model.encoder.embed([q.question]).numpy(), args.top_k)
    row = answer_batch(model, args.mode, [q], hits,
                       EvalSettings(max_new_tokens=args.max_new_tokens, multiple_choice=False))[0]
    weights = row.get("weights", {})
    best: dict[str, object] = {}
    for h in hits[0]:  # hits are chunks, best first: one source per document, at its best chunk's score
        best.setdefault(h.document.id, h)
    print(json.dumps({"answer": row["prediction"], "mode": args.mode, "sources": [
        {"id": h.document.id, "title": h.document.title, "published_at": str(h.document.published_at),
         "score": round(h.score, 4), "weight": weights.get(h.document.id)} for h in best.values()]}, indent=2))


def cmd_broker(args) -> None:
    import signal
    import time

    from workers.broker import LocalBroker

    with LocalBroker(args.port, args.durable) as broker:
        print(json.dumps({"bootstrap_servers": broker.bootstrap,
                          "durable": str(args.durable) if args.durable else None}),
              flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


def cmd_produce(args) -> None:
    from workers import kafka_io

    if args.source == "synthetic":
        from pipeline.data.synthetic import generate

        docs = sorted(generate(args.split, args.entities, seed=args.seed)[0], key=lambda d: (d.published_at, d.id))
    else:
        if not Path(args.source).exists():
            raise SystemExit(f"macstream: {args.source}: no such file or directory")
        docs = kafka_io.read_documents(args.source)
    kafka_io.ensure_topic(args.bootstrap_servers, args.topic, args.partitions)
    n = kafka_io.produce(args.bootstrap_servers, args.topic, docs, rate=args.rate)
    print(json.dumps({"topic": args.topic, "produced": n}))


def _feeds_config(args):
    """``macstream feeds``: defaults < --config file < $MACSTREAM_FEEDS_* < flags; SOURCES read here."""
    from workers.feeds import read_sources

    return flags.build(FeedsConfig, "feeds", args, {"sources": read_sources(args.feed_sources)})


def cmd_feeds(args) -> None:
    import signal

    from kafka.errors import KafkaError

    from workers import kafka_io
    from workers.feeds import FeedPoller

    logging.getLogger("workers").setLevel(logging.INFO)
    cfg = _feeds_config(args)
    try:
        kafka_io.check_reachable(cfg.bootstrap_servers)
    except (KafkaError, OSError) as err:
        raise ValueError(f"no Kafka broker answers at {cfg.bootstrap_servers} ({type(err).__name__}): start one "
                         "(`macstream broker`) or pass --bootstrap-servers") from None  # exit 2 (main)
    poller = FeedPoller(cfg, partitions=args.partitions).open()
    for sig in (signal.SIGTERM, signal.SIGINT):  # stop after the current step; what was not produced is re-fetched
        signal.signal(sig, lambda *_: poller.halt.set())
    print(json.dumps({"feeds": len(cfg.sources), "topic": cfg.topic, "interval": cfg.interval,
                      "state": str(poller.state_path), "metrics_port": poller.metrics_port}), flush=True)
    try:
        snapshot = poller.run(polls=args.polls)
    finally:
        poller.close()
    print(json.dumps(snapshot, indent=2), flush=True)


def _ingest_config(args):
    return flags.build(IngestConfig, "ingest", args)


def cmd_ingest(args) -> None:
    from macstream.lifecycle import GracefulStop
    from pipeline.cluster import init_ray
    from workers.ingest import IngestJob

    logging.getLogger("workers").setLevel(logging.INFO)
    cfg = _ingest_config(args)
    with GracefulStop() as stop:  # SIGTERM/Ctrl-C: drain and commit, or (while starting) stop what started; exit 0
        try:
            with stop.deferred():
                init_ray()
            job = IngestJob(cfg, partitions=args.partitions).start()
        except KeyboardInterrupt:
            print(json.dumps({"stopped": "during start-up"}), file=sys.stderr)
            return
        if job.metrics_server is not None:
            print(f"metrics: http://{job.cfg.metrics_host}:{job.metrics_port}/metrics", file=sys.stderr)
        print(json.dumps(job.run(), indent=2))


def cmd_up(args) -> None:
    from macstream.up import main as up

    logging.getLogger("workers").setLevel(logging.INFO)
    local_broker = not flags.given(IngestConfig, "ingest", args, "bootstrap_servers")
    ingest = _ingest_config(args)
    feeds = None
    if args.feeds:  # validated here, before anything starts; up() points it at the local broker when it runs one
        from pipeline.config import load_config
        from workers.feeds import read_sources

        data = flags.from_env(FeedsConfig, "feeds") | {"sources": read_sources(args.feeds), "topic": ingest.topic,
                                                       "bootstrap_servers": ingest.bootstrap_servers}
        feeds = load_config(FeedsConfig, data | ({"interval": args.feeds_interval} if args.feeds_interval else {}),
                            "feeds")
    up(ingest, _serve_config(args), local_broker, args.partitions, feeds)


def cmd_stats(args) -> None:
    from pipeline.config import store_location
    from pipeline.store import open_store

    location = store_location(args.store)
    store = open_store(location)
    try:
        print(json.dumps({"store": location, "collections": store.stats()}, indent=2))
    finally:
        store.close()


def cmd_migrate_store(args) -> None:
    from pipeline.config import store_location
    from pipeline.store.migrate import migrate_local

    print(json.dumps({"from": store_location(args.source), "to": args.to,
                      "collections": migrate_local(store_location(args.source), args.to)}, indent=2))


def cmd_carry(args) -> None:
    from pipeline.config import store_location
    from pipeline.model.mac import MACModel, checkpoint_dir
    from pipeline.store import collection_name, open_store
    from pipeline.store.carry import carry_over

    location = store_location(args.store)
    store = open_store(location)
    source = collection_name(getattr(args, "from"))
    codec, have = store.codec_of(source), store.collections()
    store.close()
    if source not in have:  # before loading a model: one line, at once
        raise ValueError(f"no collection {source} in this store (collections: {', '.join(have) or 'none'})")
    model = MACModel.load(checkpoint_dir(args.checkpoint)).eval()
    store = open_store(location, codec)  # the new collection codes as the old one did: a copy bit for bit
    try:
        print(json.dumps({"store": location, **carry_over(store, getattr(args, "from"), model, args.sample)},
                         indent=2))
    finally:
        store.close()


def cmd_replay(args) -> None:
    from workers.kafka_io import reset_group

    offsets = reset_group(args.bootstrap_servers, args.topic, args.group_id, getattr(args, "from"))
    print(json.dumps({"topic": args.topic, "group_id": args.group_id, "offsets": offsets}))


def cmd_backfill(args) -> None:
    import signal

    from pipeline.cluster import init_ray
    from workers.backfill import BackfillJob

    logging.getLogger("workers").setLevel(logging.INFO)
    cfg = flags.build(BackfillConfig, "backfill", args, {"source": args.backfill_source})
    job = BackfillJob(cfg)  # a missing or unreadable source fails here, before Ray starts
    for sig in (signal.SIGTERM, signal.SIGINT):  # stop reading; what is encoding is written; a rerun resumes
        signal.signal(sig, lambda *_: job.halt.set())
    init_ray()
    if job.halt.is_set():
        print(json.dumps({"stopped": "during start-up"}), file=sys.stderr)
        return
    report = job.start().run()
    print(json.dumps(report, indent=2))


def _cli_store(location: str):
    """The store at ``location`` for a one-shot command: through the cluster's store owner when $RAY_ADDRESS names a
    running cluster (e.g. `up`'s, which holds the embedded store), else opened in this process."""
    from pipeline.store import is_remote, open_store

    if os.environ.get("RAY_ADDRESS") and not is_remote(location) and location not in ("memory", ":memory:"):
        from pipeline.cluster import init_ray
        from pipeline.store.actor import connect_store

        init_ray()
        return connect_store(location)
    return open_store(location)


def cmd_export(args) -> None:
    from pipeline.config import store_location
    from pipeline.memory_export import export_collection
    from pipeline.model.mac import checkpoint_identity
    from pipeline.store import collection_name

    version, _ = checkpoint_identity(args.checkpoint)
    collection = args.collection or collection_name(version)
    store = _cli_store(store_location(args.store))
    try:
        print(json.dumps(export_collection(store, collection, args.out), indent=2))
    finally:
        store.close()


def cmd_import(args) -> None:
    from pipeline.config import store_location
    from pipeline.memory_export import import_file
    from pipeline.model.mac import checkpoint_identity

    if not Path(args.file).exists():
        raise FileNotFoundError(f"{args.file}: no such file")
    version, model_id = checkpoint_identity(args.checkpoint)
    store = _cli_store(store_location(args.store))
    try:
        print(json.dumps(import_file(store, args.file, version, model_id), indent=2))
    finally:
        store.close()


def _serve_config(args):
    """Like every config, plus ``--api-keys FILE`` (or $MACSTREAM_API_KEYS_FILE): keys live in a file, never in argv."""
    keys_file = args.api_keys_file or os.environ.get("MACSTREAM_API_KEYS_FILE")
    return flags.build(ServeConfig, "serve", args, {"api_keys": read_json_object(keys_file)} if keys_file else None)


def cmd_serve(args) -> None:
    import time

    from ray import serve

    from macstream.lifecycle import GracefulStop
    from pipeline.cluster import init_ray
    from serving.app import start

    cfg = _serve_config(args)
    with GracefulStop() as stop:  # SIGTERM/Ctrl-C at any stage: stop what started, exit 0
        try:
            with stop.deferred():
                init_ray()
            start(cfg)
            print(json.dumps({"url": f"http://{cfg.host}:{cfg.port}", "ready": f"http://{cfg.host}:{cfg.port}/ready",
                              "docs": f"http://{cfg.host}:{cfg.port}/docs"}), flush=True)
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            serve.shutdown()


BENCHMARKS = bench_config.ALL  # what `bench all` runs, in order (store is not part of it)


def cmd_bench_store(cfg, command: str) -> None:
    """`bench store`: the embedded store (Qdrant Edge) beside qdrant-client local mode, one row per size; its own
    JSON and PNG (no model, not part of `all` or the report)."""
    from datetime import date

    from benchmarks.store import run, table

    out = Path(cfg.out or f"benchmarks/results/{date.today().isoformat()}/store.json")
    result = run(cfg.points, out, engines=tuple(cfg.engines), local_cap=cfg.local_cap, workdir=cfg.workdir,
                 append=cfg.append, queries=cfg.queries, k=cfg.top_k, codec=cfg.codec, command=command)
    print(table(result))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def cmd_bench_soak(cfg, command: str) -> None:
    """`bench soak`: `up` under a continuous stream with questions alongside; its own JSON and PNG."""
    import json
    from datetime import date

    import torch

    from benchmarks.soak import plot, run, table

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir or f"benchmarks/results/{date.today().isoformat()}") / "soak.json"
    result = run(cfg.checkpoint, cfg.docs, cfg.rate, cfg.qps, cfg.prefill, cfg.sample_s,
                 max_new_tokens=cfg.max_new_tokens, workers=cfg.workers)
    result["how"]["command"] = command
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(table(result))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def bench_settings(args):
    """The config of `bench TARGET`: its model's defaults < the --config JSON file < the flags typed."""
    return bench_config.build(args.bench, vars(args), args.config)


def cmd_bench(args) -> None:
    """Run one benchmark (or all of them, one after the other, never overlapping) and rewrite the report."""
    from datetime import date

    cfg = bench_settings(args)
    # the exact command line (cli.main sets args.argv); else the command that builds the same config
    command = "macstream bench " + " ".join(args.argv) if hasattr(args, "argv") else bench_config.command_line(cfg)
    if cfg.target == "store":
        return cmd_bench_store(cfg, command)
    if cfg.target == "soak":
        return cmd_bench_soak(cfg, command)

    import torch

    from benchmarks.report import run_benchmark, write_report

    torch.set_num_threads(cfg.threads)  # this process's share; Ray actors set their own
    out_dir = Path(cfg.out_dir or f"benchmarks/results/{date.today().isoformat()}")
    shared = cfg.model_dump()
    for one in [bench_config.TARGETS[t](**shared) for t in BENCHMARKS] if cfg.target == "all" else [cfg]:
        print(f"== bench {one.target}", file=sys.stderr, flush=True)
        result = run_benchmark(one, out_dir, command)
        if one.target == "serve":
            from benchmarks.serve import table

            print(table(result))
        elif one.target == "baselines":
            print(result["table"])
        elif one.target == "freshness":
            from benchmarks.freshness import feed_table
            from benchmarks.freshness import table as freshness_table

            print(feed_table(result) if one.source == "feed" else freshness_table(result))
        else:
            print(json.dumps({k: v for k, v in result.items() if k != "datasets"} if one.target == "quality"
                             else result, indent=2, default=str)[:4000])
    print(f"wrote {write_report(out_dir)}")


class _BenchTargetParser(argparse.ArgumentParser):
    """The parser of one `bench TARGET`: a flag that belongs to another target is refused naming that target."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        model = self.get_default("bench")
        for arg in extras:
            flag = arg.split("=", 1)[0]
            owners = [t for t, m in bench_config.TARGETS.items() if flag in bench_config.flags_of(m)]
            if model is not None and flag.startswith("--") and owners:
                self.error(f"{flag} is not a setting of `bench {model.target}`; it is one of `bench "
                           f"{'`, `bench '.join(owners)}` (see `macstream bench {model.target} --help`)")
        return ns, extras


def cmd_diagnose(args) -> None:
    from pipeline.diagnose import diagnose

    model = _model(args)
    if args.news:
        return _diagnose_news(model, args)
    if args.spelling:
        import torch

        from pipeline.diagnose import spelling

        torch.set_num_threads(args.threads)
        out = spelling(model, args.split, args.entities, args.questions, style=args.style)
        out["command"] = "macstream diagnose " + " ".join(sys.argv[2:])
        print(json.dumps(out, indent=2))
        return
    print(json.dumps(diagnose(model, args.split, args.entities, args.questions), indent=2))


def _diagnose_news(model, args) -> None:
    """`diagnose --news`: the document pick on real news with full-length articles (pipeline/news_selection.py)."""
    import torch

    from pipeline import news_selection

    torch.set_num_threads(args.threads)
    if args.ignore_pick:
        model.pick = None
    try:
        result = news_selection.run(model, tuple(_csv(args.news_sets)), args.news_questions, args.news_articles,
                                    tuple(args.news_top_k), modes=tuple(_csv(args.news_modes)),
                                    log=lambda m: print(m, file=sys.stderr, flush=True))
    except FileNotFoundError as err:
        raise SystemExit(f"macstream: {err}") from None
    result["command"] = "macstream diagnose " + " ".join(sys.argv[2:])
    print(news_selection.table(result), file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(json.dumps({k: v for k, v in result.items() if k != "sets"} | {"sets": {
            n: {k: v for k, v in r.items() if k not in ("records", "answers")}
            | ({"answers": r["answers"]["metrics"]} if "answers" in r else {}) for n, r in result["sets"].items()}},
            indent=2))


def cmd_calibrate_pick(args) -> None:
    """`calibrate-pick`: the retriever-floor margin that picks best on the held-out weeks of the selection years."""
    import torch

    from pipeline import news_selection
    from pipeline.model.mac import checkpoint_dir
    from pipeline.model.pick import save_pick

    torch.set_num_threads(args.threads)
    model = _model(args)
    model.pick = None
    try:
        qs, bank = news_selection.news_memory(model, "heldout", args.news_questions, args.news_articles,
                                              log=lambda m: print(m, file=sys.stderr, flush=True))
    except FileNotFoundError as err:
        raise SystemExit(f"macstream: {err}") from None
    records = [r for k in args.news_top_k for r in news_selection.select_records(model, bank, qs, k)]
    source = (f"RealTimeQA held-out weeks of the selection years: {len(qs)} questions, {len(bank)} documents "
              f"({bank.num_chunks} windows), top-k {args.news_top_k}; macstream calibrate-pick "
              + " ".join(sys.argv[2:]))
    rule = news_selection.calibrate(records, source)
    print(json.dumps(rule.model_dump(), indent=2))
    if args.write:
        print(f"wrote {save_pick(rule, checkpoint_dir(args.checkpoint))}", file=sys.stderr)


def cmd_demo(args) -> None:
    from macstream.demo import main as demo

    demo(feed=args.feed)


def _positive(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _mode(v: str) -> str:
    from pipeline.modes import Mode

    try:
        Mode.parse(v)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return v


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
    d.add_argument("--style", default="house", choices=["house", "other"],
                   help="synthetic: house (the style checkpoints train on) or other (never trained on)")
    d.add_argument("--years", type=int, nargs="+", default=[2024])
    d.set_defaults(fn=cmd_data)

    tr = sub.add_parser("train-readout", help="build a readout-memory checkpoint (the LM's own states + a per-layer "
                        "K/V readout; pipeline/train_readout.py)")
    tr.add_argument("--out", required=True, help="checkpoint directory (resumes from <out>/last.pt)")
    tr.add_argument("--config", help="JSON file of ReadoutTrainConfig fields; unknown keys are rejected")
    tr.add_argument("--steps", type=int, help="end-to-end fine-tuning steps (overrides the config)")
    tr.add_argument("--selection-from", metavar="CHECKPOINT", help="keep this readout checkpoint's selector and "
                    "readout; train only the selection (question encoder + aggregator) again")
    tr.add_argument("--readout-from", metavar="CHECKPOINT", help="tune this readout checkpoint's readout --steps more "
                    "(with span recall when the config's span_share > 0); its selector, selection, answer prompt and "
                    "pick rule are kept")
    tr.add_argument("--device", default="cpu", help="with --readout-from: where to tune (cpu, cuda)")
    tr.set_defaults(fn=cmd_train_readout)

    tp = sub.add_parser("train-prompt", help="train a readout checkpoint's answer prompt, the prefix select+rag reads "
                        "the text behind (writes <checkpoint>/prompt.safetensors; the version does not change)")
    tp.add_argument("--checkpoint", help="readout checkpoint directory (default: the shipped one)")
    tp.add_argument("--config", help="JSON file of PromptTrainConfig fields; unknown keys are rejected")
    tp.add_argument("--steps", type=int, help="Adam steps (overrides the config)")
    tp.set_defaults(fn=cmd_train_prompt)

    for name, fn, hlp in (("eval", cmd_eval, "evaluate modes on a portable dataset"),
                          ("encode", cmd_encode, "amortize a portable dataset's documents into a memory file"),
                          ("ask", cmd_ask, "answer one question from a memory file")):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("--checkpoint", help="checkpoint directory (default: the shipped one)")
        s.set_defaults(fn=fn)
        if name == "eval":
            s.add_argument("--data", required=True)
            s.add_argument("--modes", default="base,mac,rag,mac+rag",
                           help="comma-separated: base, rag, mac, mac+rag, select+rag, KIND@N for the text kinds "
                                "(only N texts in the prompt; for mac+rag and select+rag the ones the aggregator "
                                "weighs most), ft-uniform, ft-salient")
            s.add_argument("--top-k", type=_positive, default=4)
            s.add_argument("--max-new-tokens", type=_positive, default=16)
            s.add_argument("--limit", type=_positive)
            s.add_argument("--no-retention", action="store_true")
            s.add_argument("--ignore-pick", dest="ignore_pick", action="store_true",
                           help="pick the aggregator's heaviest document, not the checkpoint's pick.json rule")
            s.add_argument("--out")
            s.add_argument("--ft-config", dest="ft_config",
                           help="ft modes: JSON FinetuneConfig, {mode: FinetuneConfig}, or a baselines tuning report")
            s.add_argument("--ft-steps", dest="ft_steps", type=_positive,
                           help="ft modes: K optimiser steps per document")
            s.add_argument("--ft-lr", dest="ft_lr", type=float, help="ft modes: learning rate")
            s.add_argument("--ft-optimizer", dest="ft_optimizer", choices=["adamw", "sgd"], help="ft modes: optimiser")
        elif name == "encode":
            s.add_argument("--data", required=True)
            s.add_argument("--out", required=True)
        else:
            s.add_argument("question")
            s.add_argument("--memory", required=True, help="file written by `macstream encode`")
            s.add_argument("--mode", default=DEFAULT_MODE, type=_mode,
                           help=f"base, rag, mac, mac+rag, select+rag, or KIND@N for the text kinds (N texts in the "
                                f"prompt); default {DEFAULT_MODE}, "
                                "the best the shipped checkpoint measures")
            s.add_argument("--top-k", type=_positive, default=4)
            s.add_argument("--max-new-tokens", type=_positive, default=16)
    b = sub.add_parser("broker", help="run the local Kafka-protocol broker (Tansu) on 127.0.0.1 until Ctrl-C")
    b.add_argument("--port", type=_positive, default=9092)
    b.add_argument("--durable", help="directory for restart-safe storage (S3 engine on a local s3rver)")
    b.set_defaults(fn=cmd_broker)

    kafka = argparse.ArgumentParser(add_help=False)
    kafka.add_argument("--bootstrap-servers", dest="bootstrap_servers", default="127.0.0.1:9092")
    kafka.add_argument("--topic", required=True)

    pr = sub.add_parser("produce", parents=[kafka], help="publish documents keyed by id")
    pr.add_argument("source", help="JSONL file of documents, a portable dataset directory, or 'synthetic'")
    pr.add_argument("--rate", type=float, help="documents per second (default: as fast as acknowledged)")
    pr.add_argument("--partitions", type=_positive, default=4, help="when the topic is created")
    pr.add_argument("--split", default="test", choices=["train", "validation", "test"], help="with 'synthetic'")
    pr.add_argument("--entities", type=_positive, default=150, help="with 'synthetic'")
    pr.add_argument("--seed", type=int, default=0)
    pr.set_defaults(fn=cmd_produce)

    fd = sub.add_parser("feeds", help="poll RSS/Atom/JSON feeds into the topic: each story's article text, once "
                        "(again when it changes)", epilog=f"Every setting is also read from "
                        f"${flags.env_prefix('feeds')}<SETTING> (flags win). "
                        "State: MACSTREAM_HOME/feeds/<topic>.sqlite.")
    fd.add_argument("feed_sources", metavar="SOURCES", help="a feed URL, or a file with one feed URL per line")
    flags.add_flags(fd, FeedsConfig, skip=("sources",))
    fd.add_argument("--partitions", type=_positive, default=4, help="when the topic is created")
    fd.add_argument("--polls", type=_positive, help="stop after this many polls (default: until Ctrl-C/SIGTERM)")
    fd.add_argument("--config", help="JSON file of feeds settings (environment and flags override it)")
    fd.set_defaults(fn=cmd_feeds)

    i = sub.add_parser("ingest", help="stream a topic into the store with Ray workers",
                       epilog=f"Every setting is also read from ${flags.env_prefix('ingest')}<SETTING> (flags win).")
    flags.add_flags(i, IngestConfig)
    i.add_argument("--partitions", type=_positive, default=4, help="when the topic is created")
    i.add_argument("--config", help="JSON file of ingest settings (environment and flags override it)")
    i.set_defaults(fn=cmd_ingest)

    u = sub.add_parser("up", help="ingest + serve in one Ray cluster until Ctrl-C/SIGTERM (the always-on path)",
                       epilog="Without --bootstrap-servers a local broker runs too. Settings are also read from "
                              f"${flags.env_prefix('ingest')}<SETTING> and ${flags.env_prefix('serve')}<SETTING>.")
    flags.add_flags(u, IngestConfig)
    flags.add_flags(u, ServeConfig, skip=("api_keys", *IngestConfig.model_fields))  # store, checkpoint: shared
    u.add_argument("--api-keys", dest="api_keys_file", help='JSON file {"KEY": "TENANT", ...}; none: no auth')
    u.add_argument("--partitions", type=_positive, default=4, help="when the topic is created")
    u.add_argument("--feeds", metavar="SOURCES", help="also poll these feeds into the topic (a feed URL, or a file "
                   f"with one per line); other feeds settings from ${flags.env_prefix('feeds')}<SETTING>")
    u.add_argument("--feeds-interval", dest="feeds_interval", type=float, help="seconds between polls of the feeds")
    u.set_defaults(fn=cmd_up, config=None)

    st = sub.add_parser("stats", help="store counts per checkpoint collection, as JSON")
    st.add_argument("--store", default="embedded")
    st.set_defaults(fn=cmd_stats)

    mg = sub.add_parser("migrate-store", help="copy a store of the old embedded format (qdrant-client local mode) "
                                              "into a new directory of the embedded engine (Qdrant Edge), without "
                                              "re-encoding")
    mg.add_argument("--from", dest="source", default="embedded", help="the old store ('embedded' or a directory)")
    mg.add_argument("--to", required=True, help="a new or empty directory")
    mg.set_defaults(fn=cmd_migrate_store)

    ca = sub.add_parser("carry", help="fill the checkpoint's collection from an older checkpoint's collection without "
                        "re-encoding, when the two write the same memory (a readout-only continuation); verified on "
                        "sampled documents first")
    ca.add_argument("--from", required=True, metavar="VERSION", help="the checkpoint version whose collection is "
                    "copied (see `macstream stats`)")
    ca.add_argument("--store", default="embedded")
    ca.add_argument("--checkpoint", help="MAC checkpoint directory; default: the shipped one")
    ca.add_argument("--sample", type=int, default=4, help="documents encoded again to verify the write path")
    ca.set_defaults(fn=cmd_carry)

    bf = sub.add_parser("backfill", help="encode an archive (Parquet or JSONL) into the store with Ray Data and the "
                        "ingest encoders; resumable, bad rows to a dead-letter Parquet file",
                        epilog=f"Every setting is also read from ${flags.env_prefix('backfill')}<SETTING> (flags win).")
    bf.add_argument("backfill_source", metavar="SOURCE", help="a Parquet or JSONL file or a directory of them; a local "
                    "path or a URI pyarrow reads (s3://, gs://, hdfs://)")
    flags.add_flags(bf, BackfillConfig, skip=("source",))
    bf.add_argument("--config", help="JSON file of backfill settings (environment and flags override it)")
    bf.set_defaults(fn=cmd_backfill)

    ex = sub.add_parser("export", help="write a collection's memory (ids, documents, vectors, float16 modulations) to "
                        "a Parquet file")
    ex.add_argument("--out", required=True, help="the Parquet file to write")
    ex.add_argument("--store", default="embedded", help="as for ingest: 'embedded', a directory, 'local:DIR', a URL")
    ex.add_argument("--checkpoint", help="whose collection to export (default: the shipped checkpoint)")
    ex.add_argument("--collection", help="export this collection instead (see `macstream stats`)")
    ex.set_defaults(fn=cmd_export)

    im = sub.add_parser("import", help="write an exported memory into a store (any backend); refuses another "
                        "checkpoint's file")
    im.add_argument("file", help="a Parquet file written by `macstream export`")
    im.add_argument("--store", default="embedded", help="as for ingest: 'embedded', a directory, 'local:DIR', a URL")
    im.add_argument("--checkpoint", help="the checkpoint the store is filled for (default: the shipped one)")
    im.set_defaults(fn=cmd_import)

    sv = sub.add_parser("serve", help="serve the HTTP API (Ray Serve) until Ctrl-C",
                        epilog=f"Every setting is also read from ${flags.env_prefix('serve')}<SETTING> (flags win).")
    flags.add_flags(sv, ServeConfig, skip=("api_keys",))
    sv.add_argument("--api-keys", dest="api_keys_file",
                    help='JSON file {"KEY": "TENANT", ...} (or $MACSTREAM_API_KEYS_FILE); none: no auth')
    sv.add_argument("--config", help="JSON file of serve settings (environment and flags override it)")
    sv.set_defaults(fn=cmd_serve)

    bn = sub.add_parser("bench", help="benchmarks measured side by side in one run; rewrites the report",
                        description="One benchmark per target, each with its own flags (`macstream bench TARGET "
                        "--help`), generated from its settings in benchmarks/config.py. Results: "
                        "benchmarks/results/<date>/ (JSON per benchmark, report.md, PNGs).")
    targets = bn.add_subparsers(dest="target", metavar="TARGET", required=True, parser_class=_BenchTargetParser)
    for target, model in bench_config.TARGETS.items():
        doc = " ".join((model.__doc__ or "").split())
        t = targets.add_parser(target, help=doc.split(": ", 1)[-1], description=doc,
                               epilog="Precedence, lowest first: the defaults, --config FILE, the flags.")
        bench_config.add_flags(t, model)
        t.add_argument("--config", metavar="FILE", help=f"JSON file of {model.__name__} settings (field names as the "
                       "flags, with underscores); flags override it")
        t.set_defaults(fn=cmd_bench, bench=model)

    dg = sub.add_parser("diagnose", help="does the memory carry the document? information gain over a document-free "
                                         "control per answer kind and piece, same-type other-document NLL, gold-only "
                                         "answers")
    dg.add_argument("--checkpoint")
    dg.add_argument("--split", default="validation", choices=["validation", "test"])
    dg.add_argument("--entities", type=_positive, default=120)
    dg.add_argument("--questions", type=_positive, default=240)
    dg.add_argument("--news", action="store_true",
                    help="instead: the document pick on real news with full-length articles in the memory, "
                         "aggregator vs retriever top-1 (RealTimeQA held-out weeks and 2024; memory cached in .cache/)")
    _news_flags(dg)
    dg.add_argument("--news-sets", dest="news_sets", default="heldout,test-2024", help="--news: sets, comma-separated")
    dg.add_argument("--news-modes", dest="news_modes", default="",
                    help="--news: also answer in these modes from the same memory (comma-separated, e.g. "
                         "rag@1,select+rag@1)")
    dg.add_argument("--ignore-pick", dest="ignore_pick", action="store_true",
                    help="--news: answer without the checkpoint's pick.json (the heaviest document)")
    dg.add_argument("--out", help="--news: write the full JSON (per-question records included) here")
    dg.add_argument("--spelling", action="store_true",
                    help="instead: where exact recall dies for wrong gold-only mac answers (teacher-forced per-piece "
                         "accuracy of the answer, the selector's coverage of its tokens)")
    dg.add_argument("--style", default="house", choices=["house", "other"],
                    help="--spelling: the synthetic style (house: the training style; other: never trained on)")
    dg.set_defaults(fn=cmd_diagnose)

    cp = sub.add_parser("calibrate-pick", help="the retriever-floor margin of the document pick, calibrated on the "
                                               "RealTimeQA held-out weeks of the selection years (never on 2024)")
    cp.add_argument("--checkpoint")
    _news_flags(cp)
    cp.add_argument("--write", action="store_true", help="write pick.json next to the checkpoint")
    cp.set_defaults(fn=cmd_calibrate_pick)

    dm = sub.add_parser("demo", help="the whole system on embedded defaults (what `make demo` runs)")
    dm.add_argument("--feed", action="store_true", help="the held-back articles arrive through a local RSS feed and "
                    "the feed poller instead of being produced to Kafka")
    dm.set_defaults(fn=cmd_demo)

    r = sub.add_parser("replay", parents=[kafka], help="reset the ingest group to re-encode from a point in the topic")
    r.add_argument("--from", required=True, help="'earliest' or an ISO-8601 time")
    r.add_argument("--group-id", dest="group_id", default="macstream-ingest")
    r.set_defaults(fn=cmd_replay)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.argv = argv[1:]  # after the subcommand: benchmarks record the exact command that produced them
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError, StoreBusy, Unplaceable) as err:
        print(f"macstream: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
