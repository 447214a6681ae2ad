"""The SparkPython runtime of the scoring server: a real local SparkSession, a real PipelineModel."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from scoring_server.spark import DEFAULT_JAVA_OPTIONS, session_config
from tests.workers.spark_housing import SPARK_SCORE_PY, HousingModel, train_housing_model

from . import scoring_server_harness as harness

SAME_SESSION_PY = (
    SPARK_SCORE_PY
    + """
from pyspark.sql import SparkSession

def run(raw_data):  # replaces the plain run above
    frame = spark.createDataFrame(json.loads(raw_data)["data"], ["rooms", "age", "distance"])
    return {"predictions": [r.prediction for r in model.transform(frame).select("prediction").collect()],
            "same_session": SparkSession.builder.getOrCreate() is spark,
            "ui": spark.sparkContext.uiWebUrl,
            "master": spark.sparkContext.master,
            "memory": spark.conf.get("spark.driver.memory")}
"""
)


@pytest.fixture(scope="module")
def housing(tmp_path_factory: pytest.TempPathFactory) -> HousingModel:
    return train_housing_model(tmp_path_factory.mktemp("spark-model"))


def test_the_session_starts_before_init_and_scores_as_the_model_predicts(
    tmp_path: Path, start_server, housing: HousingModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(harness, "STARTUP_TIMEOUT", 180.0)  # a JVM, on 2 shared cores
    # The model sits where the image puts it: $AZUREML_MODEL_DIR/housing.model.
    shutil.copytree(housing.folder, tmp_path / "models" / "housing.model")
    server = start_server(
        SAME_SESSION_PY,
        env={
            "SCORING_RUNTIME": "spark-py",
            "AZUREML_MODEL_DIR": str(tmp_path / "models"),
            "SPARK_DRIVER_MEMORY": "640m",
        },
    )
    answer = server.score({"data": housing.rows})
    assert answer.status == 200, answer.body
    body = answer.json()
    assert body["predictions"] == housing.predictions
    assert body["same_session"] is True  # a script's own getOrCreate() gets the runtime's
    assert body["ui"] is None and body["master"] == "local[*]" and body["memory"] == "640m"
    again = server.score({"data": housing.rows[:2]})
    assert again.json()["predictions"] == housing.predictions[:2]
    log = server.stderr()
    assert "Spark 3.5.9 started in" in log
    # Spark's start-up chatter (INFO lines, the progress bar) stays out of the log.
    assert " INFO SparkContext" not in log and "[Stage " not in log
    assert "py4j" not in log


def test_an_unknown_runtime_fails_at_start_naming_the_known_ones(start_server, monkeypatch) -> None:
    monkeypatch.setattr(harness, "STARTUP_TIMEOUT", 60.0)
    with pytest.raises(AssertionError, match="SCORING_RUNTIME must be one of python, spark-py"):
        start_server("def init():\n    pass\n\ndef run(d):\n    return d\n", env={"SCORING_RUNTIME": "spark"})


def test_session_settings_default_to_a_quick_small_local_session(tmp_path: Path) -> None:
    conf = session_config({}, "/tmp/l.properties")
    assert conf["spark.master"] == "local[*]"
    assert conf["spark.ui.enabled"] == "false"
    assert conf["spark.driver.memory"] == "512m"
    assert conf["spark.driver.extraJavaOptions"] == (
        f"-Dlog4j2.configurationFile=file:/tmp/l.properties {DEFAULT_JAVA_OPTIONS}"
    )


def test_session_settings_are_overridden_by_the_environment() -> None:
    conf = session_config(
        {
            "SPARK_MASTER": "local[2]",
            "SPARK_DRIVER_MEMORY": "2g",
            "SPARK_UI_ENABLED": "true",
            "SPARK_DRIVER_JAVA_OPTIONS": "",
            "SCORING_SPARK_CONF": "spark.sql.shuffle.partitions=8 spark.executor.cores=1",
        },
        "/l",
    )
    assert conf["spark.master"] == "local[2]" and conf["spark.driver.memory"] == "2g"
    assert conf["spark.ui.enabled"] == "true"
    assert conf["spark.driver.extraJavaOptions"] == "-Dlog4j2.configurationFile=file:/l"
    assert conf["spark.sql.shuffle.partitions"] == "8" and conf["spark.executor.cores"] == "1"
    with pytest.raises(ValueError, match="SCORING_SPARK_CONF"):
        session_config({"SCORING_SPARK_CONF": "shuffle=8"}, "/l")
