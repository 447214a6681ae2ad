"""The contained step: tenant code tries every boundary and is stopped (real bubblewrap)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from tests.listeners import tcp_listener
from workers.sandbox import Limits, SandboxFailed, run_contained

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="needs bubblewrap (scripts/bootstrap installs it)"
)

ATTACKS = """
import json, os, socket, sys
data_dir, port = sys.argv[1], int(sys.argv[2])
results = {}
def attempt(name, fn):
    try:
        results[name] = f"reached: {fn()!r}"[:200]
    except BaseException as exc:
        results[name] = f"stopped: {type(exc).__name__}: {exc}"[:200]
def connect(host, port):
    with socket.create_connection((host, port), timeout=2):
        return "connected"
def unix(path):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        return "connected"
def write(path):
    with open(path, "w") as f:
        f.write("x")
    return "written"
attempt("data folder", lambda: os.listdir(data_dir))
attempt("secret key", lambda: open(os.path.join(data_dir, "secret.key")).read())
attempt("pid 1 environment", lambda: open("/proc/1/environ", "rb").read())
attempt("own environment", lambda: {k: v for k, v in os.environ.items() if "SECRET" in k})
attempt("other processes", lambda: [p for p in os.listdir("/proc") if p.isdigit() and p not in ("1", str(os.getpid()))])
attempt("api port", lambda: connect("127.0.0.1", port))
attempt("engine socket", lambda: unix("/var/run/docker.sock"))
attempt("engine port", lambda: connect("127.0.0.1", 2375))
attempt("loopback registry", lambda: connect("127.0.0.1", 5000))
attempt("host address", lambda: connect("192.0.2.2", port))
attempt("metadata", lambda: connect("169.254.169.254", 80))
attempt("public internet", lambda: connect("pypi.org", 443))
attempt("write system", lambda: write("/usr/lib/evil"))
attempt("write worker's tree", lambda: write(os.path.join(data_dir, "evil")))
attempt("uid", lambda: os.getuid() if os.getuid() != 0 else "root")
print("RESULTS " + json.dumps(results))
"""


def _script(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inputs" / "tenant.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def _run(tmp_path: Path, text: str, *args: str, limits: Limits = Limits(wall_seconds=60)) -> list[str]:
    script = _script(tmp_path, text)
    lines: list[str] = []
    run_contained(
        [sys.executable, "/in/tenant.py", *args],
        inputs={script: "/in/tenant.py"},
        output=tmp_path / "out",
        limits=limits,
        log=lines.append,
        what="the tenant's code",
    )
    return lines


def test_tenant_code_reaches_no_file_process_network_or_secret_of_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "worker-data"
    data_dir.mkdir()
    (data_dir / "secret.key").write_text("worker-secret-key-material")
    monkeypatch.setenv("MMS_SECRET_KEY", "worker-secret-from-the-environment")
    with tcp_listener() as (port, seen):
        lines = _run(tmp_path, ATTACKS, str(data_dir), str(port))
    output = "\n".join(lines)
    results = json.loads(output.split("RESULTS ", 1)[1])
    assert not seen  # no connection ever arrived, on loopback or the host's address
    reached = {
        name: result
        for name, result in results.items()
        if result.startswith("reached") and name not in ("own environment", "other processes", "uid")
    }
    assert not reached, reached
    assert results["own environment"] == "reached: {}"
    assert results["other processes"] == "reached: []"  # its own PID namespace
    assert results["uid"] != "reached: 'root'"
    assert "worker-secret" not in output
    assert not (data_dir / "evil").exists()


@pytest.mark.parametrize(
    ("code", "limits", "fragment"),
    [
        ("x = bytearray(1 << 30)", Limits(memory_bytes=256 << 20, wall_seconds=60), "ran out of memory"),
        (
            """
     import os, time
     while True:
         if os.fork() == 0:
             time.sleep(30)
             os._exit(0)
     """,
            Limits(processes=32, wall_seconds=60),
            "process limit (32 processes)",
        ),
        ("while True: pass", Limits(cpu_seconds=2, wall_seconds=60), "CPU time limit of 2 s"),
        ("import time; time.sleep(60)", Limits(wall_seconds=2), "wall-time limit of 2 s"),
        (
            "open('/tmp/big', 'wb').write(b'x' * (96 << 20))",
            Limits(disk_bytes=32 << 20, file_bytes=1 << 30, wall_seconds=60),
            "filled its disk",
        ),
        (
            "open('/out/big', 'wb').write(b'x' * (64 << 20))",
            Limits(file_bytes=16 << 20, wall_seconds=60),
            "file size limit",
        ),
        # Many files, each under the file size limit: the output folder is bounded as a whole.
        (
            """
     for i in range(16):
         open(f'/out/part{i}', 'wb').write(b'x' * (8 << 20))
     """,
            Limits(disk_bytes=32 << 20, file_bytes=16 << 20, wall_seconds=60),
            "filled its disk",
        ),
    ],
)
def test_each_limit_stops_the_code_and_is_named(tmp_path: Path, code: str, limits: Limits, fragment: str) -> None:
    with pytest.raises(SandboxFailed) as failed:
        _run(tmp_path, code, limits=limits)
    assert fragment in str(failed.value)


def test_the_output_folder_is_collected_then_leaves_nothing_on_the_workers_disk(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = _script(tmp_path, "open('/out/made.txt', 'w').write('made inside')\n")
    seen = run_contained(
        [sys.executable, "/in/tenant.py"],
        inputs={script: "/in/tenant.py"},
        output=out,
        limits=Limits(wall_seconds=60),
        log=lambda _: None,
        what="the tenant's code",
        collect=lambda folder: (folder / "made.txt").read_text(),
    )
    assert seen == "made inside"
    if os.geteuid() == 0:  # a tmpfs for the run only
        assert not (out / "made.txt").exists()


def test_inputs_the_workers_private_umask_made_are_readable_inside(tmp_path: Path) -> None:
    old = os.umask(0o077)  # as a worker runs (app/private_files.py)
    try:
        lines = _run(tmp_path, "print(len(open(__file__).read()))\n")
    finally:
        os.umask(old)
    assert lines[-1].strip() == "34", lines
    assert os.stat(tmp_path).st_mode & 0o077 == 0  # its folder still keeps everyone else out


NAMESPACES = """
import ctypes, json, os, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
results = {}
def call(name, *args):
    code = getattr(libc, name)(*args)
    results[name] = "allowed" if code != -1 else os.strerror(ctypes.get_errno())
call("unshare", 0x10000000)  # CLONE_NEWUSER
call("unshare", 0x40000000)  # CLONE_NEWNET, for a fresh firewall to play with
results["unshare"] = results["unshare"]
results["unshare -Ur"] = subprocess.run(["unshare", "-Ur", "true"], capture_output=True, text=True).stderr.strip()
results["syscall clone NEWUSER"] = (lambda code: "allowed" if code != -1 else os.strerror(ctypes.get_errno()))(
    libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0))  # SYS_clone on x86_64 (exit signal SIGCHLD)
results["mount"] = (lambda code: "allowed" if code != -1 else os.strerror(ctypes.get_errno()))(
    libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
results["keyctl"] = (lambda code: "allowed" if code != -1 else os.strerror(ctypes.get_errno()))(
    libc.syscall(250, 0, 0, 0, 0, 0))  # SYS_keyctl on x86_64
# What a build backend does need still works: processes and threads.
pid = os.fork()
if pid == 0:
    os._exit(7)
results["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
thread = threading.Thread(target=lambda: results.__setitem__("thread", "ran"))
thread.start(); thread.join()
print("RESULTS " + json.dumps(results))
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the probe names x86_64 system calls")
def test_tenant_code_can_make_no_namespace_mount_or_key_of_its_own(tmp_path: Path) -> None:
    lines = _run(tmp_path, NAMESPACES)
    results = json.loads(next(line for line in lines if "RESULTS " in line).split("RESULTS ", 1)[1])
    assert results["unshare"] == "Operation not permitted"
    assert "Operation not permitted" in results["unshare -Ur"]
    assert results["syscall clone NEWUSER"] == "Operation not permitted"
    assert results["mount"] == "Operation not permitted"
    assert results["keyctl"] == "Operation not permitted"
    assert results["fork"] == 7 and results["thread"] == "ran"
