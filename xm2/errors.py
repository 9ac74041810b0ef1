"""Every error xm2 raises on purpose, and how the ``xm2`` command prints them.

xm2 checks configurations and data files early and says what is wrong in one sentence: which key
or file, the bad value, what is allowed or which command fixes it. Such an error is an
:class:`Xm2Error` and is printed as one line (``xm2: error: ...``) without a traceback. Whether an
error is printed so is decided by its type alone: any other exception is a bug, or a failure xm2
did not foresee, and keeps its traceback. ``XM2_TRACEBACK=1`` shows the traceback of every error.

Each kind also derives from the built-in type a Python caller would expect (a bad value is a
``ValueError``, a missing file a ``FileNotFoundError``), so ``except ValueError`` keeps working.

This module imports nothing heavy: the command's start-up and its error path stay fast.
"""

from __future__ import annotations

TRACEBACK_VARIABLE = "XM2_TRACEBACK"


class Xm2Error(Exception):
    """An error a person can act on; the message says what is wrong and how to fix it."""


class ConfigError(Xm2Error, ValueError):
    """A configuration value, option or input that xm2 cannot use."""


class DataError(Xm2Error, ValueError):
    """A data file (corpus, shard, evaluation set, backlog, journal) that is damaged or unreadable."""


class MissingFileError(Xm2Error, FileNotFoundError):
    """A file or folder that the command needs does not exist."""


class CheckpointError(Xm2Error, ValueError):
    """A checkpoint that cannot be used for what was asked (damaged, unsafe, incompatible)."""


class TrackingError(Xm2Error, RuntimeError):
    """The MLflow tracking server or store cannot be reached or written."""


class TrainingDiverged(Xm2Error, RuntimeError):
    """A training run stopped because its loss stopped being finite or exploded."""


class NonFiniteLossError(TrainingDiverged):
    """The loss or the gradients were NaN/inf for more steps in a row than allowed."""


class MissingPackageError(Xm2Error, ModuleNotFoundError):
    """An optional package that the command needs is not installed; the message says how to."""


class RunFailed(Xm2Error, RuntimeError):
    """A run started as a subprocess failed; the message carries its own error or output."""


class EnvironmentProblem(Xm2Error, RuntimeError):
    """The machine lacks what the command needs (a package, a kernel feature, disk space)."""


def chain(error: BaseException):
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
    for link in chain(error):
        if isinstance(link, Xm2Error):
            found = link
    return found


def message(error: BaseException) -> str:
    """The one line printed for a user error."""
    return f"xm2: error: {error}"
