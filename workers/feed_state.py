"""What the feed poller remembers between polls and across restarts: one SQLite file per topic.

Default location: ``$MACSTREAM_HOME/feeds/<topic>.sqlite`` (:func:`pipeline.config.home`). Per topic, because a
story produced to one topic is still new to another.

- ``items``: per story id, its canonical link, the fingerprint of its feed entry, the content hash of the document
  last produced (:func:`workers.messages.content_hash`), and for a story that failed, the failure kind and the
  attempts made on this entry fingerprint.
- ``feeds``: per feed URL, the validators of its last fully handled 200 answer (ETag, Last-Modified), the hash of
  the last broken body dead-lettered (so one broken body is dead-lettered once), and the last success time.

The poller writes a story's row only after the broker acknowledged its message (or its dead letter), and a feed's
validators only after every item of that answer was acknowledged: a crash before that re-fetches, never skips.
Every write is one transaction. One poller per file at a time (SQLite serialises writers; a second poller on the
same topic and file would produce each new story twice).
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY, link TEXT, entry_fp TEXT NOT NULL, content_hash TEXT,
    failed_kind TEXT, attempts INTEGER NOT NULL DEFAULT 0, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS feeds (
    url TEXT PRIMARY KEY, etag TEXT, last_modified TEXT, bad_body TEXT, last_success REAL);
"""


@dataclass(frozen=True)
class ItemState:
    entry_fp: str
    content_hash: str | None  # of the last document produced; None: never produced
    failed_kind: str | None  # the last attempt's failure on this entry fingerprint; None: it succeeded
    attempts: int  # failed attempts on this entry fingerprint


@dataclass(frozen=True)
class FeedState:
    etag: str | None
    last_modified: str | None
    bad_body: str | None
    last_success: float | None


def default_path(topic: str, state_dir: str | Path | None = None) -> Path:
    from pipeline.config import home

    safe = re.sub(r"[^A-Za-z0-9._-]", "_", topic)
    return (Path(state_dir) if state_dir else home() / "feeds") / f"{safe}.sqlite"


class StateStore:
    """Not shared between threads: the poller's own thread owns it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # ---- items ----------------------------------------------------------------------------------------------------
    def items(self, ids: list[str]) -> dict[str, ItemState]:
        out: dict[str, ItemState] = {}
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            q = ("SELECT id, entry_fp, content_hash, failed_kind, attempts FROM items "
                 f"WHERE id IN ({','.join('?' * len(part))})")
            for row in self.db.execute(q, part):
                out[row[0]] = ItemState(*row[1:])
        return out

    def produced(self, rows: list[tuple[str, str | None, str, str]]) -> None:
        """(id, link, entry_fp, content_hash) of documents the broker acknowledged."""
        now = time.time()
        with self.db:
            self.db.executemany(
                "INSERT INTO items (id, link, entry_fp, content_hash, failed_kind, attempts, updated_at) "
                "VALUES (?, ?, ?, ?, NULL, 0, ?) ON CONFLICT(id) DO UPDATE SET link=excluded.link, "
                "entry_fp=excluded.entry_fp, content_hash=excluded.content_hash, failed_kind=NULL, attempts=0, "
                "updated_at=excluded.updated_at", [(*r, now) for r in rows])

    def unchanged(self, rows: list[tuple[str, str]]) -> None:
        """(id, entry_fp): the entry changed in the feed, but the page's document did not (nothing produced)."""
        with self.db:
            self.db.executemany("UPDATE items SET entry_fp=?, failed_kind=NULL, attempts=0, updated_at=? WHERE id=?",
                                [(fp, time.time(), i) for i, fp in rows])

    def failed(self, rows: list[tuple[str, str | None, str, str]]) -> None:
        """(id, link, entry_fp, kind) of dead letters the broker acknowledged. The content hash of an earlier
        success is kept (an update that failed leaves the last good version as what was produced)."""
        now = time.time()
        with self.db:
            for i, link, fp, kind in rows:
                self.db.execute(
                    "INSERT INTO items (id, link, entry_fp, content_hash, failed_kind, attempts, updated_at) "
                    "VALUES (?, ?, ?, NULL, ?, 1, ?) ON CONFLICT(id) DO UPDATE SET link=excluded.link, "
                    "failed_kind=excluded.failed_kind, updated_at=excluded.updated_at, "
                    "attempts=CASE WHEN items.entry_fp=excluded.entry_fp AND items.failed_kind IS NOT NULL "
                    "THEN items.attempts + 1 ELSE 1 END, entry_fp=excluded.entry_fp", (i, link, fp, kind, now))

    def count(self) -> dict[str, int]:
        produced, failed = self.db.execute(
            "SELECT SUM(content_hash IS NOT NULL), SUM(failed_kind IS NOT NULL) FROM items").fetchone()
        return {"produced": produced or 0, "failed": failed or 0}

    # ---- feeds ----------------------------------------------------------------------------------------------------
    def feed(self, url: str) -> FeedState:
        row = self.db.execute("SELECT etag, last_modified, bad_body, last_success FROM feeds WHERE url=?",
                              (url,)).fetchone()
        return FeedState(*row) if row else FeedState(None, None, None, None)

    def feed_done(self, url: str, etag: str | None, last_modified: str | None, keep_validators: bool) -> None:
        """A poll of ``url`` fully handled. ``keep_validators=False``: forget them (some item waits for a retry,
        so the next poll must see the whole feed again)."""
        with self.db:
            self.db.execute(
                "INSERT INTO feeds (url, etag, last_modified, bad_body, last_success) VALUES (?, ?, ?, NULL, ?) "
                "ON CONFLICT(url) DO UPDATE SET etag=excluded.etag, last_modified=excluded.last_modified, "
                "bad_body=NULL, last_success=excluded.last_success",
                (url, etag if keep_validators else None, last_modified if keep_validators else None, time.time()))

    def feed_not_modified(self, url: str) -> None:
        with self.db:
            self.db.execute("UPDATE feeds SET last_success=? WHERE url=?", (time.time(), url))

    def feed_broken(self, url: str, body_hash: str) -> None:
        with self.db:
            self.db.execute("INSERT INTO feeds (url, bad_body) VALUES (?, ?) ON CONFLICT(url) DO UPDATE SET "
                            "bad_body=excluded.bad_body, etag=NULL, last_modified=NULL", (url, body_hash))
