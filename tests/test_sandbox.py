"""The code sandbox runs real subprocesses: no network, no escape from its directory, no reach
into other processes, limits that stop runaway programs. Each layer is tested alone where the
machine has it."""

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from xm2.eval.sandbox import execute, execute_many

TOKEN = b"xm2-sandbox-token"


@pytest.fixture(scope="module")
def layers() -> tuple[str, ...]:
    return execute("pass").layers


@contextlib.contextmanager
def serving(listener: socket.socket):
    """Answer every connection to ``listener`` with TOKEN until the block ends."""
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                continue
            with connection:
                connection.sendall(TOKEN)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        listener.close()


@pytest.fixture
def server():
    """A TCP server on 127.0.0.1 that answers every connection with TOKEN: its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    with serving(listener):
        yield listener.getsockname()[1]


@pytest.fixture
def unix_server(tmp_path):
    """A Unix-socket server of the machine that answers every connection with TOKEN: its path."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "service.sock"))
    listener.listen()
    with serving(listener):
        yield listener.getsockname()


def client(port: int) -> str:
    return (
        "import socket\n"
        f"with socket.create_connection(('127.0.0.1', {port}), timeout=2) as s:\n"
        "    print(s.recv(100).decode())\n"
    )


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="all-layers"),
        pytest.param({"network_namespace": "off"}, id="guard-alone"),
        pytest.param({"guard": False}, id="namespace-alone"),
    ],
)
def test_no_network(server, layers, options):
    plain = subprocess.run(
        [sys.executable, "-c", client(server)], capture_output=True, text=True, timeout=30
    )
    assert plain.stdout.strip() == TOKEN.decode(), plain.stderr  # the server is reachable

    if not options.get("guard", True) and "network-namespace" not in layers:
        pytest.skip(f"no network namespace on this machine: {layers}")
    result = execute(client(server), timeout_s=10, **options)
    assert result.status == "failed", result
    assert TOKEN.decode() not in result.stdout
    if options.get("guard", True):
        assert "PermissionError: xm2 sandbox" in result.stderr
        assert result.refused and result.refused[0].startswith("socket.")
    else:
        assert "Network is unreachable" in result.stderr


@pytest.mark.parametrize("guard", [True, False], ids=["guard-alone", "private-root-alone"])
def test_no_unix_socket_of_the_machine(unix_server, layers, guard):
    # A read-only mount does not stop connecting to a socket file (say /var/run/docker.sock).
    program = (
        "import socket\n"
        "with socket.socket(socket.AF_UNIX) as s:\n"
        f"    s.connect({unix_server!r})\n"
        "    print(s.recv(100).decode())\n"
    )
    plain = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=30
    )
    assert plain.stdout.strip() == TOKEN.decode(), plain.stderr  # the service is reachable

    if not guard and "private-root" not in layers:
        pytest.skip(f"no private root on this machine: {layers}")
    result = execute(program, **({"network_namespace": "off"} if guard else {"guard": False}))
    assert result.status == "failed" and TOKEN.decode() not in result.stdout, result
    assert ("PermissionError: xm2 sandbox" if guard else "FileNotFoundError") in result.stderr


def test_a_required_namespace_is_there_or_an_error(layers):
    result = execute("print('ran')", network_namespace="require")
    if "network-namespace" in layers:
        assert result.passed and result.stdout == "ran\n"
    else:
        assert result.status == "error" and "network namespace" in result.reason
        assert result.stdout == ""


def test_an_infinite_loop_is_killed_at_the_timeout():
    result = execute("while True:\n    pass\n", timeout_s=1.0)
    assert result.status == "timeout", result
    assert 1.0 <= result.seconds < 5.0
    assert "wall-clock" in result.reason


def test_a_sleeping_program_and_its_process_group_are_killed():
    started = time.monotonic()
    result = execute("import time\nprint('before', flush=True)\ntime.sleep(60)\n", timeout_s=1.0)
    assert result.status == "timeout" and result.stdout == "before\n"
    assert time.monotonic() - started < 5.0


@pytest.mark.parametrize(
    "program",
    [
        pytest.param("x = bytearray(8 * 1024**3)\n", id="one-allocation"),
        pytest.param("x = []\nwhile True:\n    x.append(bytearray(2**20))\n", id="growing"),
    ],
)
def test_a_memory_bomb_is_stopped(program):
    result = execute(program, timeout_s=10, memory_mb=256)
    assert result.status == "error", result
    assert "memory limit" in result.reason
    assert result.seconds < 5.0


def test_endless_output_is_stopped_and_truncated():
    result = execute("while True:\n    print('y' * 1000)\n", max_file_mb=1, max_output_bytes=1000)
    assert result.status == "error" and "file-size limit" in result.reason, result
    assert result.stdout.startswith("y" * 1000)
    assert "more bytes not shown" in result.stdout


ESCAPES = {
    "open": "open(OUTSIDE + '/escaped', 'w').write('x')",
    "os.open": "import os\nos.open(OUTSIDE + '/escaped', os.O_CREAT | os.O_WRONLY)",
    "pathlib": "import pathlib\npathlib.Path(OUTSIDE, 'escaped').write_text('x')",
    "mkdir": "import os\nos.mkdir(OUTSIDE + '/escaped')",
    "rename": "import os\nopen('inside', 'w').close()\nos.rename('inside', OUTSIDE + '/escaped')",
    "shutil.copy": "import shutil\nopen('inside', 'w').close()\nshutil.copy('inside', OUTSIDE + '/escaped')",
    "symlink": "import os\nos.symlink(OUTSIDE, 'link')\nopen('link/escaped', 'w').write('x')",
    "chdir": "import os\nos.chdir(OUTSIDE)\nopen('escaped', 'w').write('x')",
    "dir_fd": (
        "import os\nfd = os.open(OUTSIDE, os.O_RDONLY)\n"
        "os.close(os.open('escaped', os.O_CREAT | os.O_WRONLY, dir_fd=fd))"
    ),
    "sqlite": "import sqlite3\nsqlite3.connect(OUTSIDE + '/escaped').execute('create table t(x)')",
}


@pytest.mark.parametrize("guard", [True, False], ids=["guard-alone", "read-only-mounts-alone"])
@pytest.mark.parametrize("way", list(ESCAPES))
def test_cannot_write_outside_its_directory(tmp_path, layers, way, guard):
    if not guard and "read-only-filesystem" not in layers:
        pytest.skip(f"no mount namespace on this machine: {layers}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("kept")
    program = f"OUTSIDE = {str(outside)!r}\n" + ESCAPES[way] + "\nprint('escaped')\n"
    options = {"network_namespace": "off"} if guard else {"guard": False}
    result = execute(program, timeout_s=10, **options)
    assert result.status == "failed", result
    assert "escaped" not in result.stdout
    if guard:
        assert "PermissionError: xm2 sandbox" in result.stderr and result.refused
    assert sorted(p.name for p in outside.iterdir()) == ["keep"]


def test_cannot_remove_files_outside_its_directory(tmp_path):
    keep = tmp_path / "keep"
    keep.write_text("kept")
    for program in (
        f"import os\nos.remove({str(keep)!r})",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
    ):
        assert execute(program).status == "failed"
    assert keep.read_text() == "kept"


@pytest.mark.parametrize(
    "program",
    [
        pytest.param("import subprocess\nsubprocess.run(['echo', 'spawned'])", id="subprocess"),
        pytest.param("import os\nos.system('echo spawned')", id="os.system"),
        pytest.param("import os\nif os.fork() == 0:\n    print('spawned')", id="fork"),
        pytest.param(
            "import os\nos.posix_spawn('/bin/echo', ['echo', 'spawned'], {})", id="posix_spawn"
        ),
        pytest.param("import os\nos.execv('/bin/echo', ['echo', 'spawned'])", id="exec"),
        pytest.param("import ctypes\nctypes.CDLL(None).system(b'echo spawned')", id="ctypes"),
    ],
)
def test_cannot_start_a_process(program):
    result = execute(program)
    assert result.status == "failed", result
    assert "spawned" not in result.stdout
    assert "PermissionError: xm2 sandbox" in result.stderr


@pytest.fixture
def sleeper():
    """Start real processes of the evaluating user, each sleeping in its own process group."""
    processes = []

    def start() -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-c", "import time\ntime.sleep(60)"], start_new_session=True
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.kill()
        process.wait()


KILLS = {
    "pidfd": "signal.pidfd_send_signal(os.pidfd_open(VICTIM), signal.SIGKILL)",
    "proc-pidfd": (
        "signal.pidfd_send_signal(os.open(f'/proc/{VICTIM}', os.O_RDONLY), signal.SIGKILL)"
    ),
    "os.kill": "os.kill(VICTIM, signal.SIGKILL)",
    "os.killpg": "os.killpg(VICTIM, signal.SIGKILL)",
}


def _kill(way: str, pid: int) -> str:
    return f"import os, signal\nVICTIM = {pid}\n{KILLS[way]}\nprint('sent')\n"


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="all-layers"),
        pytest.param({"network_namespace": "off"}, id="guard-alone"),
        pytest.param({"guard": False}, id="pid-namespace-alone"),
    ],
)
@pytest.mark.parametrize("way", list(KILLS))
def test_cannot_signal_other_processes(sleeper, layers, way, options):
    target = sleeper()
    plain = subprocess.run(
        [sys.executable, "-c", _kill(way, target.pid)], capture_output=True, text=True, timeout=30
    )
    assert plain.stdout == "sent\n" and target.wait(timeout=10) == -9, plain.stderr  # it works

    if not options.get("guard", True) and "pid-namespace" not in layers:
        pytest.skip(f"no PID namespace on this machine: {layers}")
    victim = sleeper()
    result = execute(_kill(way, victim.pid), timeout_s=10, **options)
    assert result.status == "failed", result
    assert "sent" not in result.stdout
    if options.get("network_namespace") == "off":  # with all layers, /proc may fail it first
        assert "PermissionError: xm2 sandbox" in result.stderr and result.refused
    time.sleep(0.1)
    assert victim.poll() is None  # still alive


def test_only_its_own_processes_are_visible_and_it_holds_no_capabilities(sleeper, layers):
    # Without the guard, so that ctypes can try to undo the mounts.
    if "pid-namespace" not in layers or "no-capabilities" not in layers:
        pytest.skip(f"no PID namespace on this machine: {layers}")
    victim = sleeper()
    program = (
        "import ctypes, os\n"
        "print(sorted(int(name) for name in os.listdir('/proc') if name.isdigit()))\n"
        "status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
        "print(status['CapEff'].strip(), status['CapBnd'].strip())\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.umount2(b'/proc', 2), libc.mount(None, b'/', None, 32 | 4096, None))\n"
    )
    result = execute(program, guard=False)
    assert result.passed, result
    pids, capabilities, undone = result.stdout.splitlines()
    assert pids == "[1, 2]"  # the namespace's first process and the program
    assert capabilities == "0000000000000000 0000000000000000"
    assert undone == "-1 -1"  # neither unmounting /proc nor making / writable
    assert victim.poll() is None


LISTINGS = {
    "os.listdir": "print(os.listdir(OUTSIDE))",
    "os.scandir": "print([entry.name for entry in os.scandir(OUTSIDE)])",
    "os.walk": "print(list(os.walk(OUTSIDE)))",
    "glob": "import glob\nprint(glob.glob(OUTSIDE + '/*'))",
    "pathlib": "import pathlib\nprint(list(pathlib.Path(OUTSIDE).iterdir()))",
    "fd": "print(os.listdir(os.open(OUTSIDE, os.O_RDONLY)))",
}


@pytest.mark.parametrize("guard", [True, False], ids=["guard-alone", "private-root-alone"])
@pytest.mark.parametrize("way", list(LISTINGS))
def test_cannot_list_a_directory_outside_its_own(tmp_path, layers, way, guard):
    if not guard and "private-root" not in layers:
        pytest.skip(f"no private root on this machine: {layers}")
    (tmp_path / "secret-name.txt").write_text("")
    program = f"import os\nOUTSIDE = {str(tmp_path)!r}\n" + LISTINGS[way] + "\n"
    options = {"network_namespace": "off"} if guard else {"guard": False}
    result = execute(program, **options)
    assert "secret-name" not in result.stdout, result
    if guard:
        assert result.refused and result.refused[0].startswith(("os.listdir", "os.scandir", "open"))
    # os.walk and glob skip a directory they cannot list; the others fail.
    assert result.status == ("passed" if way in ("os.walk", "glob") else "failed"), result


def test_the_private_root_shows_no_file_of_the_machine(tmp_path, layers):
    if "private-root" not in layers:
        pytest.skip(f"no private root on this machine: {layers}")
    secret = tmp_path / "secret.txt"
    secret.write_text("xm2-secret")
    program = (
        "import os\n"
        f"print([os.path.exists(path) for path in ({str(secret)!r}, {__file__!r}, '/etc/passwd')])\n"
        f"print(open({str(secret)!r}).read())\n"
    )
    result = execute(program, guard=False)
    assert result.status == "failed" and "FileNotFoundError" in result.stderr, result
    assert result.stdout == "[False, False, False]\n"


def test_the_standard_library_works_in_the_sandbox():
    # Imports list their package's directory (the guard allows the interpreter's library) and
    # extension modules load the system's libraries (the private root shows them).
    program = (
        "import bisect, collections, datetime, fractions, heapq, itertools, math, random, re\n"
        "import statistics, string, tempfile, typing, unicodedata, xml.etree.ElementTree\n"
        "import decimal, hashlib, json, os, sqlite3\n"
        "print(json.dumps([str(decimal.Decimal(2).sqrt())[:4], hashlib.sha256(b'x').hexdigest()[:8],\n"
        "                  sqlite3.connect(':memory:').execute('select 1 + 1').fetchone()[0],\n"
        "                  os.listdir('.')]))\n"
    )
    result = execute(program)
    assert result.passed, result
    assert result.stdout == '["1.41", "2d711642", 2, ["main.py"]]\n'


def test_files_inside_its_directory_work_and_the_directory_is_removed():
    program = (
        "import contextlib, os\n"
        "with open(os.devnull, 'w') as null, contextlib.redirect_stdout(null):\n"
        "    print('discarded')\n"
        "import os, shutil, tempfile\n"
        "os.makedirs('a/b')\n"
        "open('a/b/f.txt', 'w').write('hello')\n"
        "shutil.copy('a/b/f.txt', 'g.txt')\n"
        "fd, path = tempfile.mkstemp()\n"
        "os.chmod('a', 0o500)\n"  # a read-only leftover must not stop the clean-up
        "print(os.getcwd())\n"
        "print(open('g.txt').read(), os.path.dirname(path) == os.getcwd())\n"
    )
    result = execute(program)
    assert result.passed, result
    workdir, line = result.stdout.splitlines()
    assert line == "hello True"
    assert os.path.basename(workdir).startswith("xm2-sandbox-")
    assert not os.path.exists(workdir)


def test_output_and_exit_codes_are_reported():
    result = execute("import sys\nprint('out')\nprint('err', file=sys.stderr)\n")
    assert (result.status, result.returncode, result.stdout, result.stderr) == (
        "passed",
        0,
        "out\n",
        "err\n",
    )
    failed = execute("def f():\n    assert 1 + 1 == 3\nf()\n")
    assert (failed.status, failed.returncode) == ("failed", 1)
    # The traceback names the program's lines, not the sandbox's own code.
    assert 'main.py", line 3' in failed.stderr and "sandbox_child" not in failed.stderr
    assert execute("import sys\nsys.exit(3)").reason == "exit code 3"
    assert execute("def f(:\n").status == "failed"  # a syntax error is the program's fault


def test_execute_many_keeps_the_order():
    programs = [f"print({i} * {i})" for i in range(6)] + ["raise SystemExit(2)"]
    results = execute_many(programs, workers=3, timeout_s=10)
    assert [r.stdout.strip() for r in results[:-1]] == [str(i * i) for i in range(6)]
    assert [r.status for r in results] == ["passed"] * 6 + ["failed"]


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="network_namespace='sometimes'"):
        execute("pass", network_namespace="sometimes")


FORKING = (
    "import os, time\n"
    "print(os.environ['HOME'], flush=True)\n"
    "if os.fork() == 0:\n"
    "    time.sleep(60)\n"
    "    os._exit(0)\n"
    "time.sleep(60)\n"
)


def _processes_with_home(home: str) -> list[int]:
    """The machine's live processes whose environment has HOME=home: a program's, by the host's
    process ids (inside a PID namespace it sees other ones)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/environ", "rb") as file:
                if f"HOME={home}".encode() in file.read().split(b"\0"):
                    found.append(int(entry))
        except (OSError, ValueError):
            pass
    return found


@pytest.mark.skipif(
    os.geteuid() != 0, reason="RLIMIT_NPROC stops the fork for users other than root"
)
def test_a_timeout_kills_the_whole_process_group():
    # Without the guard, root can fork: the child must die with its parent at the timeout.
    result = execute(FORKING, timeout_s=1.0, guard=False)
    assert result.status == "timeout", result
    home = result.stdout.strip()
    assert home.startswith(os.path.join(os.path.realpath(tempfile.gettempdir()), "xm2-sandbox-"))
    deadline = time.monotonic() + 5
    while _processes_with_home(home) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_with_home(home) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="RLIMIT_NPROC does not bind root")
def test_rlimit_nproc_stops_a_fork_without_the_guard():
    result = execute(FORKING, timeout_s=5.0, guard=False)
    assert result.status == "failed" and "BlockingIOError" in result.stderr, result


def test_its_files_together_are_capped_where_the_directory_is_a_tmpfs(layers):
    if not any(layer.startswith("tmpfs-directory") for layer in layers):
        pytest.skip(f"no mount namespace on this machine: {layers}")
    program = "for i in range(100):\n    open(str(i), 'wb').write(bytes(2**20))\n"
    result = execute(program, max_disk_mb=8, max_file_mb=4)
    assert result.status == "failed" and "No space left on device" in result.stderr, result


def test_the_guard_refuses_raising_its_limits():
    program = "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n"
    result = execute(program, network_namespace="off")
    assert result.status == "failed" and result.refused[0].startswith("resource.setrlimit")


def test_the_guard_replaces_the_process_calls_that_raise_no_audit_event():
    program = (
        "import os, signal\n"
        "for call in (os.pidfd_open, signal.pidfd_send_signal, os.setpriority, os.mknod):\n"
        "    try:\n"
        "        call(1, 0, 0)\n"
        "    except PermissionError as error:\n"
        "        print(error)\n"
    )
    result = execute(program, network_namespace="off")
    assert result.passed and len(result.stdout.splitlines()) == 4, result
    assert [refusal.split()[0] for refusal in result.refused] == [
        "os.pidfd_open",
        "_signal.pidfd_send_signal",
        "os.setpriority",
        "os.mknod",
    ]
