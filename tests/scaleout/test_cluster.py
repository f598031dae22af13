"""A real multi-node Ray cluster: a head and a second node, separate raylets (processes) on this
machine, the second declaring a GPU it does not have. ``detr tune --address`` from a separate
driver process runs its trials on both nodes with the resources each trial asks for; and the
settings a cluster cannot honour fail before any trial starts, naming the setting: a GPU node
without CUDA, a local-file tracking store, a storage path the nodes cannot see, more workers than
the cluster holds. One cluster for the module; every process it started is stopped by PID."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from detr.cli import main
from tests.servers import VENV_BIN, free_port, server_process
from tests.tune.conftest import EXPERIMENT, micro_search_config

pytestmark = pytest.mark.slow
METRIC = "train/loss_mean"


@pytest.fixture(scope="module")
def cluster():
    """Head (2 CPUs) and a second node (2 CPUs, 1 declared GPU), each a raylet of its own."""
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    small = {"include_dashboard": False, "object_store_memory": 80 * 1024**2}
    ray_cluster = Cluster(initialize_head=True, connect=False,
                          head_node_args={"num_cpus": 2, "resources": {"head_node": 1}, **small})
    second = ray_cluster.add_node(num_cpus=2, num_gpus=1, resources={"gpu_node": 1},
                                  object_store_memory=80 * 1024**2)
    ray_cluster.wait_for_nodes()
    try:
        yield ray_cluster
    finally:
        pids = [p.process.pid for node in (ray_cluster.head_node, second)
                for processes in node.all_processes.values() for p in processes]
        ray_cluster.shutdown()  # kills the processes it started, by their handles
        for pid in pids:
            assert not _alive(pid), f"process {pid} of the cluster still runs"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
               "--artifacts-destination", str(work / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    with server_process(command, ready_url=f"{url}/health", log=work / "server.log", cwd=work):
        yield url


def write_config(micro_synth_dir, tmp_path, tracking_uri: str) -> Path:
    path = tmp_path / "micro.yaml"
    path.write_text(micro_search_config(micro_synth_dir, tmp_path, tracking_uri, **{"train.epochs": 1}).to_yaml())
    return path


def test_trials_run_on_both_nodes_with_their_resources(cluster, tracking_server, micro_synth_dir, tmp_path):
    config = write_config(micro_synth_dir, tmp_path, tracking_server)
    space = tmp_path / "lr.yaml"
    space.write_text("train.lr: {grid: [1.0e-4, 3.0e-4]}\n")
    storage = tmp_path / "ray"
    # Two CPUs per trial: a node holds one trial at a time, so the two trials run on the two nodes.
    command = [sys.executable, "-m", "detr.cli", "tune", str(config), "--space", str(space), "--samples", "1",
               "--cpus-per-trial", "2", "--metric", METRIC, "--mode", "min", "--name", "nodes", "--storage",
               str(storage), "--address", cluster.address]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for path in storage.glob("nodes/trial_*/result.json")
            for line in path.read_text().splitlines()]
    assert len(rows) == 2
    import ray

    ray.init(address=cluster.address)
    try:
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
    assert {r["worker/node_id"] for r in rows} == nodes and len(nodes) == 2
    client = mlflow.MlflowClient(tracking_server)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)


def tune_args(config: Path, tmp_path: Path, address: str, *extra: str) -> list[str]:
    space = tmp_path / "lr.yaml"
    space.write_text("train.lr: {grid: [1.0e-4]}\n")
    return ["tune", str(config), "--space", str(space), "--samples", "1", "--metric", METRIC, "--mode", "min",
            "--storage", str(tmp_path / "ray"), "--address", address, *extra]


def test_settings_the_cluster_cannot_honour_fail_before_any_trial(cluster, tracking_server, micro_synth_dir,
                                                                  tmp_path, capsys):
    served = write_config(micro_synth_dir, tmp_path, tracking_server)
    (tmp_path / "local").mkdir()
    cases = [
        # The second node declares a GPU; CUDA is missing there.
        (served, ["--gpus-per-trial", "1"], r"--gpus-per-trial 1 asks for GPUs, and node [0-9a-f]{12} \(.*\) declares 1 "
                                            r"GPUs but CUDA is not available there"),
        (served, ["--workers-per-trial", "5"], r"--workers-per-trial asks for 5 workers of 1 CPU each, but the Ray "
                                               r"cluster holds 4 such workers"),
        (write_config(micro_synth_dir, tmp_path / "local", f"sqlite:///{tmp_path / 'mlflow.db'}"), [],
         r"the tracking URI 'sqlite:///.*mlflow\.db' .* is a file on this machine, but the Ray cluster has 2 nodes"),
    ]
    import re

    for config, extra, expected in cases:
        assert main(tune_args(config, tmp_path, cluster.address, *extra)) == 2
        err = capsys.readouterr().err
        assert err.startswith("detr: error: ") and re.search(expected, err), (extra, err)
    assert not list((tmp_path / "ray").glob("*/trial_*")), "no trial started"

    # A storage path only this driver sees: a file system mounted in its own mount namespace.
    private = tmp_path / "private"
    private.mkdir()
    script = (f"mount -t tmpfs none {private} && exec {sys.executable} -m detr.cli "
              + " ".join(tune_args(served, tmp_path, cluster.address, "--storage", str(private / "ray"))))
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.search(rf"--storage {private}/ray: node [0-9a-f]{{12}} .*, node [0-9a-f]{{12}} .* cannot see this "
                     "directory", result.stderr), result.stderr[-3000:]
