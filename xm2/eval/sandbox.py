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
  address, not even 127.0.0.1, can be reached; and a new mount namespace in which every mount is
  read-only and the temporary directory is a tmpfs of ``max_disk_mb`` holding a copy of the
  program (the machine's own mounts are untouched);
- a guard inside the interpreter: an audit hook (PEP 578; it cannot be removed once added) that
  refuses, with a ``PermissionError``, network use (sockets other than ``AF_UNIX``, connect,
  bind, send-to, name lookups), new processes (``subprocess``, ``os.system``, ``exec*``,
  ``fork``, ``posix_spawn``, signals to other processes), ``ctypes`` and foreign libraries,
  raising its own resource limits, ``gc`` introspection (a way to reach the guard's state),
  writing, creating, renaming, removing or changing any file outside the directory, opening a
  directory outside it, and changing the working directory out of it.

What it does not protect against. The guard is Python code in the program's own process: it
stops accidents and naive code (a completion that deletes files, calls ``os.system`` or fetches a
URL), not a determined attacker, who could tamper with the interpreter's state or find a path
the audit events do not cover (``os.mknod``, ``os.mkfifo`` and ``os.chroot`` are removed for that
reason). Reads are not restricted: the program can read any file the user can (and print it).
The namespaces are enforced by the kernel: no network, no writes outside the directory, and (in a
user namespace) none of root's capabilities over the rest of the machine. Without them (many CI
containers; laptops where unprivileged user namespaces are disabled), network and file refusal
rest on the guard alone; run as root without a user namespace, the program is root, and only the
guard stands between it and the machine. For untrusted code in bulk, run the
whole evaluation in a container or VM as well. ``ExecutionResult.layers`` records which layers
were active for each run.
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

STATUSES = ("passed", "failed", "timeout", "error")
"""passed: exit code 0. failed: the program ran and exited non-zero (an assertion, an exception,
``sys.exit(1)``). timeout: the wall-clock or CPU limit stopped it. error: no verdict: the memory
or file-size limit, a crash (a signal), or the sandbox could not start it."""

NETWORK_NAMESPACE_MODES = ("auto", "require", "off")

PROGRAM_FILE = "main.py"
"""The program's file name inside its temporary directory (tracebacks name it)."""

# Exit codes of the child's own: Python itself uses 1 (an exception), 2 (usage) and 120 (output
# could not be flushed at exit).
_MEMORY_EXIT = 97  # the program raised MemoryError
_SETUP_EXIT = 98  # a required layer is unavailable
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
    ``read-only-filesystem`` (a mount namespace), ``tmpfs-directory (64 MiB)``, ``rlimits``,
    ``no-new-processes`` (RLIMIT_NPROC, binding only for users other than root), ``audit-guard``;
    and ``unavailable: <layer>: <why>`` for a layer that was tried but could not be set up."""
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
    ``network_namespace``: ``auto`` enters the namespaces (network; user and mount where possible)
    where the kernel allows it, ``require`` reports an ``error`` where it cannot enter a network
    namespace, ``off`` never tries. ``guard=False`` leaves out the audit hook (for testing the
    other layers alone). ``max_file_mb`` caps every file the program writes, its captured output
    included; ``max_disk_mb`` caps all its files together where the directory is a tmpfs (with
    the mount namespace). ``python`` is the interpreter (default: this one).
    """
    if os.name != "posix":
        raise NotImplementedError(
            "the code sandbox needs a POSIX system (Linux, or macOS without namespaces)"
        )
    if network_namespace not in NETWORK_NAMESPACE_MODES:
        raise ValueError(
            f"network_namespace={network_namespace!r}: expected one of {NETWORK_NAMESPACE_MODES}"
        )
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s={timeout_s} and memory_mb={memory_mb} must be positive")
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
        command = [python, "-I", "-S", "-B", "-X", "utf8", "-c", _CHILD, arguments]
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


# The child: run by `python -I -S -B -X utf8 -c _CHILD <config: marshal, hex>` in the directory.
# It sets up the layers in this order (the namespace first: a user namespace needs a
# single-threaded process, and ctypes is refused once the guard is in), writes one report line
# per layer to the report file, then runs the program as __main__. It imports only what the set-up
# needs: a module imported here is already loaded, unaudited, when the program starts.
_CHILD = r"""
import marshal, os, sys

config = marshal.loads(bytes.fromhex(sys.argv[1]))
report_fd = config["report_fd"]
report_lines = [0]


def report(line):
    if report_lines[0] < config["max_report_lines"] + 10:
        report_lines[0] += 1
        try:
            os.write(report_fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
        except OSError:
            pass


def enter_namespaces(workdir):
    # New network (and user, mount) namespaces; returns the layers set up, raises OSError.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    user, network, mount = 0x10000000, 0x40000000, 0x00020000  # CLONE_NEW*
    # A user namespace as well, where allowed: even root then holds no capability outside it.
    attempts = ((user | network | mount, ("user-namespace", "network-namespace")),
                (network | mount, ("network-namespace",)), (network, ("network-namespace",)))
    errors, uid, gid = [], os.geteuid(), os.getegid()
    for flags, layers in attempts:
        if libc.unshare(flags) == 0:
            break
        errors.append(os.strerror(ctypes.get_errno()))
    else:
        raise OSError("unshare: " + ", ".join(dict.fromkeys(errors)))
    if flags & user:
        # Stay the same user inside (unmapped, it would be nobody and could not create files in
        # a tmpfs of this namespace). Setgroups must be denied before an unprivileged gid map.
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")):
            try:
                descriptor = os.open(f"/proc/self/{name}", os.O_WRONLY)
                try:
                    os.write(descriptor, text.encode())
                finally:
                    os.close(descriptor)
            except OSError as error:
                report(f"unavailable {name}: {error}")
    if not flags & mount:
        report("unavailable read-only-filesystem: no mount namespace")
        return layers
    try:
        return layers + mount_filesystem(libc, ctypes, workdir, config["disk_bytes"])
    except OSError as error:
        report(f"unavailable read-only-filesystem: {error}")
        return layers


def mount_filesystem(libc, ctypes, workdir, disk_bytes):
    # In this mount namespace only: the sandbox directory becomes a small tmpfs (a bind mount of
    # itself where tmpfs is refused) holding a copy of the program, and every other mount is made
    # read-only. The machine's mounts are untouched.
    ms_nosuid, ms_nodev, ms_noexec, ms_bind, ms_rec, ms_private = 2, 4, 8, 0x1000, 0x4000, 1 << 18
    mount_setattr, at_fdcwd, at_recursive, mount_attr_rdonly = 442, -100, 0x8000, 1

    class MountAttr(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint64)
                    for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]

    def check(result, what):
        if result != 0:
            raise OSError(f"{what}: {os.strerror(ctypes.get_errno())}")

    path = workdir.encode()
    check(libc.mount(None, b"/", None, ms_rec | ms_private, None), "mount --make-rprivate /")
    program = os.path.join(workdir, config["program"])
    with open(program, "rb") as file:
        source = file.read()
    options = f"size={disk_bytes},mode=0700".encode()
    layers = ()
    if libc.mount(b"tmpfs", path, b"tmpfs", ms_nosuid | ms_nodev | ms_noexec, options) == 0:
        try:
            with open(program, "wb") as file:
                file.write(source)
            layers = (f"tmpfs-directory ({disk_bytes // 2**20} MiB)",)
        except OSError as error:
            report(f"unavailable tmpfs-directory: {error}")
            check(libc.umount2(path, 2), "umount")  # MNT_DETACH
    if not layers:
        check(libc.mount(path, path, None, ms_bind | ms_rec, None), "mount --bind")
    for target, flags, attributes in ((b"/", at_recursive, MountAttr(mount_attr_rdonly, 0, 0, 0)),
                                      (path, 0, MountAttr(0, mount_attr_rdonly, 0, 0))):
        check(libc.syscall(mount_setattr, at_fdcwd, target, flags, ctypes.byref(attributes),
                           ctypes.sizeof(attributes)), "mount_setattr")
    # The working directory was entered before the mount: enter it again, through the mount.
    os.chdir(workdir)
    return ("read-only-filesystem",) + layers


if config["network_namespace"] != "off":
    try:
        for layer in enter_namespaces(os.path.realpath(config["workdir"])):
            report("layer " + layer)
    except (OSError, AttributeError) as error:
        report(f"unavailable network-namespace: {error}")
        if config["network_namespace"] == "require":
            sys.stderr.write(f"xm2 sandbox: no network namespace: {error}\n")
            sys.exit(config["setup_exit"])
    for name in [name for name in sys.modules if name == "ctypes" or name.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]

import resource

for name, value in config["limits"].items():
    soft, hard = value if isinstance(value, list) else (value, value)
    try:
        limit = getattr(resource, name)
        _, current_hard = resource.getrlimit(limit)
        if current_hard != resource.RLIM_INFINITY:
            hard = min(hard, current_hard)
            soft = min(soft, hard)
        resource.setrlimit(limit, (soft, hard))
    except (AttributeError, ValueError, OSError) as error:  # e.g. RLIMIT_AS on macOS
        report(f"unavailable {name}: {error}")
report("layer rlimits")
import _signal

# Python ignores SIGXFSZ; the default action ends a program that writes past the file-size limit.
_signal.signal(_signal.SIGXFSZ, _signal.SIG_DFL)
if not config["root"]:
    report("layer no-new-processes")


def install_guard(workdir):
    import _socket
    import posix
    import posixpath

    # Everything the hook calls is bound here, so rebinding module attributes cannot change it.
    realpath, join, isabs, isdir = posixpath.realpath, posixpath.join, posixpath.isabs, posixpath.isdir
    fspath, fsdecode, readlink, getpid, getpgrp = os.fspath, os.fsdecode, os.readlink, os.getpid, os.getpgrp
    af_unix = _socket.AF_UNIX
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    prefix = workdir + "/"
    devnull = os.devnull
    refused_names = {
        "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
        "os.startfile", "subprocess.Popen", "socket.connect", "socket.bind", "socket.sendto",
        "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname",
        "socket.gethostbyaddr", "socket.getnameinfo", "sqlite3.enable_load_extension",
        "resource.setrlimit", "resource.prlimit", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents",
    }
    refused_imports = {"_posixsubprocess", "_ctypes", "_xxsubinterpreters"}

    def resolve(path, dir_fd=None):
        # None when the target cannot be named (e.g. an fd that /proc cannot resolve).
        try:
            if isinstance(path, int):
                return realpath(readlink(f"/proc/self/fd/{path}"))
            path = fsdecode(fspath(path))
            if dir_fd not in (None, -1) and not isabs(path):
                path = join(readlink(f"/proc/self/fd/{dir_fd}"), path)
            return realpath(path)
        except (OSError, TypeError, ValueError):
            return None

    def inside(path, dir_fd=None):
        resolved = resolve(path, dir_fd)
        return resolved is not None and (resolved == workdir or resolved.startswith(prefix))

    def refuse(event, args, why):
        report(f"refused {event} {args!r:.200}")
        raise PermissionError(f"xm2 sandbox: {event} {args!r:.100} is not allowed: {why}")

    # (event, indices of path arguments, index of their dir_fd or None)
    path_events = {
        "os.rename": ((0, 1), 2), "os.link": ((0, 1), 2), "os.remove": ((0,), 1),
        "os.rmdir": ((0,), 1), "os.mkdir": ((0,), 2), "os.symlink": ((1,), 2),
        "os.chmod": ((0,), 2), "os.chown": ((0,), 3), "os.utime": ((0,), 3),
        "os.truncate": ((0,), None), "os.setxattr": ((0,), None), "os.removexattr": ((0,), None),
        "shutil.rmtree": ((0,), None), "shutil.copyfile": ((1,), None),
        "shutil.copytree": ((1,), None), "shutil.move": ((0, 1), None), "shutil.chown": ((0,), None),
    }

    def hook(event, args):
        if event in refused_names:
            refuse(event, args, "not in the sandbox (no network, no new processes, fixed limits)")
        elif event == "open":
            path, _, flags = args
            if isinstance(path, int):
                return
            writing = bool((flags or 0) & write_flags)
            if writing and not inside(path) and resolve(path) != devnull:
                refuse(event, args, "writing outside the sandbox directory")
            if not writing and isdir(path) and not inside(path):
                refuse(event, args, "opening a directory outside the sandbox directory")
        elif event in path_events:
            indices, dir_fd_index = path_events[event]
            dir_fd = args[dir_fd_index] if dir_fd_index is not None else None
            for index in indices:
                if not inside(args[index], dir_fd):
                    refuse(event, args, "changing files outside the sandbox directory")
        elif event == "os.chdir":
            if not inside(args[0]):
                refuse(event, args, "leaving the sandbox directory")
        elif event == "import":
            if args[0] in refused_imports:
                refuse(event, args[:1], "no processes or foreign code in the sandbox")
        elif event.startswith("ctypes."):
            refuse(event, args, "no foreign code in the sandbox")
        elif event == "socket.__new__":
            if args[1] != af_unix:
                refuse(event, args[1:], "no network in the sandbox")
        elif event in ("os.kill", "os.killpg"):
            pid = args[0]
            if pid not in (0, getpid(), getpgrp()):
                refuse(event, args, "signals to other processes")
        elif event == "sqlite3.connect":
            database = args[0]
            if database not in (":memory:", "", b":memory:", b"") and not inside(database):
                refuse(event, args, "writing outside the sandbox directory")
        elif event in ("object.__setattr__", "object.__delattr__") and args[0] is hook:
            refuse(event, args[1:2], "the sandbox guard cannot be changed")

    # Calls that create files but raise no audit event.
    for module in (os, posix):
        for name in ("mknod", "mkfifo", "chroot"):
            if hasattr(module, name):
                delattr(module, name)
    sys.addaudithook(hook)


if config["guard"]:
    install_guard(os.path.realpath(config["workdir"]))
    report("layer audit-guard")
del install_guard, enter_namespaces, mount_filesystem


def run_program(path, memory_exit):
    with open(path, encoding="utf-8") as file:
        source = file.read()
    main = type(sys)("__main__")
    main.__file__ = os.path.abspath(path)
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    try:
        exec(compile(source, main.__file__, "exec"), main.__dict__)
    except MemoryError:
        try:
            sys.stderr.write("MemoryError: the sandbox's memory limit was reached\n")
        finally:
            sys.exit(memory_exit)
    except SystemExit:
        raise
    except BaseException as error:
        import traceback

        # The traceback shows the program's frames, not the sandbox's.
        summary = traceback.TracebackException.from_exception(error)
        summary.stack = traceback.StackSummary.from_list(
            [frame for frame in summary.stack if frame.filename != "<string>"]
        )
        sys.stderr.write("".join(summary.format()))
        sys.exit(1)


report("start")
run_program(config["program"], config["memory_exit"])
"""
