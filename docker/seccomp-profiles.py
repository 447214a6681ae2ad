"""Write the seccomp profiles this project gives Docker, each Docker's default profile
(moby/profiles, seccomp/default.json, Apache-2.0) changed in one way:

- ``docker/worker-seccomp.json``, for the build workers' containers (docker-compose.yml): plus
  the calls bubblewrap makes to set up a sandbox in a user namespace of its own, which the
  default allows only to a container holding CAP_SYS_ADMIN (clone and unshare with namespace
  flags, mount, umount2, pivot_root, and sethostname for its own UTS namespace). The worker
  still holds no capability, and the sandbox's own filter refuses all of them to the code
  it contains (workers/sandbox.py).
- ``docker/engine-seccomp.json``, the build engine's default for every container it runs
  (RUN steps, smoke tests; ``dockerd --seccomp-profile``): ``fallocate`` only without
  FALLOC_FL_KEEP_SIZE, which reserves disk that a container's size (``SizeRw``, what the
  build's disk limit reads) does not show.

    python docker/seccomp-profiles.py <moby/profiles>/seccomp/default.json
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SANDBOX_CALLS = ["clone", "mount", "pivot_root", "sethostname", "umount2", "unshare"]
FALLOC_FL_KEEP_SIZE = 0x01


def worker_profile(default: dict) -> dict:
    profile = copy.deepcopy(default)
    profile["syscalls"].append(
        {
            "names": SANDBOX_CALLS,
            "action": "SCMP_ACT_ALLOW",
            "comment": "bubblewrap: a sandbox in an unprivileged user namespace (workers/sandbox.py)",
        }
    )
    return profile


def engine_profile(default: dict) -> dict:
    profile = copy.deepcopy(default)
    found = 0
    for rule in profile["syscalls"]:
        if "fallocate" in rule["names"] and not rule.get("args"):
            rule["names"] = [name for name in rule["names"] if name != "fallocate"]
            found += 1
    assert found == 1, "the default profile no longer allows fallocate in one rule"
    profile["syscalls"].append(
        {
            "names": ["fallocate"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 1, "value": FALLOC_FL_KEEP_SIZE, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
            "comment": "fallocate only without FALLOC_FL_KEEP_SIZE: disk a container's size shows",
        }
    )
    return profile


def main(default_path: str) -> None:
    default = json.loads(Path(default_path).read_text(encoding="utf-8"))
    for name, make in (("worker-seccomp.json", worker_profile), ("engine-seccomp.json", engine_profile)):
        (HERE / name).write_text(json.dumps(make(default), indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
