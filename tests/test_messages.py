"""The Kafka message contract: every class of bad input is a PoisonMessage with a reason; no input crashes parsing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.schemas import Document
from workers.messages import Delete, PoisonMessage, Upsert, content_hash, encode, parse


def _v(obj) -> bytes:
    return json.dumps(obj).encode()


def test_document_round_trip_and_hash_ignores_key_order() -> None:
    doc = Document(id="a", text="Acme hired Bo.", title="T", source="wire", tenant="t1")
    key, value = encode(doc)
    op = parse(key, value)
    assert isinstance(op, Upsert) and op.doc == doc
    shuffled = json.dumps(dict(reversed(list(json.loads(value).items())))).encode()
    assert parse(key, shuffled).content_hash == op.content_hash == content_hash(doc)
    assert parse(key, _v({"id": "a", "text": "Acme hired Cy."})).content_hash != op.content_hash


def test_deletes_by_op_and_by_tombstone() -> None:
    assert parse(b"a", _v({"id": "a", "op": "delete"})) == Delete("a")
    assert parse(b"a", None) == Delete("a")
    assert parse(None, _v({"id": "a", "op": "delete", "tenant": "t"})) == Delete("a")


@pytest.mark.parametrize("key,value,kind", [
    (b"a", b"{not json", "invalid_json"),
    (b"a", b"\xff\xfe", "invalid_json"),
    (b"a", _v([1, 2]), "wrong_type"),
    (b"a", _v("text"), "wrong_type"),
    (b"a", _v({"text": "no id"}), "missing_id"),
    (b"a", _v({"id": 5, "text": "x"}), "missing_id"),
    (b"a", _v({"id": "a"}), "missing_text"),
    (b"a", _v({"id": "a", "text": "   "}), "missing_text"),
    (b"a", _v({"id": "a", "text": 5}), "missing_text"),
    (b"a", _v({"id": "a", "text": "x", "published_at": "yesterday"}), "invalid_document"),
    (b"a", _v({"id": "a", "text": "x", "colour": "red"}), "invalid_document"),
    (b"a", _v({"id": "a", "op": "merge"}), "unknown_op"),
    (b"a", _v({"id": "a", "op": "delete", "text": "x"}), "invalid_document"),
    (b"b", _v({"id": "a", "text": "x"}), "key_mismatch"),
    (None, None, "bad_tombstone"),
    (b"\xff", _v({"id": "a", "text": "x"}), "bad_key"),
    (b"a", _v({"id": "a", "text": "x" * 5000}), "oversize"),
])
def test_every_poison_class_has_a_kind_and_a_reason(key, value, kind) -> None:
    with pytest.raises(PoisonMessage) as err:
        parse(key, value, max_bytes=4096)
    assert err.value.kind == kind and err.value.reason


@settings(max_examples=400, deadline=None)
@given(key=st.one_of(st.none(), st.binary(max_size=40)), value=st.one_of(st.none(), st.binary(max_size=400)))
def test_arbitrary_bytes_never_crash(key, value) -> None:
    try:
        op = parse(key, value)
    except PoisonMessage as err:
        assert err.kind and err.reason
    else:
        assert isinstance(op, (Upsert, Delete))


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
                     max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(obj=st.dictionaries(
    st.sampled_from(["id", "text", "op", "title", "published_at", "source", "url", "tenant", "x"]), _json, max_size=8))
def test_arbitrary_json_objects_never_crash(obj) -> None:
    key = obj["id"].encode() if isinstance(obj.get("id"), str) else None
    try:
        op = parse(key, json.dumps(obj).encode())
    except PoisonMessage as err:
        assert err.kind and err.reason
    else:
        assert op.doc_id == obj["id"]
