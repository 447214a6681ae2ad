"""Run a command that executes a build's inputs (a package's build backend) contained.

Built on bubblewrap, Debian's unprivileged sandbox (the one Flatpak runs on): the command
gets new PID, network, IPC and UTS namespaces, so it sees no other process, has no network
interface but its own loopback, and cannot reach the host's services, the Docker engine or
a metadata address. Its file system is a fresh tmpfs holding only the system's programs
and libraries and the worker's Python (read-only), the inputs it is given (read-only) and
one output folder: never the worker's data folder, settings or caches. It runs under an
unprivileged uid with no capabilities and ``no_new_privs``, under resource limits
(``prlimit``: CPU time, address space, processes, file size; tmpfs sizes; wall time), and
under a seccomp filter that refuses what only a namespace owner may do (new namespaces,
mounts, keyrings, BPF): an unprivileged process reaches that kernel code only through a
user namespace of its own, and bugs there have led to root before.
Why not a container: the oci builder exists to need no Docker engine, and a build backend
needs no image, only the worker's Python.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TypeVar

__all__ = ["Limits", "SandboxFailed", "run_contained"]

Log = Callable[[str], None]
T = TypeVar("T")
# Unprivileged uids for contained commands when the worker runs as root: one per command,
# so concurrent commands never share a process budget or files.
_UID_RANGE = (300000, 365535)
_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc/ld.so.cache", "/etc/alternatives")
_TAIL = 20
# Calls a build backend never needs, each a way into kernel code that an unprivileged process
# reaches only as the owner of a namespace (Flatpak refuses much the same).
_REFUSED_CALLS = (
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "userfaultfd",
    "perf_event_open",
    "fsopen",
    "fsmount",
    "fsconfig",
    "fspick",
    "open_tree",
    "move_mount",
    "mount_setattr",
)
# clone's flags that make a namespace (NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET).
_NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)


@dataclass(frozen=True)
class Limits:
    """What one contained command may use."""

    cpu_seconds: int = 900
    memory_bytes: int = 4 << 30  # address space
    processes: int = 256
    file_bytes: int = 1 << 30  # the largest file it may write
    disk_bytes: int = 2 << 30  # each tmpfs (/tmp)
    files: int = 1_000_000  # files and folders in the output tmpfs (each costs kernel memory)
    wall_seconds: float = 1800.0


class SandboxFailed(Exception):
    """The contained command failed or hit a limit; the message says which."""


def run_contained(
    command: list[str],
    *,
    inputs: Mapping[Path, str],
    output: Path,
    limits: Limits,
    log: Log,
    what: str,
    collect: Callable[[Path], T] | None = None,
) -> T | None:
    """Run ``command`` contained, ``inputs`` (host path → sandbox path) read-only and
    ``output`` writable at ``/out``; stream its output to ``log``; raise ``SandboxFailed``.

    ``collect(output)`` takes what the command made, while ``output`` still holds it: as
    root, ``output`` is a tmpfs of ``limits.disk_bytes`` for the command's run only, so it
    cannot fill the worker's disk.
    """
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxFailed(
            f"{what} needs bubblewrap to run contained, and this worker has none (apt-get install bubblewrap)"
        )
    output.mkdir(parents=True, exist_ok=True)
    args = [
        bwrap,
        "--die-with-parent",
        "--new-session",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname",
        "sandbox",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/bin:/bin",
        "--setenv",
        "HOME",
        "/tmp",
        "--setenv",
        "TMPDIR",
        "/tmp",
        "--setenv",
        "LANG",
        "C.UTF-8",
        "--setenv",
        "PYTHONDONTWRITEBYTECODE",
        "1",
        *(["--proc", "/proc"] if _proc_mountable(bwrap) else []),
        "--dev",
        "/dev",
        "--perms",
        "1777",
        "--size",
        str(limits.disk_bytes),
        "--tmpfs",
        "/tmp",
    ]
    binds = [(path, path) for path in dict.fromkeys((sys.prefix, sys.base_prefix))]  # its Python
    binds += [(str(source), target) for source, target in inputs.items()]
    # bwrap makes missing parent folders 0700: open them, or the uid below cannot pass.
    targets = [*_SYSTEM, *(target for _, target in binds)]
    parents = {str(p) for target in targets for p in Path(target).parents if str(p) != "/"}
    for folder in sorted(parents, key=lambda p: p.count("/")):
        args += ["--perms", "0755", "--dir", folder]
    for path in _SYSTEM:
        args += ["--ro-bind-try", path, path]
    for source, target in binds:
        args += ["--ro-bind", source, target]
    args += ["--bind", str(output), "/out", "--chdir", "/tmp"]
    filter_fd = _seccomp_filter()
    args += ["--add-seccomp-fd", str(filter_fd)]
    rlimits = [
        "prlimit",
        f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 5}",
        f"--as={limits.memory_bytes}",
        f"--nproc={limits.processes}",
        f"--fsize={limits.file_bytes}",
        "--core=0",
        "--",
    ]
    uid = None
    if os.geteuid() == 0:
        # bwrap runs as root to set up the mounts, then the command drops to a uid of its
        # own, every capability gone and no way back (no_new_privs).
        uid = secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0]) + _UID_RANGE[0]
        for source in inputs:
            _readable_by_others(Path(source))
        drop = [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
        ]
        args += ["--", *drop, *rlimits, *command]
    else:
        # Unprivileged: a user namespace maps the worker's own uid; no capability reaches out.
        # The output folder is then bounded per file only (no mount without privilege).
        args += ["--unshare-user", "--cap-drop", "ALL", "--", *rlimits, *command]
    try:
        with _bounded(output, limits, uid):
            _run(args, limits, log, what, filter_fd)
            return collect(output) if collect is not None else None
    finally:
        os.close(filter_fd)


def _readable_by_others(path: Path) -> None:
    """Let the command's own uid read ``path`` (bound read-only), which the worker's private
    umask made 0600: its folders stay 0700, so nothing else on the host can reach it."""
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        mode = item.lstat().st_mode
        if not stat.S_ISLNK(mode):
            os.chmod(item, stat.S_IMODE(mode) | (0o555 if stat.S_ISDIR(mode) else 0o444))


@contextmanager
def _bounded(folder: Path, limits: Limits, uid: int | None) -> Iterator[None]:
    """As root: a tmpfs of ``limits.disk_bytes`` and ``limits.files`` on ``folder``, owned by
    ``uid``, for the block."""
    if uid is None:
        yield
        return
    options = f"size={limits.disk_bytes},nr_inodes={limits.files},mode=0700,uid={uid},gid={uid},nosuid,nodev,noexec"
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "mms-sandbox-out", str(folder)],
            check=True,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise SandboxFailed(f"cannot mount the sandbox's output folder: {exc}") from None
    try:
        yield
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=False, capture_output=True, timeout=30)


@cache
def _proc_mountable(bwrap: str) -> bool:
    """Whether a sandbox may have a /proc of its own.

    The kernel mounts a new proc only where no part of the existing one is covered, and a
    container engine covers parts of its containers' (Docker's masked paths): a non-root
    worker in such a container gets a sandbox without /proc, which hides even more.
    """
    if os.geteuid() == 0:
        return True
    probe = [bwrap, "--unshare-user", "--unshare-pid", "--ro-bind", "/", "/", "--proc", "/proc", "--", "true"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=30, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _seccomp_filter() -> int:
    """A file descriptor holding the contained command's seccomp program (BPF), for bwrap."""
    program = _seccomp_program()
    fd = os.memfd_create("mms-sandbox-seccomp")
    with os.fdopen(os.dup(fd), "wb") as out:
        out.write(program)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _seccomp_program() -> bytes:
    try:
        return _compiled_seccomp_program()
    except (ImportError, OSError, RuntimeError) as exc:  # no libseccomp on this worker
        raise SandboxFailed(
            f"cannot build the sandbox's seccomp filter ({exc}): the worker "
            "needs libseccomp (apt-get install libseccomp2)"
        ) from None


@cache
def _compiled_seccomp_program() -> bytes:
    import pyseccomp  # loads the system's libseccomp: only where a step is contained

    refuse = pyseccomp.ERRNO(errno.EPERM)
    rules = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
    for name in _REFUSED_CALLS:
        rules.add_rule(refuse, name)
    for flag in _NAMESPACE_FLAGS:
        rules.add_rule(refuse, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
    # clone3 passes its flags in memory, out of the filter's sight: as if the kernel had no
    # clone3, which makes the C library fall back to clone.
    rules.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as program:
        rules.export_bpf(program)
        program.seek(0)
        return program.read()


def _run(args: list[str], limits: Limits, log: Log, what: str, filter_fd: int) -> None:
    tail: list[str] = []
    try:
        proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            start_new_session=True,
            env={},
            pass_fds=(filter_fd,),
        )
    except OSError as exc:
        raise SandboxFailed(f"cannot start the sandbox for {what}: {exc}") from None
    timer = _Deadline(proc, limits.wall_seconds)
    with proc:
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                line = line.rstrip()
                tail = [*tail[-_TAIL + 1 :], line]
                log(f"    {line}")
            code = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:  # the log raised: a cancelled build
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if timer.fired:
        raise SandboxFailed(f"{what} ran longer than its wall-time limit of {limits.wall_seconds:g} s and was stopped")
    if code != 0:
        raise SandboxFailed(f"{what} failed: {_reason(code, tail, limits)}")


def _reason(code: int, tail: list[str], limits: Limits) -> str:
    text = "\n".join(tail)
    signalled = code - 128 if code > 128 else -code if code < 0 else 0
    if signalled == signal.SIGXCPU:  # the soft limit; the hard one, 5 s later, kills
        return f"it used up its CPU time limit of {limits.cpu_seconds} s"
    if signalled == signal.SIGKILL:
        return f"it was killed at its CPU time limit of {limits.cpu_seconds} s"
    if signalled == signal.SIGXFSZ or "File too large" in text:
        return f"it wrote a file beyond the file size limit of {limits.file_bytes >> 20} MiB"
    if "MemoryError" in text or "Cannot allocate memory" in text:
        return f"it ran out of memory (limit {limits.memory_bytes >> 20} MiB of address space)"
    if "Resource temporarily unavailable" in text or "can't start new thread" in text:
        return f"it hit the process limit ({limits.processes} processes)"
    if "No space left on device" in text:
        return f"it filled its disk (limit {limits.disk_bytes >> 20} MiB)"
    errors = [line.strip() for line in tail if line.strip().startswith(("ERROR", "error"))]
    last = errors[-1] if errors else (tail[-1].strip() if tail else "")
    return f"exit code {code}" + (f": {last[:300]}" if last else "")


class _Deadline:
    """Kill the sandbox's whole session when the wall-time limit passes."""

    def __init__(self, proc: subprocess.Popen, seconds: float) -> None:
        self.fired = False
        self._proc = proc
        self._timer = threading.Timer(seconds, self._kill)
        self._timer.daemon = True
        self._timer.start()

    def _kill(self) -> None:
        self.fired = True
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def cancel(self) -> None:
        self._timer.cancel()
