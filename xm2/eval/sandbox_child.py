"""The sandbox's child process: it sets up the isolation layers, then runs the program.

``xm2.eval.sandbox`` runs this file by path, as ``python -I -S -B -X utf8 sandbox_child.py
<config>`` (``config``: a dict, marshalled and hex-encoded) in the program's temporary directory.
It sets up the layers in this order, writing one report line per layer to the report file, then
runs the program as ``__main__``:

1. the namespaces (first: a user namespace needs a single-threaded process, and ctypes is refused
   once the guard is in). A new PID namespace holds only this process's children, so this process
   forks the namespace's first process (PID 1), which mounts the filesystem (its /proc is the
   namespace's) and forks the process that runs the program: the program must not be PID 1, which
   ignores the signals it has no handler for (SIGXCPU and SIGXFSZ of the limits among them). Each
   of the two waits for its child and exits as it did, so the sandbox sees the program's own exit
   status;
2. the filesystem, in the mount namespace: a private root, or the machine's mounts read-only;
3. no capabilities (a user namespace would give the program all of them over its own mounts);
4. the resource limits, then the guard.

It imports only what the set-up needs, each module where the set-up needs it, and nothing from
xm2: a module imported here is already loaded, unaudited, when the program starts. That is also
why the config comes marshalled, not as JSON (json imports re).
"""

import marshal
import os
import sys

CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000, 0x20000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 1 << 18
MNT_DETACH, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY, SYS_MOUNT_SETATTR = 2, -100, 0x8000, 1, 442
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}  # where libc has no pivot_root
SIGKILL = 9
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/dev/null",
                "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/etc/ld.so.cache",
                "/etc/localtime")
"""What a private root shows of the machine besides the Python installation: the system's
libraries (extension modules load them) and programs, a few devices, the loader's cache and the
time zone."""


class SetupError(OSError):
    """A layer that failed half-way, leaving the process in no state to run the program."""


def report(line):
    """One line of the report file that the parent reads (layers, refusals), within a budget."""
    if report_lines[0] < config["max_report_lines"] + 10:
        report_lines[0] += 1
        try:
            os.write(report_fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
        except OSError:
            pass


def isolate(workdir):
    """The kernel's layers: namespaces, the filesystem, no capabilities. With a PID namespace
    this process and the namespace's first process stay behind, waiting: it returns in the
    process that runs the program."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        flags = enter_namespaces(libc, ctypes)
    except (OSError, AttributeError, ImportError) as error:
        report(f"unavailable network-namespace: {error}")
        if config["network_namespace"] == "require":
            sys.stderr.write(f"xm2 sandbox: no network namespace: {error}\n")
            sys.exit(config["setup_exit"])
        return

    def call(result, what):
        if result != 0:
            raise OSError(f"{what}: {os.strerror(ctypes.get_errno())}")

    own_pids = bool(flags & CLONE_NEWPID)
    if own_pids:
        status_pipe = start_pid_namespace(libc)
    if flags & CLONE_NEWNS:
        try:
            for layer in mount_filesystem(libc, ctypes, call, workdir, own_pids):
                report("layer " + layer)
        except SetupError as error:
            sys.stderr.write(f"xm2 sandbox: {error}\n")
            sys.exit(config["setup_exit"])
        except OSError as error:
            report(f"unavailable read-only-filesystem: {error}")
    else:
        report("unavailable read-only-filesystem: no mount namespace")
        if own_pids:
            report("unavailable pid-namespace-proc: no mount namespace (/proc shows every process)")
    if own_pids:
        fork_program(libc, status_pipe)
    try:
        drop_capabilities(libc, ctypes, call)
        report("layer no-capabilities")
    except OSError as error:
        report(f"unavailable no-capabilities: {error}")


def enter_namespaces(libc, ctypes):
    # New network (and user, mount, PID) namespaces; reports the layers, returns the flags that
    # worked, raises OSError.
    user, network, mount = CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWNS
    # A user namespace as well, where allowed: even root then holds no capability outside it.
    attempts = ((user | network | mount, ("user-namespace", "network-namespace")),
                (network | mount, ("network-namespace",)), (network, ("network-namespace",)))
    errors, uid, gid = [], os.geteuid(), os.getegid()
    for flags, layers in attempts:  # noqa: B007 (the attempt that worked is used below)
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
    for layer in layers:
        report("layer " + layer)
    # Apart from the others: the capabilities that a new PID namespace needs come with the user
    # namespace, and the namespace is for the children (start_pid_namespace).
    if libc.unshare(CLONE_NEWPID) == 0:
        report("layer pid-namespace")
        flags |= CLONE_NEWPID
    else:
        report(f"unavailable pid-namespace: unshare: {os.strerror(ctypes.get_errno())}")
    return flags


def start_pid_namespace(libc):
    """Fork the PID namespace's first process and return in it, with the write end of a pipe
    for the program's wait status; this process waits for it and exits as the program did."""
    status_read, status_write = os.pipe()
    first = os.fork()
    if first == 0:
        os.close(status_read)
        # Killed with this process: the sandbox kills the whole group at the timeout, but a
        # namespace without its first process ends, and with it every process of the program.
        libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
        return status_write
    os.close(status_write)
    _, status = os.waitpid(first, 0)
    relayed = os.read(status_read, 32)
    exit_as(int(relayed) if relayed.isdigit() else status)


def fork_program(libc, status_write):
    """In the PID namespace's first process: fork the process that runs the program and return
    in it; here, reap the namespace's processes until that one ends and pass its status on."""
    import _signal

    # PID 1 ignores any signal from inside its namespace that it has no handler for: without
    # Python's SIGINT handler the program cannot stop it. Not dumpable: the program (same user,
    # no capabilities) can neither trace it nor open its pipe through /proc/1/fd.
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    program = os.fork()
    if program == 0:
        os.close(status_write)
        libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
        _signal.signal(_signal.SIGINT, _signal.default_int_handler)
        return
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == program:
            break
    os.write(status_write, str(status).encode())
    # The processes the program left behind end with this one.
    os._exit(0)


def exit_as(status):
    """End this process as the one whose wait status is ``status`` ended: same code, same signal."""
    if os.WIFSIGNALED(status):
        import _signal
        import resource

        number = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        try:
            _signal.signal(number, _signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL and SIGSTOP keep theirs
            pass
        os.kill(os.getpid(), number)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def mount_filesystem(libc, ctypes, call, workdir, own_proc):
    # In this mount namespace only (the machine's mounts are untouched): a private root, or where
    # that cannot be made, every mount read-only. Either way the sandbox directory becomes a small
    # tmpfs holding a copy of the program; own_proc: a /proc of the PID namespace.
    call(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    with open(os.path.join(workdir, config["program"]), "rb") as file:
        source = file.read()

    class MountAttr(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint64)
                    for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]

    def read_only(root, writable):
        # Every mount under root read-only, then the directory's writable again.
        for target, flags, attributes in (
            (root, AT_RECURSIVE, MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)),
            (writable, 0, MountAttr(0, MOUNT_ATTR_RDONLY, 0, 0)),
        ):
            call(libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, target.encode(), flags,
                              ctypes.byref(attributes), ctypes.sizeof(attributes)), "mount_setattr")

    def mount(source, target, kind, flags, options, what):
        call(libc.mount(source, target.encode(), kind, flags, options), what)

    def mount_proc(target):
        try:
            mount(b"proc", target, b"proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, None,
                  "mount proc")
        except OSError as error:
            report(f"unavailable pid-namespace-proc: {error}")

    try:
        return private_root(libc, ctypes, mount, mount_proc, read_only, workdir, source, own_proc)
    except SetupError:
        raise
    except OSError as error:
        report(f"unavailable private-root: {error}")
        libc.umount2(workdir.encode(), MNT_DETACH)  # whatever private_root mounted goes with it
    layers = ()
    try:
        layers = (program_directory(mount, workdir, source),)
    except OSError as error:
        report(f"unavailable tmpfs-directory: {error}")
        libc.umount2(workdir.encode(), MNT_DETACH)
        mount(workdir.encode(), workdir, None, MS_BIND | MS_REC, None, "mount --bind")
    if own_proc:
        mount_proc("/proc")
    read_only("/", workdir)
    # The working directory was entered before the mount: enter it again, through the mount.
    os.chdir(workdir)
    return ("read-only-filesystem",) + layers


def program_directory(mount, path, source):
    """Mount the program's tmpfs at ``path`` and write the program into it; returns the layer."""
    disk_bytes = config["disk_bytes"]
    mount(b"tmpfs", path, b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
          f"size={disk_bytes},mode=0700".encode(), "mount tmpfs")
    with open(os.path.join(path, config["program"]), "wb") as file:
        file.write(source)
    return f"tmpfs-directory ({disk_bytes // 2**20} MiB)"


def private_root(libc, ctypes, mount, mount_proc, read_only, workdir, source, own_proc):
    # A new root, built in a tmpfs over the sandbox directory and then swapped in (pivot_root):
    # the directory (a tmpfs at the same path), the Python installation and SYSTEM_PATHS, all
    # read-only, a /proc of the PID namespace, and nothing else of the machine. The old root is
    # detached, so no path leads back to it.
    paths = visible_paths()
    if "/" in paths:
        raise OSError("the Python installation is the whole filesystem (/)")
    mount(b"tmpfs", workdir, b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=0755", "mount tmpfs")
    for path in paths:
        target = workdir + path
        if os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o600))
        mount(path.encode(), target, None, MS_BIND | MS_REC, None, f"mount --bind {path}")
    os.makedirs(workdir + workdir, mode=0o700)
    layer = program_directory(mount, workdir + workdir, source)
    if own_proc:
        os.mkdir(workdir + "/proc")
        mount_proc(workdir + "/proc")
    read_only(workdir, workdir + workdir)
    try:
        pivot_root = libc.pivot_root
    except AttributeError:
        machine = os.uname().machine
        if machine not in SYS_PIVOT_ROOT:
            raise OSError(f"pivot_root: not in libc, no system call known on {machine}") from None

        def pivot_root(new_root, put_old):
            return libc.syscall(SYS_PIVOT_ROOT[machine], new_root, put_old)

    os.chdir(workdir)
    if pivot_root(b".", b".") != 0:
        raise OSError(f"pivot_root: {os.strerror(ctypes.get_errno())}")
    # The old root now lies over the new one: detach it. Failing here is fatal: the machine's
    # files would be visible again.
    if libc.umount2(b".", MNT_DETACH) != 0:
        raise SetupError(f"could not detach the old root: {os.strerror(ctypes.get_errno())}")
    os.chdir(workdir)
    return ("read-only-filesystem", "private-root", layer)


def visible_paths():
    """The paths of the machine that a private root shows: the Python installation (its prefixes
    and import path, as named and as resolved) and SYSTEM_PATHS, each existing one once (not
    under another)."""
    named = [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, *sys.path]
    paths = set(SYSTEM_PATHS)
    for path in named:
        if path and os.path.isabs(path):
            paths.update((os.path.normpath(path), os.path.realpath(path)))
    kept = []
    for path in sorted(path for path in paths if os.path.exists(path)):
        if not any(path == parent or path.startswith(parent.rstrip("/") + "/") for parent in kept):
            kept.append(path)
    return kept


def drop_capabilities(libc, ctypes, call):
    # In a user namespace the program would hold every capability over the namespace's mounts:
    # it could make them writable again or unmount its /proc. no_new_privs and an empty bounding
    # set keep an exec from giving any back.
    call(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    for capability in range(64):
        # EINVAL past the last capability; EPERM without CAP_SETPCAP (then there are none).
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            break
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # fails before Linux 4.3
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    call(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")


def install_guard(workdir):
    import _signal
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
    # posix and _signal are loaded: importing them again (after removing them from sys.modules)
    # would give back the calls replaced below.
    refused_imports = {name: "no processes or foreign code in the sandbox"
                       for name in ("_posixsubprocess", "_ctypes", "_xxsubinterpreters")}
    refused_imports.update(dict.fromkeys(("posix", "_signal"), "the guard cannot be changed"))
    # The import system lists the directories of its path (and their packages) to find modules.
    library = tuple(realpath(path) for path in sys.path if path and isabs(path))

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

    def listable(path):
        # None: the working directory.
        resolved = resolve("." if path is None else path)
        return resolved is not None and any(
            resolved == root or resolved.startswith(root.rstrip("/") + "/")
            for root in (workdir, *library)
        )

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
        elif event in ("os.listdir", "os.scandir"):
            if not listable(args[0]):
                refuse(event, args, "listing a directory outside the sandbox directory")
        elif event == "os.chdir":
            if not inside(args[0]):
                refuse(event, args, "leaving the sandbox directory")
        elif event == "import":
            if args[0] in refused_imports:
                refuse(event, args[:1], refused_imports[args[0]])
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

    def refusing(event, why):
        def refused(*args, **keywords):
            refuse(event, args, why)

        return refused

    # Calls that raise no audit event, replaced in every module that holds them: creating special
    # files or changing the root, and acting on another process (a pidfd signals it).
    calls = dict.fromkeys(("mknod", "mkfifo", "chroot"), "no special files or chroot here")
    others = ("pidfd_open", "pidfd_send_signal", "setpriority", "sched_setaffinity",
              "sched_setparam", "sched_setscheduler")
    calls.update(dict.fromkeys(others, "acting on other processes"))
    for module in (os, posix, _signal, sys.modules.get("signal")):
        for name, why in calls.items():
            if module is not None and hasattr(module, name):
                setattr(module, name, refusing(f"{module.__name__}.{name}", why))
    sys.addaudithook(hook)


def run_program(path, memory_exit):
    """Run the program file as ``__main__``; exit 1 with its traceback if it raises."""
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
            [frame for frame in summary.stack if frame.filename != __file__]
        )
        sys.stderr.write("".join(summary.format()))
        sys.exit(1)


# Only as a program: importing this file (a linter, an editor, a test) sets nothing up.
if __name__ == "__main__":
    config = marshal.loads(bytes.fromhex(sys.argv[1]))
    report_fd = config["report_fd"]
    report_lines = [0]

    if config["network_namespace"] != "off":
        isolate(os.path.realpath(config["workdir"]))
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

    if config["guard"]:
        install_guard(os.path.realpath(config["workdir"]))
        report("layer audit-guard")
    del (install_guard, isolate, enter_namespaces, start_pid_namespace, fork_program, exit_as,
         mount_filesystem, program_directory, private_root, drop_capabilities)

    report("start")
    run_program(config["program"], config["memory_exit"])
