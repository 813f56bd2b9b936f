"""Starting and stopping Ray: a private local instance by default, or an existing cluster by address."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

LOOPBACK = "127.0.0.1"


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator[dict]:
    """Connect Ray for the duration of a job and yield the cluster's resources.

    With no address a fresh local Ray is started (`address="local"`), never silently attaching to
    another cluster that happens to run on this machine, and listening on loopback only (see
    `_loopback_only`). `address` may be `auto`, `ray://host:10001` or `host:6379` for an existing cluster.
    """
    import ray

    env = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_V2_ENABLED": "1"}
    with _loopback_only() if address is None else nullcontext():
        if address is None:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _node_ip_address=LOOPBACK,
                     runtime_env={"env_vars": env}, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
        try:
            yield ray.cluster_resources()
        finally:
            ray.shutdown()


@contextmanager
def _loopback_only() -> Iterator[None]:
    """A private local Ray whose every server (GCS, raylet, workers, agents) listens on 127.0.0.1 only.

    On Linux Ray turns a loopback node address into the host's external one and its servers listen
    there or on every interface; it keeps loopback only where it does not support clusters (macOS,
    Windows), by a switch (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`) it reads into a module constant at
    import. A private Ray is one machine's, never a cluster's: the switch is turned off while it runs.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
