"""The generated build context and Dockerfile, and the failure explanations (no engine)."""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from tests.dockerfile_smuggling import SMUGGLING
from workers.build_context import (
    BuildSpec,
    InvalidBuildSpec,
    RegistryCredentials,
    parse_extra_steps,
    write_context,
)
from workers.builders import BuildFailed
from workers.builders.docker import explain_build_failure, explain_registry_error
from workers.builders.oci import check_extra_steps

CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


@pytest.fixture
def spec(tmp_path: Path) -> BuildSpec:
    app, models = tmp_path / "app", tmp_path / "models"
    (app / "lib").mkdir(parents=True)
    (app / "score.py").write_text("def init(): pass\ndef run(d): return d\n")
    (app / "lib" / "helper.py").write_text("X = 1\n")
    (models / "m" / "2").mkdir(parents=True)
    (models / "m" / "2" / "w.bin").write_bytes(b"\0" * 10)
    (tmp_path / "ca.pem").write_text(CERT)
    return BuildSpec(
        base_image="127.0.0.1:5000/mms/base:py3.11",
        driver_program="score.py",
        app_dir=app,
        model_dir=models,
        pip_requirements="six\n",
        labels={"org.mms.manifest": "m1", "price": "$5"},
        ca_bundles=(tmp_path / "ca.pem",),
    )


def instructions(dockerfile: str) -> list[str]:
    return [line for line in dockerfile.splitlines() if line and not line.startswith("#")]


def test_context_is_byte_for_byte_deterministic(spec, tmp_path):
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    write_context(spec, first)
    os.utime(spec.app_dir / "score.py", (1, 1))  # a touched file changes nothing
    write_context(spec, second)

    assert hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(second.read_bytes()).digest()
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(946684800, 0, 0, "")}
    names = [m.name for m in members]
    assert names[0] == "Dockerfile"
    assert "app/lib/helper.py" in names and "models/m/2/w.bin" in names
    assert "mms/runtime/lib/scoring_server/__main__.py" in names
    assert not [n for n in names if "__pycache__" in n]


def test_dockerfile_puts_models_after_environment_and_code(spec, tmp_path):
    info = write_context(spec, tmp_path / "c.tar")
    lines = instructions(info.dockerfile)

    assert len(lines) == len(info.steps)
    order = [
        info.steps.index(s)
        for s in (
            "base",
            "ca-certs",
            "environment",
            "scoring-server-deps",
            "requirements",
            "scoring-server",
            "driver",
            "models",
            "metadata",
        )
    ]
    assert order == sorted(order)
    assert lines[info.steps.index("models")] == "COPY models/ /var/azureml-app/azureml-models/"
    assert 'LABEL "org.mms.manifest"="m1" "price"="\\$5"' in lines
    assert 'AZUREML_MODEL_DIR="/var/azureml-app/azureml-models/m/2"' in info.dockerfile
    assert "ARG PIP_CERT=/opt/mms/ca/bundle.pem" in lines  # build-time only, not ENV
    assert lines[-1] == 'CMD ["/opt/mms/bin/start"]'


def test_model_dir_points_at_the_root_when_there_are_several_models(spec, tmp_path):
    (spec.model_dir / "other" / "1").mkdir(parents=True)
    info = write_context(spec, tmp_path / "c.tar")
    assert 'AZUREML_MODEL_DIR="/var/azureml-app/azureml-models"' in info.dockerfile


def test_extra_steps_keep_continuations_and_drop_comments():
    steps = parse_extra_steps("# set up\nrun apt-get update \\\n  # why\n  && echo ok\n\nENV A=1\r\n")
    assert [step.render() for step in steps] == ['RUN ["/bin/sh", "-c", "apt-get update   && echo ok"]', "ENV A=1"]


@pytest.mark.parametrize(
    "text",
    [
        "COPY / /x",
        "FROM scratch",
        "ONBUILD RUN x",
        'ENTRYPOINT ["sh"]',
        "USER root",
        "RUN echo \\",  # would swallow the generated instructions after it
        "RUN echo a\x00b",
    ],
)
def test_extra_steps_outside_the_allowed_instructions_are_refused(text):
    with pytest.raises(InvalidBuildSpec):
        parse_extra_steps(text)


def test_the_dockerfile_holds_the_steps_as_written_anew_never_the_tenants_text(spec, tmp_path):
    steps = 'run echo one \\\n    two\nENV GREETING="hello world"\nEXPOSE 9000'
    info = write_context(replace(spec, extra_dockerfile_steps=steps), tmp_path / "c.tar")
    extra = [
        line for line, step in zip(instructions(info.dockerfile), info.steps, strict=True) if step == "extra-steps"
    ]
    assert extra == ['RUN ["/bin/sh", "-c", "echo one     two"]', 'ENV GREETING="hello world"', "EXPOSE 9000"]


def test_the_dockerfile_builds_as_root_and_runs_as_its_own_user_after_every_extra_step(spec, tmp_path):
    info = write_context(replace(spec, extra_dockerfile_steps="RUN id -u\nENV A=1"), tmp_path / "c.tar")
    lines = instructions(info.dockerfile)
    users = [(index, line) for index, line in enumerate(lines) if line.startswith("USER ")]
    # Root from the base on (whatever user the base names), the image's own user last but CMD.
    assert users == [(1, "USER 0:0"), (len(lines) - 2, "USER 10002:10002")]
    assert max(i for i, step in enumerate(info.steps) if step == "extra-steps") < len(lines) - 2
    assert "scoring:x:10002:10002:scoring server:/home/scoring:" in lines[2] and "chmod 1777 /tmp" in lines[2]
    assert 'HOME="/home/scoring"' in info.dockerfile


def test_conda_file_needs_dependencies(spec, tmp_path):
    bad = replace(spec, conda_file="name: x\n")
    with pytest.raises(InvalidBuildSpec, match="dependencies"):
        write_context(bad, tmp_path / "c.tar")


def test_conda_only_packages_are_named_in_the_setup_script(spec, tmp_path):
    conda = "dependencies:\n  - python=3.11\n  - pip\n  - conda-forge::numpy\n  - pip:\n    - six==1.16\n"
    write_context(replace(spec, conda_file=conda), tmp_path / "c.tar")
    with tarfile.open(tmp_path / "c.tar") as tar:
        setup = tar.extractfile("mms/env/setup.sh").read().decode()
        pip = tar.extractfile("mms/env/conda-pip.txt").read().decode()
    assert "conda env update -n base -f /opt/mms/env/conda.yml" in setup
    assert "cannot be installed: conda-forge::numpy " in setup
    assert pip == "six==1.16\n"


@pytest.mark.parametrize(
    "change, match",
    [
        ({"driver_program": "missing.py"}, "not among the app files"),
        ({"driver_program": "../score.py"}, "relative path"),
        ({"runtime": "r"}, "not supported"),
        ({"base_image": "base\nCOPY / /x"}, "invalid base image"),
        ({"labels": {"a": "line\nbreak"}}, "control character"),
    ],
)
def test_invalid_specs_are_refused(spec, tmp_path, change, match):
    with pytest.raises(InvalidBuildSpec, match=match):
        write_context(replace(spec, **change), tmp_path / "c.tar")


def test_symlinks_are_not_built_in(spec, tmp_path):
    (spec.app_dir / "link").symlink_to("/etc/passwd")
    with pytest.raises(InvalidBuildSpec, match="link"):
        write_context(spec, tmp_path / "c.tar")


def test_registry_password_is_not_in_repr():
    assert "hunter2" not in repr(RegistryCredentials("r.example", "u", "hunter2"))


def test_build_failures_are_explained_in_one_line():
    pip = ["Collecting nope==1", "ERROR: No matching distribution found for nope==1"]
    assert "nope==1" in explain_build_failure("The command '/bin/sh -c pip' returned a non-zero code: 1", pip)
    tls = [
        "Could not fetch URL https://pypi.org/simple/x/: [SSL: CERTIFICATE_VERIFY_FAILED]",
        "ERROR: No matching distribution found for x",
    ]
    assert "TLS certificate" in explain_build_failure("...", tls)
    generic = explain_build_failure(
        "The command '/bin/sh -c false\nx' returned a non-zero code: 2", ["Step 3/9 : RUN false", "boom here"]
    )
    assert generic == "a command exited with code 2: boom here"
    assert "requires authentication" in explain_registry_error(
        "Head http://r/v2/x/manifests/1: no basic auth credentials", "r", False
    )


@pytest.mark.parametrize("name", SMUGGLING)
def test_both_builders_refuse_every_smuggling_attempt(spec, tmp_path, name):
    # A manifest stored before a rule existed reaches the builders unchecked by the API.
    text, fragment = SMUGGLING[name]
    with pytest.raises(InvalidBuildSpec, match=re.escape(fragment)):
        write_context(replace(spec, extra_dockerfile_steps=text), tmp_path / "c.tar")
    assert not (tmp_path / "c.tar").exists()
    with pytest.raises(BuildFailed, match=re.escape(fragment)) as failed:
        check_extra_steps(text)
    assert failed.value.step == "extra-steps"
