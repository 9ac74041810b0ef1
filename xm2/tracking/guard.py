"""The MLflow outage guard: training never stops because the tracking server went away.

If the tracking server stops answering mid-run, :class:`TrackingGuard` (which the xm2 logger puts
in front of its ``MlflowClient``) says so at once, keeps every metric, parameter, tag and artefact in a
local backlog file, and sends the backlog when the server answers again, or later with
``xm2 tracking-sync <backlog>``. Training and checkpointing go on meanwhile.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from xm2.errors import DataError, MissingFileError
from xm2.tracking import DEFAULT_TRACKING_URI

FIRST_RETRY_SECONDS, MAX_RETRY_SECONDS = 10.0, 300.0


def _is_outage(error: Exception) -> bool:
    """A failure of the connection to the server, as opposed to a request the server refused."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        # MLflow's REST layer words every transport failure (refused, reset, timeout, 5xx) so.
        return str(error.message).startswith("API request to ") and " failed with" in error.message
    return isinstance(error, (ConnectionError, TimeoutError))


def _outage_reason(message: str) -> str:
    for words, reason in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Name or service not known", "unknown host"),
                          ("too many 5", "server errors")):
        if words in message:
            return reason
    return message.split(" failed with ")[-1][:100]


class _RunKnownOffline:
    """Stands in for ``get_run``'s answer while the server is away: the run exists."""

    def __bool__(self) -> bool:
        return True


class TrackingGuard:
    """A stand-in for ``MlflowClient`` that keeps working when the tracking server goes away.

    Until the first call succeeds, failures raise (a server that is down at the start is a
    configuration error). After that, a failed call switches to offline mode: writes go to the
    backlog file, reads answer None, and the server is tried again with growing pauses.
    """

    def __init__(self, client: Any, tracking_uri: str, backlog_dir: str | Path) -> None:
        self._client, self.tracking_uri = client, tracking_uri
        self.backlog_dir = Path(backlog_dir)
        self.offline = False
        self._answered_once = False
        self._retry_after, self._next_try = FIRST_RETRY_SECONDS, 0.0
        self.kept = 0

    def backlog_path(self, run_id: str) -> Path:
        return self.backlog_dir / f"mlflow-backlog-{run_id}.jsonl"

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            if self.offline and not self._try_reconnect():
                return self._keep(name, args, kwargs)
            try:
                result = attribute(*args, **kwargs)
            except Exception as error:
                if not (self._answered_once and _is_outage(error)):
                    raise
                self._go_offline(error)
                return self._keep(name, args, kwargs)
            self._answered_once = True
            return result

        return call

    def _go_offline(self, error: Exception) -> None:
        self.offline = True
        self._retry_after = FIRST_RETRY_SECONDS
        self._next_try = time.monotonic() + self._retry_after
        reason = _outage_reason(str(getattr(error, "message", error)))
        print(f"xm2: the MLflow tracking server {self.tracking_uri} stopped answering ({reason}). "
              f"Training goes on; metrics and artefacts are kept in {self.backlog_dir}/"
              "mlflow-backlog-<run id>.jsonl and sent when the server answers again.",
              file=sys.stderr, flush=True)

    def _try_reconnect(self) -> bool:
        if time.monotonic() < self._next_try:
            return False
        pending = sorted(self.backlog_dir.glob("mlflow-backlog-*.jsonl"))
        try:
            sent = sum(send_backlog(path, self._client) for path in pending)
        except Exception as error:
            if not _is_outage(error):
                raise
            self._retry_after = min(MAX_RETRY_SECONDS, 2 * self._retry_after)
            self._next_try = time.monotonic() + self._retry_after
            return False
        self.offline = False
        print(f"xm2: the MLflow tracking server {self.tracking_uri} answers again; sent the "
              f"{sent} records kept meanwhile.", file=sys.stderr, flush=True)
        return True

    def _keep(self, name: str, args: tuple, kwargs: dict) -> Any:
        entry = _backlog_entry(name, args, kwargs, self.backlog_dir)
        if name == "get_run":
            return _RunKnownOffline()
        if entry is None:
            return None
        self.backlog_dir.mkdir(parents=True, exist_ok=True)
        with open(self.backlog_path(entry["run_id"]), "a") as backlog:
            backlog.write(json.dumps(entry) + "\n")
        self.kept += 1
        return None

    def report_unsent(self) -> None:
        """Tell the user, at the end of a run, about records the server never received."""
        if not self.offline:
            return
        for path in sorted(self.backlog_dir.glob("mlflow-backlog-*.jsonl")):
            print(f"xm2: the MLflow tracking server {self.tracking_uri} did not come back; the run's "
                  f"unsent records are in {path}. Send them with: xm2 tracking-sync {path} "
                  f"--tracking_uri {self.tracking_uri}", file=sys.stderr, flush=True)


def _metric_rows(metrics) -> list:
    return [[m.key, m.value, m.timestamp, m.step] for m in metrics or []]


def _backlog_entry(name: str, args: tuple, kwargs: dict, backlog_dir: Path) -> dict | None:
    """The backlog record of one ``MlflowClient`` write call, or None for a read."""
    import inspect

    from mlflow.tracking import MlflowClient

    if not hasattr(MlflowClient, name):
        return None
    bound = inspect.signature(getattr(MlflowClient, name)).bind(None, *args, **kwargs)
    values = dict(bound.arguments)
    values.pop("self", None)
    run_id = values.get("run_id")
    if name == "log_batch":
        return {"op": "log_batch", "run_id": run_id, "metrics": _metric_rows(values.get("metrics")),
                "params": [[p.key, p.value] for p in values.get("params") or []],
                "tags": [[t.key, t.value] for t in values.get("tags") or []]}
    if name == "log_metric":
        return {"op": "log_batch", "run_id": run_id, "params": [], "tags": [],
                "metrics": [[values["key"], values["value"],
                             values.get("timestamp") or int(time.time() * 1000),
                             values.get("step") or 0]]}
    if name == "log_param":
        return {"op": "log_batch", "run_id": run_id, "metrics": [], "tags": [],
                "params": [[values["key"], str(values["value"])]]}
    if name == "set_tag":
        return {"op": "log_batch", "run_id": run_id, "metrics": [], "params": [],
                "tags": [[values["key"], str(values["value"])]]}
    if name == "set_terminated":
        return {"op": "set_terminated", "run_id": run_id,
                "status": values.get("status") or "FINISHED"}
    if name in ("log_text", "log_dict", "log_figure", "log_artifact", "log_image", "log_table"):
        return _keep_artifact(name, values, backlog_dir)
    return None


def _keep_artifact(name: str, values: dict, backlog_dir: Path) -> dict:
    run_id = values["run_id"]
    folder = backlog_dir / f"mlflow-backlog-{run_id}-artifacts"
    if name == "log_artifact":
        local = Path(values["local_path"])
        artifact_path = values.get("artifact_path")
        relative = Path(artifact_path or "") / local.name
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(local.read_bytes())
    else:
        relative = Path(values["artifact_file"])
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if name == "log_text":
            target.write_text(values["text"])
        elif name in ("log_dict", "log_table"):
            data = values.get("dictionary", values.get("data"))
            if hasattr(data, "to_dict"):
                data = data.to_dict(orient="list")
            target.write_text(json.dumps(data, indent=2, default=str))
        elif name == "log_figure":
            values["figure"].savefig(target)
        else:
            image = values["image"]
            if hasattr(image, "save"):
                image.save(target)
            else:
                import matplotlib.pyplot as plt

                plt.imsave(target, image)
    return {"op": "artifact", "run_id": run_id, "local_path": str(target),
            "artifact_path": str(relative.parent) if str(relative.parent) != "." else None}


BACKLOG_FIELDS = {"log_batch": ("run_id", "metrics", "params", "tags"),
                  "artifact": ("run_id", "local_path", "artifact_path"),
                  "set_terminated": ("run_id", "status")}
"""Each kind of backlog record (its ``op``) and the fields it needs."""


def read_backlog(path: Path) -> list[dict]:
    """Every record of a backlog file, all checked before any is sent; a damaged line is refused
    naming the file, the line and how to go on."""
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as error:
        raise DataError(f"backlog file {path} is damaged: not text ({error}); restore it, or "
                        "move it away to give up the records it kept") from error
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            problem = f"is not JSON ({error.msg}, column {error.colno})"
        else:
            problem = _backlog_problem(entry)
        if problem:
            raise DataError(f"backlog file {path} line {number} {problem}; nothing was sent. "
                            "Delete or repair that line (a run killed while writing leaves its "
                            "last line cut short) and run `xm2 tracking-sync` again")
        entries.append(entry)
    return entries


def _backlog_problem(entry: Any) -> str | None:
    """What is wrong with one parsed backlog record, or None."""
    if not isinstance(entry, dict):
        return f"is {type(entry).__name__}, not a record (a JSON object)"
    if "op" not in entry:
        return "is a record without 'op'"
    if entry["op"] not in BACKLOG_FIELDS:
        return f"has op {entry['op']!r}; known: {', '.join(BACKLOG_FIELDS)}"
    missing = [field for field in BACKLOG_FIELDS[entry["op"]] if field not in entry]
    if missing:
        return f"is a {entry['op']} record without {', '.join(repr(f) for f in missing)}"
    if entry["op"] == "log_batch":
        for field, size in (("metrics", 4), ("params", 2), ("tags", 2)):
            rows = entry[field]
            if not (isinstance(rows, list)
                    and all(isinstance(row, list) and len(row) == size for row in rows)):
                return f"has {field!r} that are not lists of {size} values"
    return None


def send_backlog(path: str | Path, client: Any) -> int:
    """Send a backlog file's records in order; sent records leave the file. Returns how many."""
    from mlflow.entities import Metric, Param, RunTag

    path = Path(path)
    entries = read_backlog(path)
    for done, entry in enumerate(entries):
        try:
            if entry["op"] == "log_batch":
                metrics = [Metric(k, v, ts, step) for k, v, ts, step in entry["metrics"]]
                params = [Param(k, v) for k, v in entry["params"]]
                tags = [RunTag(k, v) for k, v in entry["tags"]]
                # MLflow takes at most 1000 metrics per call.
                for start in range(0, max(1, len(metrics)), 1000):
                    client.log_batch(entry["run_id"], metrics=metrics[start:start + 1000],
                                     params=params if start == 0 else [],
                                     tags=tags if start == 0 else [])
            elif entry["op"] == "artifact":
                client.log_artifact(entry["run_id"], entry["local_path"], entry["artifact_path"])
            elif entry["op"] == "set_terminated":
                client.set_terminated(entry["run_id"], entry["status"])
        except Exception:
            remaining = entries[done:]
            path.write_text("".join(json.dumps(e) + "\n" for e in remaining))
            raise
    path.unlink()
    return len(entries)


def tracking_sync(backlog: str, tracking_uri: str = DEFAULT_TRACKING_URI) -> int:
    """Send the records a run kept while its MLflow tracking server was away.

    Args:
        backlog: A backlog file named in the run's message (mlflow-backlog-<run id>.jsonl).
        tracking_uri: The tracking server or store the run logs to.
    """
    from xm2.tracking.store import open_store

    path = Path(backlog)
    if not path.is_file():
        raise MissingFileError(f"backlog file {backlog} does not exist; the run's last message "
                               "names its backlog (<default_root_dir>/tracking/mlflow-backlog-"
                               "<run id>.jsonl)")
    read_backlog(path)  # a damaged file is refused before the store is opened
    sent = send_backlog(path, open_store(tracking_uri))
    print(f"sent {sent} records from {backlog} to {tracking_uri}")
    return sent
