"""Live feeds in: the poller against a local news site (real HTTP on 127.0.0.1, recorded feeds and pages under
tests/fixtures/feeds/, written for these tests) and the real local Kafka-protocol broker. No internet.

Covered: RSS 2.0, Atom and JSON Feed parsing; stable ids; politeness (per-host delay, robots.txt, retries, 304s);
a feed that changes between polls (new story, changed story → update, changed entry with the same page → nothing);
a restart (nothing lost, nothing twice); every bad input counted, dead-lettered with its reason, the poller going
on; the `macstream feeds` command; and end to end, `macstream up --feeds` answering about a story that appeared in a
feed, citing its URL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from benchmarks.feed_server import FeedSite, Story, article, rss
from pipeline.config import FeedsConfig
from workers import kafka_io
from workers.broker import LocalBroker, free_port
from workers.feed_parse import FeedError, canonical_link, parse_feed, story_id
from workers.feeds import FeedPoller, read_sources
from workers.fetch import FetchError, PoliteFetcher

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "feeds"
PAGES = {"/news/quillon-ceo.html": "quillon-ceo.html", "/news/harbor-bridge.html": "harbor-bridge.html",
         "/herald/cider-prize.html": "cider-prize.html", "/troubled/empty.html": "empty.html"}


def _fixture(name: str, base: str) -> str:
    return (FIXTURES / name).read_text().replace("{base}", base)


def _publish(site: FeedSite) -> None:
    """The recorded feeds and pages; the troubled feed's pages fail each their own way."""
    site.put("/gazette.xml", _fixture("gazette-rss.xml", site.base), "application/rss+xml")
    site.put("/herald/atom.xml", _fixture("herald-atom.xml", site.base), "application/atom+xml")
    site.put("/troubled.xml", _fixture("bad-items-rss.xml", site.base), "application/rss+xml")
    site.put("/broken.xml", _fixture("broken.xml", site.base), "application/xml")
    for path, name in PAGES.items():
        site.put(path, _fixture(f"pages/{name}", site.base))
    slow = _fixture("pages/harbor-bridge.html", site.base).replace("Harbor", "Slow")
    site.put("/troubled/slow.html", slow, delay=2.5)
    site.put("/troubled/huge.html", "<html><body><article><p>" + "many words " * 20000 + "</p></article></body></html>")
    # /troubled/gone.html is not published: 404


@pytest.fixture
def site():
    with FeedSite() as s:
        _publish(s)
        yield s


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with LocalBroker(log_dir=tmp_path_factory.mktemp("broker-logs")) as b:
        yield b


def _cfg(site: FeedSite, broker: LocalBroker, tmp_path: Path, paths: list[str], **kw) -> FeedsConfig:
    topic = kw.pop("topic", f"feeds-{time.time_ns():x}")
    base = dict(per_host_delay=0.0, timeout=2.0, retries=0, backoff=0.05, state_dir=str(tmp_path / "state"))
    return FeedsConfig(sources=[site.url(p) for p in paths], topic=topic, bootstrap_servers=broker.bootstrap,
                       **(base | kw))


def _records(broker: LocalBroker, topic: str) -> list:
    return kafka_io.read_all(broker.bootstrap, topic, idle_s=1.0, timeout_s=30)


def _counts(**kw) -> dict:
    return {"seen": 0, "new": 0, "updated": 0, "unchanged": 0, "failed": 0, "dead_lettered": 0} | kw


def _docs(broker: LocalBroker, topic: str) -> list[dict]:
    return [json.loads(r.value) for r in _records(broker, topic)]


# ---- parsing and ids (pure logic) ---------------------------------------------------------------------------------
def test_ids_are_stable_over_tracking_parameters_fragments_and_case() -> None:
    a = story_id("https://News.Example.com:443/a/b.html?utm_source=rss&utm_medium=x#comments")
    assert a == story_id("https://news.example.com/a/b.html") and a.startswith("feed-") and len(a) == 37
    assert a != story_id("https://news.example.com/a/c.html")
    assert canonical_link("http://ex.com/p?b=2&a=1#x") == canonical_link("http://ex.com/p?a=1&b=2")


def test_rss_atom_and_json_feeds_parse_and_a_broken_one_is_refused() -> None:
    base = "http://127.0.0.1:1"
    g = parse_feed(_fixture("gazette-rss.xml", base).encode(), base + "/gazette.xml", "application/rss+xml")
    assert [e.link for e in g] == [base + "/news/quillon-ceo.html", base + "/news/harbor-bridge.html"]  # utm_ dropped
    assert g[0].published_at == datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    assert g[0].title == "Quillon Labs names Mara Castell chief executive"
    h = parse_feed(_fixture("herald-atom.xml", base).encode(), base + "/herald/atom.xml", "application/atom+xml")
    assert [e.link for e in h] == [base + "/herald/cider-prize.html"]  # a relative link, resolved against the feed
    bad = parse_feed(_fixture("bad-items-rss.xml", base).encode(), base + "/troubled.xml")
    assert bad[0].link is None and bad[0].id is None and bad[0].guid == "troubled-no-link-1"
    jf = {"version": "https://jsonfeed.org/version/1.1", "title": "Wire", "items": [
        {"id": "w1", "url": base + "/wire/1.html", "title": "One", "date_published": "2026-12-01T10:00:00+01:00"},
        {"id": "w2", "title": "No link"}]}
    j = parse_feed(json.dumps(jf).encode(), base + "/wire.json", "application/feed+json")
    assert [e.link for e in j] == [base + "/wire/1.html", None]
    assert j[0].published_at == datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    for body, ctype in ((_fixture("broken.xml", base).encode(), "text/html"), (b'{"status": "ok"}', "application/json"),
                        (b"\x00\x01garbage", ""), (b"{not json", "application/json")):
        with pytest.raises(FeedError) as err:
            parse_feed(body, base + "/x", ctype)
        assert err.value.kind == "invalid_feed"
    # the fingerprint follows what the feed says about an item
    changed = parse_feed(_fixture("gazette-rss.xml", base).replace("picked its former", "chose its former").encode(),
                         base + "/gazette.xml")
    assert changed[0].fingerprint != g[0].fingerprint and changed[1].fingerprint == g[1].fingerprint


def test_sources_are_a_url_or_a_file_of_urls(tmp_path) -> None:
    assert read_sources("https://ex.com/feed.xml") == ["https://ex.com/feed.xml"]
    f = tmp_path / "feeds.txt"
    f.write_text("# my feeds\nhttps://a.example/rss\n\n  https://b.example/atom.xml  \n")
    assert read_sources(str(f)) == ["https://a.example/rss", "https://b.example/atom.xml"]
    for bad in (str(tmp_path / "missing.txt"), "ftp://ex.com/feed"):
        with pytest.raises(ValueError):
            read_sources(bad)
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no feed URL"):
        read_sources(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="not an http"):
        FeedsConfig(sources=["file:///etc/passwd"], topic="t")


# ---- politeness over real HTTP -------------------------------------------------------------------------------------
def test_fetcher_spaces_requests_per_host_obeys_robots_retries_and_caps(site) -> None:
    site.put("/robots.txt", "User-agent: *\nDisallow: /private/\n", "text/plain")
    site.put("/private/secret.html", "<p>secret</p>")
    site.put("/flaky.html", "<p>fine now</p>", statuses=[503, 503])
    f = PoliteFetcher("macstream-test", timeout=1.0, per_host_concurrency=1, per_host_delay=0.5, retries=2,
                      backoff=0.05)
    with pytest.raises(FetchError) as err:
        f.get(site.url("/private/secret.html"), 1 << 20)
    assert err.value.kind == "robots_disallowed" and not site.requests_to("/private/secret.html")
    threads = [threading.Thread(target=f.get, args=(site.url(p), 1 << 20)) for p in PAGES]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    starts = sorted(h.at for h in site.hits if h.path in PAGES)
    assert len(starts) == len(PAGES)
    assert all(b - a >= 0.35 for a, b in zip(starts, starts[1:])), starts  # one host: 0.5 s apart (less jitter)
    assert all(h.user_agent == "macstream-test" for h in site.hits)
    r = f.get(site.url("/flaky.html"), 1 << 20)  # 503, 503, then 200
    assert r.body == b"<p>fine now</p>" and [h.status for h in site.requests_to("/flaky.html")] == [503, 503, 200]
    first = f.get(site.url("/gazette.xml"), 1 << 20)
    again = f.get(site.url("/gazette.xml"), 1 << 20, etag=first.headers["etag"])
    assert first.status == 200 and again.status == 304 and again.body == b""
    with pytest.raises(FetchError) as err:
        f.get(site.url("/troubled/huge.html"), 64 * 1024)
    assert err.value.kind == "too_large"
    t0 = time.monotonic()
    with pytest.raises(FetchError) as err:
        f.get(site.url("/troubled/slow.html"), 1 << 20)
    assert err.value.kind == "timeout" and time.monotonic() - t0 < 2.5  # 1 s, after the host's 0.5 s spacing
    with pytest.raises(FetchError) as err:
        f.get(site.url("/troubled/gone.html"), 1 << 20)
    assert err.value.kind == "http_404" and not err.value.transient
    assert len(site.requests_to("/robots.txt")) == 1  # read once per host


# ---- the poller against the real broker ----------------------------------------------------------------------------
@pytest.mark.slow
def test_changes_between_polls_are_produced_once_each_and_a_restart_duplicates_nothing(site, broker, tmp_path) -> None:
    cfg = _cfg(site, broker, tmp_path, ["/gazette.xml", "/herald/atom.xml"])
    poller = FeedPoller(cfg).open()
    try:
        assert poller.poll_once() == _counts(seen=3, new=3)
        docs = {d["id"]: d for d in _docs(broker, cfg.topic)}
        q = docs[story_id(site.url("/news/quillon-ceo.html"))]
        assert q["url"] == site.url("/news/quillon-ceo.html")  # canonical: the feed's utm_ parameters are gone
        assert q["title"] == "Quillon Labs names Mara Castell chief executive" and q["source"] == "127.0.0.1"
        assert q["published_at"].startswith("2026-12-01T09:00:00")
        assert "Mara Castell will become its chief executive" in q["text"]
        assert "Sign in" not in q["text"] and "All rights reserved" not in q["text"]  # navigation and footer dropped
        assert {d["url"] for d in docs.values()} == {site.url(p) for p in PAGES if not p.startswith("/troubled")}

        # unchanged feeds: 304 (ETag), no page fetched again, nothing produced
        assert poller.poll_once()["new"] == 0
        assert [h.status for h in site.requests_to("/gazette.xml")] == [200, 304]
        assert [h.status for h in site.requests_to("/herald/atom.xml")] == [200, 304]
        assert len(site.requests_to("/news/quillon-ceo.html")) == 1

        # the feed changes: a new story; a corrected story (its entry and its page); an entry whose page is the same
        ferry = Story("Osterby ferry line resumes after the storm", site.url("/news/ferry.html"),
                      datetime(2026, 12, 1, 11, 0, tzinfo=UTC), "Boats run again.")
        site.put("/news/ferry.html", article(ferry.title, [
            "The ferry line between Osterby and Lundholm resumed on Tuesday, a week after a storm damaged its pier.",
            "The operator said boats would run every forty minutes until the new pier opens in spring."]))
        ferry_item = (f"<item><title>{ferry.title}</title><link>{ferry.link}</link><guid>gazette-ferry</guid>"
                      "<pubDate>Tue, 01 Dec 2026 11:00:00 GMT</pubDate><description>Boats run again.</description>"
                      "</item>")
        gazette = (_fixture("gazette-rss.xml", site.base)
                   .replace("The battery start-up picked", "Updated: the battery start-up picked")
                   .replace("Traffic returned to the city's oldest crossing", "Traffic is back on the oldest crossing")
                   .replace("<item>", ferry_item + "<item>", 1))
        site.put("/gazette.xml", gazette, "application/rss+xml")
        site.put("/news/quillon-ceo.html", _fixture("pages/quillon-ceo.html", site.base)
                 .replace("on January 4", "on January 11 (corrected)"))
        assert poller.poll_once() == _counts(seen=3, new=1, updated=1, unchanged=1)
        assert len(site.requests_to("/news/harbor-bridge.html")) == 2  # fetched again, gave the same document
    finally:
        poller.close()

    # a restart, with a story published while the poller was down
    site.put("/herald/atom.xml", _fixture("herald-atom.xml", site.base).replace("<entry>", (
        "<entry><title>Brisk Valley school opens a cider science class</title><link href=\"/herald/class.html\"/>"
        "<id>urn:uuid:herald-class</id><published>2026-12-01T12:00:00Z</published><updated>2026-12-01T12:00:00Z"
        "</updated></entry><entry>"), 1), "application/atom+xml")
    site.put("/herald/class.html", article("Brisk Valley school opens a cider science class", [
        "The Brisk Valley secondary school will teach a class on fermentation and orchard science from January.",
        "The winning cooperative's cellar master, Tomas Eberle, will teach two of the lessons."]))
    again = FeedPoller(cfg).open()
    try:
        assert again.poll_once() == _counts(seen=2, new=1)
        assert [h.status for h in site.requests_to("/gazette.xml")][-1] == 304  # validators survived the restart
        assert again.poll_once()["new"] == 0
    finally:
        again.close()
    records = _records(broker, cfg.topic)
    pairs = Counter((r.key.decode(), json.loads(r.value)["text"]) for r in records)
    assert len(records) == 6 and max(pairs.values()) == 1  # 5 stories + 1 update; no (story, content) twice
    quillon = story_id(site.url("/news/quillon-ceo.html"))
    versions = [json.loads(r.value)["text"] for r in records if r.key.decode() == quillon]
    assert len(versions) == 2 and "January 11 (corrected)" in versions[-1]


@pytest.mark.slow
def test_every_bad_input_is_counted_dead_lettered_and_the_poller_goes_on(site, broker, tmp_path) -> None:
    cfg = _cfg(site, broker, tmp_path, ["/troubled.xml", "/broken.xml", "/gazette.xml"], timeout=1.0,
               max_page_bytes=64 * 1024, item_attempts=2, metrics_port=0)
    poller = FeedPoller(cfg).open()
    try:
        t0 = time.monotonic()
        got = poller.poll_once()
        assert time.monotonic() - t0 < 10  # the slow page cost its timeout, not the poll
        assert got == _counts(seen=7, new=2, failed=5, dead_lettered=6)
        dlq = _records(broker, kafka_io.dlq_topic(cfg.topic))
        kinds = Counter(dict(r.headers)["macstream.error"].decode() for r in dlq)
        assert kinds == {"missing_link": 1, "http_404": 1, "timeout": 1, "too_large": 1, "no_text": 1,
                         "invalid_feed": 1}
        for r in dlq:
            h = {k: v.decode() for k, v in r.headers}
            assert h["macstream.stage"] == "feeds" and h["macstream.reason"]
            if h["macstream.error"] == "timeout":
                assert json.loads(r.value)["url"] == site.url("/troubled/slow.html") and h["macstream.attempt"] == "1"
                assert r.key.decode() == story_id(site.url("/troubled/slow.html"))
        snap = poller.snapshot()["feeds"]
        assert snap[site.url("/troubled.xml")]["failed"] == {"missing_link": 1, "http_404": 1, "timeout": 1,
                                                            "too_large": 1, "no_text": 1}
        assert snap[site.url("/broken.xml")]["feed_errors"] == {"invalid_feed": 1}
        assert snap[site.url("/gazette.xml")]["new"] == 2 and snap[site.url("/gazette.xml")]["last_success"]
        metrics = requests.get(f"http://127.0.0.1:{poller.metrics_port}/metrics", timeout=10).text
        troubled = site.url("/troubled.xml")
        assert f'macstream_feed_items_failed_total{{feed="{troubled}",kind="no_text"}} 1.0' in metrics
        assert f'macstream_feed_errors_total{{feed="{site.url("/broken.xml")}",kind="invalid_feed"}} 1.0' in metrics
        assert f'macstream_feed_items_new_total{{feed="{site.url("/gazette.xml")}"}} 2.0' in metrics
        assert "macstream_feed_fetch_seconds_bucket" in metrics and "macstream_feed_last_success_timestamp" in metrics

        # the slow page is fast now: its retry (a passing failure) produces it; the final failures and the broken
        # body are not dead-lettered again
        site.put("/troubled/slow.html", _fixture("pages/harbor-bridge.html", site.base).replace("Harbor", "Slow"))
        got = poller.poll_once()
        assert got == _counts(seen=5, new=1)
        assert len(_records(broker, kafka_io.dlq_topic(cfg.topic))) == 6
        assert poller.snapshot()["feeds"][site.url("/broken.xml")]["feed_errors"] == {"invalid_feed": 2}
        ids = [r.key.decode() for r in _records(broker, cfg.topic)]
        assert sorted(ids) == sorted({story_id(site.url(p)) for p in
                                      ("/news/quillon-ceo.html", "/news/harbor-bridge.html", "/troubled/slow.html")})
        assert poller.snapshot()["poll_errors"] == 0
    finally:
        poller.close()


@pytest.mark.slow
def test_a_transient_failure_is_retried_item_attempts_times_then_waits_for_the_entry_to_change(site, broker,
                                                                                               tmp_path) -> None:
    cfg = _cfg(site, broker, tmp_path, ["/troubled.xml"], timeout=0.5, item_attempts=2, max_page_bytes=64 * 1024)
    poller = FeedPoller(cfg).open()
    try:
        for _ in range(3):
            poller.poll_once()
        assert len(site.requests_to("/troubled/slow.html")) == 2  # two attempts, then given up
        assert [h.status for h in site.requests_to("/troubled.xml")][-1] == 304  # validators kept once given up
        assert len(site.requests_to("/troubled/gone.html")) == 1  # a 404 is final: fetched once
    finally:
        poller.close()
    attempts = [dict(r.headers)["macstream.attempt"] for r in _records(broker, kafka_io.dlq_topic(cfg.topic))
                if dict(r.headers)["macstream.error"] == b"timeout"]
    assert attempts == [b"1", b"2"]


@pytest.mark.slow
def test_feeds_command_polls_until_sigterm_and_refuses_bad_sources(site, broker, tmp_path) -> None:
    env = dict(os.environ, MACSTREAM_FEEDS_PER_HOST_DELAY="0", PYTHONUNBUFFERED="1")
    bad = subprocess.run([sys.executable, "-m", "macstream.cli", "feeds", str(tmp_path / "none.txt"), "--topic", "t"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "neither an http(s) URL nor a file" in bad.stderr
    sources = tmp_path / "feeds.txt"
    sources.write_text(f"# test feeds\n{site.url('/gazette.xml')}\n{site.url('/herald/atom.xml')}\n")
    topic = f"cli-{time.time_ns():x}"
    proc = subprocess.Popen([sys.executable, "-m", "macstream.cli", "feeds", str(sources), "--topic", topic,
                             "--bootstrap-servers", broker.bootstrap, "--interval", "0.5", "--state-dir",
                             str(tmp_path / "state")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        started = json.loads(proc.stdout.readline() or "{}")
        assert started.get("feeds") == 2 and started["topic"] == topic, proc.stderr.read()[-2000:]
        deadline = time.monotonic() + 60
        while len(_records(broker, topic)) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(site.requests_to("/gazette.xml")) >= 2  # polled more than once
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    snap = json.loads(out)
    assert snap["new"] == 3 and snap["polls"] >= 2 and snap["poll_errors"] == 0
    assert len(_records(broker, topic)) == 3


# ---- end to end: `macstream up --feeds` ------------------------------------------------------------------------------
@pytest.mark.slow
def test_up_with_feeds_answers_about_a_story_that_appeared_in_a_feed_citing_its_url(site, tiny_checkpoint,
                                                                                    tmp_path) -> None:
    sources = tmp_path / "feeds.txt"
    sources.write_text(site.url("/gazette.xml") + "\n")
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               MACSTREAM_FEEDS_PER_HOST_DELAY="0", MACSTREAM_FEEDS_STATE_DIR=str(tmp_path / "feeds-state"))
    proc = subprocess.Popen([sys.executable, "-m", "macstream.cli", "up", "--topic", "news", "--port", str(port),
                             "--store", str(tmp_path / "store"), "--checkpoint", str(tiny_checkpoint),
                             "--feeds", str(sources), "--feeds-interval", "1"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"

    def wait(check, timeout: float, what: str, last=None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got = check()
            except requests.RequestException:
                got = None
            if got:
                return got
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}" + (f"; last answer: {last}" if last else ""))

    try:
        started = json.loads(proc.stdout.readline() or "{}")
        assert started.get("url") == base, proc.stderr.read()[-3000:] if not started else started
        wait(lambda: requests.get(base + "/ready", timeout=5).status_code == 200, 180, "/ready")
        wait(lambda: requests.get(base + "/v1/memory/stats", timeout=10).json().get("documents") == 2, 120,
             "the feed's two stories in memory")
        # a story appears in the feed; the memory has it within the poll interval + ingest
        ferry = Story("Osterby ferry line resumes after the storm", site.url("/news/ferry.html"),
                      datetime(2026, 12, 1, 11, 0, tzinfo=UTC))
        site.put("/news/ferry.html", article(ferry.title, [
            "The ferry line between Osterby and Lundholm resumed on Tuesday, a week after a storm damaged its pier.",
            "The operator said boats would run every forty minutes until the new pier opens in spring."]))
        old = parse_feed(_fixture("gazette-rss.xml", site.base).encode(), site.url("/gazette.xml"))
        site.put("/gazette.xml", rss("The Example Gazette", site.base, [ferry] + [
            Story(e.title, e.link, e.published_at) for e in old]), "application/rss+xml")
        question = {"question": "When did the ferry line between Osterby and Lundholm resume?", "top_k": 1,
                    "max_new_tokens": 4}

        last: list = []

        def cited():
            r = requests.post(base + "/v1/answer", json=question, timeout=60)
            last[:] = [r.status_code, r.text[:1500]]
            return r.status_code == 200 and [s["url"] for s in r.json()["sources"]] == [ferry.link] and r.json()

        body = wait(cited, 120, "an answer citing the new story's URL", last)
        assert body["sources"][0]["id"] == story_id(ferry.link) and body["sources"][0]["title"] == ferry.title
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "feeds: stopped after" in err  # the poller stopped with ingest and serve
    n = len(site.hits)
    time.sleep(2.0)  # two poll intervals: nothing polls any more
    assert len(site.hits) == n
    with pytest.raises(requests.ConnectionError):
        requests.get(base + "/health", timeout=5)
