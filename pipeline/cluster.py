"""Starting (or joining) Ray for macstream jobs."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

_started_gcs: str | None = None  # the GCS address of the local cluster init_ray started, if it did


def started_here() -> bool:
    """True when this process started the Ray cluster it is connected to (a local one sized to this machine), False
    when it joined one ($RAY_ADDRESS, or a cluster something else initialised in this process)."""
    import ray

    return ray.is_initialized() and _started_gcs == ray.get_runtime_context().gcs_address


@contextlib.contextmanager
def _keep_own_signal_handlers():
    """``ray.init`` installs SIGTERM handlers of its own: Python ones that exit 1 mid-start, and its core worker's
    native failure handler, which aborts the process (exit 134) after the Python handler ran. A process that
    installed Python handlers of its own (``up``, ``ingest``, ``serve``: a clean stop) keeps them through the call."""
    import ray._private.utils as ray_utils

    main = threading.current_thread() is threading.main_thread()
    own = {s: h for s in (signal.SIGTERM, signal.SIGINT) if main and callable(h := signal.getsignal(s))}
    original = ray_utils.set_sigterm_handler
    if signal.SIGTERM in own:
        ray_utils.set_sigterm_handler = lambda _handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = original
        for s, h in own.items():
            signal.signal(s, h)


TASK_EVENTS_KEPT = 10_000  # task records the local GCS keeps (Ray's default: 100,000, about 100 MB)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (or $RAY_ADDRESS), else start a local one sized to this machine.

    Local: no dashboard, a 512 MiB object store (modulations are ~14 KB each; nothing large travels), workers inherit
    this process's environment (MACSTREAM_HOME, HF_HUB_OFFLINE); the GCS keeps the records of the last
    ``TASK_EVENTS_KEPT`` tasks, not Ray's 100,000 (an always-on ingest runs a few tasks per document, and those records
    were the GCS's memory growth in a soak). Idempotent.
    """
    global _started_gcs
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    with _keep_own_signal_handlers():
        if address:
            ray.init(address=address, log_to_driver=False)
            return
        ray.init(num_cpus=num_cpus or os.cpu_count(), object_store_memory=512 * 1024 * 1024, include_dashboard=False,
                 log_to_driver=False, configure_logging=False,
                 _system_config={"task_events_max_num_task_in_gcs": TASK_EVENTS_KEPT})
    _started_gcs = ray.get_runtime_context().gcs_address
