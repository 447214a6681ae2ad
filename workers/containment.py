"""The host configs of containers that run a tenant's code on the workers' engine.

Two kinds: the smoke test's (``contained_host_config``: no network at all, run once while a
build ends) and a web service's replica (``replica_host_config``: on the service's own
``--internal`` bridge, workers/deploy/local_network.py, under scripts/infra/service-network.sh's
firewall; docs/design/web-services.md, "How `local` is built").

Both keep the image's own user: the builders make it a non-root one (build_context's RUN_UID);
forcing one here would break an image that is built otherwise and writes into its own
(root-owned) folders at start. Root in here, then, holds no capability, cannot gain one (no
setuid, no file capabilities), and has no engine socket or host folder to use it on; mapping
it to an unprivileged host uid is the engine's job (dockerd --userns-remap), an operator's
setting.
"""

from __future__ import annotations

import posixpath
from typing import Any

import docker

from workers.build_context import PORT, RUN_GID, RUN_UID, RUN_USER

__all__ = ["REPLICA_PORT", "contained_host_config", "replica_host_config", "replica_task_template"]

# Where a replica's scoring server listens (the images' PORT); nothing publishes it: the
# gateway and the readiness probe reach it at the container's address on the service bridge.
REPLICA_PORT = PORT

_MB = 1024 * 1024
# The container's logs are the tenant's to fill: cap what the engine keeps of them. The smoke
# test reads only its last lines; a replica's two files are what the service's /logs copies.
_SMOKE_TEST_LOGS = {"type": "json-file", "config": {"max-size": "10m", "max-file": "1"}}
_REPLICA_LOGS = {"type": "json-file", "config": {"max-size": "10m", "max-file": "2"}}
# A crash restarts in place a few times; past that the reconciler replaces or fails it.
_REPLICA_RESTARTS = {"Name": "on-failure", "MaximumRetryCount": 3}
# Files per memory-backed folder, per MB of its size: plenty for caches and temporary files,
# while each inode (kernel memory, not always charged to the container) stays bounded.
_INODES_PER_MB = 64
_MIN_INODES = 1024
# Never mounted over, whatever $HOME the image names: the kernel's and the engine's own.
_NOT_A_HOME = ("/", "/proc", "/sys", "/dev", "/etc")


def contained_host_config(
    api: docker.APIClient, *, memory_mb: int, pids: int, cpus: float, disk_mb: int, **overrides: Any
) -> dict:
    """The smoke test's host config: no network but the container's own loopback, no
    capabilities, limits on memory (swap included), processes and threads, CPU, and each
    file's size (``disk_mb``; all files together are the caller's to watch). ``overrides``
    are further ``create_host_config`` arguments, which win."""
    settings: dict[str, Any] = {
        "network_mode": "none",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "pids_limit": pids,
        "mem_limit": f"{memory_mb}m",
        "memswap_limit": f"{memory_mb}m",  # the same: no swap beyond the memory limit
        "nano_cpus": int(cpus * 1e9),
        # No file may pass the disk limit (the kernel's, at once).
        "ulimits": [docker.types.Ulimit(name="fsize", soft=disk_mb * _MB, hard=disk_mb * _MB)],
        "log_config": _SMOKE_TEST_LOGS,
    }
    return api.create_host_config(**{**settings, **overrides})


def replica_host_config(
    api: docker.APIClient, *, image: str, network: str, cpus: float, memory_mb: int, pids: int, tmp_mb: int
) -> dict:
    """A web-service replica's host config, on the service's ``network``.

    As the smoke test's, and: a read-only root, with memory-backed ``/tmp`` and ``$HOME`` of
    ``tmp_mb`` each (the builders make only these writable; tmpfs pages count against the
    memory limit, so the kernel holds disk and inodes and nothing needs watching), the same
    over every ``VOLUME`` the image declares (otherwise the engine would give each an
    anonymous volume: host disk without a limit, left behind by the container), ``init``
    reaping what score.py starts, restarts in place after a crash, and no published port.
    ``image`` must be in the engine (its config names the user and ``$HOME``).
    """
    config = api.inspect_image(image).get("Config") or {}
    cpus = min(cpus, api.info().get("NCPU") or cpus)  # the engine refuses more
    inodes = max(_MIN_INODES, tmp_mb * _INODES_PER_MB)
    size = f"size={tmp_mb}m,nr_inodes={inodes}"
    tmpfs = {path: f"{size},mode=1777" for path in _writable_folders(config)}
    uid, gid = _image_user(config.get("User") or "")
    home = _image_home(config.get("Env") or [], config.get("User") or "", uid)
    if home is not None and home not in tmpfs:
        owner = f"uid={uid},gid={gid},mode=0700" if uid is not None else "mode=1777"
        tmpfs[home] = f"{size},{owner}"
    return api.create_host_config(
        network_mode=network,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        pids_limit=pids,
        mem_limit=f"{memory_mb}m",
        memswap_limit=f"{memory_mb}m",
        nano_cpus=int(cpus * 1e9),
        read_only=True,
        tmpfs=tmpfs,
        ulimits=[docker.types.Ulimit(name="fsize", soft=tmp_mb * _MB, hard=tmp_mb * _MB)],
        log_config=_REPLICA_LOGS,
        init=True,
        restart_policy=_REPLICA_RESTARTS,
    )


def replica_task_template(
    api: docker.APIClient,
    *,
    image: str,
    network: str | None,
    cpus: float,
    memory_mb: int,
    pids: int,
    tmp_mb: int,
    labels: dict[str, str],
    restart_delay_seconds: float = 1.0,
) -> dict:
    """A swarm task's spec for a web-service replica: the same containment as
    ``replica_host_config`` as far as a swarm service can say it, on the swarm-scoped bridge
    ``network`` (workers/deploy/swarm.py; None on a tenant's swarm, where the task publishes its
    port instead). ``labels`` go on the container too.

    What swarm's API (1.41) cannot say: tmpfs inodes and owners (``$HOME`` is mode 1777
    instead of the image user's 0700), no-new-privileges and the ``fsize`` ulimit. With no
    capability and no setuid use, and memory-backed folders whose size counts against the
    memory limit, the kernel still holds the rest. Swarm restarts a task that exits (after
    ``restart_delay_seconds``); the reconciler judges a generation that never served.
    ``image`` must be in the engine (its config names the user and ``$HOME``)."""
    config = api.inspect_image(image).get("Config") or {}
    cpus = min(cpus, api.info().get("NCPU") or cpus)
    user = config.get("User") or ""
    folders = {path: 0o1777 for path in _writable_folders(config)}
    home = _image_home(config.get("Env") or [], user, _image_user(user)[0])
    if home is not None:
        folders.setdefault(home, 0o1777)
    mounts = [
        docker.types.Mount(path, None, type="tmpfs", tmpfs_size=tmp_mb * _MB, tmpfs_mode=mode)
        for path, mode in folders.items()
    ]
    container = docker.types.ContainerSpec(
        image,
        hostname="localhost",
        env={"PORT": str(REPLICA_PORT)},
        user=user or None,
        labels=labels,
        mounts=mounts,
        read_only=True,
        init=True,
        cap_drop=["ALL"],
    )
    nano_cpus, memory = int(cpus * 1e9), memory_mb * _MB
    resources = docker.types.Resources(
        cpu_limit=nano_cpus, mem_limit=memory, cpu_reservation=nano_cpus, mem_reservation=memory
    )
    resources["Limits"]["Pids"] = pids  # API 1.41; docker-py has no argument for it
    return docker.types.TaskTemplate(
        container,
        resources=resources,
        restart_policy=docker.types.RestartPolicy(
            condition="any", delay=int(restart_delay_seconds * 1e9), max_attempts=0
        ),
        log_driver=docker.types.DriverConfig(_REPLICA_LOGS["type"], _REPLICA_LOGS["config"]),
        networks=[{"Target": network}] if network else [],
    )


def _writable_folders(config: dict) -> list[str]:
    """``/tmp`` and every ``VOLUME`` the image declares (memory-backed: else the engine would
    give each an anonymous volume, host disk without a limit)."""
    folders = ["/tmp"]
    for volume in config.get("Volumes") or {}:
        path = _clean(volume)
        if path not in folders:
            folders.append(path)
    return folders


def _image_user(user: str) -> tuple[int | None, int]:
    """The uid and gid the image runs as, where its config says them without its /etc/passwd:
    numbers, root, or the builders' own user; no uid for another name. A gid it does not
    give is taken as the builders' for their uid, else 0 (what the engine does for a uid
    missing from /etc/passwd); $HOME's mode (0700) makes only the owner matter anyway."""
    name, _, group = user.partition(":")
    if name in ("", "root"):
        uid: int | None = 0
    elif name.isdigit():
        uid = int(name)
    elif name == RUN_USER:
        uid = RUN_UID
    else:
        uid = None
    gid = int(group) if group.isdigit() else RUN_GID if uid == RUN_UID else 0
    return uid, gid


def _image_home(env: list[str], user: str, uid: int | None) -> str | None:
    """The folder ``$HOME`` names in the container: the image's ``HOME``, else what the engine
    would set from a usual /etc/passwd (/root, /home/<name>); None when it would be ``/`` (a
    number without a ``HOME``) or names a folder that must not be hidden."""
    home = next((item.partition("=")[2] for item in env if item.startswith("HOME=")), None)
    if home is None:
        name = user.partition(":")[0]
        if uid == 0:
            home = "/root"
        elif name and not name.isdigit():
            home = f"/home/{name}"
        else:
            return None
    if not home.startswith("/"):
        return None
    home = _clean(home)
    if home in _NOT_A_HOME or any(home.startswith(f"{top}/") for top in _NOT_A_HOME[1:]):
        return None
    return home


def _clean(path: str) -> str:
    """``path`` as the engine mounts it: normpath keeps a leading ``//`` (POSIX leaves its
    meaning open), which the engine then cleans away (``//etc`` is mounted over /etc)."""
    return "/" + posixpath.normpath(path).lstrip("/")
