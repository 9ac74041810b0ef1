"""The sandbox's child process: it sets up the isolation layers, then runs the program.

``xm2.eval.sandbox`` runs this file by path, as ``python -I -S -B -X utf8 sandbox_child.py
<config>`` (``config``: a dict, marshalled and hex-encoded) in the program's temporary directory.
It sets up the layers in this order (the namespaces first: a user namespace needs a
single-threaded process, and ctypes is refused once the guard is in), writes one report line per
layer to the report file, then runs the program as ``__main__``.

It imports only what the set-up needs, each module where the set-up needs it, and nothing from
xm2: a module imported here is already loaded, unaudited, when the program starts. That is also
why the config comes marshalled, not as JSON (json imports re).
"""

import marshal
import os
import sys


def report(line):
    """One line of the report file that the parent reads (layers, refusals), within a budget."""
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

    if config["guard"]:
        install_guard(os.path.realpath(config["workdir"]))
        report("layer audit-guard")
    del install_guard, enter_namespaces, mount_filesystem

    report("start")
    run_program(config["program"], config["memory_exit"])
