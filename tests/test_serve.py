"""The HTTP API on real Ray Serve, called over HTTP: endpoints, streaming, auth and tenant isolation, every bad-input
class (4xx, never 5xx), readiness, a bounded concurrent load, a fuzz run, overload (503) and a checkpoint rollout.

The store is filled through the same store-owner actor the server reads (an embedded qdrant-client directory) with
documents encoded by the tiny checkpoint: these tests are about the service, not answer quality.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")

from benchmarks.serve import batch_counts  # noqa: E402
from pipeline.config import ServeConfig  # noqa: E402
from pipeline.schemas import Document  # noqa: E402
from pipeline.store import collection_name  # noqa: E402
from workers.broker import free_port  # noqa: E402
from workers.messages import content_hash  # noqa: E402

KEYS = {"key-one": "t1", "key-two": "t2"}
H1 = {"Authorization": "Bearer key-one"}
H2 = {"Authorization": "Bearer key-two"}


def _docs() -> list[Document]:
    out = []
    for i in range(12):
        out.append(Document(id=f"s{i}", title=f"Story {i}", url=f"https://news.example/{i}",
                            text=f"Company Acme{i} appointed Person{i} as chief executive.",
                            published_at=datetime(2025, 1 + i % 12, 5, tzinfo=UTC),
                            source="wire" if i % 2 else "blog", tenant="t1" if i < 8 else "t2"))
    return out


def _fill(store, checkpoint) -> None:
    from pipeline.model.mac import MACModel

    model = MACModel.load(checkpoint)
    coll = collection_name(model.version)
    by_doc: dict[str, list] = {}
    for c in model.encode_documents(_docs()):
        by_doc.setdefault(c.modulation.doc_id, []).append(c)
    for d in _docs():
        store.upsert(coll, d, content_hash(d), by_doc[d.id])


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    from ray import serve

    from pipeline.cluster import init_ray
    from pipeline.store.actor import connect_store
    from serving.app import start

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_ray(num_cpus=2)
    cfg = ServeConfig(port=free_port(), checkpoint=str(tiny_checkpoint),
                      store=str(tmp_path_factory.mktemp("serve") / "store"), api_keys=KEYS, max_pending=64)
    _fill(connect_store(cfg.store_location()), tiny_checkpoint)
    start(cfg)
    base = f"http://127.0.0.1:{cfg.port}"
    first = []  # /ready as seen from the moment the app is up
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = requests.get(base + "/ready", timeout=10)
        first.append(r.status_code)
        if r.status_code == 200:
            break
        time.sleep(0.05)
    yield {"base": base, "cfg": cfg, "ready_seen": first}
    serve.shutdown()
    ray.shutdown()


def _wait_ready(server, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while requests.get(server["base"] + "/ready", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "not ready in time"
        time.sleep(0.1)


def _post(server, path, body, headers=H1, **kw):
    return requests.post(server["base"] + path, json=body, headers=headers, timeout=120, **kw)


def test_readiness_before_and_after_load(server, tmp_path) -> None:
    from ray import serve

    from serving.app import start

    seen = server["ready_seen"]
    assert seen[-1] == 200 and set(seen) <= {200, 503}
    health = requests.get(server["base"] + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["default_mode"] == server["cfg"].default_mode
    ready = requests.get(server["base"] + "/ready", timeout=10).json()
    assert ready["ready"] and ready["checkpoint"]
    prompt = hashlib.sha256((Path(server["cfg"].checkpoint) / "prompt.safetensors").read_bytes()).hexdigest()[:12]
    assert ready["answer_prompt"] == prompt  # the replica loaded the checkpoint's answer prompt (select+rag)
    # a replica whose model never loads: up (/health), not ready (/ready 503 with the reason), requests 503, never 500
    start(server["cfg"].model_copy(update={"checkpoint": str(tmp_path / "missing")}), name="broken",
          route_prefix="/broken")
    try:
        base = server["base"] + "/broken"
        assert requests.get(base + "/health", timeout=10).status_code == 200
        deadline = time.monotonic() + 30
        while (r := requests.get(base + "/ready", timeout=10)).json()["error"] is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert r.status_code == 503 and "no checkpoint" in r.json()["error"]
        r = requests.post(base + "/v1/answer", json={"question": "q"}, headers=H1, timeout=30)
        assert r.status_code == 503 and r.headers["Retry-After"] and "no checkpoint" in r.json()["error"]["message"]
    finally:
        serve.delete("broken")


def test_a_store_owned_by_another_process_is_a_503_with_the_reason(server, tmp_path) -> None:
    """Serve started on an embedded store that another process holds open: up, never ready, and every data endpoint
    answers 503 JSON naming the cause (it used to say ready and then 500 on every request)."""
    from ray import serve

    from pipeline.store.actor import StoreBusy
    from pipeline.store.edge import EdgeStore
    from serving.app import build_app, start

    held = EdgeStore(str(tmp_path / "held"))  # this process owns the directory now
    cfg = server["cfg"].model_copy(update={"store": str(tmp_path / "held")})
    try:
        with pytest.raises(StoreBusy, match="macstream up"):  # `serve` refuses at once, naming the fixes
            start(cfg, name="held", route_prefix="/held")
        serve.run(build_app(cfg), name="held", route_prefix="/held", blocking=False)  # past the check: the replica
        base = server["base"] + "/held"
        deadline = time.monotonic() + 60
        while (r := requests.get(base + "/ready", timeout=30)).json()["error"] is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert r.status_code == 503 and not r.json()["ready"] and "another process" in r.json()["error"]
        for path, body in (("/v1/answer", {"question": "Who leads Acme3?"}), ("/v1/memory/stats", None)):
            r = (requests.post(base + path, json=body, headers=H1, timeout=60) if body
                 else requests.get(base + path, headers=H1, timeout=60))
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert "another process" in r.json()["error"]["message"] and r.headers["Retry-After"]
    finally:
        serve.delete("held")
        held.close()


def test_default_mode_is_the_configured_best_mode(server) -> None:
    r = _post(server, "/v1/answer", {"question": "Who leads Acme3?", "max_new_tokens": 4})
    assert r.status_code == 200 and r.json()["mode"] == server["cfg"].default_mode == "select+rag@1"
    r = _post(server, "/v1/answer", {"question": "Who leads Acme3?", "max_new_tokens": 4, "context_docs": 2})
    assert r.status_code == 200 and r.json()["mode"] == "select+rag@2"  # the request's context_docs, the default's kind
    r = _post(server, "/v1/answer", {"question": "Who leads Acme3?", "max_new_tokens": 4, "mode": "mac"})
    assert r.status_code == 200 and r.json()["mode"] == "mac"
    r = _post(server, "/v1/chat/completions", {"model": "macstream", "max_tokens": 4,
                                               "messages": [{"role": "user", "content": "Who leads Acme3?"}]})
    assert r.status_code == 200 and r.json()["macstream"]["mode"] == "select+rag@1"


def test_a_bad_default_mode_is_refused_at_the_edge() -> None:
    with pytest.raises(ValueError, match="mode"):
        ServeConfig(default_mode="mac@1")
    assert ServeConfig(default_mode="rag@2").default_mode == "rag@2"


@pytest.mark.parametrize("mode", ["mac", "rag", "mac+rag", "select+rag", "base"])
def test_answer_in_every_mode_with_sources(server, mode) -> None:
    r = _post(server, "/v1/answer", {"question": "Who leads Acme3?", "mode": mode, "top_k": 4, "max_new_tokens": 6})
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out["answer"], str) and out["mode"] == mode and out["fallback"] is None
    assert set(out["timings"]) >= {"retrieve", "aggregate", "generate"}
    if mode == "base":
        assert out["sources"] == []
        return
    assert 1 <= len(out["sources"]) <= 4 and all(s["url"].startswith("https://") for s in out["sources"])
    weights = [s["weight"] for s in out["sources"]]
    if mode != "rag":  # the aggregator weighed the retrieved chunks: citation weights
        assert all(w is not None and w >= 0 for w in weights) and abs(sum(weights) - 1) < 1e-3
    else:
        assert weights == [None] * len(weights)


@pytest.mark.parametrize("mode", ["rag", "mac+rag", "select+rag"])
def test_context_docs_keeps_every_source_and_its_weight(server, mode) -> None:
    """Only one text enters the prompt, but all retrieved documents stay sources (and, for mac+rag, in the prefix)."""
    r = _post(server, "/v1/answer", {"question": "Who leads Acme3?", "mode": mode, "top_k": 4, "context_docs": 1,
                                      "max_new_tokens": 6})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["mode"] == f"{mode}@1" and out["fallback"] is None and len(out["sources"]) == 4
    if mode != "rag":
        assert abs(sum(s["weight"] for s in out["sources"]) - 1) < 1e-3


def test_tenant_isolation_and_auth(server) -> None:
    t1 = {f"s{i}" for i in range(8)}
    for _ in range(3):
        body = {"question": "Acme9 chief executive", "top_k": 10}
        ids = {s["id"] for s in _post(server, "/v1/answer", body).json()["sources"]}
        assert ids and ids <= t1
    ids = {s["id"]
           for s in _post(server, "/v1/answer", {"question": "Acme9", "top_k": 10}, headers=H2).json()["sources"]}
    assert ids and not ids & t1
    assert _post(server, "/v1/answer", {"question": "x", "tenant": "t2"}).status_code == 403
    assert _post(server, "/v1/answer", {"question": "x"}, headers={}).status_code == 401
    r = _post(server, "/v1/answer", {"question": "x"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert requests.get(server["base"] + "/health", timeout=10).status_code == 200  # open without a key
    assert requests.get(server["base"] + "/v1/memory/stats", timeout=10).status_code == 401


def test_filters_restrict_sources(server) -> None:
    body = {"question": "chief executive", "top_k": 10, "since": "2025-03-01T00:00:00Z",
            "until": "2025-06-30T00:00:00Z"}
    for s in _post(server, "/v1/answer", body).json()["sources"]:
        assert "2025-03-01" <= s["published_at"][:10] <= "2025-06-30"
    srcs = _post(server, "/v1/answer", {"question": "chief executive", "top_k": 10, "source": "wire"}).json()["sources"]
    assert srcs and all(int(s["id"][1:]) % 2 == 1 for s in srcs)
    out = _post(server, "/v1/answer", {"question": "x", "source": "no-such-source"}).json()
    assert out["sources"] == [] and out["fallback"]


def test_memory_stats_models_and_metrics(server) -> None:
    # each key sees its own tenant's share of the collection (t1: s0..s7, t2: s8..s11), never the other's
    stats = requests.get(server["base"] + "/v1/memory/stats", headers=H1, timeout=10).json()
    assert stats["documents"] == 8 and stats["newest_published_at"].startswith("2025-08-05")
    stats = requests.get(server["base"] + "/v1/memory/stats", headers=H2, timeout=10).json()
    assert stats["documents"] == 4 and stats["newest_published_at"].startswith("2025-12-05")
    models = requests.get(server["base"] + "/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["macstream"]
    text = requests.get(server["base"] + "/metrics", timeout=10).text
    assert "macstream_request_seconds_bucket" in text and "macstream_stage_seconds" in text


def test_openai_endpoints_and_streaming(server) -> None:
    ext = {"mode": "mac", "top_k": 3}
    chat = {"model": "macstream", "messages": [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Who leads Acme2?"}],
            "max_tokens": 8, "temperature": 0.2, "macstream": ext}
    out = _post(server, "/v1/chat/completions", chat).json()
    answer = out["choices"][0]["message"]["content"]
    assert out["object"] == "chat.completion" and out["macstream"]["sources"]
    comp = _post(server, "/v1/completions", {"model": "macstream", "prompt": "Who leads Acme2?", "max_tokens": 8,
                                             "macstream": ext}).json()
    assert comp["choices"][0]["text"] == answer  # same question, same memory, greedy
    with _post(server, "/v1/chat/completions", chat | {"stream": True}, stream=True) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["macstream"]["sources"] and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed.strip() == answer
    assert _post(server, "/v1/chat/completions", chat | {"model": "gpt-4"}).status_code == 404


def _lm_tokenizer(server):
    """The served LM's own tokenizer, found through the checkpoint's config (as the replica finds it)."""
    from transformers import AutoTokenizer

    from pipeline.model.weights import resolve_lm

    meta = json.loads((Path(server["cfg"].checkpoint) / "config.json").read_text())
    return AutoTokenizer.from_pretrained(resolve_lm(meta["model"]["lm"]))


def _expected_prompt(mode: str, question: str, sources: list[dict]) -> str:
    """The text prompt the replica builds, rebuilt from the sources it returned (the fixture's short documents are
    one window each, so a text in the prompt is the whole document)."""
    from pipeline.prompts import document_text, prompt_with

    docs = {d.id: d for d in _docs()}
    if mode == "rag":  # every retrieved document, in retrieval order (= the sources' order)
        texts = [document_text(docs[s["id"]]) for s in sources]
    elif mode == "select+rag":  # @1: the one document the aggregator weighs most
        texts = [document_text(docs[max(sources, key=lambda s: s["weight"])["id"]])]
    else:
        texts = []
    return prompt_with(mode, question, texts)


@pytest.mark.parametrize("mode,ext", [("base", {"mode": "base"}), ("mac", {"mode": "mac", "top_k": 3}),
                                      ("rag", {"mode": "rag", "top_k": 3}),
                                      ("select+rag", {"mode": "select+rag", "top_k": 3, "context_docs": 1})])
def test_usage_counts_the_prompt_fed_and_the_tokens_generated(server, mode, ext) -> None:
    """prompt_tokens is the text prompt (template, question, texts in the prompt) tokenized by the LM's tokenizer; the
    memory prefix of mac / select+rag adds no tokens. completion_tokens is what greedy decoding generated: a shorter
    max_tokens truncates the same answer to exactly that many tokens. /v1/answer carries the same counts."""
    tok = _lm_tokenizer(server)
    q = "Who leads Acme5?"
    full = _post(server, "/v1/completions", {"model": "macstream", "prompt": q, "max_tokens": 12, "macstream": ext})
    assert full.status_code == 200, full.text
    out = full.json()
    usage, sources = out["usage"], out["macstream"]["sources"]
    assert (mode == "base") == (not sources)
    assert usage["prompt_tokens"] == len(tok(_expected_prompt(mode, q, sources))["input_ids"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    n = usage["completion_tokens"]
    assert 0 <= n <= 12 and (n > 0) == bool(out["choices"][0]["text"])
    for k in (1, 3):
        short = _post(server, "/v1/completions", {"model": "macstream", "prompt": q, "max_tokens": k,
                                                  "macstream": ext}).json()["usage"]
        assert short == usage | {"completion_tokens": min(k, n), "total_tokens": usage["prompt_tokens"] + min(k, n)}
    answered = _post(server, "/v1/answer", {"question": q, "max_new_tokens": 12, **ext}).json()
    assert answered["usage"] == usage and answered["answer"] == out["choices"][0]["text"]
    if mode == "base":  # the base prompt is longer than mac's by the one-shot example; rag's by its texts
        mac = _post(server, "/v1/completions", {"model": "macstream", "prompt": q, "max_tokens": 1,
                                                "macstream": {"mode": "mac"}}).json()["usage"]
        assert mac["prompt_tokens"] < usage["prompt_tokens"]


def _events(server, path: str, body: dict) -> list:
    with _post(server, path, body, stream=True) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
        events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_streamed_usage_only_when_asked_in_a_last_chunk(server, path) -> None:
    """stream_options.include_usage: every chunk has usage null, and one last chunk before [DONE] has empty choices and
    the counts, equal to the unstreamed request's. Without it no chunk has a usage field (OpenAI's behaviour)."""
    ext = {"mode": "rag", "top_k": 2}
    body = {"model": "macstream", "max_tokens": 8, "macstream": ext}
    body |= ({"messages": [{"role": "user", "content": "Who leads Acme4?"}]} if "chat" in path
             else {"prompt": "Who leads Acme4?"})
    whole = _post(server, path, body).json()
    plain = _events(server, path, body | {"stream": True})
    assert plain and all("usage" not in c for c in plain) and all(c["choices"] for c in plain)
    counted = _events(server, path, body | {"stream": True, "stream_options": {"include_usage": True}})
    *chunks, last = counted
    assert last["choices"] == [] and last["usage"] == whole["usage"] and last["id"] == chunks[0]["id"]
    assert chunks and all(c["usage"] is None and c["choices"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    off = _events(server, path, body | {"stream": True, "stream_options": {"include_usage": False}})
    assert all("usage" not in c for c in off)
    r = _post(server, path, body | {"stream_options": {"include_usage": True}})  # not streaming: refused, as OpenAI
    assert r.status_code == 422 and r.json()["error"]["param"] == "stream_options", r.text


def test_the_openai_client_reads_usage(server) -> None:
    """The official OpenAI Python client against the API: usage on a chat completion and a completion, and the
    streamed usage chunk when it asks for one."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key="key-one", max_retries=0, timeout=120)
    ext = {"macstream": {"mode": "mac", "top_k": 3}}
    msgs = [{"role": "user", "content": "Who leads Acme6?"}]
    chat = client.chat.completions.create(model="macstream", messages=msgs, max_tokens=6, extra_body=ext)
    u = chat.usage
    assert u is not None and u.prompt_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    comp = client.completions.create(model="macstream", prompt="Who leads Acme6?", max_tokens=6, extra_body=ext)
    assert comp.usage == u and comp.choices[0].text == chat.choices[0].message.content
    chunks = list(client.chat.completions.create(model="macstream", messages=msgs, max_tokens=6, extra_body=ext,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == u
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]).strip() == chat.choices[0].message.content


BAD = [
    ({"question": ""}, "question"), ({"question": "   "}, "question"), ({"question": "x" * 5000}, "question"),
    ({"question": "q", "top_k": 0}, "top_k"), ({"question": "q", "top_k": 65}, "top_k"),
    ({"question": "q", "since": "yesterday"}, "since"), ({"question": "q", "mode": "magic"}, "mode"),
    ({"question": "q", "since": "2025-02-01T00:00:00Z", "until": "2025-01-01T00:00:00Z"}, "until"),
    ({"question": 5}, "question"), ({"question": "q", "max_new_tokens": 0}, "max_new_tokens"),
    ({"question": "q", "colour": "red"}, "colour"), ({}, "question"), ([1, 2], None),
    ({"question": "q", "mode": "mac", "context_docs": 1}, "context_docs"),
    ({"question": "q", "mode": "rag", "context_docs": 0}, "context_docs"),
]


@pytest.mark.parametrize("body,field", BAD)
def test_bad_answer_requests_are_4xx_naming_the_field(server, body, field) -> None:
    r = _post(server, "/v1/answer", body)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    if field:
        assert field in err["message"] or field == err["param"], err


def test_malformed_json_and_bad_chat_bodies(server) -> None:
    r = requests.post(server["base"] + "/v1/answer", data=b"{not json",
                      headers=H1 | {"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"]
    for body in ({"model": "macstream", "messages": []},
                 {"model": "macstream", "messages": [{"role": "user", "content": " "}]},
                 {"model": "macstream", "messages": [{"role": "wizard", "content": "hi"}]},
                 {"model": "macstream", "prompt": "q", "n": 3},
                 {"model": "macstream", "messages": [{"role": "user", "content": "q"}],
                  "macstream": {"mode": "mac", "bogus": 1}}):
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        assert 400 <= _post(server, path, body).status_code < 500, body


def test_concurrent_load_completes_without_errors(server) -> None:
    bodies = [{"question": f"Who leads Acme{i % 12}?", "mode": ["mac", "base", "rag", "mac+rag"][i % 4],
               "max_new_tokens": 4} for i in range(200)]
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda b: _post(server, "/v1/answer", b).status_code, bodies))
    assert codes == [200] * 200
    text = requests.get(server["base"] + "/metrics", timeout=10).text
    sizes = [line for line in text.splitlines() if line.startswith("macstream_batch_size_count")]
    assert sizes and float(sizes[0].split()[-1]) >= 200


def test_concurrent_clients_share_batches(server) -> None:
    """Batching works: 8 closed-loop clients are answered in shared batches (a mean of 1 means no batching). The tiny
    model answers too fast to provoke the half-batch pattern reliably; `macstream bench serve` is where that shows."""
    def client(i: int) -> None:
        for r in range(6):
            assert _post(server, "/v1/answer", {"question": f"Who leads Acme{(i + r) % 12}?", "mode": "mac",
                                                "max_new_tokens": 4}).status_code == 200

    s0, c0 = batch_counts(server["base"])
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(client, range(8)))
    s1, c1 = batch_counts(server["base"])
    assert c1 - c0 == 48
    assert (s1 - s0) / (c1 - c0) > 4.5, f"mean batch size {(s1 - s0) / (c1 - c0):.2f} for 8 concurrent clients"


_value = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                   st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30),
                   st.lists(st.integers(), max_size=3))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(["question", "mode", "top_k", "since", "until", "source", "tenant",
                                             "max_new_tokens", "model", "messages", "prompt", "stream", "macstream",
                                             "zz"]),
                            _value, max_size=6),
       path=st.sampled_from(["/v1/answer", "/v1/chat/completions", "/v1/completions"]))
def test_fuzz_never_5xx(server, body, path) -> None:
    if isinstance(body.get("max_new_tokens"), int) or isinstance(body.get("top_k"), int):
        body = {k: v for k, v in body.items() if k not in ("max_new_tokens",)}  # keep valid fuzz requests short
    r = _post(server, path, body)
    assert r.status_code < 500, (path, body, r.status_code, r.text)


def test_overload_is_503_with_retry_after_and_rollout_drops_nothing(server, tiny_checkpoint, tmp_path, tokenizer,
                                                                     minilm) -> None:
    # overload: a service that admits 1 request at a time (its own app, beside the main one) turns the rest away
    from ray import serve

    from serving.app import start

    small = server["cfg"].model_copy(update={"max_pending": 1})
    start(small, name="small", route_prefix="/small")
    try:
        with ThreadPoolExecutor(8) as pool:
            rs = list(pool.map(lambda i: _post(server, "/small/v1/answer",
                                               {"question": f"q{i}", "max_new_tokens": 24, "mode": "rag"}), range(8)))
    finally:
        serve.delete("small")
    codes = [r.status_code for r in rs]
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}
    assert all(r.headers.get("Retry-After") for r in rs if r.status_code == 503)

    # rollout: a second checkpoint goes live in place while a client keeps asking; every request succeeds
    from conftest import tiny_config

    from pipeline.model.mac import MACModel
    from pipeline.store.actor import connect_store

    old = requests.get(server["base"] + "/ready", timeout=10).json()["checkpoint"]
    import torch

    torch.manual_seed(11)
    ckpt2 = tmp_path / "ckpt2"
    base_model = MACModel.load(tiny_checkpoint)
    MACModel(tiny_config(lm=base_model.cfg.lm), lm=base_model.lm, encoder=minilm).save(ckpt2)
    _fill(connect_store(server["cfg"].store_location()), ckpt2)
    results, stop = [], []

    def client():
        while not stop:
            results.append(_post(server, "/v1/answer",
                                 {"question": "Who leads Acme1?", "max_new_tokens": 4}).status_code)

    with ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(client) for _ in range(2)]
        time.sleep(1)
        start(server["cfg"].model_copy(update={"checkpoint": str(ckpt2)}))
        deadline = time.monotonic() + 60
        while (requests.get(server["base"] + "/ready", timeout=10).json()["checkpoint"] == old
               and time.monotonic() < deadline):
            time.sleep(0.2)
        time.sleep(1)
        stop.append(True)
        for f in futs:
            f.result()
    new = requests.get(server["base"] + "/ready", timeout=10).json()["checkpoint"]
    assert new != old and results and set(results) == {200}
    out = _post(server, "/v1/answer", {"question": "Who leads Acme1?", "max_new_tokens": 4}).json()
    assert out["checkpoint"] == new and out["sources"]  # it reads its own checkpoint's collection

