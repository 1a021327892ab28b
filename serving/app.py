"""The builder that turns a :class:`ServeConfig` into a Serve application (gateway + model deployment), and
:func:`start`, which runs it on this process's Ray cluster. ``serving.app:build_app`` is also the import path a Serve
config file (KubeRay ``RayService``) names."""

# no `from __future__ import annotations` here: Serve validates an application builder's args by its real type hint
from ray import serve

from pipeline import placement
from pipeline.cluster import init_ray, started_here
from pipeline.config import ServeConfig
from pipeline.store.actor import connect_store
from serving.gateway import Gateway
from serving.model import MACServer


def build_app(cfg: ServeConfig):
    """ServeConfig → a bound Serve application (ingress + model deployment).

    Redeploying (``start`` with a new config, e.g. another checkpoint) is a rolling update with surge: Serve starts
    the new replicas, which load their model before taking traffic, before it drains and stops the old ones, so no
    request is dropped. Under ``serve deploy`` (config files), a changed checkpoint alone is a lightweight update:
    ``reconfigure`` swaps the model inside the running replicas.
    """
    cfg_static = cfg.model_copy(update={"checkpoint": None})
    rolling = {"max_surge_percent": 100, "graceful_shutdown_timeout_s": 120}
    actor_opts: dict = {"num_cpus": cfg.replica_threads}
    if cfg.replica_gpus:  # the replica computes on the GPU Ray assigns it (serving/model.py, _Loaded)
        actor_opts["num_gpus"] = cfg.replica_gpus
    model_opts: dict = {"ray_actor_options": actor_opts, "user_config": {"checkpoint": cfg.checkpoint}, **rolling}
    if cfg.autoscale_max_replicas:
        model_opts["autoscaling_config"] = {"min_replicas": 1, "max_replicas": cfg.autoscale_max_replicas,
                                            "target_ongoing_requests": cfg.max_batch_size}
    else:
        model_opts["num_replicas"] = cfg.replicas
    model = MACServer.options(**model_opts).bind(cfg.store_location(), cfg.replica_threads, cfg.max_batch_size,
                                                 cfg.batch_wait_timeout_s)
    return Gateway.options(**rolling).bind(model, cfg_static)


def demand(cfg: ServeConfig) -> tuple[float, float]:
    """(CPUs, GPUs) the app reserves at start: the model replicas (the first one when autoscaling); the gateway
    reserves none."""
    replicas = 1 if cfg.autoscale_max_replicas else cfg.replicas
    return replicas * cfg.replica_threads, replicas * cfg.replica_gpus


def serve_running(name: str) -> bool:
    """Whether app ``name`` is already deployed here (a redeploy is a rolling update: its surge is Serve's to place)."""
    try:
        return name in serve.status().applications
    except Exception:  # noqa: BLE001 - Serve not started on this cluster
        return False


def start(cfg: ServeConfig, name: str = "macstream", route_prefix: str = "/", blocking: bool = False):
    """Start (or update in place) the app on cfg.host:cfg.port; returns when the deployments are up (the model
    replicas may still be loading: see /ready). On a cluster started here, a plan it cannot place is refused first
    (:class:`placement.Unplaceable`), instead of a deployment that waits for its replicas without end."""
    init_ray()
    if started_here() and not serve_running(name):
        placement.check_serve(*demand(cfg))
    connect_store(cfg.store_location())  # the store's owner on this node; StoreBusy here, not a never-ready replica
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    return serve.run(build_app(cfg), name=name, route_prefix=route_prefix, blocking=blocking)
