"""Smoke test of the Docker SDK (docker-py 7.1) against the CI infrastructure.

Run with the project's venv (needs `docker` installed there):

    DOCKER_HOST=unix:///var/run/docker.sock .venv/bin/python scripts/infra/sdk_smoke.py \
        --base 127.0.0.1:5000/mms/base:py3.11-test \
        --auth-registry 127.0.0.1:5002 --user mms --password mms-ci-secret

What it proves:
  * a low-level streaming build (APIClient.build(decode=True)) with
    network_mode="host" from an in-memory tar context, whose Dockerfile copies
    the host CA bundle in and pip-installs a package from PyPI;
  * a push with auth_config to the basic-auth registry (streamed, errors are
    reported inside the stream, NOT raised: they must be checked);
  * that an unauthenticated push to that registry is refused;
  * pulling the pushed image back by digest and running it with network_mode="host".
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import time
from pathlib import Path

import docker

CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def build_context(base: str) -> io.BytesIO:
    dockerfile = f"""\
FROM {base}
# The PyPI proxy re-signs TLS: the build must trust the host's CA bundle.
COPY host-ca.crt /usr/local/share/ca-certificates/mms-host-ca.crt
RUN update-ca-certificates >/dev/null \\
 && python3 -m venv /opt/venv \\
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check six \\
 && /opt/venv/bin/python -c 'import six; print("six", six.__version__)'
ENV PATH=/opt/venv/bin:$PATH
CMD ["python", "-c", "import six, ssl; print('sdk-image-ok', six.__version__)"]
"""
    buf = io.BytesIO()
    ca = Path(CA_BUNDLE).read_bytes()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("Dockerfile", dockerfile.encode()), ("host-ca.crt", ca)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--auth-registry", required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    args = ap.parse_args()

    client = docker.from_env(timeout=600)
    api = client.api
    print("server", client.version()["Version"], "api", api.api_version)

    repo = f"{args.auth_registry}/mms/sdk-smoke"
    tag = str(int(time.time()))

    t0 = time.monotonic()
    image_id = None
    for chunk in api.build(
        fileobj=build_context(args.base),
        custom_context=True,
        tag=f"{repo}:{tag}",
        network_mode="host",
        rm=True,
        forcerm=True,
        pull=False,
        decode=True,
    ):
        for line in chunk.get("stream", "").splitlines():
            if line.strip():
                print("  |", line)
        if "aux" in chunk and "ID" in chunk["aux"]:
            image_id = chunk["aux"]["ID"]
        if "error" in chunk or "errorDetail" in chunk:
            print("BUILD ERROR:", chunk.get("error") or chunk.get("errorDetail"))
            return 1
    print(f"built {image_id} in {time.monotonic() - t0:.1f}s")

    # Unauthenticated push must fail (error arrives in the stream).
    errs = [c for c in api.push(repo, tag=tag, stream=True, decode=True) if "error" in c]
    if not errs:
        print("FAIL: unauthenticated push to the auth registry succeeded")
        return 1
    print("unauthenticated push refused as expected:", errs[0]["error"][:100])

    t0 = time.monotonic()
    digest = None
    for chunk in api.push(
        repo,
        tag=tag,
        stream=True,
        decode=True,
        auth_config={"username": args.user, "password": args.password},
    ):
        if "error" in chunk:
            print("PUSH ERROR:", chunk["error"])
            return 1
        if "aux" in chunk and "Digest" in chunk["aux"]:
            digest = chunk["aux"]["Digest"]
    print(f"pushed {repo}:{tag} digest {digest} in {time.monotonic() - t0:.1f}s")

    # Pull back by digest (removing the local tag first) and run it on the host network.
    client.images.remove(f"{repo}:{tag}", force=True)
    client.images.pull(f"{repo}@{digest}", auth_config={"username": args.user, "password": args.password})
    out = client.containers.run(f"{repo}@{digest}", network_mode="host", remove=True)
    print("run:", out.decode().strip())
    if b"sdk-image-ok" not in out:
        return 1

    # Deletes are enabled on the registry: remove the manifest by digest.
    import requests

    r = requests.delete(
        f"http://{args.auth_registry}/v2/mms/sdk-smoke/manifests/{digest}",
        auth=(args.user, args.password),
        timeout=10,
    )
    print("registry DELETE manifest ->", r.status_code)
    if r.status_code != 202:
        return 1
    client.images.remove(f"{repo}@{digest}", force=True)
    print("SDK smoke OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
