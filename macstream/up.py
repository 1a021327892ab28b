"""``macstream up``: the always-on path. Ingest and serve side by side in one Ray cluster, until Ctrl-C or SIGTERM.

- Kafka: the given bootstrap servers, or (none given) a local broker started here and stopped on exit.
- One Ray cluster (this process's, or the one $RAY_ADDRESS names) holds the encoder actors, the consumer actors, the
  store owner and the Serve replicas; ingest and serve share the store through that one owner.
- Pre-flight, before anything starts: the HTTP port is free, the broker answers, the store is not owned by another
  process. Each failure is one line naming the cause and the fix (exit status 2), and nothing is left half-started.
- Resources: what the cluster cannot place is fitted (a local cluster: encoders share the free cores, with a
  warning) or refused in one line (exit 2), never waited for in silence (pipeline/placement.py).
- Stop (SIGINT or SIGTERM, at any stage, exit 0): the consumers finish and commit their in-flight batches (every
  committed offset is in the store; a batch cut short is redelivered and rewritten idempotently on the next start),
  then Serve, Ray and the local broker stop, in that order.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
from contextlib import ExitStack

from kafka.errors import KafkaError

from macstream.lifecycle import GracefulStop
from pipeline.cluster import init_ray
from pipeline.config import FeedsConfig, IngestConfig, ServeConfig
from pipeline.store.actor import ensure_store_free
from serving.app import demand as serve_demand
from serving.app import start as start_serving
from workers import kafka_io
from workers.broker import LocalBroker
from workers.ingest import IngestJob

log = logging.getLogger(__name__)


class Refused(ValueError):
    """A pre-flight check failed: nothing was started."""


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise Refused(
                f"port {port} on {host} is in use ({err.strerror}): stop what holds it or pass --port") from None


def check_broker(bootstrap: str) -> None:
    try:
        kafka_io.check_reachable(bootstrap)
    except (KafkaError, OSError) as err:
        raise Refused(f"no Kafka broker answers at {bootstrap} ({type(err).__name__}): start one (`macstream broker`) "
                      f"or leave out --bootstrap-servers to run a local one") from None


def up(ingest: IngestConfig, serving: ServeConfig, local_broker: bool, partitions: int = 4,
       feeds: FeedsConfig | None = None) -> dict:
    """Run until interrupted; return the ingest job's final snapshot (committed offsets included).

    Start order: broker → Ray → ingest (encoders loaded, consumers in the group) → Serve. Serve starts last, so
    ``/ready`` is never true before ingest runs; the ingest plan is fitted to the cluster with Serve's replicas
    reserved (pipeline/placement.py), so nothing waits for resources that will never come. SIGTERM or Ctrl-C at any
    stage stops what has started, in reverse order, and exits 0 (:class:`GracefulStop`)."""
    check_port(serving.host, serving.port)
    if not local_broker:
        check_broker(ingest.bootstrap_servers)
    if ingest.store_location() != serving.store_location():
        raise Refused(f"ingest writes {ingest.store_location()} but serve reads {serving.store_location()}: "
                      "use one --store")
    ensure_store_free(ingest.store_location())  # before Ray: another process's store is refused with nothing started
    with GracefulStop() as stop, ExitStack() as stack:
        if local_broker:
            with stop.deferred():
                broker = stack.enter_context(LocalBroker())
            ingest = ingest.model_copy(update={"bootstrap_servers": broker.bootstrap})
        stack.callback(_shutdown_ray)  # registered before Ray starts: a stop inside start-up still ends it
        with stop.deferred():
            init_ray()
        serve_cpus, serve_gpus = serve_demand(serving)
        job = IngestJob(ingest, partitions=partitions).start(reserve_cpus=serve_cpus, reserve_gpus=serve_gpus)
        if feeds is not None:  # the feed poller (a thread) produces to ingest's topic; stopped first on the way out
            from workers.feeds import FeedPoller

            feeds = feeds.model_copy(update={"topic": ingest.topic, "bootstrap_servers": ingest.bootstrap_servers})
            stack.enter_context(FeedPoller(feeds, partitions))
        start_serving(serving)
        print(json.dumps({"url": f"http://{serving.host}:{serving.port}", "ready": f"http://{serving.host}:{serving.port}/ready",
                          "topic": ingest.topic, "bootstrap_servers": ingest.bootstrap_servers,
                          "store": ingest.store_location(), "default_mode": serving.default_mode}), flush=True)
        return job.run()  # returns after Ctrl-C / SIGTERM, once the consumers have committed what they wrote


def _shutdown_ray() -> None:
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def main(ingest: IngestConfig, serving: ServeConfig, local_broker: bool, partitions: int,
         feeds: FeedsConfig | None = None) -> None:
    try:
        snapshot = up(ingest, serving, local_broker, partitions, feeds)
    except KeyboardInterrupt:  # interrupted while starting: everything started has been stopped
        print(json.dumps({"stopped": "during start-up"}), file=sys.stderr)
        return
    print(json.dumps(snapshot, indent=2, default=str), flush=True)
