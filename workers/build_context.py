"""Generate a scoring image's Docker build context: a tar holding a Dockerfile and its inputs.

The Dockerfile is ordered for the layer cache, slowest-changing first: base, CA certificates,
environment, scoring server, driver and assets, then the model files alone in the last
layer, so a new model version reuses every layer above it. The tar is deterministic (sorted,
fixed owners, modes and mtimes): the same inputs give the same bytes.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

import scoring_server
from app.dockerfile_steps import Step, StepError, parse_steps

__all__ = [
    "APP_ROOT",
    "MODEL_ROOT",
    "REQUIREMENT_FILES",
    "RUN_GID",
    "RUN_HOME",
    "RUN_UID",
    "RUN_USER",
    "SERVER_REQUIREMENTS",
    "SPARK_REQUIREMENT",
    "BuildSpec",
    "ContextInfo",
    "InvalidBuildSpec",
    "RegistryCredentials",
    "parse_extra_steps",
    "runtime_requirements",
    "walk_tree",
    "write_context",
]

APP_ROOT = "/var/azureml-app"
MODEL_ROOT = f"{APP_ROOT}/azureml-models"
VENV = "/opt/mms/venv"
PORT = 5001
# Every image runs as this user, never as root, as Azure ML's inference images do: what the
# image serves (app, models, environment, scoring server) stays root's, readable but not
# writable, so code that takes over the scoring process cannot rewrite it; HOME and /tmp are
# its writable places. A fixed number, high enough to miss the users a base image has (its
# first is often 1000) and not the service's own 10001, so on a host without user
# namespaces the two never share an identity; numeric in the config, so a runtime can check
# it is not root without the image's /etc/passwd (Kubernetes' runAsNonRoot).
RUN_UID = RUN_GID = 10002
RUN_USER = "scoring"
RUN_HOME = f"/home/{RUN_USER}"
# The scoring server's own dependencies, pinned so every image gets the tested versions, per
# Python: uvicorn 0.54 and click 8.2+ need 3.10, so older bases get the last releases that run
# on theirs. Markers pick the line: uv evaluates them for the base's Python (oci builder), pip
# in the image for its own (docker builder). h11 0.16 (its request-smuggling fix) runs on all.
SERVER_REQUIREMENTS = (
    'uvicorn==0.54.0; python_version >= "3.10"',
    'uvicorn==0.39.0; python_version == "3.9"',
    'uvicorn==0.33.0; python_version < "3.9"',
    "h11==0.16.0",
    'click==8.5.1; python_version >= "3.10"',
    'click==8.1.8; python_version < "3.10"',
)
RUNTIMES = ("python", "spark-py")
# What a SparkPython manifest that names no pyspark gets: the version the tests train with
# (pyproject's test extra pins the same), which runs on the spark base image's Java 17.
SPARK_REQUIREMENT = "pyspark==3.5.9"
NO_JAVA = (
    "the base image has no Java runtime, and the SparkPython runtime needs one for "
    "Spark: build on the spark base image "
    "(mms base-image publish --variant spark) or a base image with Java 17"
)
FIXED_MTIME = 946684800  # 2000-01-01: deterministic, and zip-safe (zip refuses pre-1980)
PIP = f"{VENV}/bin/pip install --no-cache-dir --disable-pip-version-check --progress-bar off"
CA_BUNDLE = "/opt/mms/ca/bundle.pem"
REQUIREMENT_FILES = "/opt/mms/requirements/files"
_REFERENCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SPEC_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_REQUIREMENT_NAME = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[|[=<>!~;@#\s]|$)")


class InvalidBuildSpec(ValueError):
    """The build inputs cannot make a valid build context; the message says why."""


@dataclass(frozen=True)
class RegistryCredentials:
    """A registry login used for one job's pulls or pushes only."""

    address: str
    username: str
    password: str = field(repr=False)

    def auth_config(self) -> dict[str, str]:
        """The ``auth_config`` the Docker API expects."""
        return {"username": self.username, "password": self.password, "serveraddress": self.address}


@dataclass(frozen=True)
class BuildSpec:
    """Everything one image build needs, already fetched onto local disk."""

    base_image: str
    driver_program: str
    app_dir: Path
    model_dir: Path | None = None  # one folder per model: <name>/<version>/...
    base_registry: RegistryCredentials | None = None
    runtime: str = "python"
    pip_requirements: str | None = None
    conda_file: str | None = None
    extra_dockerfile_steps: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    ca_bundles: tuple[Path, ...] = ()  # PEM files trusted while installing packages
    # Package files the requirements name (the account's own assets, fetched by the worker),
    # by file name; requirement lines point at them under REQUIREMENT_FILES.
    requirement_files: Mapping[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class ContextInfo:
    """The generated Dockerfile and, per instruction, the pipeline step it belongs to."""

    dockerfile: str
    steps: tuple[str, ...]


class _Dockerfile:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.steps: list[str] = []

    def add(self, step: str, instruction: str) -> None:
        self.lines.append(instruction)
        self.steps.append(step)

    def comment(self, text: str) -> None:
        self.lines.append(f"# {text}")


def write_context(spec: BuildSpec, dest_tar_path: str | os.PathLike[str]) -> ContextInfo:
    """Write the build context for ``spec`` as an uncompressed tar at ``dest_tar_path``."""
    files: dict[str, bytes] = {}  # generated files, context path -> content
    info = _dockerfile(spec, files)
    with tarfile.open(dest_tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "Dockerfile", info.dockerfile.encode())
        for name in sorted(files):
            _add_bytes(tar, name, files[name], executable=name.startswith("mms/runtime/bin/"))
        for name, path in sorted(spec.requirement_files.items()):
            with Path(path).open("rb") as f:
                member = _tarinfo(f"mms/requirement-files/{name}", tarfile.REGTYPE, 0o644, os.fstat(f.fileno()).st_size)
                tar.addfile(member, f)
        _add_tree(tar, server_dir(), "mms/runtime/lib/scoring_server")
        _add_tree(tar, spec.app_dir, "app")
        if has_models(spec):
            _add_tree(tar, spec.model_dir, "models")
    return info


def _dockerfile(spec: BuildSpec, files: dict[str, bytes]) -> ContextInfo:
    check_spec(spec)
    df = _Dockerfile()
    df.add("base", f"FROM {spec.base_image}")
    if spec.runtime == "spark-py":
        # First, so a base without Java fails in a second, before any package download.
        java = '[ -x "${JAVA_HOME:-/nonexistent}/bin/java" ] || command -v java >/dev/null'
        df.add("java", f"RUN {java} || {{ echo {shlex.quote('mms: ' + NO_JAVA)} >&2; exit 1; }}")
    # Root while building, whatever user the base names: the steps below (and a manifest's
    # RUN steps) install as root; the image's own user comes last, after every extra step.
    df.add("user", "USER 0:0")
    df.add("user", f"RUN {json.dumps(['/bin/sh', '-c', _USER_SCRIPT])}")
    if spec.ca_bundles:
        df.comment("Extra CAs (e.g. a TLS-inspecting proxy), trusted while installing only.")
        files["mms/ca/extra.pem"] = b"".join(read_pem(p) for p in spec.ca_bundles)
        df.add("ca-certs", "COPY mms/ca/ /opt/mms/ca/")
        df.add(
            "ca-certs",
            "RUN { cat /etc/ssl/certs/ca-certificates.crt 2>/dev/null || true; "
            f"cat /opt/mms/ca/extra.pem; }} > {CA_BUNDLE}",
        )
        # ARG, not ENV: set for every later RUN, absent from the final image's config.
        for name in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CONDA_SSL_VERIFY"):
            df.add("ca-certs", f"ARG {name}={CA_BUNDLE}")
    if spec.requirement_files:
        df.add("environment", f"COPY mms/requirement-files/ {REQUIREMENT_FILES}/")
    if spec.conda_file is not None:
        files.update(_conda_files(spec.conda_file))
        df.add("environment", "COPY mms/env/ /opt/mms/env/")
        df.add("environment", "RUN sh /opt/mms/env/setup.sh")
    else:
        df.add("environment", f"RUN python3 -m venv {VENV}")
    df.add("environment", f"ENV PATH={VENV}/bin:$PATH VIRTUAL_ENV={VENV}")
    df.add("scoring-server-deps", f"RUN {PIP} {' '.join(shlex.quote(r) for r in SERVER_REQUIREMENTS)}")
    runtime_deps = runtime_requirements(spec)
    if runtime_deps:
        # Its own layer, above the manifest's: every Spark image on this base shares it.
        df.add("runtime-deps", f"RUN {PIP} {' '.join(runtime_deps)}")
    if spec.pip_requirements and spec.pip_requirements.strip():
        files["mms/requirements/requirements.txt"] = spec.pip_requirements.encode()
        df.add("requirements", "COPY mms/requirements/ /opt/mms/requirements/")
        df.add("requirements", f"RUN {PIP} -r /opt/mms/requirements/requirements.txt")
    files["mms/runtime/bin/start"] = start_script(f"{VENV}/bin/python").encode()
    df.add("scoring-server", "COPY mms/runtime/ /opt/mms/")
    df.add("driver", f"COPY app/ {APP_ROOT}/")
    if has_models(spec):
        df.comment("Models last, alone: a new model version reuses every layer above.")
        df.add("models", f"COPY models/ {MODEL_ROOT}/")
    # Written anew, one line each: the tenant's text itself never reaches the engine.
    for step in parse_extra_steps(spec.extra_dockerfile_steps or ""):
        df.add("extra-steps", step.render())
    if spec.labels:
        pairs = " ".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(spec.labels.items()))
        df.add("metadata", f"LABEL {pairs}")
    env = runtime_env(spec, "/opt/mms/lib")
    df.add("metadata", "ENV " + " ".join(f"{k}={_quote(v)}" for k, v in env.items()))
    df.add("metadata", f"WORKDIR {APP_ROOT}")
    df.add("metadata", f"EXPOSE {PORT}")
    # Last but CMD: no step above (extra steps cannot say USER) decides who the image runs as.
    df.add("metadata", f"USER {RUN_UID}:{RUN_GID}")
    df.add("metadata", 'CMD ["/opt/mms/bin/start"]')
    return ContextInfo("\n".join(df.lines) + "\n", tuple(df.steps))


def parse_extra_steps(text: str) -> list[Step]:
    """The manifest's ``extraDockerfileSteps``, parsed (InvalidBuildSpec when they do not)."""
    try:
        return parse_steps(text)
    except StepError as exc:
        raise InvalidBuildSpec(f"extraDockerfileSteps {exc}") from None


def check_spec(spec: BuildSpec) -> None:
    if spec.runtime not in RUNTIMES:
        raise InvalidBuildSpec(f"runtime {spec.runtime!r} is not supported (only {', '.join(map(repr, RUNTIMES))})")
    if not _REFERENCE.fullmatch(spec.base_image):
        raise InvalidBuildSpec(f"invalid base image reference {spec.base_image!r}")
    driver = PurePosixPath(spec.driver_program)
    if driver.is_absolute() or ".." in driver.parts or not driver.parts:
        raise InvalidBuildSpec(f"driver program must be a relative path: {driver}")
    if not (Path(spec.app_dir) / driver).is_file():
        raise InvalidBuildSpec(f"driver program {driver} is not among the app files")


def _conda_files(text: str) -> dict[str, bytes]:
    """The conda file, its pip entries, and a setup script that uses conda if present."""
    python_spec, conda_only, pip_entries = split_conda(text)
    fail = ":"
    if conda_only:
        message = (
            "mms: the base image has no conda, so the conda-only packages in the "
            f"conda file cannot be installed: {', '.join(conda_only)} "
            "(use a base image with conda, or list them under pip:)"
        )
        fail = f"echo {shlex.quote(message)} >&2; exit 1"
    script = _SETUP_SCRIPT.format(
        venv=VENV, pip=PIP, fail_conda_only=fail, check_python=shlex.quote(_PYTHON_CHECK.format(spec=repr(python_spec)))
    )
    return {
        "mms/env/conda.yml": text.encode(),
        "mms/env/setup.sh": script.encode(),
        "mms/env/conda-pip.txt": "".join(f"{e}\n" for e in pip_entries).encode(),
    }


def split_conda(text: str) -> tuple[str | None, list[str], list[str]]:
    """Return (python spec, conda-only specs, pip entries) of a conda environment file."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidBuildSpec(f"conda file is not valid YAML: {exc}") from None
    deps = doc.get("dependencies") if isinstance(doc, dict) else None
    if not isinstance(deps, list):
        raise InvalidBuildSpec("conda file needs a 'dependencies' list")
    python_spec, conda_only, pip_entries = None, [], []
    for dep in deps:
        if isinstance(dep, dict) and set(dep) == {"pip"} and isinstance(dep["pip"], list):
            pip_entries.extend(_plain(str(e), "pip entry") for e in dep["pip"])
        elif isinstance(dep, (str, int, float)):
            item = _plain(str(dep).strip(), "dependency")
            bare = item.split("::", 1)[-1]  # drop a channel prefix: conda-forge::numpy
            match = _SPEC_NAME.match(bare)
            name = match.group(0).lower() if match else bare
            if name == "python":
                python_spec = bare[len(name) :].strip() or None
            elif name != "pip":
                conda_only.append(item)
        else:
            raise InvalidBuildSpec(f"conda file: unsupported dependency entry {dep!r}")
    return python_spec, conda_only, pip_entries


def conda_python_allows(spec: str, version: str) -> bool:
    """Does conda's ``python`` spec (``3.11``, ``=3.11``, ``>=3.8,<3.12``) admit ``version``?"""

    def key(text: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", text)[:3])

    have = key(version)
    for part in spec.replace(" ", "").split(","):
        match = re.match(r"(==|>=|<=|!=|=|>|<)?(.*)", part)
        op, want = match[1], match[2].rstrip(".*")  # type: ignore[index]
        if not want:
            continue
        same = have[: len(key(want))] == key(want)  # conda's "=3.11" means 3.11.*
        ok = {
            None: same,
            "=": same,
            "==": same,
            "!=": not same,
            ">=": have >= key(want),
            "<=": have <= key(want),
            ">": have > key(want),
            "<": have < key(want),
        }[op]
        if not ok:
            return False
    return True


def runtime_requirements(spec: BuildSpec) -> list[str]:
    """What the runtime adds to the manifest's environment: pyspark for SparkPython, unless
    the manifest's requirements or conda file name it (then theirs is used)."""
    if spec.runtime != "spark-py":
        return []
    named = (spec.pip_requirements or "").splitlines()
    if spec.conda_file is not None:
        named += split_conda(spec.conda_file)[2]
    if any(requirement_name(line) == "pyspark" for line in named):
        return []
    return [SPARK_REQUIREMENT]


def requirement_name(line: str) -> str | None:
    """The normalised project name a requirement line installs (None for options, comments)."""
    match = _REQUIREMENT_NAME.match(line.strip())
    return re.sub(r"[-_.]+", "-", match[1]).lower() if match else None


def _plain(value: str, what: str) -> str:
    if _CONTROL.search(value):
        raise InvalidBuildSpec(f"conda file: {what} {value!r} contains a control character")
    return value


def model_dir_env(spec: BuildSpec) -> str:
    # As Azure: a single model's own <name>/<version> folder, else the root of all models.
    if not has_models(spec):
        return MODEL_ROOT
    versions = [v for m in Path(spec.model_dir).iterdir() if m.is_dir() for v in m.iterdir() if v.is_dir()]
    if len(versions) == 1:
        return f"{MODEL_ROOT}/{versions[0].parent.name}/{versions[0].name}"
    return MODEL_ROOT


def has_models(spec: BuildSpec) -> bool:
    return spec.model_dir is not None and any(Path(spec.model_dir).iterdir())


def _quote(value: str) -> str:
    """A Dockerfile double-quoted word: no variable expansion, no line breaks."""
    if _CONTROL.search(value):
        raise InvalidBuildSpec(f"control character in label or setting {value!r}")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


def read_pem(path: Path) -> bytes:
    data = Path(path).read_bytes()
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise InvalidBuildSpec(f"CA bundle {path} holds no PEM certificate")
    return data if data.endswith(b"\n") else data + b"\n"


def server_dir() -> Path:
    return Path(scoring_server.__file__).parent


def _tarinfo(name: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.mtime = kind, mode, size, FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, executable: bool = False) -> None:
    info = _tarinfo(name, tarfile.REGTYPE, 0o755 if executable else 0o644, len(data))
    tar.addfile(info, io.BytesIO(data))


def _add_tree(tar: tarfile.TarFile, root: Path, arcroot: str) -> None:
    tar.addfile(_tarinfo(arcroot, tarfile.DIRTYPE, 0o755))
    for path, rel in walk_tree(Path(root)):
        name = f"{arcroot}/{rel}"
        if path.is_dir():
            tar.addfile(_tarinfo(name, tarfile.DIRTYPE, 0o755))
            continue
        mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
        with path.open("rb") as f:
            tar.addfile(_tarinfo(name, tarfile.REGTYPE, mode, os.fstat(f.fileno()).st_size), f)


def walk_tree(root: Path, prefix: str = "") -> Iterator[tuple[Path, str]]:
    """(path, relative name) of every file and folder under root, sorted, parents first;
    refuses links and special files (they could point outside the build)."""
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name == "__pycache__" or entry.name.endswith(".pyc"):
            continue
        rel = f"{prefix}{entry.name}"
        if entry.is_symlink() or not (entry.is_file() or entry.is_dir()):
            raise InvalidBuildSpec(f"{rel}: only regular files and folders can be built in")
        yield Path(entry.path), rel
        if entry.is_dir():
            yield from walk_tree(Path(entry.path), f"{rel}/")


def start_script(python: str) -> str:
    """The image's CMD: the scoring server under ``python``, behind tini when the base has it."""
    python = shlex.quote(python)
    return f"""\
#!/bin/sh
# tini, when the base has it, reaps score.py's child processes and forwards signals.
if command -v tini >/dev/null 2>&1; then
    exec tini -- {python} -m scoring_server "$@"
fi
exec {python} -m scoring_server "$@"
"""


def runtime_env(spec: BuildSpec, pythonpath: str) -> dict[str, str]:
    """The environment the scoring server reads, as Azure ML's images set it."""
    env = {
        "AML_APP_ROOT": APP_ROOT,
        "AZUREML_ENTRY_SCRIPT": spec.driver_program,
        "AZUREML_MODEL_DIR": model_dir_env(spec),
        "HOME": RUN_HOME,  # the image's user's own folder: what a library caches goes there
        "PORT": str(PORT),
        "PYTHONPATH": pythonpath,
    }
    if spec.runtime != "python":
        env["SCORING_RUNTIME"] = spec.runtime  # the server starts Spark before init()
    return env


# The image's user: a name in /etc/passwd and /etc/group (getpass.getuser(), Spark's Hadoop
# login and others ask for one) unless the base has that name or number already, a home it
# owns, and /tmp writable by all (sticky). Only sh, grep and tail: any base with a shell.
_USER_SCRIPT = f"""\
set -eu
add() {{
    if [ -f "$1" ] && grep -q -e "^{RUN_USER}:" -e "^[^:]*:[^:]*:{RUN_UID}:" "$1"; then return 0; fi
    if [ -s "$1" ] && [ -n "$(tail -c 1 "$1")" ]; then echo >>"$1"; fi
    echo "$2" >>"$1"
}}
add /etc/group '{RUN_USER}:x:{RUN_GID}:'
add /etc/passwd '{RUN_USER}:x:{RUN_UID}:{RUN_GID}:scoring server:{RUN_HOME}:/usr/sbin/nologin'
mkdir -p {RUN_HOME} /tmp
chown {RUN_UID}:{RUN_GID} {RUN_HOME}
chmod 0755 {RUN_HOME}
chmod 1777 /tmp
"""

_SETUP_SCRIPT = """\
#!/bin/sh
# Create the environment from the conda file: with conda if the base has it, else with pip.
set -eu
if command -v conda >/dev/null 2>&1; then
    conda env update -n base -f /opt/mms/env/conda.yml
    conda clean -afy
    "$(conda info --base)/bin/python" -m venv --system-site-packages {venv}
    exit 0
fi
{fail_conda_only}
python3 -c {check_python}
python3 -m venv {venv}
{pip} -r /opt/mms/env/conda-pip.txt
"""

# Run by the base's python3: is it what the conda file's `python` entry asks for?
_PYTHON_CHECK = """\
import platform, re, sys
spec = {spec}
have = platform.python_version()
def key(v): return tuple(int(p) for p in re.findall(r"\\d+", v)[:3])
ok = True
for part in (spec or "").replace(" ", "").split(","):
    op, want = re.match(r"(==|>=|<=|!=|=|>|<)?(.*)", part).groups()
    want = want.rstrip(".*")
    if not want:
        continue
    same = key(have)[:len(key(want))] == key(want)  # conda's "=3.11" means 3.11.*
    ok &= {{None: same, "=": same, "==": same, "!=": not same,
            ">=": key(have) >= key(want), "<=": key(have) <= key(want),
            ">": key(have) > key(want), "<": key(have) < key(want)}}[op]
if not ok:
    sys.exit(f"mms: the conda file asks for python{{spec}} but the base image has Python "
             f"{{have}} and no conda")
"""
