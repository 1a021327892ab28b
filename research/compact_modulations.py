"""Compact modulations: bytes per window against F1. Every document is encoded once with the checkpoint (cached under
.cache/), then for each codec of pipeline/modulation_codec.py every stored modulation goes through encode → decode
and the questions are answered from that memory in ``mac``, ``select+rag@1`` and ``mac+rag@1`` (pipeline/evaluate.py's
``build_memory``/``run_questions`` path: same retrieval, same answer batches; multiple choice and retention off).

The PCA basis is fitted on modulations of training documents only (the synthetic train split and RealTimeQA
2022/2023 articles, the years the checkpoint's selector trained on), never on the test sets. A token codec's
decoded window is padded with zero states to the checkpoint's T, as a short window already is.

``select+rag@1`` reads the text of the document (window) the aggregator picks behind the fixed answer prompt: where a
codec leaves a question's prompt unchanged, its answer is the fp16 answer (reused); only questions whose prompt
changed are answered again. Every finished (codec, dataset, mode) unit is cached, so a run resumes; units that would
not finish before ``--stop-at`` are skipped and the results written so far stand.

    HF_HUB_OFFLINE=1 nice -n 19 .venv/bin/python -m research.compact_modulations --threads 2 \\
        --out research/results/2026-12-03/compact-modulations.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import machine
from pipeline.answering import prepare
from pipeline.data import realtimeqa, synthetic
from pipeline.evaluate import run_questions
from pipeline.model.mac import MACModel, checkpoint_dir
from pipeline.modes import Mode
from pipeline.modulation import Modulation
from pipeline.modulation_codec import Codec, PcaBasis, codec
from pipeline.schemas import Document, EncodedChunk, Question
from pipeline.scoring import EvalSettings, answer_batch, stream_order, summarize
from pipeline.store.bank import MemoryBank

CODECS = ("fp16", "int8", "pca256-int8", "pca128-int8", "tokens24-int8", "pca192-int8")  # priority order
CHEAP_MODES = ("mac", "select+rag@1")  # every codec gets these first
COSTLY_MODES = ("mac+rag@1",)
SELECT = "select+rag@1"
PART = 64  # documents per cached encoding part


def busy_elsewhere(seconds: float = 1.0) -> float:
    """Cores kept busy by other processes over ``seconds`` (Linux /proc; 0 where it cannot tell)."""
    def ticks() -> tuple[int, int]:
        cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6] + cpu[7], int(own[11]) + int(own[12])
    try:
        (b0, o0), t0 = ticks(), time.perf_counter()
        time.sleep(seconds)
        (b1, o1), dt = ticks(), time.perf_counter() - t0
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, ((b1 - b0) - (o1 - o0)) / 100 / dt)  # USER_HZ = 100


def log(msg: str) -> None:
    print(f"[{datetime.now(UTC).strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- the frozen computation, once ---------------------------------------------------------------------------------
def encoded(model: MACModel, docs: list[Document], folder: Path) -> dict:
    """Every window of ``docs`` (stream order) → tokens (N, T, D) float16, vectors (N, d_enc), and per row its
    document, chunk index and chunk count. Cached in parts of PART documents under ``folder``; resumes."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, s in enumerate(range(0, len(docs), PART)):
        f = folder / f"part-{i:04d}.npz"
        if not f.exists():
            t0 = time.perf_counter()
            chunks = model.encode_documents(docs[s: s + PART])
            tmp = folder / f"part-{i:04d}.tmp.npz"
            np.savez(tmp, tokens=np.stack([c.modulation.tokens for c in chunks]),
                     vectors=np.stack([c.vector for c in chunks]).astype(np.float32),
                     doc_ids=np.array([c.modulation.doc_id for c in chunks]),
                     chunk=np.array([c.modulation.chunk for c in chunks]),
                     n_chunks=np.array([c.modulation.n_chunks for c in chunks]))
            tmp.rename(f)
            log(f"  encoded {folder.name} part {i} ({len(chunks)} windows, {time.perf_counter() - t0:.0f} s)")
        with np.load(f) as z:
            parts.append({k: z[k] for k in z.files})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def bank_of(model: MACModel, docs: list[Document], enc: dict, tokens: np.ndarray) -> MemoryBank:
    """The memory bank of ``docs`` whose modulations are ``tokens`` (N, T, D), rows as in ``enc``."""
    rows: dict[str, list[int]] = {}
    for i, d in enumerate(enc["doc_ids"].tolist()):
        rows.setdefault(d, []).append(i)
    bank = MemoryBank()
    for doc in docs:
        bank.upsert(doc, [EncodedChunk(Modulation(doc.id, int(enc["chunk"][i]), int(enc["n_chunks"][i]), tokens[i],
                                                  model.model_id, model.version), enc["vectors"][i])
                          for i in rows[doc.id]])
    return bank


def round_trip(c: Codec, tokens: np.ndarray) -> np.ndarray:
    """Every window through encode → decode, zero-padded back to T (a token codec keeps fewer)."""
    out = np.zeros_like(tokens)
    for i, x in enumerate(tokens):
        y = c.round_trip(x)
        out[i, : len(y)] = y
    return out


def fit_basis(model: MACModel, rank: int, cache: Path, entities: int, rtqa_docs: int) -> tuple[PcaBasis, dict]:
    """PCA on every non-zero stored state of training windows: the synthetic train split (``entities``) and
    ``rtqa_docs`` RealTimeQA 2022/2023 documents (evenly spaced over the stream)."""
    docs = stream_order(synthetic.generate("train", entities, seed=0)[0])
    fit_docs = {"synthetic-train": len(docs)}
    if rtqa_docs and realtimeqa.available():
        rt = stream_order(realtimeqa.load([2022, 2023])[0])
        rt = [rt[i] for i in np.linspace(0, len(rt) - 1, min(rtqa_docs, len(rt))).astype(int)]
        fit_docs["realtimeqa-2022-2023"] = len(rt)
    else:
        rt = []
    states = []
    for name, ds in (("fit-synthetic-train", docs), ("fit-rtqa-2022-2023", rt)):
        if ds:
            enc = encoded(model, ds, cache / f"{model.version}-{name}-{len(ds)}")
            x = enc["tokens"].reshape(-1, enc["tokens"].shape[-1]).astype(np.float32)
            states.append(x[np.abs(x).sum(1) > 0])
    x = np.concatenate(states)
    basis = PcaBasis.fit(x, rank, checkpoint=model.version)
    return basis, {"documents": fit_docs, "states": int(len(x))}


# ---- answering ----------------------------------------------------------------------------------------------------
def dataset(name: str, entities: int, rtqa_questions: int) -> tuple[list[Document], list[Question]]:
    """As ``macstream bench quality`` builds them: stream order, answerable questions first, RTQA limited."""
    if name == "synthetic-test":
        docs, qs = synthetic.generate("test", entities, seed=0)
        limit = None
    else:
        docs, qs = realtimeqa.load([2024])
        limit = rtqa_questions
    qs = sorted(qs, key=lambda q: not q.doc_ids)
    return stream_order(docs), qs[:limit] if limit else qs


def select_prompts(model: MACModel, hits: list, qs: list[Question], settings: EvalSettings) -> list[str]:
    """The select+rag@1 prompt of every question (the aggregator's pick only: no generation)."""
    out: list[str] = []
    for s in range(0, len(qs), settings.batch_size):
        out += prepare(model, SELECT, [q.question for q in qs[s: s + settings.batch_size]],
                       hits[s: s + settings.batch_size])[0]
    return out


def answer_select(model: MACModel, bank: MemoryBank, qs: list[Question], settings: EvalSettings,
                  ref: dict | None) -> tuple[list[dict], list[str], int]:
    """select+rag@1 rows; with the fp16 unit ``ref`` only questions whose prompt changed are answered again."""
    hits = bank.search(model.encoder.embed([q.question for q in qs]).numpy(), settings.top_k)
    prompts = select_prompts(model, hits, qs, settings)
    if ref is None:
        todo = list(range(len(qs)))
        rows: list[dict | None] = [None] * len(qs)
    else:
        todo = [i for i, p in enumerate(prompts) if p != ref["prompts"][i]]
        rows = [dict(r) for r in ref["rows"]]
    for s in range(0, len(todo), settings.batch_size):
        idx = todo[s: s + settings.batch_size]
        for i, r in zip(idx, answer_batch(model, Mode.parse(SELECT), [qs[i] for i in idx], [hits[i] for i in idx],
                                          settings)):
            rows[i] = r
    return rows, prompts, len(todo)


def paired(rows: list[dict], ref: list[dict]) -> dict:
    """F1 change against fp16 on the same questions, its paired standard error, and how many answers changed."""
    diff = np.array([r["f1"] - b["f1"] for r, b in zip(rows, ref)]) * 100
    return {"delta_f1": float(diff.mean()), "paired_se": float(diff.std(ddof=1) / np.sqrt(len(diff))),
            "answers_changed": int(sum(r["prediction"] != b["prediction"] for r, b in zip(rows, ref)))}


def diagnostics(model: MACModel, x: np.ndarray, y: np.ndarray) -> dict:
    """How far the decoded states ``y`` are from the stored ones ``x`` (relative L2 over real, non-padding states),
    and how far the keys/values the readout makes from them."""
    live = np.abs(x.astype(np.float32)).sum(-1) > 0  # (N, T): stored states, not zero padding
    a, b = x.astype(np.float32)[live], y.astype(np.float32)[live]
    return {"state_rel_error": float(np.linalg.norm(b - a) / np.linalg.norm(a)),
            "readout_rel_error": readout_error(model, x, y)}


def readout_error(model: MACModel, x: np.ndarray, y: np.ndarray, n: int = 64) -> float:
    """‖W(y − x)‖ / ‖W x‖ over the first ``n`` windows: the relative error of the keys/values the readout makes
    (W: its linear map; the bias cancels)."""
    W = model.expander.proj.weight.detach()  # (L·2·H·D, d)
    a = torch.from_numpy(x[:n].astype(np.float32)).reshape(-1, x.shape[-1])
    b = torch.from_numpy(y[:n].astype(np.float32)).reshape(-1, x.shape[-1])
    with torch.no_grad():
        return float(torch.linalg.norm((b - a) @ W.T) / torch.linalg.norm(a @ W.T))


def verdict(rows: list[dict], sets: list[str]) -> dict:
    """Per codec (smallest first): its worst F1 change against fp16 over every measured (dataset, mode), whether
    every unit was measured, and whether it stays within 1 F1 everywhere; and the smallest codec that does."""
    units = [(ds, m) for ds in sets for m in (*CHEAP_MODES, *COSTLY_MODES)
             if any(m in r["datasets"].get(ds, {}).get("modes", {}) for r in rows)]
    out: dict = {"codecs": []}
    for row in sorted(rows, key=lambda r: r["bytes_per_window"]):
        if row["codec"] == "fp16":
            continue
        deltas = {f"{ds} {m}": row["datasets"][ds]["modes"][m]["delta_f1"] for ds, m in units
                  if "delta_f1" in row["datasets"].get(ds, {}).get("modes", {}).get(m, {})}
        worst = min(deltas.values()) if deltas else None
        complete = len(deltas) == len(units)
        out["codecs"].append({"codec": row["codec"], "bytes_per_window": row["bytes_per_window"], "worst_delta_f1":
                              worst, "complete": complete, "within_1_f1": complete and worst is not None
                              and worst >= -1.0})
    ok = [c for c in out["codecs"] if c["within_1_f1"]]
    out["smallest_within_1_f1"] = ok[0]["codec"] if ok else None
    return out


# ---- output ---------------------------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    series: dict[tuple[str, str], list[tuple[int, float, str]]] = {}
    for row in result["rows"]:
        for ds, per in row["datasets"].items():
            for mode, m in per.get("modes", {}).items():
                series.setdefault((ds, mode), []).append((row["bytes_per_window"], m["f1"], row["codec"]))
    colours = {m: f"C{i}" for i, m in enumerate((*CHEAP_MODES, *COSTLY_MODES))}
    for (ds, mode), pts in sorted(series.items()):
        pts.sort()
        syn = ds.startswith("syn")
        ax.plot([p[0] / 1000 for p in pts], [p[1] for p in pts], marker="o" if syn else "s", ls="-" if syn else "--",
                color=colours.get(mode), label=f"{mode} · {ds}")
        for b, f, name in pts:
            ax.annotate(name, (b / 1000, f), fontsize=6, xytext=(3, 3), textcoords="offset points",
                        color=colours.get(mode))
    ax.axvline(16.384, color="grey", lw=0.8, ls=":")
    ax.text(16.384, ax.get_ylim()[0], " 16 KiB target", fontsize=7, color="grey", va="bottom")
    ax.set_xlabel("bytes per window (kB; fp16 today: 55.3)")
    ax.set_ylabel("F1 (%)")
    ax.set_title(f"Compact modulations, checkpoint {result['how']['checkpoint']}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint")
    ap.add_argument("--codecs", default=",".join(CODECS), help="comma-separated, in priority order")
    ap.add_argument("--datasets", default="synthetic-test,realtimeqa-2024")
    ap.add_argument("--modes", default=",".join((*CHEAP_MODES, *COSTLY_MODES)), help="a subset of the default")
    ap.add_argument("--entities", type=int, default=60, help="synthetic test entities (bench quality: 60)")
    ap.add_argument("--rtqa-questions", type=int, default=100)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--fit-entities", type=int, default=40, help="synthetic train entities the PCA is fitted on")
    ap.add_argument("--fit-rtqa-docs", type=int, default=200, help="RealTimeQA 2022/2023 documents it is fitted on")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=".cache/compact-modulations")
    ap.add_argument("--stop-at", help="ISO time (UTC): start no unit expected to end after it")
    ap.add_argument("--probe", default="", help="comma-separated codecs measured without answering, once the "
                    "answered ones are done: state and readout error, and how many select+rag@1 prompts change")
    ap.add_argument("--out", default="research/results/2026-12-03/compact-modulations.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    stop = datetime.fromisoformat(args.stop_at).replace(tzinfo=UTC).timestamp() if args.stop_at else float("inf")
    cache, out = Path(args.cache), Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = MACModel.load(checkpoint_dir(args.checkpoint)).eval()
    T, D = model.cfg.num_tokens, model.lm.hidden_size
    settings = EvalSettings(modes=(*CHEAP_MODES, *COSTLY_MODES), top_k=args.top_k, retention=False,
                            multiple_choice=False, progress=False)
    names = [c.strip() for c in args.codecs.split(",") if c.strip()]
    sets = [s.strip() for s in args.datasets.split(",") if s.strip()]
    if "realtimeqa-2024" in sets and not realtimeqa.available():
        log("RealTimeQA data absent: synthetic only")
        sets.remove("realtimeqa-2024")

    data, enc = {}, {}
    for name in sets:
        docs, qs = dataset(name, args.entities, args.rtqa_questions)
        tag = f"{name}-e{args.entities}" if name.startswith("synthetic") else name
        log(f"{name}: {len(docs)} documents, {len(qs)} questions")
        data[name] = (docs, qs)
        enc[name] = encoded(model, docs, cache / f"{model.version}-{tag}")

    probes = [c.strip() for c in args.probe.split(",") if c.strip()]
    ranks = [int(n.split("pca")[1].split("-")[0]) for n in (*names, *probes) if "pca" in n]
    basis, fit, bases = None, {}, {}
    selector = (model.amortizer.score.weight.detach().numpy()[0], float(model.amortizer.score.bias.detach()[0]))

    def codec_of(name: str) -> Codec:
        nonlocal basis, fit
        if "pca" in name and basis is None:
            basis, fit = fit_basis(model, max(ranks), cache, args.fit_entities, args.fit_rtqa_docs)
            for r in sorted(set(ranks)):
                p = cache / f"{model.version}-codec-pca{r}.npz"
                bases[f"pca{r}"] = {"file": str(p), "file_bytes": basis.truncate(r).save(p),
                                    "array_bytes": basis.truncate(r).nbytes,
                                    "explained_variance": float(basis.explained[:r].sum())}
            log(f"PCA basis fitted on {fit['states']} states: " + ", ".join(
                f"{k} explains {v['explained_variance']:.3f}" for k, v in bases.items()))
        return codec(name, basis, selector)

    units_dir = cache / f"{model.version}-units-e{args.entities}-q{args.rtqa_questions}-k{args.top_k}"
    units_dir.mkdir(parents=True, exist_ok=True)

    def unit_file(c: str, ds: str, mode: str) -> Path:
        return units_dir / f"{c}--{ds}--{mode.replace('+', 'plus').replace('@', 'at')}.json"

    modes = args.modes.split(",")
    plan = ([(c, ds, m) for c in names for ds in sets for m in CHEAP_MODES if m in modes]
            + [(c, ds, m) for c in names for ds in sets for m in COSTLY_MODES if m in modes])
    started = datetime.now(UTC).isoformat(timespec="seconds")
    diag: dict[tuple[str, str], dict] = {}
    skipped: list[str] = []
    probed: list[dict] = []

    def write() -> dict:
        rows = []
        for c in names:
            cd = codec_of(c) if ("pca" not in c or basis is not None) else None
            row = {"codec": c, "bytes_per_window": cd.bytes_per_window(T, D) if cd else None,
                   "fp16_bytes_per_window": T * D * 2, "datasets": {}}
            if c.startswith("pca") or "-pca" in c:
                row["basis"] = bases.get(c.split("-")[0] if c.startswith("pca") else c.split("-")[1])
            for ds in sets:
                per = {"modes": {}, **diag.get((c, ds), {})}
                for m in (*CHEAP_MODES, *COSTLY_MODES):
                    f = unit_file(c, ds, m)
                    if f.exists():
                        u = json.loads(f.read_text())
                        per["modes"][m] = {k: v for k, v in u.items() if k not in ("rows", "prompts")}
                row["datasets"][ds] = per
            if row["bytes_per_window"] is not None:
                rows.append(row)
        result = {
            "question": "bytes per stored window against F1: which compact modulation loses at most 1 F1?",
            "rows": rows, "verdict": verdict(rows, sets), "skipped_units": skipped,
            "probes": probed,
            "how": {"date": started, "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                    "machine": machine(),
                    "threads": f"at most {args.threads}",
                    "command": f"HF_HUB_OFFLINE=1 nice -n {os.nice(0)} .venv/bin/python -m "  # the niceness it ran at
                               "research.compact_modulations " + " ".join(sys.argv[1:] if argv is None else argv),
                    "checkpoint": model.version, "answer_prompt": model.prompt_version, "T": T, "D": D,
                    "top_k": args.top_k, "synthetic_entities": args.entities,
                    "realtimeqa_questions": args.rtqa_questions, "pca_fit": fit,
                    "datasets": {ds: {"documents": len(data[ds][0]), "windows": int(len(enc[ds]["tokens"])),
                                      "questions": len(data[ds][1])} for ds in sets},
                    "method": "each codec's encode→decode applied to every cached fp16 modulation; memory bank "
                              "rebuilt from the decoded states (token codecs zero-padded to T); questions answered "
                              "with pipeline.evaluate.run_questions (mac, mac+rag@1) and pipeline.scoring."
                              "answer_batch (select+rag@1, only where the prompt differs from fp16's); greedy, "
                              "multiple choice and retention off; delta_f1/paired_se: paired against fp16 on the "
                              "same questions"}}
        out.write_text(json.dumps(result, indent=1))
        try:
            plot(result, out.with_suffix(".png"))
        except Exception as err:  # a plot is a convenience: never lose the numbers to it
            log(f"plot failed: {err!r}")
        return result

    refs: dict[tuple[str, str], dict] = {}
    decoded: dict[tuple[str, str], tuple[np.ndarray, MemoryBank]] = {}
    est: dict[tuple[str, str], float] = {}
    for c, ds, mode in plan:
        f = unit_file(c, ds, mode)
        docs, qs = data[ds]
        if f.exists():  # finished in an earlier run
            u = json.loads(f.read_text())
            if c == "fp16":
                refs[(ds, mode)] = u
            est.setdefault((ds, mode), u["seconds"])
            continue
        guess = est.get((ds, mode), 0.0) * (0.3 if mode == SELECT else 1.0)
        if time.time() + guess > stop or time.time() > stop:
            skipped.append(f"{c} {ds} {mode} (expected {guess:.0f} s, past --stop-at)")
            log(f"skip {c} {ds} {mode}: expected {guess:.0f} s")
            write()
            continue
        # OpenMP threads spin against a busy core: with another process on one core of two, one thread is far
        # faster than two (tests/conftest.py measured ~15x on this machine). Decide per unit.
        threads = max(1, min(args.threads, round(os.cpu_count() - busy_elsewhere())))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            log(f"torch threads → {threads}")
        t0 = time.perf_counter()
        if (c, ds) not in decoded:
            decoded.clear()  # one decoded memory at a time
            x = enc[ds]["tokens"]
            y = x if c == "fp16" else round_trip(codec_of(c), x)
            diag[(c, ds)] = diagnostics(model, x, y)
            decoded[(c, ds)] = (y, bank_of(model, docs, enc[ds], y))
        bank = decoded[(c, ds)][1]
        ref = refs.get((ds, mode))
        u: dict = {}
        if mode == SELECT:
            rows, prompts, answered = answer_select(model, bank, qs, replace(settings, modes=(mode,)), ref)
            u["prompts"], u["answered_again"] = prompts, answered
            if ref is not None:
                u["prompt_changed"] = answered
        else:
            rows = run_questions(model, bank, qs, (mode,), replace(settings, modes=(mode,)), mode)[mode]
        secs = time.perf_counter() - t0
        u |= {"f1": summarize(rows)["f1"], "em": summarize(rows)["em"], "n": len(rows), "seconds": secs,
              **{k: summarize(rows)[k] for k in ("selection", "retriever_top1") if k in summarize(rows)}}
        if ref is not None:
            u |= paired(rows, ref["rows"])
        u["rows"] = [{k: v for k, v in r.items() if k != "weights"} for r in rows]
        f.write_text(json.dumps(u))
        if c == "fp16":
            refs[(ds, mode)] = u
            est[(ds, mode)] = secs
        else:
            est.setdefault((ds, mode), secs)
        log(f"{c:>14} {ds:>16} {mode:>13}: F1 {u['f1']:.1f} (n={len(rows)}"
            + (f", Δ {u['delta_f1']:+.1f} ± {u['paired_se']:.1f}" if ref is not None else "") + f") {secs:.0f} s")
        write()
    # diagnostics (cheap) of codecs whose units were all cached before this run
    for c in names:
        for ds in sets:
            if (c, ds) not in diag:
                x = enc[ds]["tokens"]
                diag[(c, ds)] = diagnostics(model, x, x if c == "fp16" else round_trip(codec_of(c), x))
    for c in probes:  # no answers: what the codec does to the states, the readout and the aggregator's pick
        if time.time() > stop:
            skipped.append(f"probe {c} (past --stop-at)")
            continue
        cd = codec_of(c)
        row = {"codec": c, "bytes_per_window": cd.bytes_per_window(T, D), "datasets": {}}
        for ds in sets:
            docs, qs = data[ds]
            x = enc[ds]["tokens"]
            y = round_trip(cd, x)
            bank = bank_of(model, docs, enc[ds], y)
            hits = bank.search(model.encoder.embed([q.question for q in qs]).numpy(), settings.top_k)
            prompts = select_prompts(model, hits, qs, settings)
            ref = refs.get((ds, SELECT))
            changed = None if ref is None else sum(a != b for a, b in zip(prompts, ref["prompts"]))
            row["datasets"][ds] = {**diagnostics(model, x, y), "n": len(qs), "select_prompt_changed": changed}
        probed.append(row)
        log(f"probe {c}: {row['datasets']}")
        write()
    result = write()
    log(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
