"""The oci builder's ``RUN`` steps, run contained by buildah: no Docker engine.

The oci builder writes the image it made (base, user, environment, server, driver, models)
as a local OCI layout; buildah takes it into a storage root of this build's own (under its
scratch folder, removed with it), runs the manifest's extra steps in order in one working
container, and commits; the one new layer (everything the steps wrote) goes back to the oci
builder, which adds it to its own config and pushes. Buildah's own config is not used.

A RUN step is a tenant's code, and the worker usually runs as root, so each step runs in a
real container (``--isolation oci``, runc), never chroot isolation:

- a user namespace maps the step's root to an unprivileged host uid range of its own per
  build (65536 ids from a random base above 2^30): root inside owns nothing outside;
- the runtime's default capabilities less ``NET_RAW``, ``MKNOD``, ``AUDIT_WRITE``,
  ``SYS_CHROOT`` and ``NET_BIND_SERVICE`` (held in that namespace only), no new
  privileges, buildah's default seccomp profile;
- no network at all (``--network none``: its own loopback only); or, with the build proxy,
  a network namespace of the build's own whose one destination is the egress proxy
  (``step_network.py``), its proxy variables set for the run only;
- a cgroup of this build's own as the parent of each step's: its memory (swap included where
  the kernel counts swap) and process limits hold each step (steps run one at a time), and a
  thread reads its CPU time, the steps' wall time and what they wrote (the working
  container's own layer), and kills the steps past ``MMS_BUILD_RUN_*``, naming the limit.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from app.dockerfile_steps import Step
from workers.builders import BuildFailed, Log
from workers.builders.run_limits import RunLimits
from workers.builders.step_network import StepNetwork
from workers.scratch import scratch_dir

__all__ = ["NewLayer", "buildah_missing", "run_steps"]

logger = logging.getLogger(__name__)

_MB = 1024 * 1024
_CGROUP = Path("/sys/fs/cgroup")
_CONTROLLERS_V1 = ("memory", "pids", "cpuacct", "cpu", "cpuset", "devices", "freezer", "blkio")
_DROPPED_CAPS = ("CAP_NET_RAW", "CAP_MKNOD", "CAP_AUDIT_WRITE", "CAP_SYS_CHROOT", "CAP_NET_BIND_SERVICE")
_ID_RANGE = 65536
_ID_BASE = 1 << 30
_INTERVAL = 0.25  # seconds between two looks at the steps' cgroup
_SIZE_EVERY = 2.0  # seconds between two reads of what the steps wrote
_BUILDAH_RUNTIME_ERROR = "Error: while running runtime"
_OUTPUT_TAIL = 40  # lines of a failed step's output kept to explain it
_MAX_LINE = 2000
_RUNTIMES = ("runc", "crun")
# A file capability in a tar (the security.capability xattr: a le32 magic whose top byte is
# the revision, two (permitted, inheritable) pairs, and in v3 the namespace root's host uid).
_CAPABILITY_XATTR = "SCHILY.xattr.security.capability"
_VFS_CAP_V2_SIZE, _VFS_CAP_V3_SIZE = 20, 24
# With the build proxy: the extra CAs (a TLS-inspecting proxy's) with the public ones, as the
# docker builder's RUN steps get them (workers/build_context.py), mounted for the run only.
# Under /dev, the runtime's tmpfs: its mount point is not made in the step's layer (buildah
# leaves one it made elsewhere, an empty file, in the commit).
_STEP_CA_BUNDLE = "/dev/mms-build-ca.pem"
_CA_VARIABLES = ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CONDA_SSL_VERIFY")
_NAMESPACES = ("pid", "network", "ipc", "uts", "mount", "user")
# What a step's root may do inside its user namespace: what package installs need (files'
# owners and modes, setuid/setgid to drop to a user, kill its own processes) and no more.
_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
)
# Refused to a step on top of buildah's default seccomp profile, which allows a root in a user
# namespace to make more namespaces (the kernel code behind most of these is reached by an
# unprivileged process only as the owner of a user namespace, and bugs there have led to root):
# new namespaces (``unshare``; ``clone`` with a namespace flag; ``clone3`` answers as if absent,
# so the C library falls back to ``clone``), ``setns``, mounts, keyrings, BPF, userfaultfd and
# perf events; as the contained sdist builds refuse them (``workers/sandbox.py``).
_REFUSED_CALLS = (
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsmount",
    "fsconfig",
    "fspick",
    "mount_setattr",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "userfaultfd",
    "perf_event_open",
)
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET: clone is allowed without them.
_NAMESPACE_FLAGS = 0x7E020000
# Buildah's OCI runtime: this script checks and completes the container's config that buildah
# wrote, then hands it to runc. Buildah 1.28 has no no-new-privileges; and a config without
# the user and network namespaces this module asked for (a change in buildah, a flag lost) is
# refused rather than run: new ones of its own, or, with the build proxy, the network
# namespace of the build's own (step_network.py) and no other.
_RUNTIME_WRAPPER = """\
import json, os, sys
POLICY = json.loads({policy!r})
args = sys.argv[1:]
for i, arg in enumerate(args[:-1]):
    if arg in ("--bundle", "-b"):
        path = os.path.join(args[i + 1], "config.json")
        with open(path) as f:
            config = json.load(f)
        linux = config.setdefault("linux", {{}})
        namespaces = {{n.get("type"): n.get("path") for n in linux.get("namespaces") or []}}
        joined = POLICY["network"]
        for kind in POLICY["namespaces"]:
            given = namespaces.get(kind, "absent")
            if kind == "network" and joined:
                # Exactly the build's own namespace, by path and by what is behind it (a
                # holder that died could have its pid taken by a process on the host's).
                try:
                    info = os.stat(given) if given == joined["path"] else None
                except OSError:
                    info = None
                if info is None or (info.st_dev, info.st_ino) != (joined["device"], joined["inode"]):
                    sys.exit(f"mms: refused: the step's config joins another network namespace ({{given}})")
            elif given:
                sys.exit(f"mms: refused: the step's config lacks its own namespaces ({{namespaces}})")
        if joined:
            # sysfs cannot be mounted in a network namespace the step's user namespace does not
            # own: /sys is an empty read-only tmpfs instead (not the host's), and nothing below it.
            mounts = [m for m in config.get("mounts") or [] if not m.get("destination", "").startswith("/sys/")]
            for m in mounts:
                if m.get("destination") == "/sys":
                    m.update(type="tmpfs", source="tmpfs", options=["nosuid", "noexec", "nodev", "ro", "size=4k"])
            config["mounts"] = mounts
        if linux.get("uidMappings") != POLICY["mappings"] or linux.get("gidMappings") != POLICY["mappings"]:
            sys.exit("mms: refused: the step's config lacks its user namespace mapping")
        seccomp = linux.get("seccomp")
        if not seccomp or not seccomp.get("syscalls"):
            sys.exit("mms: refused: the step's config has no seccomp profile")
        taken = set(POLICY["refused_calls"]) | {{"clone", "clone3"}}
        for rule in seccomp["syscalls"]:
            rule["names"] = [n for n in rule.get("names") or [] if n not in taken]
        seccomp["syscalls"] = [rule for rule in seccomp["syscalls"] if rule["names"]]
        seccomp["syscalls"] += [
            {{"names": POLICY["refused_calls"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}},
            {{"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}},
            {{"names": ["clone"], "action": "SCMP_ACT_ALLOW", "args": [
                {{"index": 0, "value": POLICY["namespace_flags"], "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}}]}},
        ]
        process = config.setdefault("process", {{}})
        process["noNewPrivileges"] = True
        caps = process.setdefault("capabilities", {{}})
        for kind in ("bounding", "effective", "inheritable", "permitted", "ambient"):
            caps[kind] = [c for c in caps.get(kind) or [] if c in POLICY["capabilities"]]
        # Under the build's cgroup, which holds the limits (a hit is counted there, by the kernel).
        linux["cgroupsPath"] = POLICY["cgroup"] + "/" + os.path.basename(os.path.normpath(args[i + 1]))
        # The container's root folder (its own layer's root, just mounted by buildah) is the
        # step's root's, as "/" is root's on the docker builder: containers/storage makes it the
        # host's root at every mount, an owner outside the namespace, so "/" took no new entry.
        rootfs = os.path.realpath(os.path.join(args[i + 1], (config.get("root") or {{}}).get("path") or "rootfs"))
        if not rootfs.startswith(POLICY["scratch"] + "/"):
            sys.exit(f"mms: refused: the step's root folder {{rootfs}} is not in the build's scratch folder")
        os.chown(rootfs, POLICY["root_id"], POLICY["root_id"], follow_symlinks=False)
        with open(path, "w") as f:
            json.dump(config, f)
# The step's cgroups are made by runc and read by its init already in the user namespace: the
# modes cgroups have, whatever the worker's umask (077 in a build worker).
os.umask(0o022)
os.execv(POLICY["runtime"], [POLICY["runtime"], *args])
"""


@dataclass(frozen=True)
class NewLayer:
    """What the steps wrote: a gzip layer, its digest, size and diff id."""

    path: Path
    digest: str
    size: int
    diff_id: str


def buildah_missing() -> str | None:
    """What this worker lacks to run RUN steps on the oci builder (None: nothing)."""
    missing = [name for name in ("buildah",) if shutil.which(name) is None]
    if not any(shutil.which(r) for r in _RUNTIMES):
        missing.append("runc (or crun)")
    return " and ".join(missing) or None


def run_steps(
    layout: Path,
    steps: list[Step],
    *,
    work: Path,
    limits: RunLimits,
    emit: Log,
    proxy: str | None = None,
    ca_bundle: Path | None = None,
) -> NewLayer:
    """Run ``steps`` (ENV and ARG set what later RUN steps see) on the image in the OCI
    layout ``layout`` (tag ``image``) and return the layer they wrote. With ``proxy`` (the
    egress proxy, ``http://host:port``) the RUN steps reach it, and nothing else; without,
    no network at all. ``ca_bundle`` (PEM: a TLS-inspecting proxy's CA with the public ones)
    is what their pip and requests trust then, mounted for the run only."""
    missing = buildah_missing()
    if missing:
        first = next(s for s in steps if s.keyword == "RUN")
        raise BuildFailed(
            "extra-steps",
            f"extraDockerfileSteps has a RUN step ({first.summary()}), and the oci builder runs RUN steps "
            f"with buildah, but this worker has no {missing}: install them (apt-get install buildah runc; "
            "scripts/bootstrap and the worker image do), or use the docker builder (builder: docker)",
        )
    # A folder of its own, traversable (0711, not listable): the runtime, already in the step's
    # user namespace, mounts the container's root from a path under it.
    with scratch_dir("buildah") as folder, ExitStack() as stack:
        root = Path(folder)
        root.chmod(0o711)
        network = None
        if proxy:
            try:
                network = stack.enter_context(StepNetwork(proxy))
            except OSError as exc:
                raise BuildFailed("extra-steps", str(exc)) from None
            emit(f"mms: the RUN steps reach the build proxy only, as http://127.0.0.1:{network.port}")
        runner = _Buildah(root, limits, emit, network, ca_bundle if network is not None else None)
        with runner.cgroup() as group:
            try:
                container = runner.from_layout(layout, group)
                env: dict[str, str] = {}
                for number, step in enumerate(steps, start=1):
                    if step.keyword in ("ENV", "ARG"):
                        env.update(step.pairs)
                    elif step.keyword == "RUN":
                        runner.run(container, step, env, group, number)
                return runner.commit(container, work / "steps-layer.tar.gz")
            finally:
                runner.remove_all()


class _Buildah:
    def __init__(
        self,
        root: Path,
        limits: RunLimits,
        emit: Log,
        network: StepNetwork | None = None,
        ca_bundle: Path | None = None,
    ) -> None:
        self.root = root
        self.limits = limits
        self.emit = emit
        self.network = network  # None: no network at all
        self.ca_bundle = None
        if ca_bundle is not None:
            # Readable to the step's root (a host uid of its own), through the 0711 folder.
            self.ca_bundle = root / "ca-bundle.pem"
            shutil.copyfile(ca_bundle, self.ca_bundle)
            self.ca_bundle.chmod(0o644)
        self.runtime = next(shutil.which(r) for r in _RUNTIMES if shutil.which(r))
        base = _ID_BASE + secrets.randbelow((1 << 31) - _ID_BASE - _ID_RANGE) // _ID_RANGE * _ID_RANGE
        self.id_map = f"0:{base}:{_ID_RANGE}"
        self.host_id = base
        (root / "conf").mkdir(parents=True, exist_ok=True)
        # Nothing of the host's containers configuration applies: empty files of our own.
        for name in ("containers.conf", "registries.conf", "storage.conf", "policy.json"):
            (root / "conf" / name).write_text("")
        (root / "conf" / "policy.json").write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        (root / "conf" / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\nrunroot = "{root / "run"}"\ngraphroot = "{root / "storage"}"\n'
        )
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(root),
            "XDG_RUNTIME_DIR": str(root / "xdg"),
            "CONTAINERS_CONF": str(root / "conf" / "containers.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(root / "conf" / "registries.conf"),
            "CONTAINERS_STORAGE_CONF": str(root / "conf" / "storage.conf"),
            "BUILDAH_ISOLATION": "oci",
            "TMPDIR": str(root / "tmp"),
        }
        (root / "xdg").mkdir(exist_ok=True)
        # Buildah mounts each step's root under its TMPDIR, and the runtime, already the step's
        # root in its user namespace, must pass through it: traversable whatever the worker's
        # umask (077 in a build worker), not listable.
        (root / "tmp").mkdir(mode=0o711, exist_ok=True)
        (root / "tmp").chmod(0o711)
        self.written_before = 0  # what the finished steps wrote
        self.run_seconds = 0.0  # how long the finished steps ran

    def _write_runtime(self, group: _Cgroup) -> Path:
        policy = {
            "runtime": self.runtime,
            "namespaces": _NAMESPACES,
            "mappings": [{"containerID": 0, "hostID": self.host_id, "size": _ID_RANGE}],
            "capabilities": _CAPABILITIES,
            "refused_calls": _REFUSED_CALLS,
            "namespace_flags": _NAMESPACE_FLAGS,
            "cgroup": group.parent,
            "scratch": os.path.realpath(self.root),
            "root_id": self.host_id,
            "network": None if self.network is None else dataclasses.asdict(self.network.netns),
        }
        path = self.root / "runtime"
        path.write_text(f"#!{sys.executable} -I\n" + _RUNTIME_WRAPPER.format(policy=json.dumps(policy)))
        path.chmod(0o700)
        return path

    def _global(self) -> list[str]:
        return [
            "buildah",
            "--root",
            str(self.root / "storage"),
            "--runroot",
            str(self.root / "run"),
            "--storage-driver",
            "overlay",
            "--cgroup-manager",
            "cgroupfs",
            "--registries-conf",
            str(self.root / "conf" / "registries.conf"),
        ]

    def _call(self, *args: str, timeout: float = 600) -> str:
        proc = subprocess.run(
            [*self._global(), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            reason = " ".join((proc.stderr or proc.stdout).split())[-400:]
            raise BuildFailed("extra-steps", f"buildah {args[0]} failed: {reason}")
        return proc.stdout.strip()

    @contextmanager
    def cgroup(self) -> Iterator[_Cgroup]:
        group = _Cgroup(f"mms-build-{secrets.token_hex(6)}", self.limits)
        try:
            group.create()
            yield group
        finally:
            group.remove()

    def from_layout(self, layout: Path, group: _Cgroup) -> str:
        started = time.monotonic()
        name = f"mms-steps-{secrets.token_hex(6)}"
        self.wrapper = self._write_runtime(group)
        # Buildah names the image it reads by the layout's path, which must then be a valid
        # image name (no "-_" as a scratch folder's random part may have): a link of ours.
        link = Path(tempfile.gettempdir()) / f"mms-buildah-{secrets.token_hex(8)}"
        link.symlink_to(layout)
        try:
            self._from(name, link, group)
        finally:
            link.unlink()
        # Mounted once so that the container records where its own layer is (the disk limit
        # reads it from the first step on); each step mounts it again.
        self._call("mount", name)
        self._call("umount", name)
        self.emit(f"mms: buildah took the image for the RUN steps in {time.monotonic() - started:.1f} s")
        return name

    def _from(self, name: str, layout: Path, group: _Cgroup) -> None:
        self._call(
            "from",
            "--name",
            name,
            "--pull-always",
            "--isolation",
            "oci",
            "--network",
            "none",
            "--userns-uid-map",
            self.id_map,
            "--userns-gid-map",
            self.id_map,
            *(arg for cap in _DROPPED_CAPS for arg in ("--cap-drop", cap)),
            "--cgroup-parent",
            group.parent,
            "--dns",
            "none",
            f"oci:{layout}:image",
        )

    def _upper(self, container: str) -> Path | None:
        """The working container's own layer (what the steps wrote), as overlay keeps it."""
        with suppress(BuildFailed, ValueError, KeyError):
            info = json.loads(self._call("inspect", "--type", "container", container))
            mount = info.get("MountPoint") or ""
            if mount:
                return Path(mount).parent / "diff"
        return None

    def _network_env(self) -> dict[str, str]:
        if self.network is None:
            return {}
        trust = dict.fromkeys(_CA_VARIABLES, _STEP_CA_BUNDLE) if self.ca_bundle is not None else {}
        return {**self.network.environment, **trust}

    def _network_mounts(self) -> list[str]:
        if self.ca_bundle is None:
            return []
        return ["--mount", f"type=bind,source={self.ca_bundle},destination={_STEP_CA_BUNDLE},ro"]

    def run(self, container: str, step: Step, env: dict[str, str], group: _Cgroup, number: int) -> None:
        self.emit(f"mms: extra step {number}: {step.summary()} (contained by buildah)")
        args = [
            *self._global(),
            "run",
            "--isolation",
            "oci",
            "--runtime",
            str(self.wrapper),
            "--network",
            "none" if self.network is None else f"ns:{self.network.netns.path}",
            "--user",
            "0:0",
            "--workingdir",
            "/",
            *(arg for cap in _DROPPED_CAPS for arg in ("--cap-drop", cap)),
            *self._network_mounts(),
            # The proxy's variables last, for this run only (never the image's config).
            *(arg for k, v in {**env, **self._network_env()}.items() for arg in ("--env", f"{k}={v}")),
            container,
            "--",
            *step.argv,
        ]
        upper = self._upper(container) if self.limits.disk_mb else None
        with subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
        ) as proc:
            watch = _Watch(group, self.limits, upper, self.written_before, self.run_seconds, proc)
            tail: list[str] = []
            with watch:
                assert proc.stdout is not None
                for raw in proc.stdout:
                    line = raw.decode(errors="replace").rstrip("\r\n")[:_MAX_LINE]
                    self.emit(line)
                    tail = [*tail[-_OUTPUT_TAIL:], line]
                code = proc.wait()
        self.written_before = watch.written
        self.run_seconds += time.monotonic() - watch.started
        breach = watch.breach or group.limit_hit()
        if breach:
            raise BuildFailed("extra-steps", breach)
        if code != 0:
            # The step's own last words, not buildah's ("Error: while running runtime: ...").
            own = [t for t in tail if t.strip() and not t.startswith(_BUILDAH_RUNTIME_ERROR)]
            last = (own or [t for t in tail if t.strip()] or [""])[-1]
            if code == 137 or code == -signal.SIGKILL:
                raise BuildFailed(
                    "extra-steps",
                    f"extra step {number} ({step.summary()}) was killed (exit code 137), most likely by its "
                    f"memory limit of {self.limits.memory_mb} MB (MMS_BUILD_RUN_MEMORY_MB)",
                )
            reach = (
                "has no network: one that downloads, apt-get or pip, needs the docker builder"
                if self.network is None
                else "reaches only the package indexes of MMS_BUILD_ALLOW_HOSTS, through the build proxy"
            )
            raise BuildFailed(
                "extra-steps",
                f"extra step {number} ({step.summary()}) exited with code {code}: {last[:300]} "
                f"(a RUN step on the oci builder {reach})",
            )

    def commit(self, container: str, dest: Path) -> NewLayer:
        started = time.monotonic()
        out = self.root / "out"
        self._call("commit", "--format", "oci", "--disable-compression", container, f"oci:{out}:steps")
        index = json.loads((out / "index.json").read_text())
        manifest = json.loads(_blob(out, index["manifests"][0]["digest"]).read_text())
        config = json.loads(_blob(out, manifest["config"]["digest"]).read_text())
        layer, diff_id = manifest["layers"][-1], config["rootfs"]["diff_ids"][-1]
        source = _blob(out, layer["digest"])
        written = source.stat().st_size
        if written > self.limits.disk_mb * _MB:
            raise BuildFailed("extra-steps", _disk_reason(self.limits, written))
        if _file_digest(source) != diff_id:
            raise BuildFailed("extra-steps", "buildah's layer of the RUN steps does not match its own diff id")
        digest, tar_digest = hashlib.sha256(), hashlib.sha256()
        with dest.open("wb") as raw, gzip.GzipFile(fileobj=_Hashing(raw, digest), mode="wb", mtime=0) as gz:
            self._unmapped(source, _Hashing(gz, tar_digest))
        self.emit(
            f"mms: the RUN steps wrote a layer of {written} bytes ({dest.stat().st_size} compressed), "
            f"committed in {time.monotonic() - started:.1f} s"
        )
        return NewLayer(dest, f"sha256:{digest.hexdigest()}", dest.stat().st_size, f"sha256:{tar_digest.hexdigest()}")

    def _unmapped(self, source: Path, out: _Hashing) -> None:
        """Copy the steps' tar with its owners and file capabilities as the step saw them
        (buildah 1.28 writes the host's ids of the user namespace): root inside is root in
        the image."""

        def inside(host: int) -> int:
            return host - self.host_id if self.host_id <= host < self.host_id + _ID_RANGE else 65534

        with_capabilities: list[str] = []
        with (
            tarfile.open(source, "r:") as tar_in,
            tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar_out,
        ):  # type: ignore[arg-type]
            for member in tar_in:
                member.uid, member.gid = inside(member.uid), inside(member.gid)
                member.uname = member.gname = ""
                for key in ("uid", "gid", "uname", "gname", "hdrcharset"):  # tarfile sets hdrcharset
                    member.pax_headers.pop(key, None)
                raw = member.pax_headers.pop(_CAPABILITY_XATTR, None)
                if raw is not None:
                    capability = _capability_as_seen_inside(raw.encode("utf-8", "surrogateescape"), self.host_id)
                    if capability is not None:
                        member.pax_headers[_CAPABILITY_XATTR] = capability.decode("utf-8", "surrogateescape")
                    with_capabilities.append(f"/{member.name}" + ("" if capability else " (dropped)"))
                tar_out.addfile(member, tar_in.extractfile(member) if member.isreg() else None)
        if with_capabilities:
            self.emit(
                "mms: the RUN steps set file capabilities (setcap) on "
                + ", ".join(with_capabilities[:20])
                + (" …" if len(with_capabilities) > 20 else "")
                + ": kept as the step saw them (as on the docker builder); they are not gained where the image "
                "runs with no new privileges, as the smoke test runs it"
            )

    def remove_all(self) -> None:
        with suppress(BuildFailed, subprocess.TimeoutExpired):
            self._call("rm", "--all", timeout=120)
        with suppress(BuildFailed, subprocess.TimeoutExpired):
            self._call("rmi", "--all", "--force", timeout=120)


class _Hashing:
    """A file object that hashes what is written to it."""

    def __init__(self, raw, digest) -> None:  # type: ignore[no-untyped-def]
        self.raw, self.digest = raw, digest

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def _capability_as_seen_inside(value: bytes, host_id: int) -> bytes | None:
    """A file capability a step set, as the step read it back: the kernel writes a step's
    ``setcap`` as a v3 capability naming the namespace's root by its host id, which no
    runtime elsewhere matches (the capability would silently not apply), and shows it to the
    step as v2, root-wide, the form the docker builder's steps write. None: not the step's
    root's (dropped)."""
    if len(value) == _VFS_CAP_V2_SIZE and value[3] == 2:
        return value
    if len(value) == _VFS_CAP_V3_SIZE and value[3] == 3 and int.from_bytes(value[20:24], "little") == host_id:
        return value[:3] + b"\x02" + value[4:20]
    return None


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def _blob(layout: Path, digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    if algorithm != "sha256" or len(hexdigest) != 64 or not all(c in "0123456789abcdef" for c in hexdigest):
        raise BuildFailed("extra-steps", f"buildah wrote a blob named {digest[:80]!r}")
    return layout / "blobs" / "sha256" / hexdigest


def _disk_reason(limits: RunLimits, written: int) -> str:
    return (
        f"the RUN steps wrote {written // _MB} MB, more than their disk limit of "
        f"{limits.disk_mb} MB (MMS_BUILD_RUN_DISK_MB)"
    )


class _Cgroup:
    """A cgroup of this build's own, the parent of each step's container: it holds the
    memory and process limits and counts CPU time and limit hits (cgroup v1 or v2)."""

    def __init__(self, name: str, limits: RunLimits) -> None:
        self.name = name
        self.parent = f"/{name}"
        self.limits = limits
        self.v2 = (_CGROUP / "cgroup.controllers").is_file()

    def _dir(self, controller: str) -> Path:
        return _CGROUP / self.name if self.v2 else _CGROUP / controller / self.name

    def create(self) -> None:
        memory = str(self.limits.memory_mb * _MB)
        try:
            if self.v2:
                (_CGROUP / "cgroup.subtree_control").write_text("+memory +pids +cpu")
                folder = self._dir("")
                folder.mkdir()
                folder.chmod(0o755)  # searchable by the step's runtime in its user namespace
                (folder / "memory.max").write_text(memory)
                with suppress(OSError):  # no swap accounting: no swap to use either
                    (folder / "memory.swap.max").write_text("0")
                (folder / "pids.max").write_text(str(self.limits.pids))
                return
            for controller in _CONTROLLERS_V1:
                if (_CGROUP / controller).is_dir():
                    self._dir(controller).mkdir(exist_ok=True)
                    self._dir(controller).chmod(0o755)
            (self._dir("memory") / "memory.limit_in_bytes").write_text(memory)
            with suppress(OSError):  # only where the kernel accounts swap
                (self._dir("memory") / "memory.memsw.limit_in_bytes").write_text(memory)
            (self._dir("pids") / "pids.max").write_text(str(self.limits.pids))
        except OSError as exc:
            self.remove()
            raise BuildFailed(
                "extra-steps",
                f"the RUN steps' limits cannot be set (a cgroup of the build's own: {exc.strerror}); "
                "the worker runs RUN steps on the oci builder as root with cgroups mounted read-write",
            ) from None

    def procs(self) -> list[int]:
        folders = [self._dir("")] if self.v2 else [self._dir("pids"), self._dir("memory")]
        pids: set[int] = set()
        for folder in folders:
            for path in folder.rglob("cgroup.procs") if folder.is_dir() else []:
                with suppress(OSError, ValueError):
                    pids.update(int(p) for p in path.read_text().split())
        return sorted(pids)

    def kill_all(self) -> None:
        for _ in range(20):
            pids = self.procs()
            if not pids:
                return
            if self.v2:
                with suppress(OSError):
                    (self._dir("") / "cgroup.kill").write_text("1")
            for pid in pids:
                with suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        with suppress(OSError, ValueError):
            if self.v2:
                for line in (self._dir("") / "cpu.stat").read_text().splitlines():
                    if line.startswith("usage_usec "):
                        return int(line.split()[1]) / 1e6
                return 0.0
            return int((self._dir("cpuacct") / "cpuacct.usage").read_text()) / 1e9
        return 0.0

    def pids_now(self) -> int:
        with suppress(OSError, ValueError):
            return int((self._dir("pids") / "pids.current").read_text())
        return 0

    def _peak(self) -> int:
        with suppress(OSError, ValueError):
            return int((self._dir("pids") / "pids.peak").read_text())
        return 0

    def pids_refused(self) -> bool:
        """Has a fork been refused (or the count reached the limit)? In this cgroup or the
        step's own below it, where newer kernels count a refusal; a fork bomb's processes come
        and go, so the count now seldom shows it."""
        if self.pids_now() >= self.limits.pids or self._peak() >= self.limits.pids:
            return True
        folder = self._dir("pids")
        with suppress(OSError):
            for events in [folder / "pids.events", *folder.glob("*/**/pids.events")]:
                with suppress(OSError, ValueError):
                    for line in events.read_text().splitlines():
                        key, _, value = line.partition(" ")
                        if key == "max" and int(value) > 0:
                            return True
        return False

    def _events(self, controller: str, name: str) -> dict[str, int]:
        with suppress(OSError):
            text = (self._dir(controller) / name).read_text()
            return {k: int(v) for k, v in (line.split() for line in text.splitlines() if len(line.split()) == 2)}
        return {}

    def limit_hit(self) -> str | None:
        """The limit the steps hit (a process refused, a memory OOM kill), as a sentence."""
        memory = self._events("", "memory.events") if self.v2 else self._events("memory", "memory.oom_control")
        if memory.get("oom_kill", 0) > 0:
            return f"a RUN step ran out of its memory limit of {self.limits.memory_mb} MB (MMS_BUILD_RUN_MEMORY_MB)"
        # A refused fork is counted in the step's own cgroup (gone with it) on newer kernels:
        # the build's cgroup's peak tells as well.
        if self.pids_refused():
            return process_limit_reason(self.limits)
        return None

    def remove(self) -> None:
        self.kill_all()
        # v1: every hierarchy, the runtime makes the step's cgroup in each (name=systemd too).
        folders = [self._dir("")] if self.v2 else [h / self.name for h in _CGROUP.iterdir() if h.is_dir()]
        for folder in folders:
            if not folder.is_dir():
                continue
            # Children first (a step's container cgroup, should the runtime leave one).
            for child in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with suppress(OSError):
                    child.rmdir()
            with suppress(OSError):
                folder.rmdir()


def process_limit_reason(limits: RunLimits) -> str:
    return f"a RUN step reached its process limit of {limits.pids} processes and threads (MMS_BUILD_RUN_PIDS)"


class _Watch:
    """Follows one step: its wall time and CPU time (with the steps before it), its
    processes and what the steps wrote; kills the step's processes past a limit."""

    def __init__(
        self,
        group: _Cgroup,
        limits: RunLimits,
        upper: Path | None,
        written_before: int,
        seconds_before: float,
        proc: subprocess.Popen,
    ) -> None:
        self.group, self.limits, self.upper, self.proc = group, limits, upper, proc
        self.seconds_before = seconds_before
        self.started = time.monotonic()
        self.breach: str | None = None
        self.written = written_before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="buildah-step-watch", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        size_read_at = 0.0
        try:
            while not self._stop.wait(_INTERVAL):
                reason = None
                if self.seconds_before + time.monotonic() - self.started > self.limits.seconds:
                    reason = (
                        f"the RUN steps ran longer than their time limit of {self.limits.seconds} s "
                        "(MMS_BUILD_RUN_SECONDS)"
                    )
                elif self.group.cpu_seconds() > self.limits.cpu_seconds:
                    reason = (
                        f"the RUN steps used more than their CPU time limit of {self.limits.cpu_seconds} s "
                        "(MMS_BUILD_RUN_CPU_SECONDS)"
                    )
                elif self.group.pids_refused():  # a fork bomb would wait there for ever
                    reason = process_limit_reason(self.limits)
                elif self.upper is not None and time.monotonic() - size_read_at >= _SIZE_EVERY:
                    size_read_at = time.monotonic()
                    self.written = _tree_size(self.upper)
                    if self.written > self.limits.disk_mb * _MB:
                        reason = _disk_reason(self.limits, self.written)
                if reason:
                    self.breach = self.breach or reason
                    logger.warning("build.run_limit", extra={"detail": reason})
                    self.group.kill_all()
                    return
        except Exception as exc:  # a watch that died must not let the step go unwatched
            logger.exception("build.run_watch_failed")
            self.breach = self.breach or f"the RUN steps' limits could not be watched ({type(exc).__name__})"
            self.group.kill_all()


def _tree_size(root: Path) -> int:
    """Bytes in the files under ``root`` (blocks, so sparse files count as they use disk)."""
    total = 0
    for folder, dirs, files in os.walk(root):
        for name in files + dirs:
            with suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total
