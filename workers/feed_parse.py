"""Feed bytes → entries: RSS 0.9x/1.0/2.0 and Atom through feedparser, JSON Feed 1.x read here (feedparser 6.0 has
no JSON support), and the story id every later stage keys on.

- :func:`canonical_link`: courlan's normalisation (lower-case scheme and host, default port dropped, tracking
  parameters such as ``utm_*`` and ``ref`` dropped, query sorted) without the fragment. Two links to one story that
  differ only in those ways give one id.
- :func:`story_id`: ``feed-`` + the first 32 hex digits of sha256(canonical link). The same story has the same id in
  every feed, on every run, on every machine.
- :func:`parse_feed` raises :class:`FeedError` (kind ``invalid_feed``) for a body that is neither an XML feed nor a
  JSON Feed (an HTML page, garbage, JSON of another shape); it never raises anything else.
"""

from __future__ import annotations

import calendar
import hashlib
import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urldefrag, urljoin, urlsplit

import feedparser
from courlan import normalize_url

JSON_FEED_PREFIX = "https://jsonfeed.org/version/"


class FeedError(ValueError):
    def __init__(self, kind: str, reason: str):
        super().__init__(f"{kind}: {reason}")
        self.kind, self.reason = kind, reason


@dataclass(frozen=True)
class Entry:
    """One feed item. ``link`` is absolute http(s) and canonical, or None (the item names no page to fetch)."""

    link: str | None
    guid: str | None
    title: str | None
    published_at: datetime | None
    fingerprint: str  # sha256 over what the feed says about the item: changes when the feed's entry changes

    @property
    def id(self) -> str | None:
        return story_id(self.link) if self.link else None


def canonical_link(url: str) -> str:
    try:
        return urldefrag(normalize_url(url))[0]
    except ValueError:  # courlan refuses some malformed URLs: keep the link as given, without its fragment
        return urldefrag(url.strip())[0]


def story_id(link: str) -> str:
    return "feed-" + hashlib.sha256(canonical_link(link).encode()).hexdigest()[:32]


def _absolute(link: str | None, base: str) -> str | None:
    """An absolute http(s) link, or None. Relative paths ("/a", "a/b.html") resolve against the feed's URL; a bare
    word (an RSS guid that feedparser took for a permalink) is not a link."""
    if not isinstance(link, str) or not link.strip():
        return None
    link = link.strip()
    if not urlsplit(link).scheme and ("/" in link or "." in link):
        link = urljoin(base, link)
    parts = urlsplit(link)
    return canonical_link(link) if parts.scheme in ("http", "https") and parts.hostname else None


def _fingerprint(*fields) -> str:
    return hashlib.sha256(json.dumps(fields, default=str, ensure_ascii=False).encode()).hexdigest()


def _time(struct) -> datetime | None:
    return datetime.fromtimestamp(calendar.timegm(struct), UTC) if struct else None


def _iso(text) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _json_feed(obj, url: str) -> list[Entry]:
    if not (isinstance(obj, dict) and str(obj.get("version", "")).startswith(JSON_FEED_PREFIX)
            and isinstance(obj.get("items"), list)):
        raise FeedError("invalid_feed",
                        f"{url}: JSON, but not a JSON Feed (needs version {JSON_FEED_PREFIX}... and items)")
    out = []
    for item in obj["items"]:
        if not isinstance(item, dict):
            continue
        link = _absolute(item.get("url") or item.get("external_url"), url)
        guid = str(item["id"]) if item.get("id") is not None else None
        title = item.get("title") if isinstance(item.get("title"), str) else None
        published = _iso(item.get("date_published")) or _iso(item.get("date_modified"))
        fp = _fingerprint(link, guid, title, item.get("date_published"), item.get("date_modified"),
                          item.get("summary"), item.get("content_text"), item.get("content_html"))
        out.append(Entry(link, guid, title, published, fp))
    return out


def parse_feed(body: bytes, url: str, content_type: str = "") -> list[Entry]:
    """Entries in feed order. ``url``: where the feed was fetched (relative links resolve against it)."""
    head = body.lstrip()[:1]
    if "json" in content_type.lower() or head in (b"{", b"["):
        try:
            obj = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise FeedError("invalid_feed", f"{url}: not JSON ({err})") from None
        return _json_feed(obj, url)
    parsed = feedparser.parse(io.BytesIO(body), response_headers={"content-location": url,
                                                                  "content-type": content_type or "application/xml"})
    if not parsed.get("version"):
        why = parsed.get("bozo_exception")
        detail = f"{type(why).__name__}: {str(why)[:120]}" if why else f"content-type {content_type!r}"
        raise FeedError("invalid_feed", f"{url}: not an RSS, Atom or JSON feed ({detail})")
    out = []
    for e in parsed.entries:
        link = _absolute(e.get("link"), url)
        guid = e.get("id") or None
        published = _time(e.get("published_parsed")) or _time(e.get("updated_parsed"))
        fp = _fingerprint(link, guid, e.get("title"), e.get("published"), e.get("updated"), e.get("summary"))
        out.append(Entry(link, guid, e.get("title") or None, published, fp))
    return out
