"""The feed poller: RSS / Atom / JSON feeds → each new or changed story's article page → one document per story on
the topic, in the project's message contract (:mod:`workers.messages`).

One poll (every ``interval`` seconds, from the start of the previous one): every feed is fetched with a conditional
GET; each entry is looked up in the state (:mod:`workers.feed_state`) by its story id (a hash of its canonical link:
:func:`workers.feed_parse.story_id`), and
- a story never produced, or whose feed entry changed, has its page fetched and its text and metadata extracted
  (trafilatura): a new story is produced; a known one is produced again only if its document's content hash
  changed (an update; ingest overwrites it by id), otherwise nothing is produced;
- a story whose feed entry did not change is not fetched again (an unchanged story is never produced again);
- an item that fails (no link, page timeout or 4xx/5xx, robots.txt disallows it, page over the size cap, no text
  found) is counted, dead-lettered to ``<topic>.dlq`` with its reason in the ``macstream.error`` /
  ``macstream.reason`` headers (stage ``feeds``), and the poll goes on. A passing failure (timeout, connection,
  429/5xx) is tried again at later polls, ``item_attempts`` polls in all; a feed body that is not a feed is
  dead-lettered once per distinct body.

Delivery: the state records a story only after the broker acknowledged its message (or its dead letter), and a
feed's ETag/Last-Modified only after every item of that answer was acknowledged. A restart therefore loses nothing
and produces nothing twice; a crash between an acknowledgement and the state write (one SQLite transaction per
poll) produces those stories once more, with the same content hash, which ingest skips as unchanged.

Document fields: ``id`` the story id; ``text`` the extracted article text; ``title`` the feed's, else the page's;
``published_at`` the feed's (published, else updated), else the page's date; ``source`` the feed's host name;
``url`` the story's canonical link.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from kafka.errors import KafkaError

from pipeline.config import FeedsConfig
from pipeline.schemas import Document
from workers import kafka_io
from workers.feed_metrics import FeedStats, serve_metrics
from workers.feed_parse import Entry, FeedError, parse_feed
from workers.feed_state import FeedState, ItemState, StateStore, default_path
from workers.fetch import FetchError, PoliteFetcher
from workers.messages import content_hash, encode

log = logging.getLogger(__name__)
ACK_TIMEOUT_S = 30.0
TRANSIENT = frozenset({"timeout", "connection", "robots_unreachable", "http_429", "http_500", "http_502", "http_503",
                       "http_504"})


def read_sources(arg: str) -> list[str]:
    """SOURCES as the command line gives it: one http(s) URL, or a file with one URL per line (blank lines and lines
    starting with # are skipped). Raises ValueError naming what is wrong."""
    if urlsplit(arg).scheme in ("http", "https"):
        return [arg]
    path = Path(arg)
    if not path.is_file():
        raise ValueError(f"feeds: {arg!r} is neither an http(s) URL nor a file of URLs")
    urls = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not urls:
        raise ValueError(f"feeds: {arg} lists no feed URL")
    return urls


class ItemFailure(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(f"{kind}: {reason}")
        self.kind, self.reason = kind, reason


@dataclass(eq=False)  # compared by identity
class _Job:
    """One story to fetch in this poll."""

    feed: str
    entry: Entry
    prev: ItemState | None
    doc: Document | None = None
    failure: ItemFailure | None = None


@dataclass(eq=False)
class _Letter:
    """A dead letter to send: ``id`` is the state key (a story id, or a pseudo id for an item without link)."""

    feed: str
    id: str
    link: str | None
    entry_fp: str
    kind: str
    reason: str
    value: dict
    attempt: int = 1


@dataclass
class _FeedPoll:
    url: str
    status: int | None = None  # 200 / 304; None: failed
    etag: str | None = None
    last_modified: str | None = None
    entries: list[Entry] = field(default_factory=list)
    error: FeedError | FetchError | None = None
    body_hash: str | None = None
    bad_seen: bool = False  # a broken body that was dead-lettered before


def _page_date(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


class FeedPoller:
    """Use as a context manager (a background thread polls until the block exits), or call :meth:`poll_once`
    between :meth:`open` and :meth:`close`. :meth:`snapshot` is safe from any thread."""

    def __init__(self, cfg: FeedsConfig, partitions: int = 4):
        self.cfg, self.partitions = cfg, partitions
        self.halt = threading.Event()
        self.fetcher = PoliteFetcher(cfg.user_agent, cfg.timeout, cfg.per_host_concurrency, cfg.per_host_delay,
                                     cfg.retries, cfg.backoff, cfg.robots, stop=self.halt)
        self.stats = FeedStats(cfg.sources)
        self.state_path = default_path(cfg.topic, cfg.state_dir)
        self.state: StateStore | None = None
        self.producer = None
        self.metrics_server, self.metrics_port = None, None
        self.polls = 0
        self.poll_errors = 0
        self.produce_errors = 0
        self._thread: threading.Thread | None = None

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def open(self) -> FeedPoller:
        cfg = self.cfg
        kafka_io.ensure_topic(cfg.bootstrap_servers, cfg.topic, self.partitions)
        kafka_io.ensure_topic(cfg.bootstrap_servers, kafka_io.dlq_topic(cfg.topic), 1)
        self.producer = kafka_io.producer(cfg.bootstrap_servers, max_block_ms=int(ACK_TIMEOUT_S * 1000))
        self.state = StateStore(self.state_path)
        if cfg.metrics_port is not None:
            self.metrics_server, self.metrics_port = serve_metrics(self.stats, cfg.metrics_port, cfg.metrics_host)
        log.info("feeds: %d feeds → %s every %g s (state %s)", len(cfg.sources), cfg.topic, cfg.interval,
                 self.state_path)
        return self

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close(timeout=10)
            self.producer = None
        if self.state is not None:
            self.state.close()
            self.state = None
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server = None

    def run(self, polls: int | None = None) -> dict:
        """Poll every ``interval`` seconds until :meth:`stop` (or ``polls`` polls); a poll that fails as a whole
        (broker or state unavailable) is logged and counted, and the next one runs on time."""
        n = 0
        while not self.halt.is_set() and (polls is None or n < polls):
            started = time.monotonic()
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the poller keeps going; the cause is in the log and the metrics
                self.poll_errors += 1
                log.exception("feeds: poll failed")
            n += 1
            if polls is None or n < polls:
                self.halt.wait(max(0.0, started + self.cfg.interval - time.monotonic()))
        return self.snapshot()

    def start(self) -> FeedPoller:
        if self.state is None:
            self.open()
        self._thread = threading.Thread(target=self.run, name="macstream-feeds", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> dict:
        """Stop polling: the poll in progress ends at its next step (a GET ends within ``timeout``); what it had not
        produced yet is fetched again by the next run. Returns the final snapshot."""
        self.halt.set()
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else 2 * self.cfg.timeout + ACK_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("feeds: the poller thread did not stop in time")
        snap = self.snapshot()
        self.close()
        log.info("feeds: stopped after %d polls: %d new, %d updated, %d failed, %d dead-lettered", snap["polls"],
                 snap["new"], snap["updated"], snap["failed"], snap["dead_lettered"])
        return snap

    def __enter__(self) -> FeedPoller:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def snapshot(self) -> dict:
        feeds = self.stats.snapshot()
        total = {k: sum(f[k] for f in feeds.values()) for k in ("seen", "new", "updated", "unchanged", "dead_lettered")}
        total["failed"] = sum(sum(f["failed"].values()) for f in feeds.values())
        return {"topic": self.cfg.topic, "state": str(self.state_path), "polls": self.polls,
                "poll_errors": self.poll_errors, "produce_errors": self.produce_errors, **total, "feeds": feeds}

    # ---- one poll -------------------------------------------------------------------------------------------------
    def poll_once(self) -> dict:
        """Poll every feed once; return what this poll did (counts)."""
        assert self.state is not None, "open() first"
        before = self.snapshot()
        known = {url: self.state.feed(url) for url in self.cfg.sources}  # the state is read and written here only
        with ThreadPoolExecutor(min(len(known), self.cfg.fetch_threads), "feeds-feed") as pool:
            polls = list(pool.map(self._fetch_feed, known, known.values()))
        if self.halt.is_set():
            return {}
        jobs, letters = self._plan(polls)
        if jobs:
            with ThreadPoolExecutor(min(len(jobs), self.cfg.fetch_threads), "feeds-page") as pool:
                list(pool.map(self._fetch_page, jobs))
        if self.halt.is_set():
            return {}
        unchanged: list[_Job] = []
        for j in jobs:
            if j.failure is not None:
                letters.append(self._letter_for(j))
            elif j.prev is not None and j.prev.content_hash == content_hash(j.doc):
                unchanged.append(j)
        docs = [j for j in jobs if j.doc is not None and j not in unchanged]
        acked_docs, acked_letters = self._produce(docs, letters)
        self._record(polls, docs, acked_docs, unchanged, letters, acked_letters)
        self.polls += 1
        after = self.snapshot()
        return {k: after[k] - before[k] for k in ("seen", "new", "updated", "unchanged", "failed", "dead_lettered")}

    def _fetch_feed(self, url: str, st: FeedState) -> _FeedPoll:
        out = _FeedPoll(url)
        try:
            r = self.fetcher.get(url, self.cfg.max_feed_bytes, st.etag, st.last_modified)
        except FetchError as err:
            out.error = err
            return out
        self.stats.fetched(url, r.seconds)
        self.stats.add(url, "polls")
        out.status, out.etag, out.last_modified = r.status, r.headers.get("etag"), r.headers.get("last-modified")
        if r.status == 304:
            self.stats.add(url, "not_modified")
            return out
        out.body_hash = hashlib.sha256(r.body).hexdigest()
        try:
            out.entries = parse_feed(r.body, r.url, r.headers.get("content-type", ""))
        except FeedError as err:
            out.error, out.status = err, None
            out.bad_seen = st.bad_body == out.body_hash
        return out

    def _plan(self, polls: list[_FeedPoll]) -> tuple[list[_Job], list[_Letter]]:
        """Which stories to fetch, which items to dead-letter at once (no link, broken feed)."""
        jobs: list[_Job] = []
        letters: list[_Letter] = []
        claimed: set[str] = set()  # a story in two feeds (or twice in one) is handled once per poll
        for p in polls:
            if p.error is not None:
                self.stats.feed_error(p.url, p.error.kind)
                log.warning("feeds: %s", p.error)
                if isinstance(p.error, FeedError) and not p.bad_seen:
                    letters.append(_Letter(p.url, p.url, None, p.body_hash or "", p.error.kind, p.error.reason,
                                           {"feed": p.url, "error": p.error.reason}))
                continue
            if p.status == 304:
                continue
            self.stats.add(p.url, "seen", len(p.entries))
            ids = [e.id for e in p.entries if e.id]
            orphans = {e: "nolink-" + hashlib.sha256(f"{p.url}\n{e.fingerprint}".encode()).hexdigest()[:32]
                       for e in p.entries if not e.id}
            known = self.state.items(ids + list(orphans.values()))
            for e in p.entries:
                if e.id is None:
                    pid = orphans[e]
                    if pid not in known and pid not in claimed:
                        claimed.add(pid)
                        letters.append(_Letter(p.url, pid, None, e.fingerprint, "missing_link",
                                               f"item {e.guid or e.title!r} of {p.url} has no http(s) link",
                                               {"feed": p.url, "guid": e.guid, "title": e.title}))
                    continue
                if e.id in claimed:
                    continue
                prev = known.get(e.id)
                if prev is not None and prev.entry_fp == e.fingerprint:
                    if prev.failed_kind is None:
                        continue  # unchanged: never fetched or produced again
                    if prev.failed_kind not in TRANSIENT or prev.attempts >= self.cfg.item_attempts:
                        continue  # given up until the feed entry changes
                claimed.add(e.id)
                jobs.append(_Job(p.url, e, prev))
        return jobs, letters

    def _fetch_page(self, job: _Job) -> None:
        if self.halt.is_set():
            job.failure = ItemFailure("stopped", "the poller is stopping")
            return
        e = job.entry
        t0 = time.monotonic()
        try:
            r = self.fetcher.get(e.link, self.cfg.max_page_bytes)
            self.stats.fetched(job.feed, r.seconds, page=True)
            job.doc = self._document(job, r.body, r.url)
        except (FetchError, ItemFailure) as err:
            if isinstance(err, FetchError):
                self.stats.fetched(job.feed, time.monotonic() - t0, page=True)
            job.failure = err if isinstance(err, ItemFailure) else ItemFailure(err.kind, err.reason)

    def _document(self, job: _Job, body: bytes, final_url: str) -> Document:
        import trafilatura

        e = job.entry
        try:
            ex = trafilatura.bare_extraction(body, url=final_url, with_metadata=True, include_comments=False)
        except Exception as err:  # noqa: BLE001 - the extractor's failure on one page is that page's failure
            raise ItemFailure("extract_error", f"{e.link}: {type(err).__name__}: {str(err)[:200]}") from None
        text = ((ex.text if ex is not None else None) or "").strip()
        if len(text) < self.cfg.min_text_chars:
            raise ItemFailure("no_text", f"{e.link}: the extractor found {len(text)} characters of article text "
                                         f"(min_text_chars is {self.cfg.min_text_chars})")
        return Document(id=e.id, text=text, title=e.title or (ex.title if ex is not None else None),
                        published_at=e.published_at or _page_date(ex.date if ex is not None else None),
                        source=urlsplit(job.feed).hostname, url=e.link)

    def _letter_for(self, job: _Job) -> _Letter:
        e, f = job.entry, job.failure
        same = job.prev is not None and job.prev.entry_fp == e.fingerprint and job.prev.failed_kind is not None
        attempt = job.prev.attempts + 1 if same else 1
        return _Letter(job.feed, e.id, e.link, e.fingerprint, f.kind, f.reason,
                       {"id": e.id, "url": e.link, "title": e.title, "guid": e.guid, "feed": job.feed,
                        "published_at": e.published_at.isoformat() if e.published_at else None}, attempt)

    # ---- produce, then remember -----------------------------------------------------------------------------------
    def _produce(self, docs: list[_Job], letters: list[_Letter]) -> tuple[list[_Job], list[_Letter]]:
        """Send documents and dead letters; return those the broker acknowledged."""
        if not docs and not letters:
            return [], []
        dlq = kafka_io.dlq_topic(self.cfg.topic)
        sent = []
        for j in docs:
            key, value = encode(j.doc)
            sent.append((j, self.producer.send(self.cfg.topic, key=key, value=value)))
        for lt in letters:
            reason = lt.reason.encode("utf-8", "replace")
            headers = [("macstream.error", lt.kind.encode()), ("macstream.reason", reason),
                       ("macstream.stage", b"feeds"),
                       ("macstream.feed", lt.feed.encode()), ("macstream.attempt", str(lt.attempt).encode())]
            sent.append((lt, self.producer.send(dlq, key=lt.id.encode(), value=json.dumps(lt.value).encode(),
                                                headers=headers)))
        self.producer.flush(timeout=ACK_TIMEOUT_S)
        acked_docs, acked_letters = [], []
        for item, fut in sent:
            try:
                fut.get(timeout=ACK_TIMEOUT_S)
            except KafkaError as err:
                self.produce_errors += 1
                log.warning("feeds: not acknowledged (%s); it is fetched again at the next poll", err)
                continue
            (acked_docs if isinstance(item, _Job) else acked_letters).append(item)
        return acked_docs, acked_letters

    def _record(self, polls: list[_FeedPoll], docs: list[_Job], acked_docs: list[_Job], unchanged: list[_Job],
                letters: list[_Letter], acked_letters: list[_Letter]) -> None:
        st = self.state
        st.produced([(j.entry.id, j.entry.link, j.entry.fingerprint, content_hash(j.doc)) for j in acked_docs])
        st.unchanged([(j.entry.id, j.entry.fingerprint) for j in unchanged])
        items = [lt for lt in acked_letters if lt.link is not None or lt.id.startswith("nolink-")]
        st.failed([(lt.id, lt.link, lt.entry_fp, lt.kind) for lt in items])
        for lt in acked_letters:
            if lt.id == lt.feed:
                st.feed_broken(lt.feed, lt.entry_fp)
        for j in acked_docs:
            self.stats.add(j.feed, "updated" if j.prev is not None and j.prev.content_hash else "new")
        for j in unchanged:
            self.stats.add(j.feed, "unchanged")
        for lt in letters:
            if lt.id != lt.feed:
                self.stats.fail(lt.feed, lt.kind)
        for lt in acked_letters:
            self.stats.add(lt.feed, "dead_lettered")
        lost = {j.feed for j in docs if j not in acked_docs} | {lt.feed for lt in letters if lt not in acked_letters}
        pending = {lt.feed for lt in letters if lt.kind in TRANSIENT and lt.attempt < self.cfg.item_attempts}
        now = time.time()
        for p in polls:
            if p.status is None or p.url in lost:
                continue
            if p.status == 304:
                st.feed_not_modified(p.url)
            else:
                st.feed_done(p.url, p.etag, p.last_modified, keep_validators=p.url not in pending)
            self.stats.succeeded(p.url, now)
