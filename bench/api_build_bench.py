"""From POST .../images to Succeeded through the API, next to the builder's own time.

Production-like: `mms serve` on PostgreSQL and one `mms worker` on Redis, building with the
oci builder and pushing to the open registry (127.0.0.1:5000, scripts/infra), the project's
base image. No smoke test runs (MMS_SMOKE_TEST=off): the figure is the build's way through the
service. With --smoke-test (a Docker engine at hand) the image is also pulled back and started
until it answers, as a worker with an engine does by default; that adds the container's start.

Each round registers a 50 MB model (random bytes: as incompressible as a pickled forest),
uploads a score.py and a requirements file (one small package), and builds it (cold: a new
environment for this round); then it registers a new 50 MB version in a new manifest with
the same environment and builds that (warm: the figure issue 20 names). For each build:

    end to end   POST .../images until GET answers Succeeded (polled every 20 ms)
    builder      the build log's "built and pushed in" (the builder's build_and_push)
    fetch        the build log's "inputs fetched in" (assets and model from the asset store)

and the ratio end to end / builder (issue 20: at most 1.5 for the warm build). ``--repeat N``
prints each round and the medians. Run as root (scripts/infra starts the registry and base image):

    .venv/bin/python bench/api_build_bench.py [--repeat 3] [--smoke-test]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from production import Service, production_service

INFRA = Path(__file__).resolve().parents[1] / "scripts" / "infra"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
MODEL_BYTES = 50 * 1024 * 1024
SCORE_PY = "def init():\n    pass\n\n\ndef run(raw_data):\n    return raw_data\n"
BUILD_TIMEOUT = 600


def run_script(name: str) -> dict[str, str]:
    done = subprocess.run([str(INFRA / name)], capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}): {done.stderr[-2000:]}")
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


class Bench:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.http = httpx.Client(headers=service.headers, timeout=120)

    def upload(self, name: str, data: bytes) -> str:
        answer = self.http.post(f"{self.service.account}/assets", params={"name": name}, content=data)
        answer.raise_for_status()
        return answer.json()["url"]

    def manifest(self, name: str, requirements_url: str) -> str:
        model_url = self.upload("model.bin", os.urandom(MODEL_BYTES))
        model = self.http.post(
            f"{self.service.account}/models",
            json={"name": "bench.model", "url": model_url, "mimeType": "application/octet-stream", "unpack": False},
        )
        model.raise_for_status()
        body = {
            "name": name,
            "driverProgram": "score",
            "modelIds": [model.json()["id"]],
            "assets": [{"id": "score", "url": self.upload("score.py", SCORE_PY.encode()), "mimeType": "text/x-python"}],
            "targetRuntime": {"runtimeType": "Python", "properties": {"pipRequirements": requirements_url}},
        }
        answer = self.http.post(f"{self.service.account}/manifests", json=body)
        answer.raise_for_status()
        return answer.json()["id"]

    def build(self, manifest_id: str, name: str) -> dict[str, float]:
        started = time.monotonic()
        created = self.http.post(
            f"{self.service.account}/images", json={"name": name, "manifestId": manifest_id, "imageType": "Docker"}
        )
        created.raise_for_status()
        url = f"{self.service.account}/images/{created.json()['Id']}"
        while True:
            image = self.http.get(url).json()
            if image["CreationState"] in ("Succeeded", "Failed", "Cancelled"):
                break
            if time.monotonic() - started > BUILD_TIMEOUT:
                raise SystemExit(f"the build did not end in {BUILD_TIMEOUT} s")
            time.sleep(0.02)
        end_to_end = time.monotonic() - started
        log = self.http.get(image["ImageBuildLogUri"]).text
        if image["CreationState"] != "Succeeded":
            raise SystemExit(f"the build {image['CreationState']}: {log[-3000:]}")
        built = float(re.search(r"built and pushed in ([\d.]+) s", log).group(1))
        fetched = float(re.search(r"inputs fetched in ([\d.]+) s", log).group(1))
        return {"end to end": end_to_end, "builder": built, "fetch": fetched, "ratio": end_to_end / built}


def one_round(bench: Bench, index: int) -> dict[str, dict[str, float]]:
    # A package pinned per round: the cold build installs an environment no earlier round cached.
    requirements = bench.upload("requirements.txt", f"six==1.16.0\n# round {uuid.uuid4().hex}\n".encode())
    cold = bench.build(bench.manifest(f"bench-{index}", requirements), f"bench-{index}")
    warm = bench.build(bench.manifest(f"bench-{index}", requirements), f"bench-{index}")
    return {"cold": cold, "warm": warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--smoke-test", action="store_true", help="start each image until it answers (needs an engine)")
    args = parser.parse_args()
    base = run_script("base-image.sh")["MMS_BASE_IMAGE"]
    # Pinned either way: with an engine reachable, "auto" would run it, without one skip it.
    settings = {"MMS_DEFAULT_BASE_IMAGE": base, "MMS_SMOKE_TEST": "required" if args.smoke_test else "off"}
    if HOST_CA_BUNDLE.is_file():  # PyPI behind a TLS-inspecting proxy here
        settings["MMS_EXTRA_CA_BUNDLE"] = str(HOST_CA_BUNDLE)
    with production_service(2, build_workers=1, **settings) as service:
        bench = Bench(service)
        rounds = [one_round(bench, index) for index in range(args.repeat)]
    smoke = "a smoke test" if args.smoke_test else "no smoke test"
    print(f"2 API processes, 1 build worker (oci builder, {smoke}), PostgreSQL, {os.cpu_count()} cores")
    print(f"{'build':<8}{'round':>6}{'end to end s':>14}{'builder s':>11}{'fetch s':>9}{'ratio':>7}")
    for scenario in ("cold", "warm"):
        for index, round_ in enumerate(rounds, 1):
            row = round_[scenario]
            print(
                f"{scenario:<8}{index:>6}{row['end to end']:>14.2f}{row['builder']:>11.2f}"
                f"{row['fetch']:>9.2f}{row['ratio']:>7.2f}"
            )
        medians = {key: statistics.median(r[scenario][key] for r in rounds) for key in rounds[0][scenario]}
        print(
            f"{scenario:<8}{'median':>6}{medians['end to end']:>14.2f}{medians['builder']:>11.2f}"
            f"{medians['fetch']:>9.2f}{medians['ratio']:>7.2f}"
        )


if __name__ == "__main__":
    main()
