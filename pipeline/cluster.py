"""Starting (or joining) Ray for macstream jobs."""

from __future__ import annotations

import os


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (or $RAY_ADDRESS), else start a local one sized to this machine.

    Local: no dashboard, a 512 MiB object store (modulations are ~14 KB each; nothing large travels), workers inherit
    this process's environment (MACSTREAM_HOME, HF_HUB_OFFLINE). Idempotent.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    ray.init(num_cpus=num_cpus or os.cpu_count(), object_store_memory=512 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
