"""`detr doctor` reaches the tracking store, the Ray cluster and the storage a cluster run needs,
says which it could not reach and why, and exits 2 then. Every check here talks to a real socket,
database driver or directory; a reachable MLflow server is checked in tests/engine/test_mlflow_server.py."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from detr.cli import main
from detr.tracking.reachability import storage_reachability, tracking_reachability
from tests.servers import free_port


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A port on which something accepts TCP connections (as a Ray head's GCS does)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def doctor_lines(capsys, *args: str) -> tuple[int, dict[str, str]]:
    try:
        code = main(["doctor", *args])
    except SystemExit as exit:
        code = exit.code
    lines = capsys.readouterr().out.splitlines()
    checks = {line.split()[0]: line.split(maxsplit=1)[1] for line in lines
              if line.split() and line.split()[0] in ("tracking", "ray", "storage")}
    return code, checks


def test_every_unreachable_place_is_named_with_its_reason_and_the_exit_status_is_2(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    dead = free_port()  # bound and released: nothing listens there
    code, checks = doctor_lines(capsys, "--tracking-uri", f"http://127.0.0.1:{dead}", "--address", f"127.0.0.1:{dead}",
                                "--storage", str(tmp_path / "missing"))
    assert code == 2
    assert checks["tracking"] == (f"UNREACHABLE: http://127.0.0.1:{dead} "
                                  f"(http://127.0.0.1:{dead}/health: Connection refused)")
    assert checks["ray"].startswith(f"UNREACHABLE: Ray cluster at 127.0.0.1:{dead} (")
    assert "Connection refused" in checks["ray"]
    assert checks["storage"] == f"UNREACHABLE: {tmp_path / 'missing'} (no such directory)"


def test_reachable_places_are_ok_and_the_exit_status_is_0(capsys, tmp_path, listening_port, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{listening_port}")  # the default of --address
    database = tmp_path / "mlflow.db"
    code, checks = doctor_lines(capsys, "--tracking-uri", f"sqlite:///{database}", "--storage", str(tmp_path))
    assert code == 0
    assert checks["tracking"].startswith(f"ok: {database} (local SQLite file, created on first use; trials on "
                                         "other nodes cannot reach it")
    assert checks["ray"] == f"ok: Ray cluster at 127.0.0.1:{listening_port} (its head accepts connections)"
    assert checks["storage"].startswith(f"ok: {tmp_path} (writable here")


def test_nothing_given_checks_the_default_store_and_says_what_it_did_not_check(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, checks = doctor_lines(capsys)
    assert code == 0
    assert checks["tracking"].startswith(f"ok: {tmp_path / 'mlflow.db'} (local SQLite file")
    assert checks["ray"].startswith("not checked: no --address or RAY_ADDRESS")
    assert checks["storage"] == "not checked: no --storage given"


def test_a_database_store_is_reached_with_its_driver_and_the_password_is_not_shown():
    port = free_port()
    check = tracking_reachability(f"postgresql+psycopg2://mlflow:secret@127.0.0.1:{port}/mlflow")
    assert check.unreachable and check.what == f"postgresql+psycopg2://mlflow:***@127.0.0.1:{port}/mlflow"
    assert "Connection refused" in check.why and "secret" not in check.line()


def test_a_local_store_whose_directory_is_missing_is_unreachable(tmp_path):
    check = tracking_reachability(f"sqlite:///{tmp_path / 'no' / 'mlflow.db'}")
    assert check.unreachable and f"{tmp_path / 'no'} does not exist" in check.why


def test_storage_uris_are_looked_up_through_pyarrow(tmp_path):
    (tmp_path / "a-file").write_text("x")
    assert storage_reachability(tmp_path.as_uri()).status == "ok"
    missing = storage_reachability((tmp_path / "missing").as_uri())
    assert missing.unreachable and "does not exist" in missing.why
    assert storage_reachability((tmp_path / "a-file").as_uri()).why.endswith("is a file, not a directory")
    assert storage_reachability(str(tmp_path / "a-file")).why == "is a file, not a directory"
