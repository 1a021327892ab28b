"""Fitting a plan (encoder actors, Serve replicas) to the Ray cluster before anything waits on it.

Ray queues an actor it cannot place and waits for resources forever: on a 2-core machine, ``up --workers 2`` (one
Serve replica + two encoders at 1 CPU each) used to start one encoder and wait for the second without a word. Every
job here checks its plan against what the cluster has *before* it creates the actors:

- on a cluster this process started (``pipeline.cluster.started_here``), a CPU shortfall is fitted: each encoder
  reserves an equal share of the free CPUs (a fraction; the actors then share cores), with a warning. A GPU
  shortfall, or less than ``MIN_CPU_SHARE`` CPU per encoder, is refused.
- on a cluster it joined ($RAY_ADDRESS), nothing is fitted (an autoscaler may be about to add nodes); the wait for
  the actors has a deadline instead (``PLACEMENT_TIMEOUT_S``), after which the job fails naming the shortfall.

A refusal is one line (:class:`Unplaceable`) that names what was asked, what the cluster has, and the flag to change.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)
MIN_CPU_SHARE = 0.25  # below a quarter core per model copy the plan is refused rather than fitted
PLACEMENT_TIMEOUT_S = 600.0  # a joined cluster: longest wait for the encoders to be placed and load their model


class Unplaceable(RuntimeError):
    """The cluster cannot hold what was asked; nothing of the plan was started."""


def _free() -> tuple[float, float, float, float]:
    """(free CPUs, total CPUs, free GPUs, total GPUs) of the connected cluster, now."""
    import ray

    free, total = ray.available_resources(), ray.cluster_resources()
    return free.get("CPU", 0.0), total.get("CPU", 0.0), free.get("GPU", 0.0), total.get("GPU", 0.0)


def fit_encoders(workers: int, cpus: float, gpus: float, reserve_cpus: float = 0.0, reserve_gpus: float = 0.0) -> float:
    """CPUs each of ``workers`` encoder actors should reserve, given ``cpus``/``gpus`` wanted each and
    ``reserve_*`` kept for something not yet started (``up``'s Serve replicas). Returns ``cpus`` when the plan fits,
    a smaller equal share when the free CPUs allow at least ``MIN_CPU_SHARE`` each; raises
    :class:`Unplaceable` otherwise."""
    free_cpu, total_cpu, free_gpu, total_gpu = _free()
    free_cpu, free_gpu = free_cpu - reserve_cpus, free_gpu - reserve_gpus
    kept = f" after {reserve_cpus:g} CPU kept for serving" if reserve_cpus else ""
    if gpus and workers * gpus > free_gpu + 1e-9:
        raise Unplaceable(f"ingest needs {workers} encoder(s) × {gpus:g} GPU = {workers * gpus:g} GPU; the cluster has "
                          f"{max(free_gpu, 0):g} free of {total_gpu:g}{kept}: lower --workers or --gpus-per-worker, "
                          f"or add GPU nodes")
    if workers * cpus <= free_cpu + 1e-9:
        return cpus
    share = math.floor(max(free_cpu, 0) / workers * 100) / 100
    if share < MIN_CPU_SHARE:
        raise Unplaceable(f"ingest needs {workers} encoder(s) × {cpus:g} CPU = {workers * cpus:g} CPU; the cluster has "
                          f"{max(free_cpu, 0):g} free of {total_cpu:g}{kept}: lower --workers (or --encoder-threads), "
                          f"or add nodes")
    log.warning("the cluster has %g CPU free%s for %d encoders wanting %g each: each reserves %g CPU instead "
                "(they share cores; docs/s will not scale with --workers here)", free_cpu, kept, workers, cpus, share)
    return share


def check_serve(cpus: float, gpus: float) -> None:
    """Refuse (one line) a Serve plan reserving ``cpus``/``gpus`` in all that the connected cluster cannot place now:
    Serve would otherwise start the deployment and wait for its replicas without end."""
    free_cpu, total_cpu, free_gpu, total_gpu = _free()
    if gpus > free_gpu + 1e-9:
        raise Unplaceable(f"serve needs {gpus:g} GPU for its replicas; the cluster has {free_gpu:g} free of "
                          f"{total_gpu:g}: lower --replicas or --replica-gpus, or add GPU nodes")
    if cpus > free_cpu + 1e-9:
        raise Unplaceable(f"serve needs {cpus:g} CPU for its replicas; the cluster has {free_cpu:g} free of "
                          f"{total_cpu:g}: lower --replicas or --replica-threads, or add nodes")
