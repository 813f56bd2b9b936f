"""Starting and stopping Ray: a private local instance by default, or an existing cluster by address."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator[dict]:
    """Connect Ray for the duration of a job and yield the cluster's resources.

    With no address a fresh local Ray is started (`address="local"`), never silently attaching to
    another cluster that happens to run on this machine. `address` may be `auto`, `ray://host:10001`
    or `host:6379` for an existing cluster.
    """
    import ray

    env = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_V2_ENABLED": "1"}
    if address is None:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 runtime_env={"env_vars": env}, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()
