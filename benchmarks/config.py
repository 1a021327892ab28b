"""The settings of each ``macstream bench`` target: one pydantic model per target, the one source of truth for its
flags, their defaults and their help.

A field ``name`` is the flag ``--name-with-dashes`` of its target's parser (:func:`add_flags`); the older spellings,
named after the benchmark (``--freshness-docs`` for freshness ``docs``), stay as aliases because result files and
docs cite them. ``macstream bench TARGET --config FILE.json`` reads the same fields from a JSON object. Precedence,
lowest first: the field's default, the ``--config`` file, the flags. A bad value is refused while the command line is
parsed (exit 2, naming the flag); settings that only make sense together are checked once the whole config is built.

Light on purpose: no model, Ray or Kafka code, so ``macstream bench ... --help`` and a bad flag answer at once.
"""

from __future__ import annotations

import argparse
import re
import shlex
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from pipeline.config import ModulationCodec, StrictModel, load_config, read_json_object
from pipeline.modes import Mode

Positive = Annotated[int, Field(ge=1)]
# The ingest settings a freshness variant may change: benchmarks.freshness.TUNABLE (checked equal by
# tests/test_freshness.py; not imported here because that module pulls in Ray and the model)
VARIANT_KEYS = ("batch_size", "poll_timeout_ms", "max_in_flight", "workers", "encoder_threads")


def setting(default: Any, description: str, *, flag: str | None = None, aliases: tuple[str, ...] = (),
            cli: Literal["nargs", "csv", "append"] | None = None, **constraints: Any) -> Any:
    """A field of a bench config. ``flag``: its flag when ``--name-with-dashes`` reads badly; ``aliases``: older
    spellings that still work; ``cli``: how a list is typed (``nargs``: ``--workers 1 2``; ``csv``: ``--points
    1e4,1e5``; ``append``: the flag repeated)."""
    extra = {k: v for k, v in (("flag", flag), ("aliases", list(aliases)), ("cli", cli)) if v}
    return Field(default, description=description, json_schema_extra=extra or None, **constraints)


class BenchConfig(StrictModel):
    """What every benchmark that loads the model shares."""

    target: ClassVar[str] = ""

    checkpoint: str | None = setting(None, "MAC checkpoint directory; default: the shipped one.")
    out_dir: str | None = setting(None, "Where the results go (one JSON per benchmark, report.md, PNGs); default "
                                  "benchmarks/results/<date>/.")
    threads: int = setting(1, "torch threads of the benchmark process (Ray actors and Serve replicas set their own).",
                           ge=1, le=256)


class QualityBench(BenchConfig):
    """`bench quality`: eval of every mode on the synthetic test split and RealTimeQA 2024 (when present), with
    retention as the memory grows and the bytes per document."""

    target: ClassVar[str] = "quality"

    entities: int = setting(60, "Synthetic test entities (about 5 questions each).", aliases=("--quality-entities",),
                            ge=1)
    rtqa_questions: int = setting(150, "RealTimeQA 2024 questions (all of their documents in the memory).", ge=1)
    top_k: int = setting(4, "Retrieved chunks per question.", aliases=("--quality-top-k",), ge=1, le=64)


class IngestBench(BenchConfig):
    """`bench ingest`: docs/s of the streaming ingest job (Kafka, Ray encoder actors, store) by worker count."""

    target: ClassVar[str] = "ingest"

    entities: int = setting(40, "Synthetic test entities whose articles (about 3 each) are ingested.", ge=1)
    workers: list[Positive] = setting([1, 2], "Encoder worker counts to compare, one run each.", cli="nargs",
                                      min_length=1)


class BackfillBench(BenchConfig):
    """`bench backfill`: docs/s of the archive backfill (Ray Data over a Parquet file) beside streaming ingest of the
    same documents, by worker count."""

    target: ClassVar[str] = "backfill"

    entities: int = setting(40, "Synthetic test entities whose articles (about 3 each) are in the archive.", ge=1)
    workers: list[Positive] = setting([1, 2], "Encoder worker counts to compare, one run of each path each.",
                                      cli="nargs", min_length=1)


class ServeBench(BenchConfig):
    """`bench serve`: latency per mode and batching throughput of the HTTP service (Ray Serve)."""

    target: ClassVar[str] = "serve"

    corpus: Literal["synthetic", "realtimeqa"] = setting(
        "synthetic", "The documents in the store: synthetic 40-90-word articles, or real-length RealTimeQA 2022 news "
        "(--entities questions and their articles; latency only, written to serve-realtimeqa.json).",
        aliases=("--serve-docs",))
    entities: int = setting(40, "Synthetic test entities in the memory (realtimeqa: questions).", ge=1)
    requests: int = setting(40, "Requests per mode.", ge=1)
    clients: int = setting(8, "Concurrent clients of the throughput phase.", ge=1, le=256)
    top_k: int = setting(8, "Retrieved chunks per question.", ge=1, le=64)
    max_new_tokens: int = setting(16, "Answer length in tokens.", ge=1, le=256)
    batch_wait: float | None = setting(None, "Longest a replica waits to fill a batch, in seconds; default: serve's "
                                       "batch_wait_timeout_s.", ge=0.0, le=5.0)
    replica_threads: int = setting(1, "torch threads of the model replica.", ge=1, le=64)


class BaselinesBench(BenchConfig):
    """`bench baselines`: base, rag and mac against online fine-tuning of the LM (accuracy, adaptation cost,
    retention)."""

    target: ClassVar[str] = "baselines"

    entities: int = setting(16, "Synthetic test entities of the stream.", aliases=("--baseline-entities",), ge=1)
    rtqa_docs: int = setting(48, "The first N RealTimeQA 2024 documents in stream order (with their questions).",
                             ge=1)
    tune_entities: int = setting(5, "Synthetic validation entities the fine-tuning hyperparameters are tuned on.",
                                 ge=1)
    tuning: str | None = setting(None, "Tuning report to reuse; default <out dir>/baselines-tuning.json (tuned and "
                                 "written there when absent).")
    top_k: int = setting(4, "Retrieved chunks per question.", aliases=("--quality-top-k",), ge=1, le=64)
    max_new_tokens: int = setting(16, "Answer length in tokens.", ge=1, le=256)


class FreshnessBench(BenchConfig):
    """`bench freshness`: time from produce (or a story's appearance in a feed) to an HTTP answer citing the
    document, on the always-on path."""

    target: ClassVar[str] = "freshness"
    PRODUCE_ONLY: ClassVar[tuple[str, ...]] = ("rate", "burst", "gate", "variants", "workers")

    source: Literal["produce", "feed"] = setting(
        "produce", "produce: documents produced to Kafka; feed: stories appearing in a local RSS feed that the feed "
        "poller polls (from appearance to cited; written to freshness-feed.json).", aliases=("--freshness-source",))
    docs: int = setting(60, "Documents timed (per ingest configuration).", aliases=("--freshness-docs",), ge=1)
    rate: float | None = setting(None, "Produce rate in docs/s; default: half the capacity measured on a burst.",
                                 aliases=("--freshness-rate",), gt=0.0)
    burst: int = setting(32, "Documents of the burst the ingest capacity is measured on.",
                         aliases=("--freshness-burst",), ge=1)
    poll_interval: float = setting(0.05, "Seconds between two questions about one document.", gt=0.0, le=60.0)
    gate: Literal["store", "none"] = setting("store", "Start asking once the store holds the document (store) or from "
                                             "its produce (none).", aliases=("--freshness-gate",))
    variants: list[str] = setting([], "Also measure with these ingest settings, e.g. batch_size=4,poll_timeout_ms=50 "
                                  f"(keys: {', '.join(VARIANT_KEYS)}; repeatable; the product defaults are always "
                                  "measured first).", flag="--variant", aliases=("--freshness-variant",),
                                  cli="append")
    workers: int = setting(1, "Encoder workers of the ingest job.", aliases=("--freshness-workers",), ge=1, le=256)
    mode: str | None = setting(None, "Answer mode of the polls, e.g. mac; default: the server's default mode.",
                               aliases=("--freshness-mode",))
    feeds_interval: float = setting(5.0, "Feed source: the poller's interval in seconds.", ge=0.1, le=86400.0)

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[str]) -> list[str]:
        for text in v:
            for part in filter(None, (p.strip() for p in text.split(","))):
                key, _, value = part.partition("=")
                if key.strip() not in VARIANT_KEYS or not re.fullmatch(r"\s*\d+\s*", value):
                    raise ValueError(f"variant {part!r}: expected KEY=INT[,KEY=INT...] with KEY one of "
                                     f"{', '.join(VARIANT_KEYS)}")
        return v

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str | None) -> str | None:
        return None if v is None else str(Mode.parse(v))  # raises naming the valid modes

    @model_validator(mode="after")
    def _source_fits(self) -> FreshnessBench:
        if self.source == "feed":
            ignored = [_flag(type(self), n) for n in self.PRODUCE_ONLY if n in self.model_fields_set]
            if ignored:
                raise ValueError(f"{', '.join(ignored)}: the produce source only (the feed source has no produce "
                                 "rate, burst, gate, variants or ingest workers to set)")
        elif "feeds_interval" in self.model_fields_set:
            raise ValueError("--feeds-interval: the feed source only (add --source feed)")
        return self


def _split(v: Any) -> Any:
    """A comma-separated flag (``"1e4,1e5"``) → its items; a JSON list passes as it is."""
    return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v


class StoreBench(StrictModel):
    """`bench store`: the embedded store (Qdrant Edge) beside qdrant-client local mode: write rate, query latency,
    RSS and disk by size (no model; its own JSON and PNG, not part of `all` or the report)."""

    target: ClassVar[str] = "store"

    points: list[Positive] = setting([10_000, 100_000], "Window counts, comma-separated (e.g. 10000,100000 or "
                                     "1e4,1e5).", cli="csv", min_length=1)
    engines: list[Literal["edge", "local"]] = setting(
        ["edge", "local"], "The engines measured, comma-separated (local: qdrant-client local mode, up to "
        "--local-cap).", aliases=("--store-engines",), cli="csv", min_length=1)
    out: str | None = setting(None, "The JSON to write (a PNG beside it); default "
                              "benchmarks/results/<date>/store.json.")
    local_cap: int = setting(10_000, "Largest size qdrant-client local mode is run at (it keeps everything in RAM).",
                             ge=1)
    queries: int = setting(200, "Searches timed per filter.", aliases=("--store-queries",), ge=1)
    top_k: int = setting(4, "Neighbours per search (recall@k against exact search).", aliases=("--quality-top-k",),
                         ge=1, le=1000)
    workdir: str | None = setting(None, "Where the stores are built; default $TMPDIR.", aliases=("--store-workdir",))
    append: bool = setting(False, "Add the rows to an existing --out (a row run again).")
    codec: ModulationCodec = setting(typing.get_args(ModulationCodec)[0], "How the store codes the modulations "
                                     "(int4zw, the store's default; int8, int4z, int4, fp16).")

    @field_validator("points", mode="before")
    @classmethod
    def _points(cls, v: Any) -> Any:
        items = _split(v)
        if isinstance(items, list):  # "1e4" is 10000
            try:
                return [int(float(x)) if isinstance(x, str) else x for x in items]
            except ValueError:
                raise ValueError(f"comma-separated window counts, e.g. 10000,100000 or 1e4,1e5; got {v!r}") from None
        return items

    @field_validator("engines", mode="before")
    @classmethod
    def _engines(cls, v: Any) -> Any:
        items = _split(v)
        return list(dict.fromkeys(items)) if isinstance(items, list) else items  # each once, in the order given


class SoakBench(BenchConfig):
    """`bench soak`: what `macstream up` runs, fed a continuous stream with questions alongside: RSS and query
    latency over time, and nothing lost (its own JSON and PNG, not part of `all` or the report)."""

    target: ClassVar[str] = "soak"

    docs: int = setting(20_000, "Documents produced to the topic.", ge=1)
    rate: float = setting(8.0, "Produce rate, docs/s (open loop; above ingest capacity the topic's lag grows).",
                          gt=0.0)
    qps: float = setting(0.5, "Questions per second asked alongside (one client).", gt=0.0, le=100.0)
    prefill: int = setting(0, "Random windows written into the checkpoint's collection before the product starts.",
                           ge=0)
    sample_s: float = setting(15.0, "Seconds between two memory samples (and latency windows).", gt=0.0)
    max_new_tokens: int = setting(1, "Answer length of the questions.", ge=1, le=256)
    workers: int = setting(1, "Encoder workers of the ingest job.", ge=1, le=256)


class AllBench(BenchConfig):
    """`bench all`: quality, ingest, serve, baselines, freshness and backfill, one after another (never
    overlapping), each with its own defaults and these shared settings; then the report."""

    target: ClassVar[str] = "all"


ALL = ("quality", "ingest", "serve", "baselines", "freshness", "backfill")  # what `bench all` runs, in order
TARGETS: dict[str, type[StrictModel]] = {cls.target: cls for cls in (
    QualityBench, IngestBench, BackfillBench, ServeBench, BaselinesBench, FreshnessBench, StoreBench, SoakBench,
    AllBench)}


def _scalar(annotation: Any) -> Any:
    """The one non-None type of ``X | None``, else the annotation itself."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return args[0] if union and len(args) == 1 else annotation


def flag_names(name: str, field: FieldInfo) -> list[str]:
    """The flag of a field first, then its aliases."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return [extra.get("flag") or "--" + name.replace("_", "-"), *extra.get("aliases", [])]


def _flag(cls: type[StrictModel], name: str) -> str:
    return flag_names(name, cls.model_fields[name])[0]


def flags_of(cls: type[StrictModel]) -> dict[str, str]:
    """Every flag spelling of ``cls`` → its field (``--no-X`` too for a yes/no setting)."""
    out = {}
    for name, field in cls.model_fields.items():
        for flag in flag_names(name, field):
            out[flag] = name
            if _scalar(field.annotation) is bool:
                out["--no-" + flag[2:]] = name
    return out


def _cli(field: FieldInfo) -> str | None:
    return field.json_schema_extra.get("cli") if isinstance(field.json_schema_extra, dict) else None


def _checker(cls: type[StrictModel], name: str, item: bool):
    """argparse ``type=``: the text validated as the field (or one item of it) by the model itself, so a bad value is
    refused while parsing, naming the flag. A value the field accepts but that conflicts with another setting passes
    here; the whole config catches that."""

    def check(text: str) -> Any:
        try:
            value = getattr(cls.model_validate({name: [text] if item else text}), name)
        except ValidationError as err:
            own = [e["msg"].removeprefix("Value error, ") for e in err.errors() if e["loc"][:1] == (name,)]
            if own:
                raise argparse.ArgumentTypeError("; ".join(own) + f" (got {text!r})") from None
            return text
        return value[0] if item else value

    check.__name__ = name  # argparse names it in "invalid <name> value"
    return check


def _shown(value: Any, field: FieldInfo) -> str:
    if isinstance(value, list):
        return ("," if _cli(field) == "csv" else " ").join(map(str, value)) or "none"
    return str(value)


def add_flags(parser: argparse.ArgumentParser, cls: type[StrictModel]) -> None:
    """One flag (and its aliases) per field of ``cls``, help from the field's description with its default. Every
    flag defaults to None: only what is typed overrides the model (and the ``--config`` file)."""
    shared = [n for n in cls.model_fields if n in BenchConfig.model_fields]
    for name in [n for n in cls.model_fields if n not in shared] + shared:  # the target's own settings first
        field = cls.model_fields[name]
        ann = _scalar(field.annotation)
        default = field.get_default(call_default_factory=True)
        helptext = (field.description or "") + ("" if default is None else f" (default: {_shown(default, field)})")
        kw: dict[str, Any] = {"dest": name, "default": None, "help": helptext.replace("%", "%%")}
        if ann is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(ann) is Literal:
            kw["choices"] = typing.get_args(ann)
        elif typing.get_origin(ann) is list:
            cli = _cli(field) or "nargs"
            item = typing.get_args(ann)[0]
            kw["type"] = _checker(cls, name, item=cli != "csv")
            kw["metavar"] = {"nargs": "N", "csv": "A,B", "append": "TEXT"}[cli]
            if typing.get_origin(item) is Literal:
                kw["metavar"] = ",".join(typing.get_args(item))  # e.g. edge,local
            if cli == "nargs":
                kw["nargs"] = "+"
            elif cli == "append":
                kw["action"] = "append"
        else:
            kw["type"] = _checker(cls, name, item=False)
            kw["metavar"] = {int: "N", float: "X"}.get(ann, "TEXT")
        parser.add_argument(*flag_names(name, field), **kw)


def build(cls: type[StrictModel], values: dict[str, Any], config_file: str | Path | None = None):
    """defaults < ``config_file`` < ``values`` (the flags typed: None means not typed), validated into ``cls``;
    ValueError names each bad setting with its flag."""
    typed = {k: v for k, v in values.items() if k in cls.model_fields and v is not None}
    section = f"bench {cls.target}"
    try:
        return load_config(cls, read_json_object(config_file) | typed, section)
    except ValueError as err:
        msg = str(err).replace(f"{section}: <root>: ", f"{section}: ").replace("Value error, ", "")
        for name, field in cls.model_fields.items():
            msg = msg.replace(f"{section}: {name}:", f"{section}: {name} ({flag_names(name, field)[0]}):")
        raise ValueError(msg) from None


def command_line(cfg: StrictModel) -> str:
    """The ``macstream bench`` command that builds ``cfg`` (its settings that differ from the defaults)."""
    words = ["macstream", "bench", cfg.target]
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        if value == field.get_default(call_default_factory=True) or value is None:
            continue
        flag = flag_names(name, field)[0]
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list) and _cli(field) == "append":
            for v in value:
                words += [flag, str(v)]
        elif isinstance(value, list):
            words += [flag, ",".join(map(str, value))] if _cli(field) == "csv" else [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)
