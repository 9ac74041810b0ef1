"""Checks made before a run is opened, so a configuration mistake leaves no FAILED MLflow run.

Lightning opens the MLflow run just before the data module's ``setup``; anything that can be
checked from the configuration alone is checked here first, by the ``xm2`` command.
"""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from xm2.errors import ConfigError, TrackingError
from xm2.tracking import DEFAULT_TRACKING_URI

# Seconds to wait for a tracking server to answer: a live one answers in milliseconds, and
# MLflow's own retries would take minutes to give up.
CONNECT_TIMEOUT_S = 5.0


def check_trainer(trainer: Any) -> None:
    """Trainer settings Lightning accepts but xm2's data stream cannot run with."""
    accumulate = trainer.get("accumulate_grad_batches")
    if not isinstance(accumulate, int) or accumulate < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches={accumulate!r} must be an integer >= 1 "
                          "(micro-batches per optimizer step; 1 accumulates nothing)")
    max_steps = trainer.get("max_steps")
    if max_steps is not None and max_steps != -1 and max_steps < 1:
        raise ConfigError(f"trainer.max_steps={max_steps} must be >= 1 (or -1 for no limit)")


def check_tracking_uri(uri: str | None) -> None:
    """Fail in seconds, naming the URL, if an HTTP tracking server does not accept connections;
    say where runs go when a local SQLite store is new."""
    if not uri:
        return
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        problem = _http_problem(uri)
        if problem:
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            raise TrackingError(
                f"the MLflow tracking server {uri} does not answer ({problem}); start it (e.g. "
                f"`mlflow server --host 127.0.0.1 --port {port}`) or log to a local store with "
                f"--trainer.logger.init_args.tracking_uri {DEFAULT_TRACKING_URI}")
    elif parsed.scheme == "sqlite":
        store = sqlite_path(uri)
        if store is not None and not store.exists():
            print(f"xm2: new MLflow store {store.resolve()} (tracking_uri {uri}); this run is "
                  "recorded there, not in an existing store", file=sys.stderr, flush=True)


def _http_problem(uri: str) -> str | None:
    """Why an HTTP request to the server fails; None if it answers at all.

    An MLflow server answers ``/health`` (a proxy in front of one may ask for credentials: that
    is an answer too); a refused connection, an unknown host, silence for CONNECT_TIMEOUT_S
    seconds, "not found" or a server error are not.
    """
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=CONNECT_TIMEOUT_S):
            return None
    except urllib.error.HTTPError as error:
        if error.code == 404 or error.code >= 500:
            return f"HTTP {error.code} for /health: something answers there, not MLflow"
        return None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return f"no answer in {CONNECT_TIMEOUT_S:.0f} s"
        return getattr(reason, "strerror", None) or str(reason) or type(reason).__name__


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///relative`` or ``sqlite:////absolute`` URI; None for memory."""
    rest = uri.removeprefix("sqlite://")
    if not rest.startswith("/") or rest in ("/", "/:memory:"):
        return None
    return Path(rest[1:])


def replaced_callbacks(config_paths: list[Any]) -> list[str]:
    """Notes for each ``--config`` whose ``trainer.callbacks`` replaces an earlier file's list.

    A list in a later config replaces the earlier list whole; ``callbacks+:`` appends to it.
    """
    notes, earlier, source = [], [], None
    for path in config_paths:
        path = str(path)
        try:
            trainer = (yaml.safe_load(Path(path).read_text()) or {}).get("trainer") or {}
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if not isinstance(trainer, dict):
            continue
        replacing = trainer.get("callbacks")
        if isinstance(replacing, list) and earlier:
            kept = {_class_name(entry) for entry in replacing}
            dropped = [name for name in earlier if name not in kept]
            if dropped:
                notes.append(
                    f"xm2: note: {path} replaces the callbacks of {source}, dropping "
                    f"{', '.join(dropped)}; to add callbacks and keep the recipe's, write "
                    "`callbacks+:` instead of `callbacks:` under `trainer:`")
        if isinstance(replacing, list):
            earlier, source = [_class_name(entry) for entry in replacing], path
        appended = trainer.get("callbacks+")
        if isinstance(appended, list):
            earlier = earlier + [_class_name(entry) for entry in appended]
    return notes


def _class_name(entry: Any) -> str:
    if isinstance(entry, dict):
        return str(entry.get("class_path", "?")).rsplit(".", 1)[-1]
    return str(entry)
