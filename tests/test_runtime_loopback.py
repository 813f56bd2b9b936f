"""A private local Ray (`graft run` without --address) listens on loopback only."""

from __future__ import annotations

import ipaddress
import os

import psutil
import pytest

from pipelines.runtime import ray_session


def _listening(pids: set[int]) -> list[tuple[str, int, str]]:
    out = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            out.append((conn.laddr.ip, conn.laddr.port, psutil.Process(conn.pid).name()))
    return out


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


@pytest.mark.integration
def test_private_ray_listens_on_loopback_only():
    import ray

    with ray_session(None, num_cpus=1):
        assert ray.get(ray.remote(lambda: 1).remote()) == 1  # a worker process too
        pids = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
        listening = _listening(pids)
        node = ray.nodes()[0]["NodeManagerAddress"]
    assert node == "127.0.0.1"
    assert len(listening) >= 3, listening  # GCS, raylet, a worker at least
    exposed = [x for x in listening if not _loopback(x[0])]
    assert not exposed, f"listening beyond loopback: {exposed}"
