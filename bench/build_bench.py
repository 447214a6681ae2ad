"""Image builders side by side: cold build, warm rebuild and no-change rebuild of a 50 MB model.

Every builder named (``--builders docker,oci``; default: each whose module imports) builds
the same scoring image three times into a fresh ``bench/<builder>-...`` repository:

    cold       empty caches: a fresh registry prefix ``bench/<builder>-<run>-r<round>/``
               (the image is ``<prefix>/housing``; the oci builder keeps its dependency-layer
               cache in the registry under the prefix); docker: the bench's earlier images
               removed from the engine, ``prune_builds()``, and a per-round salt in the CA
               bundle so no cached layer of anyone else's build applies; oci: a fresh
               ``cache_dir``
    warm       model version 2 (retrained: different bytes, same size), same environment
    no-change  version 2 again

The inputs: a RandomForestRegressor pickled with joblib (45-60 MB, checked) as
``housing/<version>/model.pkl``, a score.py with init()/run(), requirements
``scikit-learn==<the venv's version>`` and ``joblib``, the project's base image and the
host CA bundle (PyPI is behind a TLS-inspecting proxy). The builders push through
tests/registry_proxy.CountingProxy in front of the open registry (127.0.0.1:5000), which
counts what the registry received: bytes of upload bodies, completed blob uploads,
cross-repository mounts and manifest PUTs.

The base image is where the service keeps it, in the registry the builds push to: before
each cold build, untimed, the bench copies it (blob mounts and a manifest PUT, straight to the
registry) to ``<prefix>/mms/base`` and the builder reads it from there through the proxy, so a
push can mount base layers rather than upload them (the oci builder mounts only from the
``mms/`` namespace under its own prefix). The engine mounts a layer only from a repository its
push metadata records on the same registry host; it knows the base from 127.0.0.1:5000, not
from the proxy's address, so for docker the bench also pushes the copied base through the
proxy once (nothing is uploaded: the engine finds the blobs there and notes where they are),
as a build host that pulls its bases from the registry it pushes to has them noted.
``--no-prime`` skips that push: the cold push then uploads the base layer again.

For each build: wall seconds, MB uploaded, uploads, mounts, manifest PUTs, the pushed image's
compressed size (its manifest's layer sizes) and, for docker, the engine's unpacked size.
The floor: sha256 of the version 2 model file plus one monolithic upload (POST + PUT) of it,
through the proxy, into a fresh repository. Ratios: docker warm / oci warm (goal >= 5) and
oci warm / floor (goal <= 2). ``--repeat N`` takes the median of N rounds (fresh models,
repositories, salt and caches each round).

Run as root (scripts/infra starts the engine, the registry and the base image if needed):

    .venv/bin/python bench/build_bench.py [--builders docker,oci] [--repeat 1] [--json PATH]

Cleans up its engine images and temporary files; registry blobs stay (no cheap GC), all
under ``bench/``. Every wait is bounded (``--build-timeout`` per build).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import os
import queue
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.registry_proxy is not an installed package

from tests.registry_proxy import CountingProxy, ProxyStats
from workers.build_context import BuildSpec
from workers.builders import BuildResult

INFRA = ROOT / "scripts" / "infra"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BUILDER_MODULES = {
    "docker": ("workers.builders.docker", "DockerBuilder"),
    "oci": ("workers.builders.oci", "OciBuilder"),
}
SCENARIOS = ("cold", "warm", "no-change")
MODEL_NAME = "housing"
MODEL_MIN, MODEL_MAX, MODEL_TARGET = 45e6, 60e6, 52e6
REPO_PREFIX = "bench/"
_BENCH_TAG = re.compile(r"^127\.0\.0\.1:\d+/bench/[^:]+:[^:]+$")
MANIFEST_ACCEPT = (
    "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.oci.image.index.v1+json"
)
MB = 1e6

SCORE_PY = """\
import json, os

import joblib
import numpy as np


def init():
    global model
    root = os.environ["AZUREML_MODEL_DIR"]
    paths = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f == "model.pkl"]
    model = joblib.load(paths[0])
    print("init ok:", paths[0], model.n_estimators, "trees")


def run(raw_data):
    rows = np.asarray(json.loads(raw_data)["data"], dtype=float)
    return {"predictions": model.predict(rows).tolist()}
"""


class BenchTimeout(Exception):
    pass


# ---------------------------------------------------------------- inputs


def train_model(path: Path, seed: int, trees: int | None = None) -> int:
    """Pickle a RandomForestRegressor of about 52 MB at ``path``; return its tree count.

    Fully grown trees on random targets: the size is about linear in the number of trees,
    so a few trees are fitted first to size it, then more are added (warm_start).
    """
    import joblib
    import numpy as np
    from sklearn.ensemble import RandomForestRegressor

    rng = np.random.default_rng(seed)
    x, y = rng.random((20_000, 8)), rng.random(20_000)
    forest = RandomForestRegressor(n_estimators=trees or 6, random_state=seed, n_jobs=-1, warm_start=True)
    forest.fit(x, y)
    if trees is None:
        per_tree = _pickled_size(forest) / forest.n_estimators
        trees = max(1, round(MODEL_TARGET / per_tree))
        forest.set_params(n_estimators=trees)
        forest.fit(x, y)  # warm_start: adds the missing trees
    path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(forest, path)
    size = path.stat().st_size
    if not MODEL_MIN <= size <= MODEL_MAX:
        raise SystemExit(
            f"{path}: {size / MB:.1f} MB, outside {MODEL_MIN / MB:.0f}-{MODEL_MAX / MB:.0f} MB; adjust train_model"
        )
    return trees


def _pickled_size(model: Any) -> int:
    import joblib

    buffer = io.BytesIO()
    joblib.dump(model, buffer)
    return buffer.tell()


@dataclass
class Inputs:
    """One round's build inputs: the spec for model version 1 and for version 2."""

    v1: BuildSpec
    v2: BuildSpec
    model_v2: Path
    model_bytes: tuple[int, int]
    trees: int
    seeds: tuple[int, int]


def make_inputs(workdir: Path, base_image: str, salt: str) -> Inputs:
    """The round's inputs; each builder gets them with its own copy of the base image."""
    import sklearn

    seed = int.from_bytes(os.urandom(4), "big")
    app = workdir / "app"
    app.mkdir(parents=True)
    (app / "score.py").write_text(SCORE_PY)
    v1_dir, v2_dir = workdir / "models-v1", workdir / "models-v2"
    model_v1 = v1_dir / MODEL_NAME / "1" / "model.pkl"
    model_v2 = v2_dir / MODEL_NAME / "2" / "model.pkl"
    trees = train_model(model_v1, seed)
    train_model(model_v2, seed + 1, trees)  # retrained on other data: other bytes, same size
    # The host bundle plus a comment naming this round: the CA layer differs from every
    # earlier build's, so no engine cache (the bench's or anyone else's) applies when cold.
    bundle = workdir / "ca-bundle.pem"
    bundle.write_bytes(HOST_CA_BUNDLE.read_bytes().rstrip(b"\n") + f"\n# bench {salt}\n".encode())
    spec = BuildSpec(
        base_image=base_image,
        driver_program="score.py",
        app_dir=app,
        model_dir=v1_dir,
        pip_requirements=f"scikit-learn=={sklearn.__version__}\njoblib\n",
        ca_bundles=(bundle,),
        labels={"org.mms.bench": salt},
    )
    return Inputs(
        spec,
        replace(spec, model_dir=v2_dir),
        model_v2,
        (model_v1.stat().st_size, model_v2.stat().st_size),
        trees,
        (seed, seed + 1),
    )


# ---------------------------------------------------------------- builders


def builder_class(name: str) -> tuple[type | None, str]:
    """The builder's class, or None and why it is skipped."""
    if name not in BUILDER_MODULES:
        return None, f"unknown builder (known: {', '.join(BUILDER_MODULES)})"
    module_name, class_name = BUILDER_MODULES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None, f"{module_name.replace('.', '/')}.py does not exist yet"
        return None, f"{module_name} does not import: {exc}"
    except Exception as exc:  # noqa: BLE001 (a half-written module: report, go on)
        return None, f"{module_name} does not import: {type(exc).__name__}: {exc}"
    cls = getattr(module, class_name, None)
    if cls is None:
        return None, f"{module_name} has no {class_name}"
    return cls, ""


BUILD_NETWORKING: dict[str, str] = {}  # the docker builder's network and proxy (main sets them)


def make_builder(name: str, cls: type, *, registry: str, docker_host: str | None, cache_dir: Path, timeout: int) -> Any:
    """A builder pushing to ``registry`` with empty caches (``cache_dir`` is fresh).

    oci: ``OciBuilder(registry, registry_auth=None, *, cache_dir=None, timeout=300.0)`` as
    workers/builders/oci.py has it (its cache_dir holds uv's wheel cache and the base facts).
    """
    if name == "docker":
        return cls(docker_host, registry, None, timeout=timeout, **BUILD_NETWORKING)
    return cls(registry, None, cache_dir=cache_dir, timeout=timeout)


def bounded(fn: Callable[[], Any], seconds: float, what: str) -> Any:
    """Run ``fn`` in a thread; raise BenchTimeout if it has not returned after ``seconds``."""
    answer: queue.Queue[tuple[bool, Any]] = queue.Queue()

    def target() -> None:
        try:
            answer.put((True, fn()))
        except BaseException as exc:  # noqa: BLE001 (handed to the caller)
            answer.put((False, exc))

    threading.Thread(target=target, name=what, daemon=True).start()
    try:
        ok, value = answer.get(timeout=seconds)
    except queue.Empty:
        raise BenchTimeout(f"{what}: no answer after {seconds:.0f} s") from None
    if not ok:
        raise value
    return value


# ---------------------------------------------------------------- measurements


@dataclass
class Row:
    round: int
    builder: str
    scenario: str
    ok: bool = True
    error: str = ""
    seconds: float = 0.0
    upload_bytes: int = 0
    blob_uploads: int = 0
    mounts: int = 0
    manifest_puts: int = 0
    downloaded_bytes: int = 0
    image: str = ""
    digest: str = ""
    compressed_bytes: int = 0
    layers: int = 0
    unpacked_bytes: int | None = None
    cached_steps: int | None = None
    requests: dict[str, int] = field(default_factory=dict)
    log: str = ""


def fill_from_proxy(row: Row, stats: ProxyStats) -> None:
    row.upload_bytes, row.blob_uploads = stats.upload_bytes, stats.blob_uploads
    row.mounts, row.manifest_puts = stats.mounts, stats.manifest_puts
    row.downloaded_bytes = stats.downloaded_bytes
    row.requests = dict(sorted(Counter(f"{r.method} {r.status}" for r in stats.requests).items()))


def compressed_size(upstream: str, repo: str, digest: str) -> tuple[int, int]:
    """(sum of layer sizes, layer count) of the pushed manifest, read from the registry."""
    with httpx.Client(timeout=30, headers={"Accept": MANIFEST_ACCEPT}) as client:
        manifest = client.get(f"http://{upstream}/v2/{repo}/manifests/{digest}")
        manifest = manifest.raise_for_status().json()
        if "manifests" in manifest:  # an index: the linux/amd64 (or first) image
            entries = manifest["manifests"]
            entry = next((m for m in entries if m.get("platform", {}).get("architecture") == "amd64"), entries[0])
            manifest = client.get(f"http://{upstream}/v2/{repo}/manifests/{entry['digest']}")
            manifest = manifest.raise_for_status().json()
    layers = manifest.get("layers", [])
    return sum(int(layer["size"]) for layer in layers), len(layers)


def measure_floor(proxy: CountingProxy, model: Path, repo: str, timeout: float) -> Row:
    """sha256 of ``model`` and one monolithic upload of it (POST + PUT) through the proxy."""
    row = Row(0, "floor", "hash+upload")
    proxy.reset()
    started = time.monotonic()
    digest = hashlib.sha256()
    with model.open("rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    size = model.stat().st_size

    def body():
        with model.open("rb") as f:
            while piece := f.read(1 << 20):
                yield piece

    with httpx.Client(timeout=timeout) as client:
        start = client.post(f"http://{proxy.address}/v2/{repo}/blobs/uploads/")
        if start.status_code != 202:
            raise RuntimeError(f"floor: POST answered {start.status_code}: {start.text[:200]}")
        location = start.headers["Location"]
        sep = "&" if "?" in location else "?"
        put = client.put(
            f"{location}{sep}digest=sha256:{digest.hexdigest()}",
            content=body(),
            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
        )
        if put.status_code != 201:
            raise RuntimeError(f"floor: PUT answered {put.status_code}: {put.text[:200]}")
    row.seconds = time.monotonic() - started
    fill_from_proxy(row, proxy.stats())
    row.compressed_bytes, row.layers = size, 1
    return row


def run_builder(
    name: str,
    cls: type,
    inputs: Inputs,
    *,
    round_no: int,
    run_id: str,
    proxy: CountingProxy,
    upstream: str,
    docker_host: str | None,
    workdir: Path,
    log_dir: Path,
    build_timeout: int,
    rows: list[Row],
    prime: bool,
) -> None:
    """Cold, warm and no-change builds with one builder, appended to ``rows`` as they go;
    stops at the first failure, raises BenchTimeout after recording a build that hung."""
    # A fresh registry prefix per builder and round: the image is <prefix>/housing, and the oci
    # builder keeps its dependency-layer cache under the prefix too (<prefix>/mms/cache/...).
    prefix = f"{REPO_PREFIX}{name}-{run_id}-r{round_no}"
    repo = f"{prefix}/{MODEL_NAME}"
    base = publish_base(upstream, inputs.v1.base_image, f"{prefix}/mms/base")
    base_via_proxy = f"{proxy.address}/{base}"
    if name == "docker":
        empty_engine_caches(docker_host)
        if prime:
            primed = prime_docker_base(docker_host, proxy, inputs.v1.base_image, base_via_proxy)
            print(json.dumps({"round": round_no, "docker_base_primed": primed}), flush=True)
    specs = [replace(spec, base_image=base_via_proxy) for spec in (inputs.v1, inputs.v2)]
    cache_dir = workdir / f"{name}-cache"
    cache_dir.mkdir()
    builder = make_builder(
        name,
        cls,
        registry=f"{proxy.address}/{prefix}",
        docker_host=docker_host,
        cache_dir=cache_dir,
        timeout=min(build_timeout, 600),
    )
    for tag, (scenario, spec) in enumerate(zip(SCENARIOS, (specs[0], specs[1], specs[1])), start=1):
        row = Row(round_no, name, scenario)
        rows.append(row)
        lines: list[str] = []
        row.log = str(log_dir / f"{name}-r{round_no}-{scenario}.log")
        proxy.reset()
        started = time.monotonic()
        try:
            result: BuildResult = bounded(
                lambda spec=spec, tag=tag, lines=lines: builder.build_and_push(
                    spec, MODEL_NAME, str(tag), lines.append
                ),
                build_timeout,
                f"{name} {scenario} build",
            )
        except Exception as exc:  # recorded; a BuildFailed says which step
            row.ok, row.error = False, f"{type(exc).__name__}: {exc}"
            if isinstance(exc, BenchTimeout):  # still running: stop the bench, do not overlap
                row.seconds = time.monotonic() - started
                Path(row.log).write_text("\n".join(lines) + "\n")
                raise
        row.seconds = time.monotonic() - started
        fill_from_proxy(row, proxy.stats())
        Path(row.log).write_text("\n".join(lines) + "\n")
        if name == "docker":
            row.cached_steps = sum("Using cache" in line for line in lines)
        if not row.ok:
            tail = "\n    ".join(lines[-15:])
            print(f"{name} {scenario} FAILED: {row.error}\n    {tail}", file=sys.stderr)
            break
        row.image, row.digest = result.image_location, result.digest
        row.unpacked_bytes = result.size_bytes if name == "docker" else None
        row.compressed_bytes, row.layers = compressed_size(upstream, repo, result.digest)
        print(json.dumps({k: v for k, v in row.__dict__.items() if k not in ("requests", "log")}), flush=True)


# ---------------------------------------------------------------- engine housekeeping


def engine(docker_host: str | None):
    from workers.builders.docker import engine_client

    return engine_client(docker_host, timeout=120)


def bench_tags(api) -> list[str]:
    return [tag for image in api.images() for tag in image.get("RepoTags") or [] if _BENCH_TAG.match(tag)]


def remove_tags(api, tags: list[str]) -> None:
    import docker

    for tag in tags:
        with contextlib.suppress(docker.errors.NotFound):
            api.remove_image(tag)  # untags; its image and unused parents go with the last tag


def empty_engine_caches(docker_host: str | None) -> None:
    """Cold for docker: the bench's earlier images and their cached layers gone."""
    import docker

    with engine(docker_host) as api:
        remove_tags(api, bench_tags(api))
        with contextlib.suppress(docker.errors.APIError):
            api.prune_builds()  # BuildKit's cache (the legacy builder's is its images)


def publish_base(upstream: str, base_image: str, repo: str) -> str:
    """Copy ``base_image`` (in the registry at ``upstream``) to ``repo``: its blobs mounted,
    its manifest put as it is. Straight to the registry, not counted. Returns repo:tag."""
    source, _, tag = base_image.split("/", 1)[1].rpartition(":")
    with httpx.Client(timeout=60, headers={"Accept": MANIFEST_ACCEPT}) as client:
        answer = client.get(f"http://{upstream}/v2/{source}/manifests/{tag}").raise_for_status()
        manifest = answer.json()
        if "layers" not in manifest:
            raise SystemExit(f"{base_image} is an index: copying one is not written yet")
        for blob in (manifest["config"], *manifest["layers"]):
            mount = client.post(
                f"http://{upstream}/v2/{repo}/blobs/uploads/", params={"mount": blob["digest"], "from": source}
            )
            if mount.status_code != 201:
                raise RuntimeError(f"mounting {blob['digest']} into {repo}: {mount.status_code}")
        client.put(
            f"http://{upstream}/v2/{repo}/manifests/{tag}",
            content=answer.content,
            headers={"Content-Type": answer.headers["Content-Type"]},
        ).raise_for_status()
    return f"{repo}:{tag}"


def prime_docker_base(
    docker_host: str | None, proxy: CountingProxy, local_base: str, base_via_proxy: str
) -> dict[str, int]:
    """Push the engine's base image as ``base_via_proxy`` (already in the registry): the
    engine uploads nothing and notes where the layers are, to mount them from later."""
    import docker

    repo, _, tag = base_via_proxy.rpartition(":")
    proxy.reset()
    with engine(docker_host) as api:
        try:
            api.inspect_image(local_base)
        except docker.errors.NotFound:
            for chunk in api.pull(local_base, stream=True, decode=True, auth_config={}):
                if "error" in chunk:
                    raise RuntimeError(f"pull {local_base}: {chunk['error']}") from None
        api.tag(local_base, repo, tag)
        for chunk in api.push(repo, tag=tag, stream=True, decode=True, auth_config={}):
            if "error" in chunk:
                raise RuntimeError(f"priming push of {base_via_proxy}: {chunk['error']}")
    stats = proxy.stats()
    proxy.reset()
    return {
        "upload_bytes": stats.upload_bytes,
        "blob_uploads": stats.blob_uploads,
        "mounts": stats.mounts,
        "manifest_puts": stats.manifest_puts,
    }


# ---------------------------------------------------------------- infra


def run_script(name: str) -> dict[str, str]:
    proc = subprocess.run([str(INFRA / name)], capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


# ---------------------------------------------------------------- report


def median_rows(rows: list[Row]) -> dict[tuple[str, str], dict[str, float]]:
    keys = (
        "seconds",
        "upload_bytes",
        "blob_uploads",
        "mounts",
        "manifest_puts",
        "compressed_bytes",
        "unpacked_bytes",
        "cached_steps",
    )
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        if row.ok:
            groups.setdefault((row.builder, row.scenario), []).append(row)
    medians = {}
    for group, members in groups.items():
        medians[group] = {"n": len(members)}
        for key in keys:
            values = [getattr(r, key) for r in members if getattr(r, key) is not None]
            medians[group][key] = statistics.median(values) if values else None
    return medians


def print_table(medians: dict[tuple[str, str], dict[str, float]], repeat: int) -> None:
    print(f"\nmedian of {repeat} round(s)")
    print(
        f"| {'builder':<7} | {'scenario':<11} | {'s':>6} | {'MB up':>7} | {'uploads':>7} "
        f"| {'mounts':>6} | {'manif.':>6} | {'image MB gz':>11} | {'unpacked MB':>11} |"
    )
    print(f"|{'-' * 9}|{'-' * 13}|{'-' * 8}|{'-' * 9}|{'-' * 9}|{'-' * 8}|{'-' * 8}|{'-' * 13}|{'-' * 13}|")
    for (builder, scenario), m in medians.items():
        unpacked = f"{m['unpacked_bytes'] / MB:.1f}" if m["unpacked_bytes"] is not None else "-"
        print(
            f"| {builder:<7} | {scenario:<11} | {m['seconds']:>6.1f} "
            f"| {m['upload_bytes'] / MB:>7.1f} | {m['blob_uploads']:>7.0f} "
            f"| {m['mounts']:>6.0f} | {m['manifest_puts']:>6.0f} "
            f"| {m['compressed_bytes'] / MB:>11.1f} | {unpacked:>11} |"
        )


def ratios(medians: dict[tuple[str, str], dict[str, float]]) -> dict[str, float | None]:
    def seconds(builder: str, scenario: str) -> float | None:
        m = medians.get((builder, scenario))
        return m["seconds"] if m else None

    floor = seconds("floor", "hash+upload")
    docker_warm, oci_warm = seconds("docker", "warm"), seconds("oci", "warm")
    return {
        "docker_warm/oci_warm": docker_warm / oci_warm if docker_warm and oci_warm else None,
        "oci_warm/floor": oci_warm / floor if oci_warm and floor else None,
        "docker_warm/floor": docker_warm / floor if docker_warm and floor else None,
    }


def print_ratios(values: dict[str, float | None]) -> None:
    goals = {"docker_warm/oci_warm": ">= 5", "oci_warm/floor": "<= 2", "docker_warm/floor": ""}
    print()
    for name, value in values.items():
        shown = f"{value:.2f}" if value is not None else "n/a (not measured)"
        goal = f"  (goal {goals[name]})" if goals[name] else ""
        print(f"{name:<22} {shown}{goal}")


# ---------------------------------------------------------------- main


def run_round(
    round_no: int,
    classes: dict[str, type],
    proxy: CountingProxy,
    *,
    base_image: str,
    rows: list[Row],
    run_id: str,
    upstream: str,
    docker_host: str | None,
    workdir: Path,
    log_dir: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Fresh inputs, the floor, then every builder's three builds; rows appended to ``rows``."""
    salt = f"{run_id}-r{round_no}"
    started = time.monotonic()
    inputs = make_inputs(workdir, base_image, salt)
    print(
        f"round {round_no}: models {inputs.model_bytes[0] / MB:.1f} / "
        f"{inputs.model_bytes[1] / MB:.1f} MB ({inputs.trees} trees), trained in "
        f"{time.monotonic() - started:.0f} s",
        flush=True,
    )
    floor = measure_floor(proxy, inputs.model_v2, f"{REPO_PREFIX}floor-{run_id}-r{round_no}", 300)
    floor.round = round_no
    rows.append(floor)
    print(
        json.dumps({"round": round_no, "floor_seconds": round(floor.seconds, 2), "upload_bytes": floor.upload_bytes}),
        flush=True,
    )
    for name, cls in classes.items():
        first = len(rows)
        try:
            run_builder(
                name,
                cls,
                inputs,
                round_no=round_no,
                run_id=run_id,
                proxy=proxy,
                upstream=upstream,
                docker_host=docker_host,
                workdir=workdir,
                log_dir=log_dir,
                build_timeout=args.build_timeout,
                rows=rows,
                prime=not args.no_prime,
            )
        except BenchTimeout:
            raise
        except Exception as exc:  # noqa: BLE001 (e.g. a constructor that changed: go on)
            print(f"{name}: round {round_no} not run: {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append(Row(round_no, name, "cold", ok=False, error=f"{type(exc).__name__}: {exc}"))
            continue
        last = rows[-1] if len(rows) > first else None
        if args.smoke and last is not None and last.ok and last.image:
            smoke(docker_host, last.image, log_dir / f"{name}-r{round_no}-smoke.log")
    return {
        "round": round_no,
        "salt": salt,
        "seeds": inputs.seeds,
        "trees": inputs.trees,
        "model_bytes": inputs.model_bytes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builders", help="comma-separated (docker,oci); default: those that import")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the table shows medians")
    parser.add_argument("--json", type=Path, help="write the results here (default: /tmp/mms-build-bench/<run>.json)")
    parser.add_argument(
        "--build-timeout", type=int, default=1800, help="seconds one build may take before the bench gives up"
    )
    parser.add_argument(
        "--no-prime",
        action="store_true",
        help="do not push the base through the proxy before docker's cold "
        "build (its cold push then uploads the base layer again)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="also start each builder's last image once (docker engine)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the engine images")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    names = [n.strip() for n in args.builders.split(",") if n.strip()] if args.builders else list(BUILDER_MODULES)
    classes: dict[str, type] = {}
    skipped: dict[str, str] = {}
    for name in names:
        cls, why = builder_class(name)
        if cls is None:
            skipped[name] = why
            print(f"{name}: skipped: {why}", file=sys.stderr)
        else:
            classes[name] = cls
    if not classes:
        print("no builder to run", file=sys.stderr)
        return 2

    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    out = args.json or Path(tempfile.gettempdir()) / "mms-build-bench" / f"{run_id}.json"
    log_dir = out.with_suffix("")  # the build logs, one file per build
    log_dir.mkdir(parents=True, exist_ok=True)

    docker_host = run_script("docker-engine.sh")["DOCKER_HOST"]
    # RUN steps run in the contained build network, reaching PyPI through its egress proxy.
    networking = run_script("build-network.sh")
    BUILD_NETWORKING.update(network=networking["MMS_BUILD_NETWORK"], proxy=networking["MMS_BUILD_PROXY"])
    upstream = run_script("registry.sh")["MMS_REGISTRY"]
    base_image = run_script("base-image.sh")["MMS_BASE_IMAGE"]
    import sklearn

    print(
        f"run {run_id}: builders {', '.join(classes)}; registry {upstream}; base {base_image}; "
        f"scikit-learn {sklearn.__version__}; {os.cpu_count()} cores",
        flush=True,
    )

    rows: list[Row] = []
    rounds: list[dict[str, Any]] = []
    workroot = Path(tempfile.mkdtemp(prefix="mms-build-bench-"))
    try:
        with CountingProxy(upstream, upstream_timeout=300) as proxy:
            for round_no in range(1, args.repeat + 1):
                rounds.append(
                    run_round(
                        round_no,
                        classes,
                        proxy,
                        base_image=base_image,
                        rows=rows,
                        run_id=run_id,
                        upstream=upstream,
                        docker_host=docker_host,
                        workdir=workroot / f"r{round_no}",
                        log_dir=log_dir,
                        args=args,
                    )
                )
    except BenchTimeout as exc:
        print(f"stopped: {exc}", file=sys.stderr)
    finally:
        if not args.keep:  # the builds' tags and the base's copies' (tags only)
            with engine(docker_host) as api:
                remove_tags(api, bench_tags(api))
        shutil.rmtree(workroot, ignore_errors=True)

    medians = median_rows(rows)
    print_table(medians, args.repeat)
    values = ratios(medians)
    print_ratios(values)
    failed = [r for r in rows if not r.ok]
    for row in failed:
        print(
            f"FAILED: round {row.round} {row.builder} {row.scenario}: {row.error} (log: {row.log or '-'})",
            file=sys.stderr,
        )
    out.write_text(
        json.dumps(
            {
                "run": run_id,
                "cores": os.cpu_count(),
                "registry": upstream,
                "base_image": base_image,
                "docker_base_primed": not args.no_prime,
                "builders": list(classes),
                "skipped": skipped,
                "repeat": args.repeat,
                "rounds": rounds,
                "rows": [row.__dict__ for row in rows],
                "medians": [{"builder": b, "scenario": s, **m} for (b, s), m in medians.items()],
                "ratios": values,
            },
            indent=2,
        )
    )
    print(f"\nresults: {out}\nbuild logs: {log_dir}/")
    return 1 if failed else 0


def smoke(docker_host: str | None, image: str, log_path: Path) -> None:
    """Start ``image`` once (pulled into the engine if a daemonless builder made it): the
    scoring server only answers once score.py's init() has loaded the model."""
    import docker

    from workers.smoke_test import smoke_test

    lines: list[str] = []
    try:
        with engine(docker_host) as api:
            try:
                api.inspect_image(image)
            except docker.errors.NotFound:
                for chunk in api.pull(image, stream=True, decode=True, auth_config={}):
                    if "error" in chunk:
                        raise RuntimeError(f"pull {image}: {chunk['error']}") from None
        smoke_test(docker_host, image, lines.append, timeout=120)
        print(f"smoke test of {image}: OK", flush=True)
    except Exception as exc:  # noqa: BLE001 (reported, not fatal)
        print(f"smoke test of {image} FAILED: {exc}", file=sys.stderr)
    log_path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
