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
from xm2.tracking.store import sqlite_path, store_problem

# Seconds to wait for a tracking server to answer: a live one answers in milliseconds, and
# MLflow's own retries would take minutes to give up.
CONNECT_TIMEOUT_S = 5.0


def check_trainer(trainer: Any) -> None:
    """Trainer settings Lightning refuses only deep inside, or accepts but xm2's data stream
    cannot run with."""
    devices = trainer.get("devices", "auto")
    if not _valid_devices(devices):
        raise ConfigError(f"trainer.devices={devices} must be 'auto', a number of devices >= 1, "
                          "-1 (every GPU) or a list of GPU indices such as [0, 1]")
    count = _device_count(devices)
    if trainer.get("accelerator") == "cpu" and devices != "auto" and (count is None or count < 1):
        raise ConfigError(f"trainer.devices={devices} must be 'auto' or a number of processes "
                          ">= 1 with trainer.accelerator=cpu (-1 and device indices are for GPUs)")
    num_nodes = trainer.get("num_nodes", 1)
    if not isinstance(num_nodes, int) or isinstance(num_nodes, bool) or num_nodes < 1:
        raise ConfigError(f"trainer.num_nodes={num_nodes} must be an integer >= 1")
    accumulate = trainer.get("accumulate_grad_batches")
    if not isinstance(accumulate, int) or accumulate < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches={accumulate!r} must be an integer >= 1 "
                          "(micro-batches per optimizer step; 1 accumulates nothing)")
    max_steps = trainer.get("max_steps")
    if max_steps is not None and max_steps != -1 and max_steps < 1:
        raise ConfigError(f"trainer.max_steps={max_steps} must be >= 1 (or -1 for no limit)")


def _device_count(devices: Any) -> int | None:
    """``devices`` as a count if it is one (an int, or a string of one); else None."""
    if isinstance(devices, str):
        try:
            return int(devices)
        except ValueError:
            return None
    return devices if isinstance(devices, int) and not isinstance(devices, bool) else None


def _valid_devices(devices: Any) -> bool:
    """Whether Lightning can run on ``devices`` with some accelerator: "auto", a count, -1, or
    GPU indices (a list, or a string such as "0,1"). Zero devices, an empty list and counts
    below -1 it refuses only when it builds the trainer."""
    count = _device_count(devices)
    if devices == "auto" or (count is not None and (count >= 1 or count == -1)):
        return True
    if isinstance(devices, str) and "," in devices:
        indices = [word.strip() for word in devices.split(",") if word.strip()]
        return bool(indices) and all(word.isdigit() for word in indices)
    return (isinstance(devices, list) and bool(devices)
            and all(isinstance(index, int) and index >= 0 for index in devices))


def check_tracking_uri(uri: str | None) -> None:
    """Fail in seconds, naming the URL, if an HTTP tracking server does not accept connections;
    name a local SQLite store that cannot be created or written; say where runs go when a local
    store is new."""
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
        problem = store_problem(uri)
        if problem:
            raise TrackingError(problem)
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
