"""Server processes for tests: a free local port, a command run in its own session until its
readiness URL answers, then stopped with all its workers; a PostgreSQL server of the test's own
(the ``pgserver`` package: PostgreSQL binaries from PyPI, no system install) and an ``mlflow server``."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(command: Sequence[str], *, ready_url: str, log: Path, cwd: Path,
                   env: dict[str, str] | None = None, timeout: float = 180) -> Iterator[subprocess.Popen]:
    """Run ``command`` in its own session until ``ready_url`` answers 200; stop the whole process
    group (server and workers) afterwards."""
    full_env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
    with log.open("w") as out:
        server = subprocess.Popen(list(command), cwd=cwd, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                pytest.fail(f"{command[0]} exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{ready_url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield server
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def _wait_gone(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` exited (or is a zombie nobody reaps) within ``timeout`` seconds."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


@contextmanager
def postgres_database(name: str = "mlflow") -> Iterator[str]:
    """A PostgreSQL server of its own with database ``name``; yields its SQLAlchemy URI
    (``postgresql+psycopg2://``, over a Unix socket in the data directory). The server is stopped
    by its PID (fast shutdown: SIGINT to the postmaster) and the data directory removed afterwards.

    The data directory is not under pytest's temporary directory: run as root, ``pgserver`` runs
    PostgreSQL as a separate system user, which must be able to enter every folder above it.
    """
    import pgserver

    data = Path(tempfile.mkdtemp(prefix="detr-pg-"))
    server = pgserver.get_server(data, cleanup_mode=None)  # stopped here, by PID
    postmaster = server.get_pid()
    try:
        server.psql(f"CREATE DATABASE {name};")
        yield server.get_uri(name).replace("postgresql://", "postgresql+psycopg2://", 1)
    finally:
        os.kill(postmaster, signal.SIGINT)
        if not _wait_gone(postmaster, 30):
            os.kill(postmaster, signal.SIGKILL)
            _wait_gone(postmaster, 10)
        shutil.rmtree(data, ignore_errors=True)


@contextmanager
def mlflow_tracking_server(backend_store_uri: str, artifacts: Path, *, log: Path) -> Iterator[str]:
    """``mlflow server`` on ``backend_store_uri`` serving the artifacts in ``artifacts`` itself
    (``mlflow-artifacts:/``, as a remote server does); yields its URL."""
    port = free_port()
    artifacts.mkdir(parents=True, exist_ok=True)
    command = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", backend_store_uri,
               "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    with server_process(command, ready_url=f"{url}/health", log=log, cwd=log.parent, timeout=180):
        yield url
