"""The cluster path: `ray start --head` plus more nodes joined with `ray start --address` on this machine, ingest and
serve joining that cluster with RAY_ADDRESS, and GPU placement on a node that declares GPUs (no CUDA needed).

Each test starts its own cluster: every node is a `ray start --block` process in its own process group, with its own
free ports and a private temp dir, and is stopped by killing exactly its own process tree (never `ray stop`, which
would stop every Ray cluster on the machine, other tests' included). Killing the second node's tree with SIGKILL is
what a lost machine looks like to the rest of the cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import requests

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from pipeline.config import IngestConfig, ServeConfig  # noqa: E402
from pipeline.schemas import Document  # noqa: E402
from workers import kafka_io  # noqa: E402
from workers.broker import LocalBroker  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, timeout: float, what: str, every: float = 0.5):
    """Poll ``cond()`` until it returns something truthy (returned) or ``timeout`` passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {last!r})")


def _kill_tree(root: psutil.Process, sig=signal.SIGKILL, timeout: float = 20.0) -> None:
    """Signal a process and every descendant (raylet, GCS, agents, Ray workers), then wait until all are gone."""
    try:
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


class Node:
    def __init__(self, proc: subprocess.Popen, manager_port: int, log: Path):
        self.proc, self.manager_port, self.log = proc, manager_port, log
        self.node_id: str | None = None
        self.resources: tuple[int, int] = (0, 0)


class LocalCluster:
    """A multi-node Ray cluster on this machine that only touches its own processes."""

    def __init__(self, env: dict | None = None):
        # short: Ray's unix socket paths live under it (108-byte limit)
        self.tmp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                    **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[Node] = []
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"

    def _start(self, args: list[str], num_cpus: int, num_gpus: int, index: int | None = None) -> Node:
        manager = _free_port()
        ports = ["--node-manager-port", str(manager), "--object-manager-port", str(_free_port()),
                 "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
                 "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port())]
        log = self.tmp / f"node{len(self.nodes) if index is None else index}-{manager}.log"
        # every node on the loopback address, whatever the machine's own address resolves to
        cmd = [str(BIN / "ray"), "start", "--block", *args, "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus),
               "--object-store-memory", str(256 * 1024 * 1024), "--disable-usage-stats",
               "--node-ip-address", "127.0.0.1", *ports]
        proc = subprocess.Popen(cmd, env=self.env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        node = Node(proc, manager, log)
        node.resources = (num_cpus, num_gpus)
        if index is None:
            self.nodes.append(node)
        return node

    def start(self, head_cpus: int, workers: list[tuple[int, int]], head_gpus: int = 0,
              timeout: float = 120) -> LocalCluster:
        """Head with ``head_cpus``, then one node per (cpus, gpus) in ``workers``; waits until all are alive."""
        self._start(["--head", "--port", str(self.port), "--temp-dir", str(self.tmp), "--include-dashboard", "false",
                     "--ray-client-server-port", str(_free_port())], head_cpus, head_gpus)

        def gcs_up():
            if self.nodes[0].proc.poll() is not None:
                raise AssertionError(f"ray head exited: {self.nodes[0].log.read_text()[-3000:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        _wait(gcs_up, timeout, "ray head listening", 0.2)
        for cpus, gpus in workers:
            self._start(["--address", self.address], cpus, gpus)
        ray.init(address=self.address, log_to_driver=False)
        by_port = lambda: {n["NodeManagerPort"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}  # noqa: E731
        restarted: set[int] = set()

        def all_alive():
            for i, node in enumerate(self.nodes):
                if node.proc.poll() is None:
                    continue
                # a node that exits while joining (a port another process took between _free_port and its bind)
                # is started once more on fresh ports; a second exit fails with its log
                if i == 0 or i in restarted:
                    raise AssertionError(f"ray node {i} exited {node.proc.returncode}: {node.log.read_text()[-3000:]}")
                restarted.add(i)
                self.nodes[i] = self._start(["--address", self.address], *node.resources, index=i)
            alive = by_port()
            return len(alive) == len(self.nodes) and all(n.manager_port in alive for n in self.nodes) and alive

        try:
            alive = _wait(all_alive, timeout, "every node alive")
        except AssertionError as e:
            raise AssertionError(f"{e}; nodes: {[(n['NodeManagerPort'], n['Alive']) for n in ray.nodes()]}; "
                                 f"logs: {[n.log.read_text()[-1500:] for n in self.nodes]}") from None
        for node in self.nodes:
            node.node_id = alive[node.manager_port]
        return self

    @property
    def head(self) -> Node:
        return self.nodes[0]

    def kill(self, node: Node) -> None:
        """A lost machine: SIGKILL the node's whole process tree (its raylet, agents and every worker on it)."""
        _kill_tree(psutil.Process(node.proc.pid))
        node.proc.wait(timeout=10)

    def worker_log_lines(self, words=("member", "died", "Error", "Timeout", "restart")) -> list[str]:
        """Lines of the head's Ray worker logs (consumer, encoder, store actors) naming any of ``words``: what a
        failing test prints, since the logs are deleted with the cluster."""
        out = []
        for f in sorted(self.tmp.glob("session_*/logs/worker-*")):
            for line in f.read_text(errors="replace").splitlines():
                if any(w in line for w in words):
                    out.append(f"{f.name}: {line[:300]}")
        return out[-200:]

    def stop(self) -> None:
        if ray.is_initialized():
            ray.shutdown()
        for node in reversed(self.nodes):  # workers first, then the head (GCS)
            if node.proc.poll() is None:
                self.kill(node)
        if os.environ.get("MACSTREAM_TEST_KEEP_CLUSTER"):  # debugging: keep every node's session logs
            print(f"cluster logs kept in {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _actors() -> list[dict]:
    """Every actor in the cluster's GCS table (the state API would need the dashboard, which these nodes omit)."""
    from ray._private import state

    return list(state.actors().values())


def _alive(class_part: str) -> list[dict]:
    return [a for a in _actors() if class_part in a["ActorClassName"] and a["State"] == "ALIVE"]


def _where(head: str) -> dict[str, list[str]]:
    """Actor class → the node ("head" or "other") of each alive actor of it."""
    out: dict[str, list[str]] = {}
    for a in _actors():
        if a["State"] == "ALIVE":
            node = "head" if a["Address"]["NodeID"] == head else "other"
            out.setdefault(a["ActorClassName"].split(":")[-1], []).append(node)
    return out


def _docs(n: int, prefix: str) -> list[Document]:
    return [Document(id=f"{prefix}{i}", title=f"Story {i}",
                     text=f"Company {prefix.upper()}{i} named Person{i} as chief executive in month {i % 12 + 1}.")
            for i in range(n)]


PROBE = Document(id="probe-zorblax", title="Zorblax Quantum Foundry names a new chief",
                 text="Zorblax Quantum Foundry, the Vantrell lens maker, named Ilsa Marrowby as its chief executive "
                      "on Tuesday, replacing the founder Oskar Pell after eleven years.")


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with LocalBroker(log_dir=tmp_path_factory.mktemp("broker-logs")) as b:
        yield b


@pytest.fixture
def own_ray():
    """These tests connect this process to their own clusters: never while another module's Ray is up."""
    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()


def _committed(bootstrap: str, topic: str, group: str) -> dict[int, int]:
    c = kafka_io.consumer(bootstrap, group, enable_auto_commit=False)
    try:
        from kafka import TopicPartition

        return {p: (c.committed(TopicPartition(topic, p)) or 0) for p in kafka_io.partitions_of(bootstrap, topic)}
    finally:
        c.close()


def _records_below(bootstrap: str, topic: str, committed: dict[int, int]) -> set[str]:
    """Ids (keys) of every record below the committed offset of its partition: what the store must hold."""
    return {r.key.decode() for r in kafka_io.read_all(bootstrap, topic) if r.offset < committed.get(r.partition, 0)}


def test_three_nodes_ingest_and_serve_spread_answer_and_survive_two_lost_nodes(broker, tiny_checkpoint, tmp_path,
                                                                              own_ray) -> None:
    """Head (4 CPUs) + two nodes (2 CPUs each), `macstream ingest --workers 2` and `macstream serve --replicas 2`
    joined with RAY_ADDRESS: encoders and replicas spread over nodes, a produced document answerable over HTTP with
    itself as the source, then the node loss twice over: SIGKILL of one node mid-stream, recovery, SIGKILL of the
    other mid-stream. No committed document is lost and none is duplicated. The head can hold everything, so what the
    lost nodes ran restarts there. (A consumer lost with its node used to be replaced under its old name, still
    registered, and ingest exited 2.)"""
    from pipeline.model.mac import checkpoint_identity
    from pipeline.store import collection_name
    from pipeline.store.actor import store_actor_name

    topic, group = "cluster-news", "cluster-ingest"
    store = str(tmp_path / "store")
    collection = collection_name(checkpoint_identity(tiny_checkpoint)[0])
    port = _free_port()
    cluster = LocalCluster()
    procs: dict[str, subprocess.Popen] = {}
    observed: dict = {}
    try:
        cluster.start(head_cpus=4, workers=[(2, 0), (2, 0)], timeout=300)  # 3 nodes joining on 2 busy cores
        head = cluster.head.node_id
        assert ray.get_runtime_context().get_node_id() == head  # this driver is attached to the head
        env = {**cluster.env, "RAY_ADDRESS": cluster.address}
        common = ["--checkpoint", str(tiny_checkpoint), "--store", store]
        kafka_io.ensure_topic(broker.bootstrap, topic, 2)
        kafka_io.produce(broker.bootstrap, topic, _docs(6, "w"))  # in the topic before ingest starts
        procs["ingest"] = subprocess.Popen(
            [str(BIN / "macstream"), "ingest", "--topic", topic, "--group-id", group, "--bootstrap-servers",
             broker.bootstrap, "--workers", "2", "--batch-size", "2", "--partitions", "2",
             "--encode-timeout-s", "90", *common],  # a call lost with a node is given up within the round's wait
            env=env, stdout=(tmp_path / "ingest.out").open("w"), stderr=(tmp_path / "ingest.err").open("w"))
        procs["serve"] = subprocess.Popen(
            [str(BIN / "macstream"), "serve", "--port", str(port), "--replicas", "2", *common],
            env=env, stdout=(tmp_path / "serve.out").open("w"), stderr=(tmp_path / "serve.err").open("w"))

        def running(name: str) -> None:
            if procs[name].poll() is not None:
                raise AssertionError(f"{name} exited {procs[name].returncode}: "
                                     f"{(tmp_path / (name + '.err')).read_text()[-3000:]}")

        def ready():
            running("ingest"), running("serve")
            try:
                return requests.get(f"http://127.0.0.1:{port}/ready", timeout=15).status_code == 200
            except requests.RequestException:  # not listening yet, or slow while everything starts on 2 cores
                return False

        _wait(ready, 240, "serve /ready")

        # ---- placement: both kinds of model copies on both nodes ---------------------------------------------------
        encoders = _wait(lambda: len(_alive("EncoderActor")) == 2 and _alive("EncoderActor"), 120, "2 encoders alive")
        replicas = _wait(lambda: len(_alive("MACServer")) == 2 and _alive("MACServer"), 60, "2 replicas alive")
        observed["encoders"] = sorted(a["Address"]["NodeID"] for a in encoders)
        observed["replicas"] = sorted(a["Address"]["NodeID"] for a in replicas)
        assert len(set(observed["encoders"])) == 2 and len(set(observed["replicas"])) == 2, observed  # spread
        store_actor = _wait(lambda: _alive("StoreActor"), 30, "store actor alive")
        assert len(store_actor) == 1 and store_actor[0]["Name"] == store_actor_name(store)  # ingest and serve share it
        observed["store_node"] = "head" if store_actor[0]["Address"]["NodeID"] == head else "second"
        assert observed["store_node"] == "head", observed  # the singleton owner lives on the node a cluster cannot lose

        # ---- a document produced to Kafka becomes answerable over HTTP, citing itself ------------------------------
        t0 = time.monotonic()
        kafka_io.produce(broker.bootstrap, topic, [PROBE])

        def answered():
            try:
                question = "Who did Zorblax Quantum Foundry name as chief executive?"
                r = requests.post(f"http://127.0.0.1:{port}/v1/answer", json={"question": question, "top_k": 1},
                                  timeout=60)
            except requests.RequestException:
                return None
            assert r.status_code == 200, r.text
            ids = [s["id"] for s in r.json()["sources"]]
            return ids if PROBE.id in ids else None

        assert _wait(answered, 120, "probe answerable") == [PROBE.id]
        observed["probe_answerable_s"] = round(time.monotonic() - t0, 2)

        # ---- lose a node mid-stream, twice: nothing committed is lost ---------------------------------------------
        handle = ray.get_actor(store_actor_name(store), namespace="macstream")
        count = lambda: ray.get(handle.counts.remote(collection), timeout=30)["documents"]  # noqa: E731
        expected = {d.id for d in _docs(6, "w")} | {PROBE.id}
        # The first part of each stream is produced before the kill, the rest after it: the node dies mid-stream
        # however fast ingest runs (CI once stored a whole stream of 60, then of 120, before the kill landed).
        n, first = 60, 20
        for round_, node in enumerate(cluster.nodes[1:]):
            observed[f"alive_before_kill_{round_}"] = _where(head)  # before the stream: it is slow under load
            before = count()
            stream = _docs(n, f"s{round_}-")
            expected |= {d.id for d in stream}
            kafka_io.produce(broker.bootstrap, topic, stream[:first])
            _wait(lambda b=before: count() >= b + 5, 120, f"round {round_}: mid-stream progress", 0.2)
            cluster.kill(node)
            observed[f"stored_when_killed_{round_}"] = count() - before
            assert observed[f"stored_when_killed_{round_}"] < n, "the node must die mid-stream"
            kafka_io.produce(broker.bootstrap, topic, stream[first:])
            _wait(lambda nid=node.node_id: not any(x["NodeID"] == nid and x["Alive"] for x in ray.nodes()), 90,
                  "node marked dead")
            # everything arrives: restarted encoders and replaced consumers, redelivery from the last commit
            _wait(lambda expected=expected: (running("ingest"), count() == len(expected))[1], 300,
                  f"round {round_}: all {len(expected)} documents stored", 1.0)
        assert ray.get(handle.counts.remote(collection)) == {"documents": len(expected), "chunks": len(expected)}
        observed["alive_after_kill"] = after = _where(head)
        assert sorted(after["EncoderActor"]) == ["head", "head"] and after["StoreActor"] == ["head"]
        assert _wait(answered, 60, "probe still answerable after the node loss") == [PROBE.id]

        # stop ingest (Ctrl-C: drains and commits), then check committed offsets against the store, record by record
        procs["ingest"].send_signal(signal.SIGINT)
        procs["ingest"].wait(timeout=120)
        out = (tmp_path / "ingest.out").read_text()
        # Ray's warnings may precede the final snapshot (JSON) and its deduplicated log lines may follow it
        snap, _ = json.JSONDecoder().raw_decode(out[out.rindex("\n{\n") + 1:] if "\n{\n" in out
                                                else out[out.index("{"):])
        observed["consumer_restarts"] = snap["consumer_restarts"]
        committed = _committed(broker.bootstrap, topic, group)
        assert sum(committed.values()) == len(expected), committed  # every record committed exactly up to the end
        below = _records_below(broker.bootstrap, topic, committed)
        assert below == expected
        hits = handle.search.remote(collection, np.ones((1, 384), np.float32) / np.sqrt(384), 1000)
        assert sorted(h.document.id for h in ray.get(hits)[0]) == sorted(expected)  # no duplicates, no strays
    finally:
        print("observed:", json.dumps(observed))
        if sys.exc_info()[0] is not None:
            print("\n".join(cluster.worker_log_lines()))
        for name in ("serve", "ingest"):
            p = procs.get(name)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    _kill_tree(psutil.Process(p.pid))
        cluster.stop()


def test_gpu_workers_are_placed_on_the_gpu_node_and_fall_back_to_cpu(broker, tiny_checkpoint, tmp_path,
                                                                     own_ray) -> None:
    """A head without GPUs + a node declaring one (`ray start --num-gpus 1`; no CUDA on this machine): an ingest job
    with gpus_per_worker=1 puts its encoder on that node with GPU id 0, which then encodes on the CPU (identically to
    a local model); a serve replica with replica_gpus=1 lands there too and answers."""
    import torch
    from ray import serve

    from pipeline.model.mac import MACModel
    from serving.app import start
    from workers.ingest import IngestJob

    cluster = LocalCluster()
    try:
        cluster.start(head_cpus=2, workers=[(2, 1)])
        gpu_node = cluster.nodes[1].node_id
        topic = "gpu-news"
        docs = _docs(5, "g")
        kafka_io.ensure_topic(broker.bootstrap, topic, 1)
        kafka_io.produce(broker.bootstrap, topic, docs)
        cfg = IngestConfig(bootstrap_servers=broker.bootstrap, topic=topic, group_id="gpu-ingest",
                           store=str(tmp_path / "store"), checkpoint=str(tiny_checkpoint), workers=1, gpus_per_worker=1,
                           exit_when_idle=3.0)
        job = IngestJob(cfg, partitions=1, progress=False).start()
        try:
            where = ray.get(job.encoders[0].placement.remote())
            assert where["node_id"] == gpu_node  # not the head, where this driver sits
            assert where["gpu_ids"] == ["0"] and where["cuda_visible_devices"] == "0"
            cuda = torch.cuda.is_available()
            assert where["device"] == ("cuda" if cuda else "cpu")
            half = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
            assert where["lm_dtype"] == (str(half) if cuda else "torch.float32")
            remote = ray.get(job.encoders[0].encode.remote(docs))
            local = MACModel.load(tiny_checkpoint).eval().encode_documents(docs)
            for chunks, ref in zip(remote, local):
                assert len(chunks) == 1 and chunks[0].modulation.doc_id == ref.modulation.doc_id
                np.testing.assert_allclose(chunks[0].modulation.tokens, ref.modulation.tokens,
                                           atol=0 if not cuda else 2e-2)
                np.testing.assert_allclose(chunks[0].vector, ref.vector, atol=1e-6 if not cuda else 1e-2)
            _wait(lambda: (job.supervise(), job.idle())[1], 120, "ingest idle", 0.3)
        finally:
            snap = job.stop()
        assert snap["upserted"] == len(docs) and sum(snap["committed"].values()) == len(docs)

        scfg = ServeConfig(port=_free_port(), checkpoint=str(tiny_checkpoint), store=str(tmp_path / "store"),
                           replica_gpus=1)
        start(scfg)
        try:
            base = f"http://127.0.0.1:{scfg.port}"
            def ready():
                try:
                    return requests.get(base + "/ready", timeout=15).status_code == 200
                except requests.RequestException:
                    return False

            _wait(ready, 180, "gpu replica ready")
            replicas = _alive("MACServer")
            assert [a["Address"]["NodeID"] for a in replicas] == [gpu_node]
            r = requests.post(base + "/v1/answer", json={"question": "Who did Company G3 name?", "top_k": 1},
                              timeout=60)
            assert r.status_code == 200 and [s["id"] for s in r.json()["sources"]] == ["g3"], r.text
        finally:
            serve.shutdown()
    finally:
        cluster.stop()


def test_gpu_fields_at_zero_reserve_no_gpu() -> None:
    """CPU behaviour is unchanged when the GPU fields are 0: no GPU is requested from Ray."""
    from workers.ingest import encoder_options

    opts = encoder_options(IngestConfig(topic="t", encoder_threads=2), 1)
    assert opts == {"name": "macstream-encoder-1", "num_cpus": 2, "scheduling_strategy": "SPREAD"}
    assert encoder_options(IngestConfig(topic="t", gpus_per_worker=0.5), 0)["num_gpus"] == 0.5
    assert ServeConfig().replica_gpus == 0 and IngestConfig(topic="t").gpus_per_worker == 0
