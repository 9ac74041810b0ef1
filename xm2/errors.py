"""Errors a person can act on, and how the ``xm2`` command prints them.

xm2 checks configurations and data files early and says what is wrong in one sentence: which key
or file, the bad value, what is allowed or which command fixes it. Such an error is printed as one
line (``xm2: error: ...``) without a traceback; anything unexpected keeps its traceback.
``XM2_TRACEBACK=1`` shows the traceback of every error.

This module imports nothing heavy: the command's start-up and its error path stay fast.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
TRACEBACK_VARIABLE = "XM2_TRACEBACK"


class ConfigError(ValueError):
    """A configuration value or data file that xm2 cannot use; the message says how to fix it."""


# Raised on purpose by xm2 with a complete message, whatever module they come from.
_XM2_ERROR_TYPES = (
    ("xm2.errors", "ConfigError"),
    ("xm2.checkpoint", "CheckpointError"),
    ("xm2.module", "NonFiniteLossError"),
)
# Built-in types xm2's own checks raise (ValueError for a bad value, FileNotFoundError for a
# missing file, ...): they are the user's to fix when xm2's code raised them, and a bug otherwise.
_CHECK_TYPES = (ValueError, OSError)


def _is_xm2_error_type(error: BaseException) -> bool:
    for module, name in _XM2_ERROR_TYPES:
        # A type whose module was never imported cannot be the error's type: no import needed.
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(error, getattr(loaded, name)):
            return True
    return False


def _raised_by_xm2(error: BaseException) -> bool:
    """Whether the innermost frame of the error's traceback is xm2's own code."""
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ else []
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE_DIR)


def _chain(error: BaseException):
    """The error and the errors it was raised from, outermost first (no cycles)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def user_error(error: BaseException) -> BaseException | None:
    """The xm2 error a person should read, found in ``error`` or in what it wraps; else None.

    jsonargparse and Lightning re-raise errors from inside class instantiation wrapped in their
    own; the innermost xm2 error is the one that says what to fix.
    """
    found = None
    for link in _chain(error):
        if _is_xm2_error_type(link) or (isinstance(link, _CHECK_TYPES) and _raised_by_xm2(link)):
            found = link
    if found is None:
        found = _tracking_failure(error)
    return found


def _tracking_failure(error: BaseException) -> BaseException | None:
    """An MLflow request that could not reach its server, as one line naming the URL."""
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")
    for link in _chain(error):
        if mlflow_exceptions and isinstance(link, mlflow_exceptions.MlflowException):
            message = str(link.message)
            if message.startswith("API request to ") and " failed with" in message:
                url = message.removeprefix("API request to ").split(" failed with")[0]
                # MLflow names the full URL, or only the endpoint when the request never left.
                where = f"at {url}" if url.startswith("http") else f"({message[:300]})"
                return ConfigError(f"the MLflow tracking server does not answer {where}; start "
                                   "it, or log to a local store with --trainer.logger.init_args."
                                   "tracking_uri sqlite:///mlflow.db")
    return None


def message(error: BaseException) -> str:
    """The one line printed for a user error."""
    return f"xm2: error: {error}"
