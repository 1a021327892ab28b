"""``macstream bench baselines``: MAC against the online fine-tuning baselines of the MAC paper, side by side.

In one process, with one frozen LM and the same document stream, for each dataset (the synthetic test split, and
the first ``rtqa_docs`` RealTimeQA 2024 documents in stream order when ``../shared/data/realtimeqa`` exists):

- ``base`` (no adaptation), ``rag`` (top-k documents in the prompt), ``mac`` (aggregated modulations as the prefix),
  ``ft-uniform`` and ``ft-salient`` (``pipeline/baselines.py``), all scored by ``evaluate.evaluate``:
  EM/F1, multiple-choice accuracy, and retention (F1 on the first eighth's questions as the stream grows 1×-8×);
- the **cost to adapt to one document**. MAC: one encode, i.e. LM states + amortizer, measured one document at a
  time in stream order. RAG: one MiniLM embedding of the document. FT: K optimiser steps. Each comes as wall
  seconds per document, plus the peak increase of the process's resident memory while adapting over the resident
  memory before the run (``baselines.PeakRSS``; for FT the baseline is taken before the LM copy is made).

The ft hyperparameters come from ``baselines.tune`` on the synthetic **validation** split. The choice is written to
``<out dir>/baselines-tuning.json`` and reused when that file exists. Outputs: ``<out>`` (JSON),
``<out>.md`` (tables) and ``<out stem>-accuracy-vs-cost.png`` and ``<out stem>-retention.png``.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import cpu_name
from pipeline.baselines import PeakRSS, release_memory, rss_bytes, tune
from pipeline.config import FinetuneConfig
from pipeline.data import realtimeqa, synthetic
from pipeline.evaluate import evaluate
from pipeline.model.mac import MACModel, checkpoint_dir
from pipeline.modes import FT_MODES
from pipeline.prompts import document_text
from pipeline.schemas import Document, Question
from pipeline.scoring import EvalSettings, retention_block, stream_order

MODES = ("base", "rag", "mac") + FT_MODES
COLORS = {"base": "#777777", "rag": "#1f77b4", "mac": "#d62728", "ft-uniform": "#2ca02c", "ft-salient": "#9467bd"}


def _log(msg: str) -> None:
    print(f"[bench baselines {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _per_document(docs: list[Document], adapt) -> dict:
    """Time and peak RSS of ``adapt(doc)`` for each document in stream order, one at a time."""
    release_memory()
    baseline, secs, peak = rss_bytes(), [], 0
    for d in docs:
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            adapt(d)
            secs.append(time.perf_counter() - t0)
        peak = max(peak, mem.peak)
    return {"seconds_per_document": float(np.mean(secs)), "seconds_per_document_max": float(np.max(secs)),
            "seconds_total": float(np.sum(secs)), "peak_rss_mb": max(0, peak - baseline) / 2**20}


@torch.no_grad()
def measure_mac(model: MACModel, docs: list[Document]) -> dict:
    """MAC's adaptation: encode each document alone (LM states + amortizer + retrieval vector), kept in a list as a
    memory would keep it. State = the float16 modulations stored per document."""
    kept = []
    out = _per_document(docs, lambda d: kept.extend(model.encode_documents([d])))
    per_doc = sum(c.modulation.nbytes for c in kept) / max(1, len(docs))
    return out | {"method": "one encode per document (no gradient step)", "state_mb": per_doc / 2**20,
                  "state_note": "float16 modulations stored per document (chunks x T x d_LM x 2 bytes)"}


@torch.no_grad()
def measure_rag(model: MACModel, docs: list[Document]) -> dict:
    """RAG's adaptation: one MiniLM embedding of each document (the retrieval index entry)."""
    out = _per_document(docs, lambda d: model.encoder.embed([document_text(d)]))
    return out | {"method": "one MiniLM embedding per document", "state_mb": model.encoder.width * 4 / 2**20,
                  "state_note": "float32 retrieval vector (+ the document text)"}


def rtqa_stream(n_docs: int) -> tuple[list[Document], list[Question]]:
    """The first ``n_docs`` RealTimeQA 2024 documents in stream order and the questions they answer."""
    docs, questions = realtimeqa.load([2024])
    docs = stream_order(docs)[:n_docs]
    ids = {d.id for d in docs}
    return docs, [q for q in questions if q.doc_ids and set(q.doc_ids) <= ids]


def datasets(entities: int, rtqa_docs: int) -> dict[str, tuple[list[Document], list[Question]]]:
    out = {f"synthetic-test-{entities}e": synthetic.generate("test", entities)}
    if realtimeqa.available():
        out[f"realtimeqa-2024-first{rtqa_docs}"] = rtqa_stream(rtqa_docs)
    else:
        _log(f"RealTimeQA not found at {realtimeqa.default_root()}: synthetic only")
    return out


def load_or_tune(path: Path, model: MACModel, tune_entities: int, settings: EvalSettings) -> dict:
    """The tuning report at ``path``, or a fresh one from the synthetic validation split (then written there)."""
    if path.exists():
        report = json.loads(path.read_text())
        _log(f"reusing ft hyperparameters from {path}: {report['chosen']}")
        return report

    docs, qs = synthetic.generate("validation", tune_entities)
    _log(f"tuning on synthetic validation ({tune_entities} entities: {len(docs)} documents, {len(qs)} questions)")
    t0 = time.perf_counter()
    report = tune(model.lm, docs, qs, settings,
                  log=lambda r: _log(f"  {r['mode']} {r['config']['optimizer']} lr={r['config']['lr']:g} "
                                     f"K={r['config']['steps']}: F1 {r['f1']:.1f} EM {r['em']:.1f} "
                                     f"gold log-lik {r['gold_logprob']:.3f} ({r['seconds']:.0f} s)"))
    report |= {"split": "synthetic validation", "entities": tune_entities, "seconds": time.perf_counter() - t0,
               "selection": "highest F1; ties: higher EM, then higher gold-answer log-likelihood, then fewer steps, "
                            "then lower lr"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    _log(f"chose {report['chosen']} in {report['seconds']:.0f} s; wrote {path}")
    return report


def summarize_dataset(report: dict, costs: dict, docs, questions) -> dict:
    """One row per mode: scores, adaptation cost, retention."""
    n0, block = retention_block(stream_order(docs), questions)
    block_ids = {q.id for q in block}
    growth = report.get("retention", {}).get("growth", {})
    modes = {}
    for m in MODES:
        met = report["metrics"].get(m, {})
        c = costs.get(m, {})
        row = {k: met.get(k) for k in ("f1", "em", "lenient_em", "mc_accuracy")}
        row |= {"answer_seconds_per_question": met.get("seconds"),
                "adapt_seconds_per_document": c.get("seconds_per_document", 0.0),
                "adapt_peak_rss_mb": c.get("peak_rss_mb", 0.0), "adapt_state_mb": c.get("state_mb", 0.0),
                "adapt_method": c.get("method", "none")}
        if m == "base":  # no adaptation: flat retention, its F1 on the block's questions
            f1 = [r["f1"] for r in report["rows"]["base"] if r["id"] in block_ids]
            row["retention"] = {g: 100.0 * float(np.mean(f1)) for g in growth} if f1 else {}
        else:
            row["retention"] = {g: point.get(m) for g, point in growth.items()}
        modes[m] = row
    return {"documents": len(docs), "questions": report["questions"], "retention_questions": len(block),
            "retention_documents": {g: p["documents"] for g, p in growth.items()}, "first_block_documents": n0,
            "chunks": report["chunks"],
            "encode_seconds_per_document_batched": report["cost"]["encode_seconds_per_document"],
            "modes": modes, "ft_details": {m: {k: v for k, v in c.items() if k != "per_document"}
                                            for m, c in report.get("adaptation", {}).items()}}


def _fmt(v, spec=".1f") -> str:
    return "–" if v is None else format(v, spec)


def table(result: dict) -> str:
    lines = [f"## Online fine-tuning baselines vs MAC ({result['how']['date']})", "",
             f"Command: `{result['how']['command']}`  ",
             f"LM: {result['how']['lm']} (frozen; ft modes train a private full copy), checkpoint "
             f"{result['how']['checkpoint']}, top-k {result['how']['top_k']}, "
             f"greedy ≤ {result['how']['max_new_tokens']} tokens, {result['how']['threads']} torch thread(s) on "
             f"{result['how']['cpu']}.  ",
             "Adapt s/doc: wall seconds to take in one document (MAC: one encode; RAG: one embedding; ft: K steps). "
             "Peak MB: peak rise of the process's resident memory while adapting, over the memory before the run "
             "(ft: includes the LM copy, gradients, optimiser state). Retention: F1 on the questions of the first "
             "eighth of the stream after 1×, 2×, 4×, 8× of it.", ""]
    t = result["tuning"]
    lines += ["### Fine-tuning hyperparameters (chosen on the synthetic validation split, "
              f"{t.get('entities', '?')} entities: {t['documents']} documents, {t['questions']} questions)", "",
              f"Selection: {t.get('selection', 'highest F1')}. Gold log-lik: mean per-token log p(gold answer | base "
              "prompt), nats.", "",
              "| mode | optimizer | lr | K | validation F1 | validation EM | gold log-lik |",
              "|---|---|---|---|---|---|---|"]
    for r in t["results"]:
        c = r["config"]
        mark = " **(chosen)**" if FinetuneConfig(**c) == FinetuneConfig(**t["chosen"][r["mode"]]) else ""
        lines.append(f"| {r['mode']}{mark} | {c['optimizer']} | {c['lr']:g} | {c['steps']} | {r['f1']:.1f} | "
                     f"{r['em']:.1f} | {_fmt(r.get('gold_logprob'), '.3f')} |")
    lines.append(f"| base (no fine-tuning) | – | – | – | {t['base']['f1']:.1f} | {t['base']['em']:.1f} | "
                 f"{_fmt(t['base'].get('gold_logprob'), '.3f')} |")
    for name, ds in result["datasets"].items():
        lines += ["", f"### {name}: {ds['documents']} documents, {ds['questions']} questions "
                      f"(retention: {ds['retention_questions']} questions of the first "
                      f"{ds['first_block_documents']} documents)", "",
                  "| mode | F1 | EM | lenient EM | MC acc | adapt s/doc | adapt peak MB "
                  "| retention F1 1× / 2× / 4× / 8× |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, r in ds["modes"].items():
            ret = " / ".join(_fmt(r["retention"].get(g)) for g in ("1x", "2x", "4x", "8x")) if r["retention"] else "–"
            lines.append(f"| {m} | {_fmt(r['f1'])} | {_fmt(r['em'])} | {_fmt(r['lenient_em'])} | "
                         f"{_fmt(r['mc_accuracy'])} | {_fmt(r['adapt_seconds_per_document'], '.3f')} | "
                         f"{_fmt(r['adapt_peak_rss_mb'], '.0f')} | {ret} |")
        notes = []
        for m, c in ds["ft_details"].items():
            cfg = c["config"]
            notes.append(f"{m}: {cfg['optimizer']} lr {cfg['lr']:g}, K = {cfg['steps']}, "
                         f"{c['trainable_parameters'] / 1e6:.1f}M trainable parameters (full fine-tuning), "
                         f"training state {c['state_mb']:.0f} MB (copy + gradients + optimiser state), "
                         f"{c['documents_trained']}/{c['documents']} documents trained on, "
                         f"{c['loss_tokens_per_document']:.0f} loss tokens per document")
        if ds["modes"]["mac"]["adapt_state_mb"]:
            notes.append(f"mac: {ds['modes']['mac']['adapt_state_mb'] * 1024:.1f} KB of float16 modulations stored "
                         "per document")
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plots(result: dict, cost_png: Path, retention_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["datasets"])
    fig, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names), 7.5), squeeze=False)
    for col, name in enumerate(names):
        ds = result["datasets"][name]["modes"]
        for row, (metric, label) in enumerate((("f1", "F1"), ("mc_accuracy", "multiple-choice accuracy"))):
            ax = axes[row][col]
            for m, r in ds.items():
                if r[metric] is None:
                    continue
                if m == "base":
                    ax.axhline(r[metric], color=COLORS[m], ls="--", lw=1, label="base (no adaptation)")
                    continue
                ax.scatter(r["adapt_seconds_per_document"], r[metric], color=COLORS[m], s=60, label=m, zorder=3)
                ax.annotate(m, (r["adapt_seconds_per_document"], r[metric]), textcoords="offset points", xytext=(6, 4),
                            fontsize=8)
            ax.set_xscale("log")
            ax.set_xlabel("adaptation cost: seconds per document (log)")
            ax.set_ylabel(label)
            ax.set_title(f"{name}", fontsize=9)
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=7, loc="best")
    fig.suptitle("Accuracy vs cost to adapt to a document (upper left is better)")
    fig.tight_layout()
    fig.savefig(cost_png, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for col, name in enumerate(names):
        ax, ds = axes[0][col], result["datasets"][name]
        for m, r in ds["modes"].items():
            gs = [g for g in ("1x", "2x", "4x", "8x") if r["retention"].get(g) is not None]
            if not gs:
                continue
            xs, ys = [int(g[:-1]) for g in gs], [r["retention"][g] for g in gs]
            style = dict(ls="--", lw=1) if m == "base" else dict(marker="o")
            ax.plot(xs, ys, color=COLORS[m], label=m, **style)
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8], ["1×", "2×", "4×", "8×"])
        ax.set_xlabel("stream length, in multiples of its first eighth")
        ax.set_ylabel(f"F1 on the first eighth's {ds['retention_questions']} questions")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Retention: knowledge of early documents as the stream grows")
    fig.tight_layout()
    fig.savefig(retention_png, dpi=120)
    plt.close(fig)


def run(out: str | Path, checkpoint: str | None = None, entities: int = 40, rtqa_docs: int = 64, tune_entities: int = 5,
        tuning: str | Path | None = None, threads: int = 1, top_k: int = 8, max_new_tokens: int = 16,
        progress: bool = True, data: dict | None = None, command: str | None = None) -> dict:
    """Tune (or reuse the tuning), evaluate every mode on every dataset, write JSON, markdown and two PNGs.
    ``data`` replaces the default datasets ({name: (documents, questions)}), e.g. in tests."""
    torch.set_num_threads(threads)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = MACModel.load(checkpoint_dir(checkpoint))
    settings = EvalSettings(modes=MODES, top_k=top_k, max_new_tokens=max_new_tokens, progress=progress)
    tuning_path = Path(tuning) if tuning else out.parent / "baselines-tuning.json"
    tuned = load_or_tune(tuning_path, model, tune_entities, settings)
    settings.finetune = {m: FinetuneConfig.model_validate(tuned["chosen"][m]) for m in FT_MODES}
    result = {"how": {"command": command or " ".join(["macstream"] + sys.argv[1:]), "date": date.today().isoformat(),
                      "lm": model.cfg.lm, "checkpoint": f"{checkpoint_dir(checkpoint)} ({model.version})",
                      "top_k": top_k, "max_new_tokens": max_new_tokens, "threads": threads, "cpu": cpu_name(),
                      "torch": torch.__version__},
              "tuning": tuned | {"file": str(tuning_path)}, "datasets": {}}
    for name, (docs, qs) in (data or datasets(entities, rtqa_docs)).items():
        docs = stream_order(docs)
        _log(f"{name}: {len(docs)} documents, {len(qs)} questions")
        costs = {"mac": measure_mac(model, docs), "rag": measure_rag(model, docs)}  # before the ft runs (RSS)
        _log(f"  mac encode {costs['mac']['seconds_per_document']:.3f} s/doc, "
             f"rag embed {costs['rag']['seconds_per_document']:.3f} s/doc")
        t0 = time.perf_counter()
        report = evaluate(model, docs, qs, settings)
        costs |= report.get("adaptation", {})
        result["datasets"][name] = summarize_dataset(report, costs, docs, qs) | {"seconds": time.perf_counter() - t0}
        _log(f"  evaluated in {time.perf_counter() - t0:.0f} s: " + ", ".join(
            f"{m} F1 {r['f1']:.1f}" for m, r in result["datasets"][name]["modes"].items() if r["f1"] is not None))
    md, cost_png = out.with_suffix(".md"), out.with_name(out.stem + "-accuracy-vs-cost.png")
    ret_png = out.with_name(out.stem + "-retention.png")
    result["table"] = table(result)
    out.write_text(json.dumps(result, indent=2))
    md.write_text(result["table"] + f"\n![accuracy vs cost]({cost_png.name})\n\n![retention]({ret_png.name})\n")
    plots(result, cost_png, ret_png)
    result["files"] = [str(out), str(md), str(cost_png), str(ret_png), str(tuning_path)]
    return result
