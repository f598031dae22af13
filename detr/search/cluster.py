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
from pathlib import Path

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


def alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node.get("Alive")]


def describe_node(node: Mapping) -> str:
    return f"node {node['NodeID'][:12]} ({node.get('NodeManagerAddress', '?')})"


def check_cluster_settings(per_worker: Mapping[str, float], *, workers: int, tracking_uri: str | None,
                           what: str, storage: str | None = None, gpu_flag: str = "--gpus-per-worker") -> None:
    """What would otherwise fail inside a worker, or wait forever, checked before anything starts:
    the workers fit the nodes; a local-file tracking store is not used by a cluster of several
    nodes; every node sees ``storage``; every GPU node that a worker may land on has CUDA."""
    nodes = alive_nodes()
    _check_workers_fit(nodes, per_worker, workers, what)
    if tracking_uri is not None and len(nodes) > 1 and _is_local_file_uri(tracking_uri):
        raise InvalidInputError(
            f"the tracking URI {tracking_uri!r} (tracking.tracking_uri or MLFLOW_TRACKING_URI) is a file on this "
            f"machine, but the Ray cluster has {len(nodes)} nodes: what runs on the other nodes cannot write to it, "
            "and nobody else can read it; use an MLflow tracking server (MLFLOW_TRACKING_URI=http://host:5000)")
    if storage is not None and "://" not in storage:
        _probe_storage(nodes, storage)
    if per_worker.get("GPU", 0) > 0:
        _probe_gpus(nodes, per_worker["GPU"], gpu_flag)


def _is_local_file_uri(uri: str) -> bool:
    scheme = uri.partition("://")[0] if "://" in uri else ""
    return scheme in ("", "file", "sqlite")


def worker_capacity(per_worker: Mapping[str, float], nodes: list[dict] | None = None) -> int:
    """How many workers of ``per_worker`` the cluster's nodes hold at once (a worker runs on one node)."""
    def fits(node: Mapping) -> int:
        have = node.get("Resources", {})
        return int(min(have.get(key, 0) // amount for key, amount in per_worker.items() if amount > 0))

    return sum(fits(node) for node in (alive_nodes() if nodes is None else nodes))


def _check_workers_fit(nodes: list[dict], per_worker: Mapping[str, float], workers: int, what: str) -> None:
    capacity = worker_capacity(per_worker, nodes)
    if capacity >= workers:
        return
    asked = ", ".join(f"{amount:g} {key}" for key, amount in per_worker.items() if amount > 0)
    have = "; ".join(f"{describe_node(n)}: {n.get('Resources', {}).get('CPU', 0):g} CPU, "
                     f"{n.get('Resources', {}).get('GPU', 0):g} GPU" for n in nodes)
    raise InvalidInputError(
        f"{what} asks for {workers} workers of {asked} each, but the Ray cluster holds {capacity} such workers "
        f"({have}): ask for fewer workers or resources per worker (--cpus-per-worker, --gpus-per-worker), or add "
        "nodes")


def _on_node(node: Mapping, **options):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node["NodeID"], soft=False), **options}


def _probe_storage(nodes: list[dict], storage: str) -> None:
    """A file written here must be readable from every node: Ray keeps the trials' checkpoints there."""
    import uuid

    directory = Path(storage)
    directory.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = directory / f".detr-storage-probe-{token}"
    marker.write_text(token)
    try:
        seen = ray.get([_read_marker.options(**_on_node(n, num_cpus=0)).remote(str(marker)) for n in nodes],
                       timeout=120)
    finally:
        marker.unlink(missing_ok=True)
    blind = [describe_node(n) for n, text in zip(nodes, seen) if text != token]
    if blind:
        raise InvalidInputError(
            f"--storage {storage}: {', '.join(blind)} cannot see this directory (a file written here is not there); "
            "on a cluster, --storage must be shared storage that every node mounts at the same path (NFS), or "
            "s3://bucket/path / gs://bucket/path")


@ray.remote(num_cpus=0)
def _read_marker(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _probe_gpus(nodes: list[dict], gpus_per_worker: float, gpu_flag: str) -> None:
    """A node that declares GPUs must have CUDA: else a GPU worker would fail deep inside torch."""
    gpu_nodes = [n for n in nodes if n.get("Resources", {}).get("GPU", 0) > 0]
    if not gpu_nodes:
        return  # _check_workers_fit said so already
    probes = [_cuda_state.options(**_on_node(n, num_cpus=0, num_gpus=min(1.0, n["Resources"]["GPU"])))
              .remote() for n in gpu_nodes]
    try:
        states = ray.get(probes, timeout=180)
    except ray.exceptions.GetTimeoutError:
        raise InvalidInputError("the GPU check on the cluster's GPU nodes did not answer within 180 s (their GPUs "
                                "are busy, or a node is stuck)") from None
    broken = [f"{describe_node(n)} declares {n['Resources']['GPU']:g} GPUs but {state}"
              for n, state in zip(gpu_nodes, states) if state]
    if broken:
        raise InvalidInputError(
            f"{gpu_flag} {gpus_per_worker:g} asks for GPUs, and {'; '.join(broken)}: start that "
            "node with the right --num-gpus (0 without a GPU), or install a CUDA build of torch there")


@ray.remote(num_cpus=0)
def _cuda_state() -> str | None:
    """None when CUDA works in this process; else what is wrong, in words."""
    import torch

    if torch.cuda.is_available():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"CUDA is not available there (torch {torch.__version__}, torch.cuda.is_available() is False, "
            f"CUDA_VISIBLE_DEVICES={visible!r})")
