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
The engine building the same environment from a conda base (the docker builder) cannot be
measured here: no conda, and no channel it could install from, is reachable.

Run as root (scripts/infra starts the engine, the registry and the base image if needed):

    .venv/bin/python bench/conda_bench.py [--repeat 3] [--packages 20] [--package-mb 2]
"""

from __future__ import annotations

import argparse
import json
import os
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


def layer_sizes(location: str, digest: str) -> tuple[int, int]:
    """(the conda layer's compressed size, the whole image's)."""
    registry, _, repo = location.rpartition(":")[0].partition("/")
    with RemoteRegistryClient(registry) as client:
        manifest = client.get_manifest(repo, digest).body
        config = json.loads(client.get_blob(repo, manifest["config"]["digest"]))
    history = [h.get("created_by", "") for h in config["history"] if not h.get("empty_layer")]
    conda = next(i for i, line in enumerate(history) if "conda environment" in line)
    return manifest["layers"][conda]["size"], sum(layer["size"] for layer in manifest["layers"])


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
    args = parser.parse_args()
    run_script("docker-engine.sh")
    registry = run_script("registry.sh")["MMS_REGISTRY"]
    base_image = run_script("base-image.sh")["MMS_BASE_IMAGE"]
    rounds = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="mms-conda-bench-") as tmp:
            channel = Path(tmp) / "channel"
            conda_file = make_channel(channel, args.packages, args.package_mb)
            rounds.append(one_round(registry, base_image, conda_file, channel, Path(tmp)))
        print(f"round {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in rounds[-1].items()), flush=True)
    total = args.packages * args.package_mb
    print(f"\n{args.packages} packages of {args.package_mb:g} MB ({total:g} MB), medians of {args.repeat} rounds:")
    for key in rounds[0]:
        print(f"  {key:18} {statistics.median(r[key] for r in rounds):8.2f}")


if __name__ == "__main__":
    main()
