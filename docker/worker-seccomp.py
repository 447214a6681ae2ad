"""Write the build workers' seccomp profile (docker/worker-seccomp.json).

It is Docker's default profile (moby/profiles, seccomp/default.json, Apache-2.0) plus the
system calls bubblewrap makes to set up a sandbox in a user namespace of its own, which the
default profile allows only to a container holding CAP_SYS_ADMIN: clone and unshare with
namespace flags, mount, umount2, pivot_root, setns, and sethostname for its own UTS
namespace. The worker still holds no capability: it can make namespaces only for itself.

    python docker/worker-seccomp.py <moby/profiles>/seccomp/default.json > docker/worker-seccomp.json
"""

from __future__ import annotations

import json
import sys

SANDBOX_CALLS = ["clone", "mount", "pivot_root", "setdomainname", "sethostname", "setns",
                 "umount2", "unshare"]


def main(default_profile: str) -> None:
    with open(default_profile, encoding="utf-8") as f:
        profile = json.load(f)
    profile["syscalls"].append({
        "names": SANDBOX_CALLS,
        "action": "SCMP_ACT_ALLOW",
        "comment": "bubblewrap: a sandbox in an unprivileged user namespace (workers/sandbox.py)",
    })
    json.dump(profile, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
