"""Ray for a search: the Ray this process already has, an existing cluster (``address`` or
``RAY_ADDRESS``), or a local one started for the machine (``num_cpus`` of the machine). On a cluster
each trial needs the package installed where it runs, and the search's ``storage_path`` must be
shared storage (NFS, S3).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import ray

from detr.errors import InvalidInputError


@contextmanager
def ray_connection(address: str | None, resources: Mapping[str, float]) -> Iterator[None]:
    """Use the Ray this process already has, connect to ``address`` (or ``RAY_ADDRESS``), or start
    a local one for the machine; disconnect or stop afterwards only what was started here."""
    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if starts_local_ray(address):
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=100 * 1024**2)
        _check_local_resources(resources)
    else:
        address = address or os.environ["RAY_ADDRESS"]
        _check_reachable(address)
        try:
            ray.init(address=address)
        except ConnectionError as e:
            raise InvalidInputError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None
    try:
        yield
    finally:
        ray.shutdown()


def starts_local_ray(address: str | None) -> bool:
    """Whether the search starts a Ray of its own on this machine: no Ray in this process yet, and
    no cluster address given (``address`` or ``RAY_ADDRESS``)."""
    return not ray.is_initialized() and not (address or os.environ.get("RAY_ADDRESS"))


def _check_reachable(address: str) -> None:
    """``ray.init`` retries an address nobody listens at for minutes; a TCP connect says so at once."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: Ray resolves those itself
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise InvalidInputError(
            f"no Ray cluster answers at {address!r} ({e.strerror or e}): start one with `ray start --head` (it "
            "prints the address), or correct --address / RAY_ADDRESS"
        ) from None


def _check_local_resources(resources: Mapping[str, float]) -> None:
    """A trial asking for more than this machine has would wait forever: fail now instead."""
    available = ray.cluster_resources()
    for kind, key in (("cpu", "CPU"), ("gpu", "GPU")):
        wanted, have = resources.get(kind, 0), available.get(key, 0)
        if wanted > have:
            ray.shutdown()
            raise InvalidInputError(f"a trial asks for {wanted:g} {key}s but this machine has {have:g}: lower it, or "
                                    "run on a cluster that has them (--address)")
