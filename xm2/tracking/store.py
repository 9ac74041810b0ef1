"""Opening an MLflow store: a new local SQLite store is built by one process at a time.

MLflow creates the tables of a SQLite store, and runs its schema migrations, the first time a
``SqlAlchemyStore`` is built on it, without any lock: two processes that open the same new store
at the same moment both migrate it, and all but one die inside the migrations ("table runs
already exists", "duplicate column name: step"). :func:`open_store` builds the store under an
inter-process lock on a file beside it (``<store>.lock``), so the first process creates the
tables and the others wait, then find them. MLflow keeps the store it built for the rest of the
process, so every later client of the same URI in that process finds it ready. The xm2 logger
and every :class:`~xm2.tracking.runs.TrackedRun` open their stores here.

MLflow is imported inside the functions: ``xm2.preflight`` uses this module before Lightning or
MLflow are loaded.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from pathlib import Path
from typing import Any

from xm2.errors import TrackingError, chain
from xm2.tracking import DEFAULT_TRACKING_URI

LOCK_SUFFIX = ".lock"
"""The lock file of store ``mlflow.db`` is ``mlflow.db.lock``, in the same folder."""

# Stores this process has already built (MLflow keeps them): no lock needed to reopen one.
_built: set[str] = set()


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///relative`` or ``sqlite:////absolute`` URI; None for anything
    else (a server, an in-memory store)."""
    if not uri.startswith("sqlite://"):
        return None
    rest = uri.removeprefix("sqlite://")
    if not rest.startswith("/") or rest in ("/", "/:memory:"):
        return None
    return Path(rest[1:])


def store_problem(uri: str, writing: bool = True) -> str | None:
    """Why the local SQLite store of ``uri`` cannot be created (or, with ``writing``, cannot be
    written), as the sentence of a one-line error; None if it can, or if ``uri`` is a server."""
    path = sqlite_path(uri)
    if path is None:
        return None
    where = f"the MLflow store {path} (tracking_uri {uri})"
    fix = f"give --trainer.logger.init_args.tracking_uri a file in a folder, e.g. {DEFAULT_TRACKING_URI}"
    if path.is_dir():
        return f"{where} is a folder, not an SQLite file; {fix}"
    folder = next((parent for parent in path.parents if parent.exists()), None)  # nearest
    if folder is not None and not folder.is_dir():
        return f"{where} cannot be created: its parent {folder} is a file, not a folder; {fix}"
    if not writing:
        return None
    # SQLite writes a journal beside the file, so its folder must be writable too. os.access
    # also sees an immutable file (chattr +i) and a read-only mount, which stop root as well.
    read_only = next((item for item in (path, folder)
                      if item is not None and item.exists() and not os.access(item, os.W_OK)),
                     None)
    if read_only is not None:
        return (f"{where} cannot be written: {read_only} is read-only; make it writable, or log "
                f"to another store with --trainer.logger.init_args.tracking_uri")
    return None


def open_store(uri: str) -> Any:
    """An ``MlflowClient`` of ``uri``; a local SQLite store is created (or its tables checked)
    first, under the store's lock, so that processes starting together do not race to make it."""
    from mlflow import MlflowClient

    path = sqlite_path(uri)
    if path is None or uri in _built:
        return MlflowClient(uri)
    problem = store_problem(uri, writing=False)
    if problem:
        raise TrackingError(problem)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + LOCK_SUFFIX)
    try:
        lock = open(lock_path, "a")
    except OSError:
        if not path.exists():
            raise  # the folder refuses new files: MLflow could not create the store either
        # A store in a read-only folder can only be read: nobody can be creating its tables.
        client = MlflowClient(uri)
    else:
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            client = MlflowClient(uri)  # builds the SqlAlchemyStore: MLflow makes the tables here
    _built.add(uri)
    return client


def experiment_id(client: Any, name: str, artifact_location: str | None = None) -> str:
    """The id of MLflow experiment ``name``, created if missing (also when another process
    creates it at the same moment)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        # Another process created it between the lookup and the create.
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def storage_failure(error: BaseException) -> str | None:
    """What a local store's database said when it failed a call for a reason of its file (read
    only, a full or failing disk, a lock held too long); None for a request the store refused
    (a changed parameter, a unique name) or any other error."""
    for link in chain(error):
        if isinstance(link, sqlite3.OperationalError) or type(link) is sqlite3.DatabaseError:
            return str(link)
    return None
