"""Unpack and link a solved conda environment: run inside the sandbox (``workers.sandbox``),
never in the worker, by ``workers.oci.conda_env``.

It reads only what the worker put under ``/in`` (the archives it downloaded and checked, and
a repodata.json per subdir listing exactly the solved records) and writes only under
``/out``: each archive unpacked in turn into ``/out/pkgs`` (so a failure names its package),
then rattler links them into ``/out/prefix`` with no link script run. Standard library and
rattler only: the project's own code is not in the sandbox. A failure is one JSON line
(``mms-conda-failed``) for the worker to word, and exit code 3; success is ``mms-conda: done``.

Usage: ``python -I conda_link.py /in/plan.json``
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import sys
from pathlib import Path

FAILED = "mms-conda-failed"
UNPACKING = "mms-conda: unpacking "


def main(plan_file: str) -> None:
    plan = json.loads(Path(plan_file).read_text())
    # A write past the file size limit then fails with EFBIG (named below) instead of
    # killing the process with SIGXFSZ before it can say which package it was.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # rattler makes an HTTP client (never used: every url is a file) that refuses to start
    # without CA certificates, and the sandbox has none of the system's: certifi's, bound
    # with the worker's Python.
    import certifi

    os.environ["SSL_CERT_FILE"] = certifi.where()
    import rattler
    from rattler.package_streaming import extract

    channel = plan["channel"]
    records = []
    for subdir in plan["subdirs"]:
        repodata = rattler.RepoData.from_path(f"{channel}/{subdir}/repodata.json")
        records += repodata.into_repo_data(rattler.Channel(f"file://{channel}"))
    cache = Path(plan["cache"])
    for package in plan["packages"]:
        print(f"{UNPACKING}{package['label']}", flush=True)
        try:
            # rattler's own cache layout (name-version-build): install reuses it as it is.
            extract(package["archive"], cache / package["entry"])
        except Exception as exc:  # noqa: BLE001 - rattler's errors have no common base
            fail(package["label"], exc)
        check_paths(cache / package["entry"], package["label"])
    print("mms-conda: linking", flush=True)
    try:
        asyncio.run(
            rattler.install(
                records,
                plan["prefix"],
                cache_dir=cache,
                platform=rattler.Subdir(plan["platform"]),
                execute_link_scripts=False,  # a package's scripts never run, here either
                show_progress=False,
                alternative_target_prefix=plan["target"],
            )
        )
    except Exception as exc:  # noqa: BLE001 - as above
        fail(None, exc)
    print("mms-conda: done", flush=True)


def check_paths(folder: Path, label: str) -> None:
    """Refuse a package whose file list leaves the prefix: rattler links what paths.json
    names, ``..`` and absolute paths included (from and to the host, were it not here)."""
    names: list[object] = []
    try:
        names += [e.get("_path") for e in json.loads((folder / "info/paths.json").read_text())["paths"]]
    except FileNotFoundError:
        pass
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        fail(label, ValueError(f"its info/paths.json cannot be read: {exc}"))
    try:
        names += (folder / "info/files").read_text().splitlines()
    except FileNotFoundError:
        pass
    for name in names:
        if not isinstance(name, str) or not name or name.startswith("/") or ".." in name.split("/") or "\0" in name:
            print(json.dumps({FAILED: {"package": label, "kind": "path", "error": repr(name)[:200]}}), flush=True)
            os._exit(3)


def fail(label: str | None, exc: BaseException) -> None:
    text = " ".join(str(exc).split())
    kind = "error"
    if "No space left on device" in text or f"os error {errno.ENOSPC}" in text:
        out = os.statvfs("/out")
        kind = "files" if out.f_files and not out.f_ffree else "disk"
    elif "File too large" in text or f"os error {errno.EFBIG}" in text:
        kind = "file_size"
    print(json.dumps({FAILED: {"package": label, "kind": kind, "error": text[:500]}}), flush=True)
    os._exit(3)


if __name__ == "__main__":
    main(sys.argv[1])
    # Not through the interpreter's finalization: rattler's runtime threads outlive the
    # install and may still touch Python then, which aborts (PyGILState_Release).
    os._exit(0)
