"""The benchmark report: tables and PNG plots from the benchmark JSON files.

Each benchmark writes ``benchmarks/results/<date>/<name>.json`` (quality, ingest, serve, baselines, freshness); the
report reads whichever of them exist in that directory and writes ``report.md`` next to them with one PNG per figure:
quality by mode, retention as the memory grows, ingest docs/s by worker count, latency distribution by mode, bytes
per document, time-to-queryable distribution. Every section says how it was measured and the exact command that
reproduces it.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import backfill, baselines, freshness, ingest, quality, serve
from benchmarks.config import (
    BackfillBench,
    BaselinesBench,
    BenchConfig,
    FreshnessBench,
    IngestBench,
    QualityBench,
    ServeBench,
    command_line,
)
from benchmarks.machine import machine
from benchmarks.quality import QUALITY_MODES
from pipeline.data import synthetic
from pipeline.modes import FT_MODES
from pipeline.prompts import document_text

MODE_ORDER = (*QUALITY_MODES, *FT_MODES)  # the order of a table's rows


def _command(result: dict, fallback: str) -> str:
    return result.get("how", {}).get("command") or f"macstream bench {fallback}"


def _plot(path: Path, draw) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    draw(ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def _modes(metrics: dict) -> list[str]:
    return [m for m in MODE_ORDER if m in metrics] + [m for m in metrics if m not in MODE_ORDER]


def _news_selection(ns: dict | None) -> list[str]:
    """The document pick on real news with full-length articles in the memory (pipeline/news_selection.py)."""
    if not ns:
        return []
    lines = ["### The document pick on real news with full-length articles in the memory", "",
             f"Each set's questions with their evidence texts and full-length articles ({ns['articles_from']}) in one "
             f"memory; top-k {ns['top_k']} windows; gold document picked (%). Misses: gold not retrieved / another "
             "question's evidence / an article containing the answer / another article.", "",
             "| set | documents (windows) | gold retrieved | picker | pick rate | misses | "
             "only this / only retriever |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in ns["sets"].items():
        for picker in ("retriever", "aggregator_sum", "aggregator_max", "checkpoint_rule"):
            if picker in r:
                v = r[picker]
                lines.append(f"| {name} | {r['documents']} ({r['windows']}) | {r['gold_retrieved']} | {picker} | "
                             f"{v['pick_rate']} | {' / '.join(map(str, v['misses'].values()))} | "
                             f"{v['vs_retriever']['only_this']} / {v['vs_retriever']['only_retriever']} |")
    return lines + [""]


def _quality(d: Path, q: dict) -> list[str]:
    import numpy as np

    lines = ["## Quality by mode", "", f"How: {q['how']['method']}. Checkpoint `{q['how']['checkpoint']}`, top-k "
             f"{q['how']['top_k']}. s/question: wall time per question in 16-question batches on "
             f"{q['how'].get('threads', 1)} torch thread(s) (eval's "
             f"batching, not the HTTP path: see the serving section for latency). "
             f"Command: `{_command(q, 'quality')}`.", ""]
    for name, rep in q["datasets"].items():
        lines += [f"### {name}: {rep['documents']} documents, {rep['questions']} questions", "",
                  "| mode | EM | lenient EM | F1 | MC accuracy | selection | retriever top-1 | prompt tokens | "
                  "s/question |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for m in _modes(rep["metrics"]):
            r = rep["metrics"][m]
            cell = lambda k, f=".1f", r=r: format(r[k], f) if k in r else "–"  # noqa: E731
            lines.append(f"| {m} | {cell('em')} | {cell('lenient_em')} | {cell('f1')} | {cell('mc_accuracy')} | "
                         f"{cell('selection')} | {cell('retriever_top1')} | {cell('prompt_tokens', '.0f')} | "
                         f"{cell('seconds', '.3f')} |")
        lines.append("")
    lines += _news_selection(q.get("news_selection"))
    names = list(q["datasets"])

    def draw(ax):
        modes = _modes(q["datasets"][names[0]]["metrics"])
        w = 0.8 / len(names)
        for i, name in enumerate(names):
            met = q["datasets"][name]["metrics"]
            key = "mc_accuracy" if all("mc_accuracy" in met[m] for m in met) else "f1"
            ax.bar(np.arange(len(modes)) + i * w, [met.get(m, {}).get(key, 0) for m in modes], w,
                   label=f"{name} ({'MC acc.' if key == 'mc_accuracy' else 'F1'})")
        ax.set_xticks(np.arange(len(modes)) + w * (len(names) - 1) / 2, modes)
        ax.set_ylabel("score (%)")
        ax.set_title("Quality by mode")
        ax.legend(fontsize=8)

    lines += [f"![quality by mode]({_plot(d / 'quality_by_mode.png', draw)})", ""]
    ret = {n: r["retention"] for n, r in q["datasets"].items() if r.get("retention")}
    if ret:
        lines += ["## Retention as the memory grows", "",
                  "F1 on the questions of the first eighth of the stream, with the memory holding 1×, 2×, 4×, 8× that "
                  "many documents (later documents are distractors).", ""]
        for name, r in ret.items():
            growth = r["growth"]
            modes = [m for m in next(iter(growth.values())) if m != "documents"]
            lines += [f"{name} ({r['questions']} questions):", "", "| memory | documents | " + " | ".join(modes) + " |",
                      "| --- | --- | " + " | ".join("---" for _ in modes) + " |"]
            lines += [f"| {g} | {v['documents']} | " + " | ".join(f"{v[m]:.1f}" for m in modes) + " |"
                      for g, v in growth.items()]
            lines.append("")

        def draw_ret(ax):
            for name, r in ret.items():
                growth = r["growth"]
                for m in [m for m in next(iter(growth.values())) if m != "documents"]:
                    ax.plot([v["documents"] for v in growth.values()], [v[m] for v in growth.values()], marker="o",
                            label=f"{m} ({name})")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("documents in memory")
            ax.set_ylabel("F1 on first-eighth questions")
            ax.set_title("Retention")
            ax.legend(fontsize=8)

        lines += [f"![retention]({_plot(d / 'retention.png', draw_ret)})", ""]
    syn = next(iter(q["datasets"].values()))
    cost = syn["cost"]
    mean_tokens = {m: syn["metrics"][m].get("prompt_tokens") for m in syn["metrics"]}
    lines += ["## Bytes per document and per-question cost", "",
              f"- one stored modulation (T × d_LM float16): **{cost['bytes_per_modulation']:,} bytes**; the expanded "
              f"per-layer prefix it becomes at query time: {cost['bytes_per_expanded_prefix']:,} bytes (never stored)",
              f"- encode time per document (one amortizer forward): "
              f"{cost['encode_seconds_per_document'] * 1000:.1f} ms",
              "- tokens the LM reads per question (prompt): "
              + ", ".join(f"{m} {v:.0f}" for m, v in mean_tokens.items() if v), ""]
    return lines


def _bytes(d: Path, q: dict | None) -> list[str]:
    if not q:
        return []
    # the benchmarked split (deterministic)
    docs, _ = synthetic.generate("test", q["how"]["synthetic_entities"], seed=0)
    text = sum(len(document_text(x).encode()) for x in docs) / len(docs)
    cost = next(iter(q["datasets"].values()))["cost"]
    vec = cost.get("bytes_per_retrieval_vector", 384 * 4)  # older reports: the default MiniLM's 384 float32

    def draw(ax):
        parts = {"document text": text, "modulation (fp16)": cost["bytes_per_modulation"], "retrieval vector": vec}
        ax.barh(list(parts), list(parts.values()), color=["#888", "#2a7", "#47a"])
        ax.set_xlabel("bytes per document (synthetic test articles, one chunk each)")
        ax.set_title("Bytes per stored document")

    return [f"![bytes per document]({_plot(d / 'bytes_per_document.png', draw)})", "",
            f"A stored point holds the modulation ({cost['bytes_per_modulation']:,} B), the retrieval vector "
            f"({vec:,} B) "
            f"and the document's text as payload ({text:,.0f} B on average here).", ""]


def _ingest(d: Path, ing: dict) -> list[str]:
    runs = ing["runs"]
    lines = ["## Ingest throughput by encoder workers", "", f"How: {ing['how']['method']}", "",
             f"{ing['how']['documents']} documents, batch size {ing['how']['batch_size']}, {ing['how']['partitions']} "
             f"partitions. Command: "
             f"`{_command(ing, 'ingest --workers ' + ' '.join(str(r['workers']) for r in runs))}`.", "",
             "| workers | documents | seconds | docs/s | batch latency p50 s |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['workers']} | {r['documents']} | {r['seconds']:.1f} | {r['docs_per_s']:.2f} | "
              f"{r['batch_latency_p50_s']:.2f} |" for r in runs]

    def draw(ax):
        ax.plot([r["workers"] for r in runs], [r["docs_per_s"] for r in runs], marker="o", label="measured")
        ax.plot([r["workers"] for r in runs], [runs[0]["docs_per_s"] * r["workers"] / runs[0]["workers"] for r in runs],
                ls="--", color="#999", label="linear")
        ax.set_xlabel("encoder workers")
        ax.set_ylabel("documents / s")
        ax.set_title("Ingest throughput")
        ax.legend(fontsize=8)

    return lines + ["", f"![ingest docs/s]({_plot(d / 'ingest_scaling.png', draw)})", ""]


def _serve(d: Path, sv: dict, corpus: str = "") -> list[str]:
    how = sv["how"]
    title = "Serving latency on real-length news" if corpus else "Serving latency and throughput"
    lines = [f"## {title} (HTTP, Ray Serve)", "", f"How: {how['method']}", "",
             f"{how['documents']} documents ({how.get('corpus', 'synthetic')}, mean "
             f"{how.get('mean_document_tokens', float('nan')):.0f} tokens) in the store, top-k {how['top_k']}, "
             f"max_new_tokens {how['max_new_tokens']}, "
             f"{how['requests_per_mode']} requests per mode, {how['replicas']} replica × {how['replica_threads']} "
             f"thread(s), batch ≤ {how['max_batch_size']}, batch wait {how['batch_wait_s']} s. Command: "
             f"`{_command(sv, 'serve')}`.", "", serve.table(sv), ""]
    if all("latencies_s" in r for r in sv["modes"].values()):
        def draw(ax):
            modes = list(sv["modes"])
            ax.boxplot([[x * 1000 for x in sv["modes"][m]["latencies_s"]] for m in modes], tick_labels=modes)
            ax.set_ylabel("latency (ms), one client")
            ax.set_title("Request latency by mode")

        lines += [f"![latency by mode]({_plot(d / f'latency_by_mode{corpus}.png', draw)})", ""]
    return lines


def _freshness(d: Path, fr: dict) -> list[str]:
    how = fr["how"]
    cap = how.get("capacity_docs_per_s")
    lines = ["## Freshness: time from produce to an answer citing the document (always-on path)", "",
             f"How: {how['method'].replace('``', '`')}", "",
             f"{how['documents']} documents per ingest configuration at {how['rate_docs_per_s']:.2f} docs/s "
             f"({how['rate_from']}"
             + (f"; capacity {cap:.2f} docs/s on a burst of {how['burst_documents']}" if cap else "")
             + f"), poll interval {how['poll_interval_s']} s, gate `{how['gate']}`, mode `{how['mode']}`, top_k "
             f"{how['top_k']}, {how['encoder_workers']} encoder worker(s), {'warm' if how['warm'] else 'cold'}. "
             f"Load average before/after: {how.get('load_average_before')} / {how.get('load_average_after')}. "
             f"Command: `{_command(fr, 'freshness')}`.", "",
             "Seconds after the broker acknowledged the document. ttq (time-to-queryable): the later of the store "
             "holding it and the send time of the first question whose answer cites it; fetchable: a second consumer "
             "received it from the broker; in store: the store owner holds it; "
             "answered: the answer citing it came back (a 1-token answer). Percentiles are nearest-rank: with fewer "
             "than 100 documents p99 is the maximum.", "",
             freshness.table(fr), ""]
    lines += [f"- {freshness.stages(r)}" for r in fr["runs"]]
    lines.append("")

    def draw(ax):
        for n, r in enumerate(fr["runs"]):
            for key, style in (("ttq", "-"), ("answered", ":")):
                xs = sorted(x[f"{key}_s"] for x in r["per_document"] if x.get(f"{key}_s") is not None)
                if xs:
                    ax.step(xs, [(i + 1) / len(r["per_document"]) for i in range(len(xs))], where="post", ls=style,
                            color=f"C{n}", label=f"{key}: {r['name']}")
        ax.axvline(freshness.GOAL_P99_S, color="#c33", lw=1, ls="--", label="goal: p99 ≤ 2 s")
        ax.axhline(0.99, color="#999", lw=0.8)
        ax.set_xscale("log")  # ttq (sub-second) and answered (seconds, with queueing) on one axis
        ax.set_xlabel("seconds after the produce acknowledgement (log)")
        ax.set_ylabel("fraction of documents")
        ax.set_ylim(0, 1.02)
        ax.set_title("Time-to-queryable (CDF)")
        ax.legend(fontsize=7)

    return lines + [f"![time to queryable]({_plot(d / 'freshness_cdf.png', draw)})", ""]


def _backfill(bf: dict) -> list[str]:
    how = bf["how"]
    lines = ["## Archive backfill beside streaming ingest", "", f"How: {how['method']}", "",
             f"{how['documents']} documents, batch size {how['batch_size']}, {how['cpus']} CPUs (load average "
             f"{how['load_average_at_start'][0]:.1f} at the start). Command: `{_command(bf, 'backfill')}`.", "",
             backfill.table(bf), ""]
    ratio = bf["checks"].get("backfill_2_over_1_workers")
    if ratio is not None:
        lines += [f"2 workers over 1: backfill {ratio:.2f}x, ingest "
                  f"{bf['checks']['ingest_2_over_1_workers']:.2f}x.", ""]
    return lines


def write_report(directory: str | Path) -> Path:
    """Compose ``report.md`` (and its PNGs) from the benchmark JSON files present in ``directory``."""
    d = Path(directory)
    load = lambda n: json.loads((d / f"{n}.json").read_text()) if (d / f"{n}.json").exists() else None  # noqa: E731
    q, ing, sv, bl, fr = load("quality"), load("ingest"), load("serve"), load("baselines"), load("freshness")
    lines = [f"# macstream benchmark report ({d.name})", "",
             f"Machine: {machine()}. Every number below was measured by the command named in its section; "
             "`macstream bench all` reruns them all and rewrites this report.", ""]
    if q:
        lines += _quality(d, q) + _bytes(d, q)
    if ing:
        lines += _ingest(d, ing)
    if load("backfill"):
        lines += _backfill(load("backfill"))
    if sv:
        lines += _serve(d, sv)
    if load("serve-realtimeqa"):
        lines += _serve(d, load("serve-realtimeqa"), "-realtimeqa")
    if fr:
        lines += _freshness(d, fr)
    if bl and (d / "baselines.md").exists():
        lines += [(d / "baselines.md").read_text(), ""]
    if (d / "notes.md").exists():  # hand-written: e.g. a rerun check, what the machine was doing
        lines += [(d / "notes.md").read_text(), ""]
    missing = [n for n, v in (("quality", q), ("ingest", ing), ("serve", sv), ("baselines", bl), ("freshness", fr))
               if not v]
    if missing:
        lines += [f"Not measured in this report: {', '.join(missing)}.", ""]
    out = d / "report.md"
    out.write_text("\n".join(lines))
    return out


def run_benchmark(cfg: BenchConfig, out_dir: Path, command: str | None = None) -> dict:
    """Run one benchmark (``cfg``: a QualityBench, IngestBench, BackfillBench, ServeBench, BaselinesBench or
    FreshnessBench of benchmarks/config.py), write ``<out_dir>/<target>.json``, return its result. ``command`` is
    recorded as the command that reproduces it (default: the ``macstream bench`` command that builds ``cfg``)."""
    if not isinstance(cfg, QualityBench | IngestBench | BackfillBench | ServeBench | BaselinesBench | FreshnessBench):
        raise ValueError(f"not a benchmark run_benchmark runs: {type(cfg).__name__} (bench {cfg.target})")
    out_dir.mkdir(parents=True, exist_ok=True)
    command = command or command_line(cfg)
    name = cfg.target
    if isinstance(cfg, QualityBench):
        result = quality.run(cfg.checkpoint, cfg.entities, cfg.rtqa_questions, cfg.top_k)
    elif isinstance(cfg, IngestBench):
        result = ingest.run(cfg.checkpoint, cfg.entities, tuple(cfg.workers))
    elif isinstance(cfg, BackfillBench):
        result = backfill.run(cfg.checkpoint, cfg.entities, tuple(cfg.workers))
    elif isinstance(cfg, ServeBench):
        result = serve.run(cfg.checkpoint, cfg.entities, cfg.requests, cfg.clients, cfg.top_k, cfg.max_new_tokens,
                           cfg.batch_wait, cfg.replica_threads, docs=cfg.corpus, throughput=cfg.corpus == "synthetic")
        if cfg.corpus != "synthetic":  # real-length news: its own file beside the synthetic one
            name = f"serve-{cfg.corpus}"
    elif isinstance(cfg, BaselinesBench):
        return baselines.run(out_dir / "baselines.json", checkpoint=cfg.checkpoint, entities=cfg.entities,
                             rtqa_docs=cfg.rtqa_docs, tune_entities=cfg.tune_entities, tuning=cfg.tuning,
                             threads=cfg.threads, top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens, command=command)
    elif isinstance(cfg, FreshnessBench) and cfg.source == "feed":
        result = freshness.run_feed(cfg.checkpoint, cfg.docs, cfg.feeds_interval, poll_interval_s=cfg.poll_interval,
                                    mode=cfg.mode)
        name = "freshness-feed"  # its own file beside the produce-path one
    else:  # freshness, produce source
        result = freshness.run(cfg.checkpoint, cfg.docs, cfg.rate, cfg.burst, cfg.poll_interval,
                               tuple(freshness.parse_variant(v) for v in cfg.variants), cfg.gate,
                               workers=cfg.workers, mode=cfg.mode)
    result.setdefault("how", {})["command"] = command
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    return result
