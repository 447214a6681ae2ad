"""What a SparkPython build adds, checked without an engine: the Java check, the default
pyspark pin (and when it is left out), the runtime setting, Java detection in base layers."""

from __future__ import annotations

import tarfile
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from app.config import Settings
from tests.workers.oci.test_python_env import _layer, _openers
from workers.build_context import SPARK_REQUIREMENT, BuildSpec, runtime_requirements, write_context
from workers.builders.oci import _requirements
from workers.oci.python_env import detect_java, source_only
from workers.pipeline import default_base

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def spark_spec(tmp_path: Path) -> BuildSpec:
    app = tmp_path / "app"
    app.mkdir()
    (app / "score.py").write_text("def init(): pass\ndef run(d): return d\n")
    return BuildSpec(
        base_image="127.0.0.1:5000/mms/inference-base:py3.11-spark",
        driver_program="score.py",
        app_dir=app,
        runtime="spark-py",
        pip_requirements="numpy==2.4.6\n",
    )


def _dockerfile(spec: BuildSpec, tmp_path: Path) -> tuple[list[str], str]:
    info = write_context(spec, tmp_path / "c.tar")
    with tarfile.open(tmp_path / "c.tar") as tar:
        assert tar.extractfile("Dockerfile").read().decode() == info.dockerfile
    return info.dockerfile.splitlines(), info.dockerfile


def test_the_dockerfile_checks_for_java_first_and_adds_the_pinned_pyspark(spark_spec, tmp_path) -> None:
    lines, text = _dockerfile(spark_spec, tmp_path)
    assert lines[0].startswith("FROM ")
    assert lines[1].startswith("RUN ") and "command -v java" in lines[1]
    assert "mms: the base image has no Java runtime" in lines[1]
    [pin] = [line for line in lines if SPARK_REQUIREMENT in line]
    # Its own layer, before the manifest's requirements: shared by every Spark image.
    assert lines.index(pin) < next(i for i, line in enumerate(lines) if "requirements.txt" in line)
    assert '"SCORING_RUNTIME"="spark-py"' in text or 'SCORING_RUNTIME="spark-py"' in text


def test_a_python_manifest_gets_neither_java_check_nor_pyspark(spark_spec, tmp_path) -> None:
    _, text = _dockerfile(replace(spark_spec, runtime="python"), tmp_path)
    assert "java" not in text and "pyspark" not in text and "SCORING_RUNTIME" not in text


@pytest.mark.parametrize(
    "change",
    [
        {"pip_requirements": "PySpark[ml]==3.5.8  # theirs\n"},
        {"pip_requirements": None, "conda_file": "dependencies:\n  - python=3.11\n  - pip:\n    - pyspark>=3.5,<3.6\n"},
    ],
)
def test_a_pyspark_the_manifest_names_is_used_instead_of_the_pin(spark_spec, tmp_path, change) -> None:
    spec = replace(spark_spec, **change)
    assert runtime_requirements(spec) == []
    _, text = _dockerfile(spec, tmp_path)
    assert SPARK_REQUIREMENT not in text
    assert SPARK_REQUIREMENT not in _requirements(spec)


def test_the_oci_builder_adds_the_pin_and_builds_only_pyspark_from_source(spark_spec) -> None:
    requirements = _requirements(spark_spec)
    assert SPARK_REQUIREMENT in requirements and "numpy==2.4.6" in requirements
    assert source_only(requirements) == [SPARK_REQUIREMENT]
    assert source_only(["pysparkling==1", "numpy"]) == []


def test_the_default_pin_is_the_version_the_tests_train_with() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert SPARK_REQUIREMENT in pyproject["project"]["optional-dependencies"]["test"]


def test_java_is_found_by_label_or_in_the_layers_unless_a_later_layer_removes_it() -> None:
    def no_scan():
        raise AssertionError("the layers were read although the label says it")

    assert detect_java({"config": {"Labels": {"org.mms.java": "17.0.19"}}}, no_scan) == "17.0.19"
    jre = _layer({"usr/lib/jvm/java-17-openjdk-amd64/bin/java": b"elf", "usr/bin/java": "/etc/alternatives/java"})
    plain = _layer({"usr/bin/python3.11": b"elf"})
    assert detect_java({"config": {}}, _openers(plain, jre)) == "/usr/bin/java"
    assert detect_java({"config": {}}, _openers(plain)) is None
    removed = _layer({"usr/lib/jvm/.wh.java-17-openjdk-amd64": b"", "usr/bin/.wh.java": b""})
    assert detect_java({"config": {}}, _openers(jre, removed)) is None
    temurin = _layer({"opt/java/openjdk/bin/java": b"elf"})
    assert detect_java({"config": {}}, _openers(temurin)) == "/opt/java/openjdk/bin/java"


def test_spark_manifests_default_to_the_spark_base_not_the_plain_default(tmp_path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        registry="r.example:5000",
        secret_key="k" * 40,
        default_base_image="r.example:5000/mms/base:py3.11",
    )
    assert default_base(settings, None) == "r.example:5000/mms/base:py3.11"
    assert default_base(settings, None, "spark-py") == "r.example:5000/mms/inference-base:py3.11-spark"
    published = "r.example:5000/mms/inference-base:py3.11-spark-20300101"
    assert default_base(settings, published, "spark-py") == published
