"""Issue 14's attacks end to end: the HTTP API, a real Celery worker, the Docker engine and
the registry. A tenant's RUN step cannot reach the engine or the host's services, and one
account's package cannot reach another account's image through a cache."""

from __future__ import annotations

import uuid

import pytest

from tests.infra import Infra
from tests.listeners import tcp_listener
from tests.workers.stack import ECHO_SCORE, Account, Stack, run_and_score
from tests.workers.test_package_sources import USES_PACKAGE, _sdist

pytestmark = pytest.mark.postgres_only

# What the RUN step did: ask the engine for its version, here over its socket and
# its TCP port, and knock on a port of the host's (the API's, a registry's).
PROBE = """\
RUN for target in /var/run/docker.sock 127.0.0.1:2375 127.0.0.1:{api} 127.0.0.1:{port} 127.0.0.1:5000; do \\
      python3 -c "import socket, sys; t = sys.argv[1]; \\
s = socket.socket(socket.AF_UNIX if t.startswith('/') else socket.AF_INET); s.settimeout(3); \\
s.connect(t if t.startswith('/') else (t.split(':')[0], int(t.split(':')[1]))); print('REACHED', t)" "$target" \\
      || echo "STOPPED $target"; \\
    done; echo probe-{nonce}
"""


def test_a_run_step_reaches_neither_the_engine_nor_the_hosts_services(stack: Stack) -> None:
    account = Account(stack)
    api_port = int(stack.api.rsplit(":", 1)[1])
    with tcp_listener() as (port, seen):
        body = {
            "name": "probe",
            "modelIds": [],
            "entryScript": "score.py",
            "runtime": "python",
            "assets": [{"id": "score.py", "url": account.upload("score.py", ECHO_SCORE.encode())}],
            "extraDockerfileSteps": PROBE.format(api=api_port, port=port, nonce=uuid.uuid4().hex),
        }
        manifest_id = account.call("POST", f"{account.url}/manifests", json=body).json()["id"]
        image = account.wait(account.build(manifest_id, "probe", "docker")["Id"])
        log = account.log(image)
    assert image["CreationState"] == "Succeeded", log[-3000:]
    assert not [line for line in log.splitlines() if line.strip().startswith("REACHED")]
    for target in (
        "/var/run/docker.sock",
        "127.0.0.1:2375",
        f"127.0.0.1:{api_port}",
        f"127.0.0.1:{port}",
        "127.0.0.1:5000",
    ):
        assert f"STOPPED {target}" in log, target
    assert not seen


def test_one_accounts_package_never_reaches_anothers_image(stack: Stack, infra: Infra) -> None:
    # The same name and version, other bytes: B's is built first, contained, and cached.
    images = {}
    for name, origin in (("b", "planted by account B"), ("a", "account A's own")):
        account = Account(stack)
        package_url = account.upload("ownpkg-1.0.tar.gz", _sdist("ownpkg", f"ORIGIN = {origin!r}\n"))
        body = {
            "name": "own-package",
            "driverProgram": "score.py",
            "modelIds": [],
            "assets": [{"id": "score.py", "url": account.upload("score.py", USES_PACKAGE.encode())}],
            "targetRuntime": {
                "runtimeType": "Python",
                "properties": {
                    "pipRequirements": account.upload("requirements.txt", f"ownpkg @ {package_url}\n".encode())
                },
            },
        }
        manifest_id = account.call("POST", f"{account.url}/manifests", json=body).json()["id"]
        image = account.wait(account.build(manifest_id, "own-package", "oci")["Id"])
        assert image["CreationState"] == "Succeeded", account.log(image)[-3000:]
        assert "building its wheel contained" in account.log(image)
        images[name] = image["ImageLocation"]
    with infra.api() as api:
        for name, origin in (("a", "account A's own"), ("b", "planted by account B")):
            for _ in api.pull(images[name].rpartition(":")[0], tag="1", stream=True, decode=True):
                pass
            infra.local_images.append(images[name])
            scored = run_and_score(api, images[name], [])
            assert scored.status_code == 200, scored.text
            assert scored.json() == {"origin": origin}
