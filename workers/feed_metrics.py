"""Per-feed counters of the feed poller, and their Prometheus exposition (``--metrics-port``), read at scrape time.

Counters only grow for the life of one poller process. Per feed URL:
- ``polls``: GETs of the feed answered (200 or 304); ``not_modified``: of them, 304 answers;
- ``feed_errors{kind}``: polls that gave no entries (invalid_feed, timeout, http_<status>, too_large, ...);
- ``seen``: entries read from 200 answers (an entry counts at every poll that shows it);
- ``new`` / ``updated``: documents acknowledged by the broker for the first time / again with a new content hash;
- ``unchanged``: entries whose feed entry changed but whose page gave the same document (nothing produced);
- ``failed{kind}``: item attempts that failed (missing_link, timeout, http_404, too_large, no_text, ...);
- ``dead_lettered``: dead letters acknowledged (failed items and broken feed bodies);
- ``fetch_seconds`` / ``page_fetch_seconds``: latency of the feed's GETs / of its article pages' GETs (histograms);
- ``last_success``: unix time of the last poll fully handled (200 with every item acknowledged, or 304).
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter, defaultdict

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COUNTERS = ("polls", "not_modified", "seen", "new", "updated", "unchanged", "dead_lettered")


class _Histogram:
    def __init__(self):
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, x: float) -> None:
        self.counts[bisect_left(BUCKETS, x)] += 1
        self.sum += x

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for le, n in zip([*map(str, BUCKETS), "+Inf"], self.counts):
            total += n
            out.append((le, total))
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)


class FeedStats:
    """Thread-safe per-feed counters (the poller's threads write, scrapes and snapshots read)."""

    def __init__(self, feeds: list[str]):
        self.lock = threading.Lock()
        self.counters: dict[str, Counter] = {f: Counter() for f in feeds}
        self.failed: dict[str, Counter] = {f: Counter() for f in feeds}
        self.feed_errors: dict[str, Counter] = {f: Counter() for f in feeds}
        self.fetch = defaultdict(_Histogram)
        self.page_fetch = defaultdict(_Histogram)
        self.last_success: dict[str, float] = {}

    def add(self, feed: str, key: str, n: int = 1) -> None:
        with self.lock:
            self.counters.setdefault(feed, Counter())[key] += n

    def fail(self, feed: str, kind: str) -> None:
        with self.lock:
            self.failed.setdefault(feed, Counter())[kind] += 1

    def feed_error(self, feed: str, kind: str) -> None:
        with self.lock:
            self.feed_errors.setdefault(feed, Counter())[kind] += 1

    def fetched(self, feed: str, seconds: float, page: bool = False) -> None:
        with self.lock:
            (self.page_fetch if page else self.fetch)[feed].observe(seconds)

    def succeeded(self, feed: str, when: float) -> None:
        with self.lock:
            self.last_success[feed] = when

    def snapshot(self) -> dict:
        with self.lock:
            feeds = sorted(set(self.counters) | set(self.failed) | set(self.feed_errors))
            out = {}
            for f in feeds:
                c = self.counters.get(f, Counter())
                h, p = self.fetch.get(f), self.page_fetch.get(f)
                out[f] = {**{k: c.get(k, 0) for k in COUNTERS},
                          "failed": dict(self.failed.get(f, {})), "feed_errors": dict(self.feed_errors.get(f, {})),
                          "fetch_seconds_mean": h.sum / h.count if h and h.count else None,
                          "page_fetch_seconds_mean": p.sum / p.count if p and p.count else None,
                          "last_success": self.last_success.get(f)}
            return out


class FeedCollector:
    def __init__(self, stats: FeedStats):
        self.stats = stats

    def collect(self):
        snap = self.stats.snapshot()
        for key, doc in (("polls", "Feed GETs answered (200 or 304)"), ("not_modified", "Feed GETs answered 304"),
                         ("seen", "Feed entries read from 200 answers"),
                         ("new", "Stories produced for the first time (broker acknowledged)"),
                         ("updated", "Stories produced again with a new content hash"),
                         ("unchanged", "Changed feed entries whose page gave the same document"),
                         ("dead_lettered", "Dead letters acknowledged (failed items, broken feed bodies)")):
            m = CounterMetricFamily(f"macstream_feed_items_{key}" if key in ("seen", "new", "updated", "unchanged")
                                    else f"macstream_feed_{key}", doc, labels=["feed"])
            for f, s in snap.items():
                m.add_metric([f], s[key])
            yield m
        for key, name, doc in (("failed", "macstream_feed_items_failed", "Item attempts that failed, by kind"),
                               ("feed_errors", "macstream_feed_errors", "Feed polls that gave no entries, by kind")):
            m = CounterMetricFamily(name, doc, labels=["feed", "kind"])
            for f, s in snap.items():
                for kind, n in sorted(s[key].items()):
                    m.add_metric([f, kind], n)
            yield m
        with self.stats.lock:
            hists = [(name, doc, {f: (h.cumulative(), h.sum) for f, h in src.items()}) for name, doc, src in (
                ("macstream_feed_fetch_seconds", "Latency of the feed's GETs", self.stats.fetch),
                ("macstream_feed_page_fetch_seconds", "Latency of the feed's article pages' GETs",
                 self.stats.page_fetch))]
        for name, doc, per_feed in hists:
            m = HistogramMetricFamily(name, doc, labels=["feed"])
            for f, (buckets, total) in sorted(per_feed.items()):
                m.add_metric([f], buckets, total)
            yield m
        g = GaugeMetricFamily("macstream_feed_last_success_timestamp_seconds",
                              "Unix time of the feed's last fully handled poll", labels=["feed"])
        for f, s in snap.items():
            if s["last_success"] is not None:
                g.add_metric([f], s["last_success"])
        yield g


def serve_metrics(stats: FeedStats, port: int, host: str = "127.0.0.1"):
    """Expose the poller's metrics on host:port (0 = any free port); return (server, bound port)."""
    registry = CollectorRegistry()
    registry.register(FeedCollector(stats))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_address[1]
