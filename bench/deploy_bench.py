"""Web services: how long a deploy, a rolling update and a delete take, and scoring
throughput through the gateway with one replica and with two.

Runs the embedded default as a newcomer would (`mms serve` with MMS_WEB_SERVICES_PREVIEW=true,
which starts its build worker, a deploy worker and the scoring gateway) on a fresh data folder,
the default base published from the cached root file system, against the machine's engine
(scripts/infra/docker-engine.sh, with the service firewall). ``--swarm`` adds the operator's
swarm target (MMS_SWARM_DOCKER_HOST = the same engine; `docker swarm init` by the bench when
the engine is not in a swarm, and `docker swarm leave --force` at the end only then).

Per target, ``--repeat`` rounds (default 5), medians reported:

    deploy   POST .../services (1 replica, 0.5 CPU) -> Healthy, polled every 0.1 s
    update   PATCH imageId (v1 -> v2) -> its operation Succeeded (v1 serves until v2 answers)
    delete   DELETE -> 404 (the replicas and network gone first)

Then on ``local``: ``ab -k -c 8 -t 10`` POSTs of a small JSON body with the key, through the
gateway to one replica, to two, and straight to one replica's address (the gateway's share);
req/s, p50 and p99 (ms) and failed requests, each the median of three runs.

    .venv/bin/python bench/deploy_bench.py [--repeat 5] [--swarm] [--json PATH]

Everything it starts stops at the end; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, suppress
from dataclasses import replace
from pathlib import Path

import docker

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.embedded_service import EmbeddedService, free_port, stop, wait_for
from tests.workers.stack import Account, Stack

SCORE = "def init():\n    pass\n\ndef run(raw_data):\n    return {'version': VERSION, 'size': len(raw_data)}\n"
BODY = json.dumps({"data": [[8.3252, 41.0, 6.98, 1.02, 322.0, 2.55, 37.88, -122.23]]})
WAIT = 300


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--swarm", action="store_true", help="also the built-in swarm target")
    parser.add_argument("--ab-seconds", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    engine = _run(["scripts/infra/docker-engine.sh"]).strip().splitlines()[-1].split("=", 1)[1]
    rootfs = Path(_run(["scripts/infra/base-rootfs.sh"]).strip().splitlines()[-1])
    results: dict[str, object] = {"repeat": args.repeat}
    with ExitStack() as cleanup, tempfile.TemporaryDirectory(prefix="mms-deploy-bench-") as tmp:
        settings = {"MMS_WEB_SERVICES_PREVIEW": "true", "MMS_SCORING_URL": f"http://127.0.0.1:{free_port()}"}
        if args.swarm:
            cleanup.callback(_swarm_left_as_found(engine))
            settings["MMS_SWARM_DOCKER_HOST"] = engine
        service = EmbeddedService.prepare(Path(tmp) / "data", Path(tmp), rootfs)
        service = replace(service, env={**service.env, **settings, "DOCKER_HOST": engine})
        server = service.serve()
        cleanup.callback(stop, server)
        wait_for(f"{settings['MMS_SCORING_URL']}/health", server)
        headers = {"Authorization": f"Bearer {service.token()}"}
        account = Account(Stack(api=service.url, headers=headers, env=service.env, workers=[], log_dir=Path(tmp)))
        v1, v2 = (_image(account, version) for version in (1, 2))
        for target in ["local", *(["swarm"] if args.swarm else [])]:
            results[target] = _lifecycle(account, target, v1, v2, args.repeat)
            print(target, json.dumps(results[target]), flush=True)
        results["throughput"] = _throughput(account, engine, v1, args.ab_seconds)
        print("throughput", json.dumps(results["throughput"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _lifecycle(account: Account, target: str, v1: str, v2: str, repeat: int) -> dict[str, object]:
    rounds = [_round(account, f"bench-{target}-{n}", target, v1, v2) for n in range(repeat)]
    figures: dict[str, object] = {}
    for name in ("deploy", "update", "delete"):
        values = [r[name] for r in rounds]
        figures[name] = round(statistics.median(values), 2)
        figures[f"{name}_all"] = [round(v, 2) for v in values]
    return figures


def _round(account: Account, name: str, target: str, v1: str, v2: str) -> dict[str, float]:
    """One service's life: created, updated to v2, deleted; the seconds each took."""
    started = time.monotonic()
    service = _create(account, name, v1, target)
    url = f"{account.url}/services/{service['id']}"
    _until(lambda: _get(account, service["id"])["state"] == "Healthy", "Healthy")
    deploy = time.monotonic() - started

    started = time.monotonic()
    operation = f"{account.url}/operations/{account.call('PATCH', url, json={'imageId': v2}).json()['operationId']}"
    _until(lambda: account.call("GET", operation).json()["state"] != "Running", "the update's end")
    assert account.call("GET", operation).json()["state"] == "Succeeded"
    update = time.monotonic() - started

    started = time.monotonic()
    account.call("DELETE", url)
    _until(lambda: account.status("GET", url) == 404, "gone")
    return {"deploy": deploy, "update": update, "delete": time.monotonic() - started}


def _throughput(account: Account, engine: str, image: str, seconds: int) -> dict[str, dict[str, float]]:
    created = _create(account, "bench-throughput", image, "local")
    _until(lambda: _get(account, created["id"])["state"] == "Healthy", "Healthy")
    service = _get(account, created["id"])  # its scoringUri, now that it serves
    keys = account.call("POST", f"{account.url}/services/{service['id']}/keys").json()
    auth = f"Bearer {keys['primaryKey']}"
    with tempfile.NamedTemporaryFile("w", suffix=".json") as body:
        body.write(BODY)
        body.flush()
        figures = {"gateway_1_replica": _ab(service["scoringUri"], body.name, auth, seconds)}
        with docker.APIClient(base_url=engine, version="auto") as api:
            (container,) = api.containers(filters={"label": f"org.mms.service={service['id']}"})
            info = api.inspect_container(container["Id"])
        address = next(n["IPAddress"] for n in info["NetworkSettings"]["Networks"].values() if n["IPAddress"])
        figures["direct_1_replica"] = _ab(f"http://{address}:5001/score", body.name, None, seconds)
        account.call("PATCH", f"{account.url}/services/{service['id']}", json={"numReplicas": 2})
        _until(lambda: _get(account, service["id"])["deploymentStatus"]["readyReplicas"] == 2, "2 ready")
        _until(lambda: _get(account, service["id"])["state"] == "Healthy", "Healthy")
        time.sleep(3)  # past the gateway's route cache
        figures["gateway_2_replicas"] = _ab(service["scoringUri"], body.name, auth, seconds)
    account.call("DELETE", f"{account.url}/services/{service['id']}")
    _until(lambda: account.status("GET", f"{account.url}/services/{service['id']}") == 404, "gone")
    return figures


def _ab(url: str, body: str, auth: str | None, seconds: int) -> dict[str, float]:
    runs = []
    for _ in range(3):
        command = [
            "ab",
            "-q",
            "-k",
            "-c",
            "8",
            "-t",
            str(seconds),
            "-n",
            "10000000",
            "-p",
            body,
            "-T",
            "application/json",
        ]
        if auth:
            command += ["-H", f"Authorization: {auth}"]
        output = _run([*command, url])
        runs.append(
            {
                "rps": float(re.search(r"Requests per second:\s+([\d.]+)", output)[1]),  # type: ignore[index]
                "p50_ms": float(re.search(r"\s50%\s+(\d+)", output)[1]),  # type: ignore[index]
                "p99_ms": float(re.search(r"\s99%\s+(\d+)", output)[1]),  # type: ignore[index]
                "failed": float(re.search(r"Failed requests:\s+(\d+)", output)[1])  # type: ignore[index]
                + float(re.search(r"Non-2xx responses:\s+(\d+)", output)[1] if "Non-2xx" in output else 0),
            }
        )
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def _image(account: Account, version: int) -> str:
    score = SCORE.replace("VERSION", str(version))
    manifest = account.manifest(None, score, "# nothing to install\n", name=f"bench-v{version}")
    image = account.wait(account.build(manifest, f"bench-v{version}")["Id"], seconds=WAIT)
    assert image["CreationState"] == "Succeeded", account.log(image)[-2000:]
    return image["Id"]


def _create(account: Account, name: str, image: str, target: str) -> dict:
    config = {"numReplicas": 1, "containerResourceRequirements": {"cpu": 0.5, "memoryInGB": 0.5}}
    body = {"name": name, "imageId": image, "computeName": target, "deploymentConfig": config}
    return account.call("POST", f"{account.url}/services", json=body).json()


def _get(account: Account, service_id: str) -> dict:
    service = account.call("GET", f"{account.url}/services/{service_id}").json()
    assert service["state"] != "Failed", service
    return service


def _until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} not reached in {WAIT} s")
        time.sleep(0.1)


def _swarm_left_as_found(engine: str):  # type: ignore[no-untyped-def]
    """Init a swarm if the engine has none; the callback that leaves it only then."""
    with docker.APIClient(base_url=engine, version="auto") as api:
        if (api.info().get("Swarm") or {}).get("LocalNodeState") == "active":
            return lambda: None
        api.init_swarm(advertise_addr="127.0.0.1", listen_addr="127.0.0.1:2377")

    def leave() -> None:
        with docker.APIClient(base_url=engine, version="auto") as api:
            api.leave_swarm(force=True)
            with suppress(docker.errors.APIError):
                api.remove_network("docker_gwbridge")

    return leave


def _run(command: list[str]) -> str:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    if done.returncode != 0:
        raise SystemExit(f"bench: {' '.join(command)} failed: {done.stderr[-2000:]}")
    return done.stdout


if __name__ == "__main__":
    main()
