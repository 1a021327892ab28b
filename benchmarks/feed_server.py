"""A local news site for the feed poller's tests, the freshness benchmark and the demo: feeds and article pages served
from memory over real HTTP on 127.0.0.1 (``http.server``), with ETag / If-None-Match (304), per-path delays, status
codes and a request log. Nothing leaves the machine.

``FeedSite.put(path, body)`` publishes or replaces a resource (its ETag is the body's hash, so a changed body gets a
new ETag); :func:`rss` / :func:`atom` / :func:`article` write the documents a publisher would.
"""

from __future__ import annotations

import hashlib
import html
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Resource:
    body: bytes
    content_type: str
    status: int = 200
    delay: float = 0.0  # seconds before the answer starts
    etag: bool = True  # send an ETag and honour If-None-Match
    statuses: list[int] = field(default_factory=list)  # answer these first, one per request (e.g. [503, 503])

    @property
    def tag(self) -> str:
        return '"' + hashlib.sha256(self.body).hexdigest()[:16] + '"'


@dataclass(frozen=True)
class Hit:
    path: str
    status: int
    at: float  # time.monotonic() when the request arrived
    user_agent: str


@dataclass(frozen=True)
class Story:
    title: str
    link: str
    published: datetime
    summary: str = ""
    guid: str | None = None


class FeedSite:
    """Use as a context manager. ``base`` is ``http://127.0.0.1:<port>``. Thread-safe."""

    def __init__(self):
        self.resources: dict[str, Resource] = {}
        self.hits: list[Hit] = []
        self.lock = threading.Lock()
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                t = time.monotonic()
                with site.lock:
                    res = site.resources.get(self.path)
                    scripted = res.statuses.pop(0) if res is not None and res.statuses else None
                if scripted is not None:
                    status, body, headers = scripted, b"scripted answer", {"Content-Type": "text/plain"}
                elif res is None:
                    status, body, headers = 404, b"not found", {"Content-Type": "text/plain"}
                else:
                    headers = {"Content-Type": res.content_type}
                    if res.etag:
                        headers["ETag"] = res.tag
                    if res.etag and self.headers.get("If-None-Match") == res.tag and res.status == 200:
                        status, body = 304, b""
                    else:
                        status, body = res.status, res.body
                with site.lock:  # logged on arrival (a slow answer is still a request made)
                    site.hits.append(Hit(self.path, status, t, self.headers.get("User-Agent", "")))
                if res is not None and res.delay:
                    time.sleep(res.delay)
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    if status != 304:
                        self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if status != 304:
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="feed-site")

    def __enter__(self) -> FeedSite:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def url(self, path: str) -> str:
        return self.base + path

    def put(self, path: str, body: bytes | str, content_type: str = "text/html; charset=utf-8", **kw) -> None:
        with self.lock:
            self.resources[path] = Resource(body.encode() if isinstance(body, str) else body, content_type, **kw)

    def remove(self, path: str) -> None:
        with self.lock:
            self.resources.pop(path, None)

    def requests_to(self, path: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.path == path]


def rss(title: str, link: str, stories: list[Story]) -> str:
    """An RSS 2.0 document."""
    items = "".join(
        f"<item><title>{html.escape(s.title)}</title><link>{html.escape(s.link)}</link>"
        f"<guid isPermaLink=\"false\">{html.escape(s.guid or s.link)}</guid>"
        f"<pubDate>{format_datetime(s.published.astimezone(UTC), usegmt=True)}</pubDate>"
        f"<description>{html.escape(s.summary)}</description></item>" for s in stories)
    return (f'<?xml version="1.0" encoding="UTF-8"?><rss version="2.0"><channel><title>{html.escape(title)}</title>'
            f"<link>{html.escape(link)}</link><description>{html.escape(title)}</description>{items}</channel></rss>")


def atom(title: str, link: str, stories: list[Story]) -> str:
    """An Atom 1.0 document."""
    entries = "".join(
        f"<entry><title>{html.escape(s.title)}</title><link href=\"{html.escape(s.link)}\"/>"
        f"<id>{html.escape(s.guid or s.link)}</id><updated>{s.published.isoformat()}</updated>"
        f"<summary>{html.escape(s.summary)}</summary></entry>" for s in stories)
    return (f'<?xml version="1.0" encoding="utf-8"?><feed xmlns="http://www.w3.org/2005/Atom">'
            f"<title>{html.escape(title)}</title><id>{html.escape(link)}</id>"
            f"<updated>{datetime.now(UTC).isoformat()}</updated>{entries}</feed>")


def article(title: str, paragraphs: list[str], published: datetime | None = None) -> str:
    """A news article page as a publisher serves it: navigation, the article, a footer."""
    meta = (f'<meta property="article:published_time" content="{published.isoformat()}">' if published else "")
    body = "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>{meta}</head>"
            f"<body><nav><a href=\"/\">Home</a> <a href=\"/world\">World</a> <a href=\"/business\">Business</a></nav>"
            f"<main><article><h1>{html.escape(title)}</h1>{body}</article></main>"
            f"<footer>Copyright the Example Gazette. All rights reserved.</footer></body></html>")
