"""The Kafka message contract, parsed the same way everywhere (producer, consumer, tests).

- key: the document id (UTF-8). Keyed messages of one document land in one partition, so their order holds.
- value: JSON ``{id, text, title?, published_at?, source?, url?, tenant?}`` (a :class:`~pipeline.schemas.Document`),
  or ``{"id": ..., "op": "delete"}``; ``"op": "upsert"`` may be given explicitly.
- a null value (tombstone) deletes the document named by the key.

:func:`parse` never raises anything but :class:`PoisonMessage`, whose ``reason`` is one line naming what is wrong;
the consumer routes such messages to the dead-letter topic and keeps the partition flowing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from pydantic import ValidationError

from pipeline.schemas import Document

DEFAULT_MAX_MESSAGE_BYTES = 1 << 20


class PoisonMessage(ValueError):
    """A message that can never be ingested. ``kind`` is a short machine-readable class, ``reason`` a sentence."""

    def __init__(self, kind: str, reason: str):
        super().__init__(f"{kind}: {reason}")
        self.kind, self.reason = kind, reason


@dataclass(frozen=True)
class Upsert:
    doc: Document
    content_hash: str

    @property
    def doc_id(self) -> str:
        return self.doc.id


@dataclass(frozen=True)
class Delete:
    doc_id: str


def content_hash(doc: Document) -> str:
    """sha256 of the document's canonical JSON: equal for equal content, whatever the key order on the wire."""
    canon = json.dumps(doc.model_dump(mode="json"), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def _key(key: bytes | None) -> str | None:
    if key is None:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        raise PoisonMessage("bad_key", "key is not UTF-8") from None


def parse(key: bytes | None, value: bytes | None, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Upsert | Delete:
    """Kafka (key, value) → the operation it asks for. Raises :class:`PoisonMessage` for anything else."""
    k = _key(key)
    if value is None:
        if not k:
            raise PoisonMessage("bad_tombstone", "tombstone (null value) without a key: no document to delete")
        return Delete(k)
    if len(value) > max_bytes:
        raise PoisonMessage("oversize", f"message is {len(value)} bytes, the limit is {max_bytes}")
    try:
        obj = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise PoisonMessage("invalid_json", f"value is not JSON: {err}") from None
    if not isinstance(obj, dict):
        raise PoisonMessage("wrong_type", f"value must be a JSON object, got {type(obj).__name__}")
    op = obj.pop("op", "upsert")
    if op not in ("upsert", "delete"):
        raise PoisonMessage("unknown_op", f"op must be 'upsert' or 'delete', got {str(op)[:50]!r}")
    doc_id = obj.get("id")
    if not isinstance(doc_id, str) or not doc_id:
        raise PoisonMessage("missing_id", "field 'id' must be a non-empty string")
    if k is not None and k != doc_id:
        # a key that is not the id breaks per-document ordering (partitioning is by key): refuse it loudly
        raise PoisonMessage("key_mismatch", f"key {k[:80]!r} differs from id {doc_id[:80]!r}")
    if op == "delete":
        extra = set(obj) - {"id", "tenant"}
        if extra:
            raise PoisonMessage("invalid_document", f"a delete carries only 'id' (and 'tenant'), got {sorted(extra)}")
        return Delete(doc_id)
    try:
        doc = Document.model_validate(obj)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "<root>"
        kind = "missing_text" if field == "text" else "invalid_document"
        more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise PoisonMessage(kind, f"{field}: {first['msg']}" + more) from None
    return Upsert(doc, content_hash(doc))


def encode(doc: Document) -> tuple[bytes, bytes]:
    """Document → (key, value) as the producer writes them."""
    return doc.id.encode(), doc.model_dump_json(exclude_none=True).encode()
