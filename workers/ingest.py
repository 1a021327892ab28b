"""The ingest job: Kafka topic → consumer actors → encoder actors → store, supervised, with metrics.

Topology (all Ray actors): ``workers`` encoder actors (model copies, ``encoder_threads`` CPUs and ``gpus_per_worker``
GPUs each, spread over the cluster's nodes, restarted and retried by Ray when they die); ``consumers`` consumer
actors (0 CPUs, one group member each, never more than the topic has partitions); one store owner for embedded stores
(pipeline/store/actor.py). The driver supervises: a consumer that dies is replaced (its partitions are redelivered
from the last commit), and it aggregates metrics.

Backfill mode (``exit_when_idle``): the job stops once every member has nothing in flight and saw no record for that
many seconds; broker end offsets are never consulted (they are wrong on some brokers, and racy on all).
"""

from __future__ import annotations

import logging
import statistics
import time

import ray

from pipeline import placement
from pipeline.cluster import init_ray, started_here
from pipeline.config import IngestConfig
from pipeline.model.mac import checkpoint_identity
from pipeline.store import collection_name
from pipeline.store.actor import connect_store
from workers import kafka_io
from workers.consumer import ConsumerActor
from workers.encoder import EncoderActor
from workers.metrics import serve_metrics

log = logging.getLogger(__name__)
UNASSIGNED_GIVE_UP_S = 60.0
RELEASE_TIMEOUT_S = 10.0  # longest a stopped job waits for its encoders' CPUs to be free again
STOP_TIMEOUT_S = 60  # a member drains its in-flight batches, commits (≤ 30 s) and leaves the group (≤ 5 s)


def encoder_options(cfg: IngestConfig, index: int, cpus: float | None = None, name: str = "macstream-encoder") -> dict:
    """Ray options of encoder actor ``index``: ``encoder_threads`` CPUs, ``gpus_per_worker`` GPUs when above 0 (the
    actor then computes on the GPU Ray assigns it), and SPREAD scheduling, so the model copies land on different
    nodes of a multi-node cluster (more compute, and one lost node does not take every encoder with it). On one
    node SPREAD places them as the default would. ``cpus`` overrides the CPU reservation (a plan fitted to a small
    cluster: pipeline/placement.py). ``cfg``: any config with ``encoder_threads`` and ``gpus_per_worker``."""
    opts: dict = {"name": f"{name}-{index}", "num_cpus": cfg.encoder_threads if cpus is None else cpus,
                  "scheduling_strategy": "SPREAD"}
    if cfg.gpus_per_worker:
        opts["num_gpus"] = cfg.gpus_per_worker
    return opts


def start_encoders(cfg, identity: tuple[str, str], reserve_cpus: float = 0.0, reserve_gpus: float = 0.0,
                   name: str = "macstream-encoder") -> tuple[list, float]:
    """``cfg.workers`` encoder actors with their model loaded, and the CPUs each reserves. The plan is checked against
    the cluster first (pipeline/placement.py): on a cluster started here it is fitted or refused in one line
    (:class:`Unplaceable`, nothing left running); on a joined one the encoders must load within
    ``PLACEMENT_TIMEOUT_S``. Raises RuntimeError when they loaded another checkpoint than ``identity``. ``cfg``: any
    config with ``workers``, ``encoder_threads``, ``gpus_per_worker`` and ``checkpoint`` (ingest, backfill)."""
    cpus: float = cfg.encoder_threads
    if started_here():  # a joined cluster may be about to grow: no fitting there, the wait below has a deadline
        cpus = placement.fit_encoders(cfg.workers, cfg.encoder_threads, cfg.gpus_per_worker,
                                      reserve_cpus=reserve_cpus, reserve_gpus=reserve_gpus)
    encoders = [EncoderActor.options(**encoder_options(cfg, i, cpus, name)).remote(cfg.checkpoint, cfg.encoder_threads)
                for i in range(cfg.workers)]
    ready, pending = ray.wait([e.identity.remote() for e in encoders], num_returns=cfg.workers,
                              timeout=placement.PLACEMENT_TIMEOUT_S)
    if pending:
        for e in encoders:
            ray.kill(e, no_restart=True)
        raise placement.Unplaceable(
            f"{len(pending)} of {cfg.workers} encoders were not placed and loaded within "
            f"{placement.PLACEMENT_TIMEOUT_S:g} s (each wants {cpus:g} CPU"
            f"{f', {cfg.gpus_per_worker:g} GPU' if cfg.gpus_per_worker else ''}; the cluster has "
            f"{ray.available_resources().get('CPU', 0):g} CPU free): lower --workers or add nodes")
    ids = ray.get(ready)
    if any(i != identity for i in ids):
        for e in encoders:
            ray.kill(e, no_restart=True)
        raise RuntimeError(f"encoders loaded {ids}, expected {identity}")
    return encoders, cpus


def stop_encoders(encoders: list, cpus: float, timeout_s: float = RELEASE_TIMEOUT_S) -> None:
    """Kill ``encoders`` (each reserving ``cpus`` CPUs) and wait, at most ``timeout_s``, until the cluster has their
    CPUs free again. ``ray.kill`` is asynchronous: a job started right after (the next freshness variant, the next
    worker count of a benchmark, ``up`` restarted in one cluster) was otherwise fitted against CPUs still held by
    the dying actors and refused as unplaceable."""
    if not encoders:
        return
    target = ray.available_resources().get("CPU", 0.0) + len(encoders) * cpus - 1e-6
    for e in encoders:
        ray.kill(e, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < target and time.monotonic() < deadline:
        time.sleep(0.1)


class IngestJob:
    def __init__(self, cfg: IngestConfig, partitions: int = 4, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.create_partitions = partitions
        self.version, self.model_id = checkpoint_identity(cfg.checkpoint)
        self.collection = collection_name(self.version)
        self.encoders: list = []
        self.encoder_cpus = 0.0  # what each encoder reserves (set by start: fitted to the cluster)
        self.members: dict[int, tuple] = {}  # slot → (actor, run ref)
        self.incarnation: dict[int, int] = {}  # slot → how many members it has had (names are never reused)
        self.restarts = 0
        self.last: dict[int, dict] = {}  # slot → last stats seen (kept after a member dies, for totals)
        self.base: dict[int, dict] = {}  # counters of members that were replaced, per slot
        self.started = time.monotonic()
        self.metrics_server = None

    # ---- lifecycle -----------------------------------------------------------------------------------------------
    def start(self, reserve_cpus: float = 0.0, reserve_gpus: float = 0.0) -> IngestJob:
        """Create the topic, the encoders (once their model is loaded) and the consumers. The plan is checked against
        the cluster first (pipeline/placement.py): on a cluster started here it is fitted or refused in one line
        (:class:`Unplaceable`, nothing left running); on a joined one the encoders must load within
        ``PLACEMENT_TIMEOUT_S``. ``reserve_*``: resources kept for something started after (``up``'s Serve)."""
        cfg = self.cfg
        kafka_io.ensure_topic(cfg.bootstrap_servers, cfg.topic, self.create_partitions)
        kafka_io.ensure_topic(cfg.bootstrap_servers, kafka_io.dlq_topic(cfg.topic), 1)
        n_parts = len(kafka_io.partitions_of(cfg.bootstrap_servers, cfg.topic))
        init_ray()
        self.store = connect_store(cfg.store_location(), cfg.modulation_codec)
        self.encoders, self.encoder_cpus = start_encoders(cfg, (self.version, self.model_id), reserve_cpus,
                                                          reserve_gpus)
        self.n_members = min(cfg.consumers or cfg.workers, n_parts)
        for slot in range(self.n_members):
            self._spawn(slot)
        if cfg.metrics_port is not None:
            self.metrics_server, self.metrics_port = serve_metrics(self, cfg.metrics_port, cfg.metrics_host)
        self.started = time.monotonic()  # docs/s counts from here, not from model loading
        log.info("ingest: topic %s (%d partitions) → %d consumers → %d encoders → %s [%s]", cfg.topic, n_parts,
                 self.n_members, cfg.workers, cfg.store_location(), self.collection)
        return self

    def _spawn(self, slot: int) -> None:
        """Start the next member of ``slot`` under a name of its own (``macstream-consumer-<slot>.<n>``): a member
        lost with its node stays registered under its name until the GCS declares it dead, and ``ray.kill`` is
        asynchronous, so reusing the name would fail exactly when a replacement is needed."""
        n = self.incarnation.get(slot, -1) + 1
        self.incarnation[slot] = n
        actor = ConsumerActor.options(name=f"macstream-consumer-{slot}.{n}").remote(
            self.cfg, slot, self.encoders, self.store, self.collection)
        self.members[slot] = (actor, actor.run.remote())

    def supervise(self) -> None:
        """Replace members whose run loop died (actor crash or killed); refresh their stats."""
        for slot in range(self.n_members):  # a slot whose replacement failed last pass gets another
            if slot not in self.members:
                try:
                    self._spawn(slot)
                except Exception as err:  # noqa: BLE001
                    log.warning("consumer %d: replacement failed (%s); retrying", slot, err)
        for slot, (actor, ref) in list(self.members.items()):
            done, _ = ray.wait([ref], timeout=0)
            if done:
                try:
                    self.last[slot] = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - any failure of the member: replace it
                    log.warning("consumer %d died (%s); replacing it", slot, type(err).__name__)
                    self.restarts += 1
                    self._bank(slot)
                    try:
                        ray.kill(actor, no_restart=True)
                    except Exception:  # noqa: BLE001 - already gone
                        pass
                    try:
                        self._spawn(slot)
                    except Exception as spawn_err:  # noqa: BLE001 - e.g. the cluster is still losing a node
                        log.warning("consumer %d: replacement failed (%s); retrying", slot, spawn_err)
                        self.members.pop(slot, None)
                    continue
            try:
                self.last[slot] = ray.get(actor.stats.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - a dying member; the next pass replaces it
                pass

    def _bank(self, slot: int) -> None:
        """Keep the counters of a member that is replaced, so totals survive restarts."""
        seen = self.last.pop(slot, None)
        if seen:
            acc = self.base.setdefault(slot, {"counters": {}, "dlq": {}})
            for part in ("counters", "dlq"):
                for k, v in seen[part].items():
                    acc[part][k] = acc[part].get(k, 0) + v

    def idle(self) -> bool:
        """Backfill done: every member has nothing in flight and saw no record for exit_when_idle seconds *while it
        held partitions*. A member still waiting for its group assignment (a slow rebalance) is not idle, unless it
        waited UNASSIGNED_GIVE_UP_S (the broker never assigned it: stop rather than hang)."""
        if len(self.members) < self.n_members or len(self.last) < len(self.members):
            return False
        wait = self.cfg.exit_when_idle
        return all(s["in_flight"] == 0 and s["idle_s"] >= (wait if s["assigned"] else max(UNASSIGNED_GIVE_UP_S, wait))
                   for s in self.last.values())

    def run(self, timeout: float | None = None) -> dict:
        """Supervise until stopped (Ctrl-C), idle (backfill mode) or ``timeout``; return the final snapshot."""
        deadline = None if timeout is None else time.monotonic() + timeout
        t_log = time.monotonic()
        try:
            while deadline is None or time.monotonic() < deadline:
                self.supervise()
                if self.cfg.exit_when_idle and self.idle():
                    break
                if self.progress and time.monotonic() - t_log >= 5:
                    t_log = time.monotonic()
                    s = self.snapshot()
                    log.info("ingest: %d records, %d written, %d unchanged, %d deleted, %d dead-lettered, %.1f docs/s",
                             s["records"], s["upserted"], s["unchanged"], s["deleted"], s["dead_lettered"],
                             s["docs_per_s"])
                time.sleep(0.5)
        except KeyboardInterrupt:
            log.info("ingest: interrupted; finishing in-flight batches")
        return self.stop()

    def stop(self) -> dict:
        for actor, _ in self.members.values():
            try:
                actor.stop.remote()
            except Exception:  # noqa: BLE001
                pass
        # one deadline for all members (waiting for each in turn made two stuck members cost twice the limit)
        refs = {ref: slot for slot, (_, ref) in self.members.items()}
        done, stuck = ray.wait(list(refs), num_returns=len(refs), timeout=STOP_TIMEOUT_S) if refs else ([], [])
        for ref in done:
            try:
                self.last[refs[ref]] = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - a member that dies while stopping loses nothing uncommitted
                log.warning("consumer %d did not stop cleanly: %s", refs[ref], err)
        for ref in stuck:  # killed below: its uncommitted batches are redelivered to the next run
            log.warning("consumer %d did not stop within %d s", refs[ref], STOP_TIMEOUT_S)
        snap = self.snapshot()
        for actor, _ in self.members.values():
            ray.kill(actor, no_restart=True)
        stop_encoders(self.encoders, self.encoder_cpus)
        self.members, self.encoders = {}, []
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        return snap

    # ---- metrics -------------------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Totals over members (including replaced ones), committed offsets, batch latency, store counts."""
        totals: dict[str, int] = {}
        dlq: dict[str, int] = {}
        committed: dict[int, int] = {}
        lat: list[float] = []
        for source in list(self.base.values()) + list(self.last.values()):
            for k, v in source["counters"].items():
                totals[k] = totals.get(k, 0) + v
            for k, v in source["dlq"].items():
                dlq[k] = dlq.get(k, 0) + v
        for s in self.last.values():
            for p, off in s["committed"].items():
                committed[int(p)] = max(committed.get(int(p), 0), off)
            lat += s["batch_seconds"]
        elapsed = time.monotonic() - self.started
        return {
            "topic": self.cfg.topic, "collection": self.collection, "checkpoint": self.version,
            "records": totals.get("records", 0), "upserted": totals.get("upserted", 0),
            "unchanged": totals.get("unchanged", 0), "deleted": totals.get("deleted", 0),
            "chunks_written": totals.get("chunks", 0), "dead_lettered": sum(dlq.values()), "dlq_by_kind": dlq,
            "committed": committed, "consumer_restarts": self.restarts, "elapsed_s": elapsed,
            "docs_per_s": totals.get("upserted", 0) / elapsed if elapsed else 0.0,
            "batch_latency_p50_s": statistics.median(lat) if lat else None,
            "batch_latency_max_s": max(lat) if lat else None,
            "batches": totals.get("batches", 0),
            "batches_dropped": totals.get("batches_dropped", 0),  # uncommitted at a rebalance, redelivered
        }
