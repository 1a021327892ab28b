"""Polite HTTP GETs for the feed poller: per-host concurrency and delay, robots.txt, conditional GET, retries with
backoff, a total deadline and a size cap.

Guarantees of :meth:`PoliteFetcher.get`:
- at most ``per_host_concurrency`` requests to one host at a time, and request starts to one host at least
  ``per_host_delay`` seconds apart (or the host's robots.txt ``Crawl-delay``, whichever is longer);
- a URL that the host's robots.txt disallows for our user agent is never requested (``robots_disallowed``);
  robots.txt is read once per host per ``ROBOTS_TTL_S`` (RFC 9309: a 4xx robots.txt allows everything; a 5xx or
  unreachable one disallows everything until it is read again, ``ROBOTS_RETRY_S`` later);
- connection errors, 429 and 5xx are retried ``retries`` times with exponential backoff (``Retry-After`` honoured,
  capped); a timeout is not retried here (the poller retries it at a later poll, so a slow host is not hammered);
- each socket read times out after ``timeout`` seconds and the body must be complete ``timeout`` seconds after the
  request started (checked between 16 KiB chunks), and it may be at most ``max_bytes`` long; otherwise
  :class:`FetchError` (``timeout`` / ``too_large``), never a partial body;
- 304 Not Modified is a normal answer (``status == 304``, empty body); any other status outside 2xx raises
  :class:`FetchError` with kind ``http_<status>``.

Every failure raises :class:`FetchError` whose ``kind`` is short and machine-readable and whose ``reason`` is a line.
"""

from __future__ import annotations

import threading
import time
import urllib.robotparser
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import requests

ROBOTS_TTL_S = 3600.0
ROBOTS_RETRY_S = 60.0  # an unreachable robots.txt is read again this soon
ROBOTS_MAX_BYTES = 512 * 1024
MAX_RETRY_AFTER_S = 30.0
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class FetchError(Exception):
    """A GET that gave no usable answer. ``kind``: timeout, too_large, robots_disallowed, connection, http_<status>."""

    def __init__(self, kind: str, reason: str):
        super().__init__(f"{kind}: {reason}")
        self.kind, self.reason = kind, reason

    @property
    def transient(self) -> bool:
        """Worth trying again at a later poll (the page may be fine then); 404, too_large, robots are final."""
        return self.kind in ("timeout", "connection", "robots_unreachable") or self.kind in {
            f"http_{s}" for s in RETRY_STATUSES}


@dataclass(frozen=True)
class Response:
    url: str  # after redirects
    status: int  # 2xx or 304
    body: bytes
    headers: dict[str, str]  # lower-case names
    seconds: float  # first attempt's start to the last byte, retries and waits for the host included


def host_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class _Host:
    """One host's gate: a semaphore for concurrency and the earliest time the next request may start."""

    def __init__(self, concurrency: int):
        self.slots = threading.Semaphore(concurrency)
        self.lock = threading.Lock()
        self.next_start = 0.0
        self.delay = 0.0  # the host's robots.txt Crawl-delay, when it says one
        self.robots: urllib.robotparser.RobotFileParser | None = None
        self.robots_ok = True  # False: robots.txt unreachable (5xx / network): disallow everything until re-read
        self.robots_read = -ROBOTS_TTL_S
        self.robots_lock = threading.Lock()  # the first requests to a host wait for its robots.txt


class PoliteFetcher:
    """Thread-safe. ``stop`` (an Event) cuts backoff waits short: a stopping poller is not held up by a retry."""

    def __init__(self, user_agent: str, timeout: float, per_host_concurrency: int = 2, per_host_delay: float = 1.0,
                 retries: int = 2, backoff: float = 1.0, robots: bool = True, stop: threading.Event | None = None):
        self.user_agent, self.timeout = user_agent, timeout
        self.concurrency, self.delay = per_host_concurrency, per_host_delay
        self.retries, self.backoff, self.use_robots = retries, backoff, robots
        self.stop = stop or threading.Event()
        self._hosts: dict[str, _Host] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    # ---- public -------------------------------------------------------------------------------------------------
    def get(self, url: str, max_bytes: int, etag: str | None = None, last_modified: str | None = None) -> Response:
        host = self._host(url)
        if self.use_robots:
            self._check_robots(url, host)
        headers = {}
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        t0 = time.monotonic()
        for attempt in range(self.retries + 1):
            try:
                r = self._request(url, host, headers, max_bytes)
            except FetchError as err:
                if err.kind != "connection" or attempt == self.retries:
                    raise
                self._backoff(attempt, None)
                continue
            if r.status in RETRY_STATUSES and attempt < self.retries:
                self._backoff(attempt, r.headers.get("retry-after"))
                continue
            if r.status != 304 and not 200 <= r.status < 300:
                raise FetchError(f"http_{r.status}", f"GET {url} answered {r.status}")
            return Response(r.url, r.status, r.body, r.headers, time.monotonic() - t0)
        raise AssertionError("unreachable")

    # ---- internals ----------------------------------------------------------------------------------------------
    def _host(self, url: str) -> _Host:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError("bad_url", f"not an http(s) URL: {url[:200]!r}")
        key = host_of(url)
        with self._lock:
            if key not in self._hosts:
                self._hosts[key] = _Host(self.concurrency)
            return self._hosts[key]

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            s.headers["User-Agent"] = self.user_agent
        return s

    def _backoff(self, attempt: int, retry_after: str | None) -> None:
        wait = self.backoff * 2 ** attempt
        if retry_after:
            try:
                wait = max(wait, float(retry_after))
            except ValueError:
                try:
                    wait = max(wait, parsedate_to_datetime(retry_after).timestamp() - time.time())
                except (TypeError, ValueError):
                    pass
        self.stop.wait(min(wait, MAX_RETRY_AFTER_S))
        if self.stop.is_set():
            raise FetchError("stopped", "the poller is stopping")

    def _request(self, url: str, host: _Host, headers: dict, max_bytes: int) -> Response:
        """One GET through the host's gate: the body read in full within the deadline, or FetchError."""
        with host.slots:
            with host.lock:
                wait = host.next_start - time.monotonic()
                host.next_start = max(host.next_start, time.monotonic()) + max(self.delay, host.delay)
            if wait > 0 and self.stop.wait(wait):
                raise FetchError("stopped", "the poller is stopping")
            t0 = time.monotonic()
            deadline = t0 + self.timeout
            try:
                with self._session().get(url, headers=headers, timeout=self.timeout, stream=True) as r:
                    hdrs = {k.lower(): v for k, v in r.headers.items()}
                    length = hdrs.get("content-length", "")
                    if length.isdigit() and int(length) > max_bytes:
                        raise FetchError("too_large",
                                         f"GET {url}: Content-Length {length} > the cap of {max_bytes} bytes")
                    chunks, size = [], 0
                    for chunk in r.iter_content(16 * 1024):
                        size += len(chunk)
                        if size > max_bytes:
                            raise FetchError("too_large", f"GET {url}: body over the cap of {max_bytes} bytes")
                        if time.monotonic() > deadline:
                            raise FetchError("timeout", f"GET {url}: body not complete within {self.timeout:g} s")
                        chunks.append(chunk)
                    return Response(r.url, r.status_code, b"".join(chunks), hdrs, time.monotonic() - t0)
            except requests.Timeout:
                raise FetchError("timeout", f"GET {url}: no answer within {self.timeout:g} s") from None
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as err:
                if isinstance(err.__context__, TimeoutError) or "timed out" in str(err):
                    raise FetchError("timeout", f"GET {url}: no answer within {self.timeout:g} s") from None
                raise FetchError("connection", f"GET {url}: {type(err).__name__}") from None
            except requests.RequestException as err:
                raise FetchError("connection", f"GET {url}: {type(err).__name__}: {str(err)[:200]}") from None

    def _check_robots(self, url: str, host: _Host) -> None:
        with host.robots_lock:
            if time.monotonic() - host.robots_read >= ROBOTS_TTL_S:
                self._read_robots(url, host)
                host.robots_read = time.monotonic() - (0.0 if host.robots_ok else ROBOTS_TTL_S - ROBOTS_RETRY_S)
        if not host.robots_ok:
            raise FetchError("robots_unreachable", f"{host_of(url)}/robots.txt could not be read: not fetching {url}")
        if host.robots is not None and not host.robots.can_fetch(self.user_agent, url):
            raise FetchError("robots_disallowed", f"{host_of(url)}/robots.txt disallows {url}")

    def _read_robots(self, url: str, host: _Host) -> None:
        robots_url = host_of(url) + "/robots.txt"
        try:
            r = self._request(robots_url, host, {}, ROBOTS_MAX_BYTES)
        except FetchError as err:
            if err.kind == "too_large":  # RFC 9309: parse at least 500 KiB; a larger file is ignored, allow all
                host.robots, host.robots_ok = None, True
                return
            host.robots, host.robots_ok = None, False
            return
        if 400 <= r.status < 500:
            host.robots, host.robots_ok = None, True
        elif r.status >= 500:
            host.robots, host.robots_ok = None, False
        else:
            parser = urllib.robotparser.RobotFileParser(robots_url)
            parser.parse(r.body.decode("utf-8", "replace").splitlines())
            host.robots, host.robots_ok = parser, True
            delay = parser.crawl_delay(self.user_agent)
            host.delay = float(delay) if delay else 0.0
