"""Whether the places a run keeps its records can be reached from this machine: the MLflow tracking
store and the storage of a search's state and checkpoints (Ray's ``storage_path``). ``detr doctor``
prints these checks before anything starts on a cluster.

Each check answers in a few seconds: a tracking server's ``/health`` with a short timeout, a
database with one connection (a connect timeout), a path by looking at it. A reachable place is
not proof that the workers of a cluster reach it too; the details say so where it matters.
"""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

TIMEOUT_S = 5.0
# SQLAlchemy dialects (the part of the URI before "+" or "://") MLflow can use as a backend store,
# and the driver argument that bounds the connection time of each.
_DATABASE_TIMEOUT_ARGS = {"postgresql": "connect_timeout", "mysql": "connect_timeout", "mssql": "timeout"}


@dataclass(frozen=True)
class Reachability:
    """``status``: "ok", "UNREACHABLE" or "not checked"; ``what``: the place; ``why``: the detail."""

    status: str
    what: str
    why: str

    @property
    def unreachable(self) -> bool:
        return self.status == "UNREACHABLE"

    def line(self) -> str:
        return f"{self.status}: {self.what} ({self.why})"


def tracking_reachability(uri: str) -> Reachability:
    """Reach the tracking store ``uri`` (a server, a database, or a local SQLite file or directory)."""
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        return _http_reachability(uri)
    if scheme == "sqlite":
        return _sqlite_reachability(uri)
    if scheme.split("+")[0] in _DATABASE_TIMEOUT_ARGS:
        return _database_reachability(uri)
    if scheme in ("", "file"):
        path = Path(urlparse(uri).path if scheme else uri).resolve()
        return _local_reachability(path, "local file store directory")
    return Reachability("not checked", uri, f"no check for {scheme}:// tracking URIs here")


def _http_reachability(uri: str) -> Reachability:
    health = f"{uri.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(health, timeout=TIMEOUT_S) as response:
            return Reachability("ok", uri, f"{health} answers {response.status}")
    except urllib.error.HTTPError as error:
        return Reachability("UNREACHABLE", uri, f"{health} answers {error.code} {error.reason}")
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        return Reachability("UNREACHABLE", uri, f"{health}: {getattr(reason, 'strerror', None) or reason}")


def _sqlite_reachability(uri: str) -> Reachability:
    path = Path(uri.removeprefix("sqlite:///")).resolve() if uri.startswith("sqlite:///") else None
    if path is None or str(path) == ":memory:":
        return Reachability("not checked", uri, "not a SQLite file")
    return _local_reachability(path, "local SQLite file")


def _local_reachability(path: Path, kind: str) -> Reachability:
    on_other_nodes = "trials on other nodes cannot reach it: use an MLflow server for a cluster"
    if path.exists():
        return Reachability("ok", str(path), f"{kind}, exists; {on_other_nodes}")
    if path.parent.is_dir() and os.access(path.parent, os.W_OK):
        return Reachability("ok", str(path), f"{kind}, created on first use; {on_other_nodes}")
    return Reachability("UNREACHABLE", str(path), f"{kind}: its directory {path.parent} does not exist or is "
                                                  "not writable")


def _database_reachability(uri: str) -> Reachability:
    import sqlalchemy

    url = sqlalchemy.engine.make_url(uri)
    shown = url.render_as_string(hide_password=True)
    timeout_arg = _DATABASE_TIMEOUT_ARGS[url.get_backend_name()]
    try:
        engine = sqlalchemy.create_engine(url, connect_args={timeout_arg: int(TIMEOUT_S)}, poolclass=sqlalchemy.NullPool)
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except ImportError as error:
        return Reachability("UNREACHABLE", shown, f"the database driver is not installed here: {error}")
    except sqlalchemy.exc.SQLAlchemyError as error:
        original = getattr(error, "orig", None) or error
        first_line = (str(original).strip().splitlines() or [type(original).__name__])[0]
        return Reachability("UNREACHABLE", shown, first_line)
    return Reachability("ok", shown, "database connection works")


def storage_reachability(storage: str) -> Reachability:
    """Reach the storage of a search (``--storage``): a local directory that must exist and be
    writable, or a URI (``s3://``, ``gs://``, ``file://``) looked up through ``pyarrow.fs``, as Ray
    does."""
    if "://" not in storage:
        return _directory_reachability(Path(storage).resolve())
    try:
        import pyarrow
        import pyarrow.fs
    except ImportError:
        return Reachability("not checked", storage, "pyarrow is not installed here, so URIs cannot be checked")
    object_store = urlparse(storage).scheme != "file"
    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(storage)
        info = filesystem.get_file_info(path)
        if info.type == pyarrow.fs.FileType.NotFound and object_store:
            # An object store has no empty folders: a new prefix is fine once its bucket exists.
            bucket = filesystem.get_file_info(path.split("/")[0])
            if bucket.type != pyarrow.fs.FileType.NotFound:
                return Reachability("ok", storage, "its bucket exists, the prefix is created on first write")
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return Reachability("UNREACHABLE", storage, first_line)
    if info.type == pyarrow.fs.FileType.NotFound:
        return Reachability("UNREACHABLE", storage, f"{'bucket of ' if object_store else ''}{path} does not exist")
    if info.type != pyarrow.fs.FileType.Directory:
        return Reachability("UNREACHABLE", storage, f"{path} is a file, not a directory")
    return Reachability("ok", storage, "exists; every node of the cluster must reach it with the same URI")


def _directory_reachability(path: Path) -> Reachability:
    if not path.is_dir():
        why = "is a file, not a directory" if path.exists() else "no such directory"
        return Reachability("UNREACHABLE", str(path), why)
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        return Reachability("UNREACHABLE", str(path), f"not writable: {error.strerror or error}")
    return Reachability("ok", str(path), "writable here; on a cluster every node must see this same path (NFS)")
