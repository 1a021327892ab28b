"""Kafka source and sink helpers (kafka-python 3). Nothing here is specific to the local broker.

Client settings that matter (measured against Tansu, also right for Apache Kafka):
- ``enable_auto_commit=False``: offsets are committed by the ingest consumer only after the store acknowledged the
  write (at-least-once; idempotent writes make it effectively once).
- ``session_timeout_ms=6000, heartbeat_interval_ms=1000``: a group join waits session_timeout/2 on Tansu, and a dead
  member's partitions move after at most 6 s.
- ``api_version`` left unset (negotiated). Broker end offsets / high watermarks are never trusted for "done" or lag.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from pipeline.schemas import Document
from workers.messages import encode

GROUP_SETTINGS = dict(enable_auto_commit=False, session_timeout_ms=6000, heartbeat_interval_ms=1000,
                      auto_offset_reset="earliest")
DLQ_SUFFIX = ".dlq"


def dlq_topic(topic: str) -> str:
    return topic + DLQ_SUFFIX


def consumer(bootstrap: str, group_id: str | None, **kw) -> KafkaConsumer:
    return KafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, **(GROUP_SETTINGS | kw))


def producer(bootstrap: str, **kw) -> KafkaProducer:
    """acks=all and idempotence off (Tansu has no transactions); retries on; one in flight per connection keeps
    order."""
    return KafkaProducer(bootstrap_servers=bootstrap, acks="all", retries=5, max_in_flight_requests_per_connection=1,
                         **kw)


def ensure_topic(bootstrap: str, topic: str, partitions: int) -> bool:
    """Create ``topic`` with ``partitions`` partitions if it does not exist; return whether it was created."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        if topic in admin.list_topics():
            return False
        admin.create_topics([NewTopic(topic, partitions, 1)])
        return True
    except TopicAlreadyExistsError:
        return False
    finally:
        admin.close()


def check_reachable(bootstrap: str, timeout_s: float = 5.0) -> None:
    """Raise (``NoBrokersAvailable`` or another ``KafkaError``) unless a broker at ``bootstrap`` answers a metadata
    request within about ``timeout_s``."""
    ms = int(timeout_s * 1000)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=ms, bootstrap_timeout_ms=ms)
    try:
        admin.list_topics()
    finally:
        admin.close()


def partitions_of(bootstrap: str, topic: str) -> list[int]:
    c = consumer(bootstrap, None)
    try:
        return sorted(c.partitions_for_topic(topic) or [])
    finally:
        c.close()


def read_documents(path: str | Path) -> Iterator[Document]:
    """A JSONL file of documents, or a portable dataset directory (its documents.jsonl), in file order."""
    p = Path(path)
    if p.is_dir():
        p = p / "documents.jsonl"
    with p.open() as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield Document.model_validate_json(line)
                except ValueError as err:
                    raise ValueError(f"{p}:{n}: not a document: {err}") from None


def produce(bootstrap: str, topic: str, docs: Iterable[Document], rate: float | None = None) -> int:
    """Publish documents keyed by id (acks=all), at most ``rate`` per second; return how many were acknowledged."""
    prod = producer(bootstrap)
    sent, t0 = 0, time.monotonic()
    try:
        futures = []
        for doc in docs:
            key, value = encode(doc)
            futures.append(prod.send(topic, key=key, value=value))
            sent += 1
            if rate:
                wait = t0 + sent / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
        prod.flush()
        for f in futures:
            f.get(timeout=30)  # raises if the broker did not acknowledge
    finally:
        prod.close()
    return sent


def produce_raw(bootstrap: str, topic: str, records: Iterable[tuple[bytes | None, bytes | None]]) -> int:
    """Publish raw (key, value) records as they are: tests and tools that need bad input on the wire."""
    prod = producer(bootstrap)
    try:
        futures = [prod.send(topic, key=k, value=v) for k, v in records]
        prod.flush()
        for f in futures:
            f.get(timeout=30)
    finally:
        prod.close()
    return len(futures)


def read_all(bootstrap: str, topic: str, idle_s: float = 3.0, timeout_s: float = 60.0) -> list:
    """Every record of ``topic`` from the beginning, read without a group until ``idle_s`` pass without one."""
    c = consumer(bootstrap, None)
    try:
        parts = c.partitions_for_topic(topic) or set()
        c.assign([TopicPartition(topic, p) for p in parts])
        c.seek_to_beginning()
        out, last, start = [], time.monotonic(), time.monotonic()
        while time.monotonic() - last < idle_s and time.monotonic() - start < timeout_s:
            batch = c.poll(timeout_ms=300)
            for recs in batch.values():
                out += recs
                last = time.monotonic()
        return out
    finally:
        c.close()


def reset_group(bootstrap: str, topic: str, group_id: str, start: str) -> dict[int, int]:
    """Point ``group_id``'s committed offsets on ``topic`` at ``start``: "earliest" or an ISO-8601 time (the first
    record at or after it; partitions with none keep their committed offset). The group must have no live members.
    Returns the new offset per partition."""
    c = consumer(bootstrap, group_id)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or [])]
        if not tps:
            raise ValueError(f"topic {topic!r} does not exist")
        if start == "earliest":
            offsets = c.beginning_offsets(tps)
        else:
            t = datetime.fromisoformat(start)
            t = t.replace(tzinfo=UTC) if t.tzinfo is None else t
            found = c.offsets_for_times({tp: int(t.timestamp() * 1000) for tp in tps})
            offsets = {tp: o.offset for tp, o in found.items() if o is not None}
        c.assign(tps)
        c.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})
        return {tp.partition: off for tp, off in offsets.items()}
    finally:
        c.close()
