"""Starting or joining Ray from a stage, the same way everywhere.

Inside `ray job submit` (or with `RAY_ADDRESS` set, e.g. `RAY_ADDRESS=auto` after `ray start --head`)
a stage joins that cluster. Otherwise it starts a private local instance with `address="local"`:
plain `ray.init()` would silently attach to whatever cluster `ray start` last left running on the
machine, with its resources instead of the ones the stage sized.
"""

from __future__ import annotations

import os


_START_ONLY = {"include_dashboard", "dashboard_port", "num_gpus", "resources", "object_store_memory"}


def ensure_ray(num_cpus: float | None = None, **kwargs) -> bool:
    """Make sure this process is connected to Ray; True if this call started it (the caller shuts it down).

    `num_cpus` sizes a new local instance (logical CPUs; may exceed physical cores, see
    docs/architecture.md); it is ignored when joining an existing cluster, which has its own.
    Worker log lines known to be noise (ray_compat.NOISE) are not echoed here; they stay in Ray's logs.
    """
    import ray

    from distillery.ray_compat import drop_noise_from_worker_logs

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # Options that size or shape a new instance are refused when joining one.
        ray.init(address=address, **{k: v for k, v in kwargs.items() if k not in _START_ONLY})
    else:
        # The private instance lives as long as the stage, without a dashboard unless asked for: on a
        # small machine the dashboard's processes take a real share of the cores
        # (benchmarks/README.md, "Ray's own cost on 2 cores"). For a dashboard, `ray start --head`
        # and set RAY_ADDRESS.
        kwargs.setdefault("include_dashboard", False)
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    drop_noise_from_worker_logs()
    return True
