"""A conda environment on the oci builder: cold and warm build, and what the environment adds.

No public conda channel is reachable from this machine, so the bench writes one on local disk
(tests/workers/conda_channel.py): ``python`` (a link to the base's own 3.11, as the tests
make it) and ``--packages`` packages of ``--package-mb`` incompressible bytes each, one of
them depending on the others. The figures are of solving, installing and layering that
synthetic environment; a real conda-forge environment's packages are larger and many, and
its repodata far larger (the solve reads it).

Each round, with a fresh worker cache folder and a fresh registry prefix:

    cold   the environment solved, its packages extracted from the channel, installed into
           /opt/mms/conda, tarred, compressed and uploaded, then the rest of the image
    warm   the same environment with another score.py: solved again, installed from the
           worker's package cache, its layer found in the worker's layer cache (no upload)

For each: wall seconds, and the conda layer's compressed size beside the whole image's.

The same environment built by the engine from a conda base (``--engine``, the docker builder:
``conda env update`` in the base's own conda, a RUN step in the contained build network):
no conda is reachable from this machine, so the bench makes a conda-shaped base on the
published base: ``/opt/miniconda`` (a Python prefix, first on PATH) with the channel baked in at
``/opt/channel`` and a ``conda`` whose ``env update``, ``clean`` and ``info --base`` are done by
py-rattler (its wheel copied in), the same library the oci builder uses, so both install the
same packages and the figures differ by where it runs. Each round a new base (so nothing is
in the engine's cache):

    cold   FROM that base: the environment step (``conda env update``, then a venv) and the
           scoring server's pip installs run, the image is pushed
    warm   another score.py: the engine's layer cache answers every step above the app's

The engine's environment layer is that whole RUN step (the conda packages and the venv).

Run as root (scripts/infra starts the engine, the registry and the base image if needed):

    .venv/bin/python bench/conda_bench.py [--repeat 3] [--packages 20] [--package-mb 2] [--engine]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.workers.conda_channel is not an installed package

from tests.workers.conda_channel import add_package, add_python
from workers.build_context import BuildSpec
from workers.builders import BuildFailed
from workers.builders.docker import DockerBuilder, engine_client
from workers.builders.oci import OciBuilder
from workers.oci.remote_registry import RemoteRegistryClient

INFRA = ROOT / "scripts" / "infra"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
SCORE = "def init():\n    pass\n\ndef run(raw):\n    return {{'round': {n}}}\n"


def run_script(name: str) -> dict[str, str]:
    proc = subprocess.run([str(INFRA / name)], capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


def make_channel(root: Path, packages: int, size_mb: float) -> str:
    """The channel and the conda file that asks for all of it."""
    add_python(root, "3.11.7", "/usr/bin/python3.11")
    names = []
    for i in range(packages):
        data = os.urandom(int(size_mb * 1024 * 1024))  # incompressible, as shared libraries nearly are
        depends = [f"payload{i + 1}"] if i + 1 < packages else []
        add_package(root, f"payload{i}", "1.0", {f"lib/payload{i}.so": data}, depends=depends)
        names.append(f"payload{i}")
    listed = "".join(f"  - {name}\n" for name in names[:1])
    return f"name: bench\nchannels:\n  - local\ndependencies:\n  - python=3.11\n{listed}"


def layer_sizes(location: str, digest: str, marker: str = "conda environment") -> tuple[int, int]:
    """(the compressed size of the layer whose history names ``marker``, the whole image's)."""
    registry, _, repo = location.rpartition(":")[0].partition("/")
    with RemoteRegistryClient(registry) as client:
        manifest = client.get_manifest(repo, digest).body
        config = json.loads(client.get_blob(repo, manifest["config"]["digest"]))
    history = [h.get("created_by", "") for h in config["history"] if not h.get("empty_layer")]
    conda = next(i for i, line in enumerate(history) if marker in line)
    return manifest["layers"][conda]["size"], sum(layer["size"] for layer in manifest["layers"])


# The bench's `conda` (module docstring): what the docker builder's setup script asks of one.
CONDA_SHIM = """#!/opt/miniconda/bin/python3
import asyncio, sys
from pathlib import Path
import rattler, yaml

BASE, CHANNEL = "/opt/miniconda", "file:///opt/channel"


async def update(path):
    deps = yaml.safe_load(Path(path).read_text())["dependencies"]
    if not all(isinstance(d, str) for d in deps):
        sys.exit("the bench's conda installs conda packages only")
    # The base's python is kept, as conda keeps an installed one that satisfies the file.
    specs = [d for d in deps if d.replace("=", " ").split()[0] != "python"]
    records = await rattler.solve([CHANNEL], specs, platforms=["linux-64", "noarch"])
    await rattler.install(records, BASE, execute_link_scripts=False, show_progress=False)
    print(f"conda: installed {len(records)} package(s) into {BASE}")


args = sys.argv[1:]
if args[:2] == ["env", "update"]:
    asyncio.run(update(args[args.index("-f") + 1]))
elif args[:2] == ["info", "--base"]:
    print(BASE)
elif args[:1] != ["clean"]:
    sys.exit(f"the bench's conda does not do {args}")
"""

CONDA_BASE = """FROM {base}
COPY wheels/ /tmp/wheels/
COPY channel/ /opt/channel/
COPY conda /opt/miniconda/bin/conda
RUN python3 -m venv --without-pip /opt/miniconda \\
 && python3 -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \\
    /opt/miniconda/lib/python3.11/site-packages /tmp/wheels/*.whl \\
 && chmod 0755 /opt/miniconda/bin/conda && rm -rf /tmp/wheels && mkdir -p /opt/miniconda/conda-meta
ENV PATH=/opt/miniconda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
"""


def conda_base(docker_host: str, registry: str, base_image: str, channel: Path, wheels: Path, work: Path) -> str:
    """Build the bench's conda base (module docstring) with the engine, no network; push it."""
    context = work / "conda-base"
    context.mkdir()
    shutil.copytree(channel, context / "channel")
    shutil.copytree(wheels, context / "wheels")
    (context / "conda").write_text(CONDA_SHIM)
    (context / "Dockerfile").write_text(CONDA_BASE.format(base=base_image))
    reference = f"{registry}/bench/conda-base-{uuid.uuid4().hex[:8]}"
    with engine_client(docker_host) as api:
        api.pull(base_image)
        output = list(api.build(path=str(context), tag=f"{reference}:1", rm=True, network_mode="none", decode=True))
        errors = [chunk["error"] for chunk in output if "error" in chunk]
        if errors:
            raise SystemExit(f"the conda base did not build: {errors[-1]}")
        for chunk in api.push(reference, tag="1", stream=True, decode=True):
            if "error" in chunk:
                raise SystemExit(f"the conda base was not pushed: {chunk['error']}")
        api.remove_image(f"{reference}:1")  # the builder pulls it back, as a worker would
    return f"{reference}:1"


def rattler_wheels(folder: Path) -> Path:
    """py-rattler and PyYAML wheels for the base's Python 3.11 (from PyPI, as the operator)."""
    from importlib.metadata import version

    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:"]
        + ["--python-version", "3.11", "--platform", "manylinux2014_x86_64", "-d", str(folder)]
        + [f"py-rattler=={version('py-rattler')}", f"PyYAML=={version('PyYAML')}"],
        check=True,
        timeout=600,
    )
    return folder


def engine_round(
    docker_host: str, networking: dict[str, str], registry: str, base: str, conda_file: str, work: Path
) -> dict[str, float]:
    builder = DockerBuilder(
        docker_host,
        f"{registry}/bench/engine-conda-{uuid.uuid4().hex[:8]}",
        network=networking["MMS_BUILD_NETWORK"],
        proxy=networking["MMS_BUILD_PROXY"],
    )
    figures: dict[str, float] = {}
    for n, scenario in enumerate(("cold", "warm")):
        app = work / f"engine-app-{scenario}"
        app.mkdir()
        (app / "score.py").write_text(SCORE.format(n=n))
        spec = BuildSpec(
            base_image=base,
            driver_program="score.py",
            app_dir=app,
            conda_file=conda_file,
            ca_bundles=(HOST_CA_BUNDLE,) if HOST_CA_BUNDLE.is_file() else (),
        )
        lines: list[str] = []
        started = time.monotonic()
        try:
            result = builder.build_and_push(spec, "bench/img", str(n + 1), lines.append)
        except BuildFailed as exc:
            raise SystemExit(f"the engine's {scenario} build failed: {exc}\n" + "\n".join(lines[-40:])) from None
        figures[f"{scenario}_seconds"] = time.monotonic() - started
        if scenario == "cold" and not any("conda: installed" in line for line in lines):
            raise SystemExit("the engine's build did not run the base's conda:\n" + "\n".join(lines[-30:]))
        env, whole = layer_sizes(result.image_location, result.digest, "/opt/mms/env/setup.sh")
        figures[f"{scenario}_env_mb"], figures[f"{scenario}_image_mb"] = env / 1e6, whole / 1e6
    return figures


def one_round(registry: str, base_image: str, conda_file: str, channel: Path, work: Path) -> dict[str, float]:
    prefix = f"{registry}/bench/conda-{uuid.uuid4().hex[:8]}"
    builder = OciBuilder(prefix, cache_dir=work / "cache", conda_channels=[f"local=file://{channel}"])
    figures: dict[str, float] = {}
    for n, scenario in enumerate(("cold", "warm")):
        app = work / f"app-{scenario}"
        app.mkdir()
        (app / "score.py").write_text(SCORE.format(n=n))
        spec = BuildSpec(
            base_image=base_image,
            driver_program="score.py",
            app_dir=app,
            conda_file=conda_file,
            ca_bundles=(HOST_CA_BUNDLE,) if HOST_CA_BUNDLE.is_file() else (),
        )
        started = time.monotonic()
        result = builder.build_and_push(spec, "bench/img", str(n + 1), lambda _: None)
        figures[f"{scenario}_seconds"] = time.monotonic() - started
        conda, whole = layer_sizes(result.image_location, result.digest)
        figures[f"{scenario}_conda_mb"], figures[f"{scenario}_image_mb"] = conda / 1e6, whole / 1e6
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--packages", type=int, default=20)
    parser.add_argument("--package-mb", type=float, default=2.0)
    parser.add_argument("--engine", action="store_true", help="also the docker builder from a conda base")
    args = parser.parse_args()
    docker_host = run_script("docker-engine.sh")["DOCKER_HOST"]
    registry = run_script("registry.sh")["MMS_REGISTRY"]
    base_image = run_script("base-image.sh")["MMS_BASE_IMAGE"]
    networking = run_script("build-network.sh") if args.engine else {}
    rounds: dict[str, list[dict[str, float]]] = {"oci": [], "engine": []}
    with tempfile.TemporaryDirectory(prefix="mms-conda-bench-wheels-") as wheels_dir:
        wheels = rattler_wheels(Path(wheels_dir)) if args.engine else None
        for i in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix="mms-conda-bench-") as tmp:
                channel = Path(tmp) / "channel"
                conda_file = make_channel(channel, args.packages, args.package_mb)
                rounds["oci"].append(one_round(registry, base_image, conda_file, channel, Path(tmp)))
                if wheels is not None:
                    base = conda_base(docker_host, registry, base_image, channel, wheels, Path(tmp))
                    rounds["engine"].append(
                        engine_round(docker_host, networking, registry, base, conda_file, Path(tmp))
                    )
            for kind in ("oci", "engine"):
                if rounds[kind]:
                    figures = ", ".join(f"{k} {v:.2f}" for k, v in rounds[kind][-1].items())
                    print(f"round {i + 1} {kind}: {figures}", flush=True)
    total = args.packages * args.package_mb
    print(f"\n{args.packages} packages of {args.package_mb:g} MB ({total:g} MB), medians of {args.repeat} rounds:")
    for kind, label in (("oci", "oci builder, py-rattler"), ("engine", "docker builder, the base's conda")):
        if rounds[kind]:
            print(label)
            for key in rounds[kind][0]:
                print(f"  {key:18} {statistics.median(r[key] for r in rounds[kind]):8.2f}")


if __name__ == "__main__":
    main()
