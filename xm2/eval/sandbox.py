"""Run model-written Python in a sandbox: a limited, offline subprocess in a throw-away directory.

HumanEval and MBPP score a model by running the code it wrote. ``execute`` runs one such program
in a fresh Python process and says whether it passed:

- a fresh temporary directory is the working directory (``HOME`` and ``TMPDIR`` point there, the
  environment holds nothing else) and is removed afterwards, whatever the program did;
- an isolated interpreter: ``python -I -S -B`` (no ``PYTHON*`` variables, no user or site
  packages, no bytecode written), in its own session, so that a timeout kills its whole process
  group;
- resource limits (``setrlimit``): address space (``memory_mb``), CPU seconds (the timeout plus
  one), file size, open files, no core dumps and, for a user other than root, no new processes;
  and a wall-clock timeout;
- namespaces, where the kernel allows them (``unshare``; a new user namespace too where that is
  allowed): a new network namespace, which has no interface but a loopback that is down, so no
  address, not even 127.0.0.1, can be reached; a new PID namespace, whose first process runs the
  program as its child: the program's /proc shows only the sandbox's own processes, no process
  outside can be named, so none can be signalled (``kill``, ``pidfd_send_signal``) or traced, and
  whatever the program leaves running dies with the namespace when it ends; and a new mount
  namespace (the machine's own mounts are untouched) with a private root: the program sees only
  its directory, a tmpfs of ``max_disk_mb`` holding a copy of the program, and, read-only, the
  Python installation, the system's libraries and programs (``/usr``, ``/bin``, ``/sbin``,
  ``/lib*``), ``/dev/null``, ``/dev/zero``, ``/dev/full``, ``/dev/random``, ``/dev/urandom``,
  ``/etc/ld.so.cache`` and ``/etc/localtime``; nothing else of the machine, so no other file can
  be read. Where a private root cannot be made, every mount is read-only instead (and every file
  the user can read stays readable). The program then holds no capabilities (a user namespace
  would give it all of them over its own mounts: it could make them writable again);
- a guard inside the interpreter: an audit hook (PEP 578; it cannot be removed once added) that
  refuses, with a ``PermissionError``, network use (sockets other than ``AF_UNIX``, connect,
  bind, send-to, name lookups), new processes (``subprocess``, ``os.system``, ``exec*``,
  ``fork``, ``posix_spawn``), acting on other processes (``os.kill`` and ``os.killpg`` of any
  process but its own; ``os.pidfd_open``, ``signal.pidfd_send_signal``, ``os.setpriority`` and
  ``os.sched_set*``, which raise no audit event, are replaced by refusals), ``ctypes`` and
  foreign libraries, raising its own resource limits, ``gc`` introspection (a way to reach the
  guard's state), writing, creating, renaming, removing or changing any file outside the
  directory, opening or listing (``os.listdir``, ``os.scandir``, hence ``os.walk``, ``glob``,
  ``pathlib``) a directory outside it (the interpreter's library excepted: imports list it), and
  changing the working directory out of it.

What it does not protect against. The guard is Python code in the program's own process: it
stops accidents and naive code (a completion that deletes files, calls ``os.system``, fetches a
URL or signals a process), not a determined attacker, who could tamper with the interpreter's
state or find a path the audit events do not cover (``os.mknod``, ``os.mkfifo``, ``os.chroot``
and the process calls above are replaced for that reason). The guard does not restrict reading
files: on its own, the program can read any file the user can (and print it), other processes'
``/proc`` entries included. The namespaces are enforced by the kernel: no network, no writes
outside the directory, no reads outside what the private root shows, no process outside the
sandbox, and (in a user namespace) none of root's capabilities over the rest of the machine.
Without them (many CI containers; laptops where unprivileged user namespaces are disabled),
network, file and process refusal rest on the guard alone, and reads are not restricted; run as
root without a user namespace, the program is root, and only the guard stands between it and the
machine. Nothing stops a program from exiting with code 0 before its tests run, nor a kernel
exploit. For untrusted code in bulk, run the whole evaluation in a container or VM as well.
``ExecutionResult.layers`` records which layers were active for each run.
"""

from __future__ import annotations

import marshal
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from xm2.errors import ConfigError

STATUSES = ("passed", "failed", "timeout", "error")
"""passed: exit code 0. failed: the program ran and exited non-zero (an assertion, an exception,
``sys.exit(1)``). timeout: the wall-clock or CPU limit stopped it. error: no verdict: the memory
or file-size limit, a crash (a signal), or the sandbox could not start it."""

NETWORK_NAMESPACE_MODES = ("auto", "require", "off")

PROGRAM_FILE = "main.py"
"""The program's file name inside its temporary directory (tracebacks name it)."""
CHILD_FILE = Path(__file__).with_name("sandbox_child.py")
"""The program that sets up the layers in the child process and then runs the program there."""

# Exit codes of the child's own: Python itself uses 1 (an exception), 2 (usage) and 120 (output
# could not be flushed at exit).
_MEMORY_EXIT = 97  # the program raised MemoryError
_SETUP_EXIT = 98  # a required layer is unavailable, or one failed half-way
_MAX_REPORT_LINES = 50


@dataclass(frozen=True)
class ExecutionResult:
    """How one program ran in the sandbox."""

    status: str
    """One of ``STATUSES``."""
    returncode: int | None
    """The process's exit code; negative: killed by that signal; None: it never started."""
    stdout: str
    """Captured standard output, truncated to ``max_output_bytes``."""
    stderr: str
    """Captured standard error (tracebacks), truncated to ``max_output_bytes``."""
    seconds: float
    """Wall-clock time from start to exit, interpreter start-up included."""
    reason: str = ""
    """Why the status is not ``passed``, in words (e.g. ``wall-clock timeout after 10 s``)."""
    layers: tuple[str, ...] = ()
    """The isolation layers that were active: ``user-namespace``, ``network-namespace``,
    ``pid-namespace`` (the program sees and signals only the sandbox's processes),
    ``read-only-filesystem`` (a mount namespace), ``private-root`` (only the directory, the Python
    installation and the system's libraries are visible), ``tmpfs-directory (64 MiB)``,
    ``no-capabilities``, ``rlimits``, ``no-new-processes`` (RLIMIT_NPROC, binding only for users
    other than root), ``audit-guard``; and ``unavailable: <layer>: <why>`` for a layer that was
    tried but could not be set up (``pid-namespace-proc``: the PID namespace's own /proc could not
    be mounted; processes outside stay out of reach, but the machine's /proc may still list
    them)."""
    refused: tuple[str, ...] = ()
    """The operations the guard refused (at most 50), e.g. ``socket.connect ('127.0.0.1', 80)``;
    a program that catches the ``PermissionError`` still shows up here."""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def execute(
    program: str,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    *,
    network_namespace: str = "auto",
    guard: bool = True,
    max_output_bytes: int = 64 * 1024,
    max_file_mb: int = 16,
    max_disk_mb: int = 64,
    python: str | None = None,
) -> ExecutionResult:
    """Run ``program`` (Python source) in the sandbox described in this module's docstring.

    ``timeout_s`` is wall-clock time, start-up included; ``memory_mb`` caps the address space.
    ``network_namespace``: ``auto`` enters the namespaces (network; user, PID and mount where
    possible) where the kernel allows it, ``require`` reports an ``error`` where it cannot enter a
    network namespace, ``off`` never tries. ``guard=False`` leaves out the audit hook (for testing
    the other layers alone). ``max_file_mb`` caps every file the program writes, its captured output
    included; ``max_disk_mb`` caps all its files together where the directory is a tmpfs (with
    the mount namespace). ``python`` is the interpreter (default: this one).
    """
    if os.name != "posix":
        raise NotImplementedError(
            "the code sandbox needs a POSIX system (Linux, or macOS without namespaces)"
        )
    if network_namespace not in NETWORK_NAMESPACE_MODES:
        raise ConfigError(
            f"network_namespace={network_namespace!r}: expected one of {NETWORK_NAMESPACE_MODES}"
        )
    if timeout_s <= 0 or memory_mb <= 0:
        raise ConfigError(f"timeout_s={timeout_s} and memory_mb={memory_mb} must be positive")
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="xm2-sandbox-"))
    try:
        with open(os.path.join(workdir, PROGRAM_FILE), "w", encoding="utf-8") as file:
            file.write(program)
        return _run_child(
            workdir,
            timeout_s=timeout_s,
            memory_mb=memory_mb,
            network_namespace=network_namespace,
            guard=guard,
            max_output_bytes=max_output_bytes,
            max_file_bytes=max_file_mb * 1024 * 1024,
            max_disk_mb=max_disk_mb,
            python=python or sys.executable,
        )
    finally:
        _remove_tree(workdir)


def execute_many(
    programs: Sequence[str], workers: int | None = None, **options
) -> list[ExecutionResult]:
    """``execute`` each program, ``workers`` at a time (default: the number of CPUs); results
    in the programs' order. ``options`` are ``execute``'s keyword arguments."""
    workers = max(1, workers or os.cpu_count() or 1)
    if workers == 1 or len(programs) <= 1:
        return [execute(program, **options) for program in programs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda program: execute(program, **options), programs))


def _run_child(
    workdir: str,
    *,
    timeout_s: float,
    memory_mb: int,
    network_namespace: str,
    guard: bool,
    max_output_bytes: int,
    max_file_bytes: int,
    max_disk_mb: int,
    python: str,
) -> ExecutionResult:
    # Output goes to unlinked files rather than pipes: RLIMIT_FSIZE then caps a program that
    # prints forever, and the parent never holds more than max_output_bytes of it in memory.
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.TemporaryFile() as report,
    ):
        cpu_seconds = math.ceil(timeout_s) + 1
        config = {
            "workdir": workdir,
            "program": PROGRAM_FILE,
            "report_fd": report.fileno(),
            "disk_bytes": max_disk_mb * 1024 * 1024,
            "network_namespace": network_namespace,
            "guard": guard,
            "limits": {
                "RLIMIT_AS": memory_mb * 1024 * 1024,
                "RLIMIT_CPU": [cpu_seconds, cpu_seconds + 1],
                "RLIMIT_FSIZE": max_file_bytes,
                "RLIMIT_NOFILE": 64,
                "RLIMIT_CORE": 0,
                "RLIMIT_NPROC": 0,
            },
            "root": os.geteuid() == 0,
            "memory_exit": _MEMORY_EXIT,
            "setup_exit": _SETUP_EXIT,
            "max_report_lines": _MAX_REPORT_LINES,
        }
        # marshal, not json: the child then imports nothing to read it (json imports re).
        arguments = marshal.dumps(config).hex()
        # -I also leaves the child file's folder off sys.path: xm2/eval/code.py would otherwise
        # shadow the standard library's code module for the program.
        command = [python, "-I", "-S", "-B", "-X", "utf8", str(CHILD_FILE), arguments]
        start = time.monotonic()
        try:
            process = subprocess.Popen(
                command,
                cwd=workdir,
                env={"HOME": workdir, "TMPDIR": workdir},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                pass_fds=(report.fileno(),),
                start_new_session=True,
            )
        except OSError as error:
            return ExecutionResult(
                "error", None, "", "", 0.0, reason=f"could not start {python}: {error}"
            )
        killed = False
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            killed = True
        finally:
            if process.returncode is None:
                # Kill the group before reaping the leader, so that its id cannot be reused.
                _kill_group(process.pid)
                process.wait()
        seconds = time.monotonic() - start
        layers, refused = _read_report(report)
        status, reason = _verdict(process.returncode, killed, timeout_s, cpu_seconds, layers)
        return ExecutionResult(
            status=status,
            returncode=process.returncode,
            stdout=_read_output(out, max_output_bytes),
            stderr=_read_output(err, max_output_bytes),
            seconds=seconds,
            reason=reason,
            layers=layers,
            refused=refused,
        )


def _verdict(
    returncode: int, killed: bool, timeout_s: float, cpu_seconds: int, layers: tuple[str, ...]
) -> tuple[str, str]:
    if killed:
        return "timeout", f"wall-clock timeout after {timeout_s:g} s"
    if returncode == 0:
        return "passed", ""
    if returncode == _MEMORY_EXIT:
        return "error", "memory limit (MemoryError)"
    if returncode == _SETUP_EXIT:
        missing = "; ".join(layer for layer in layers if layer.startswith("unavailable"))
        return "error", f"sandbox setup failed: {missing or 'see stderr'}"
    if returncode > 0:
        return "failed", f"exit code {returncode}"
    signal_number = -returncode
    if signal_number == signal.SIGXCPU:
        return "timeout", f"CPU limit ({cpu_seconds} s)"
    if signal_number == signal.SIGXFSZ:
        return "error", "file-size limit (output or a file too large)"
    name = (
        signal.Signals(signal_number).name
        if signal_number in signal.valid_signals()
        else signal_number
    )
    return "error", f"killed by signal {name}"


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_output(file, limit: int) -> str:
    size = file.seek(0, os.SEEK_END)
    file.seek(0)
    text = file.read(limit).decode("utf-8", errors="replace")
    if size > limit:
        text += f"\n[xm2 sandbox: {size - limit} more bytes not shown]"
    return text


def _read_report(file) -> tuple[tuple[str, ...], tuple[str, ...]]:
    file.seek(0)
    layers, refused, started = [], [], False
    for line in file.read(256 * 1024).decode("utf-8", errors="replace").splitlines():
        kind, _, detail = line.partition(" ")
        # Layers are reported before the program starts; later lines could come from it.
        started = started or kind == "start"
        if kind == "layer" and not started:
            layers.append(detail)
        elif kind == "unavailable" and not started:
            layers.append(f"unavailable: {detail}")
        elif kind == "refused" and len(refused) < _MAX_REPORT_LINES:
            refused.append(detail)
    return tuple(layers), tuple(refused)


def _remove_tree(path: str) -> None:
    def make_writable_and_retry(function, target, _):
        # A program may leave read-only directories behind; the owner can always chmod them.
        try:
            os.chmod(os.path.dirname(target), 0o700)
            os.chmod(target, 0o700)
            function(target)
        except OSError:
            pass

    shutil.rmtree(path, onerror=make_writable_and_retry)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)
