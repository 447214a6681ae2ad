"""The seed's pySpark example for the SparkPython tests: a small ``housing.model`` trained here.

Training runs in a child process (pyspark's JVM and its warnings stay out of pytest's own),
with the host's Java and the pinned pyspark the test extra installs.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from workers.build_context import walk_tree

# score.py as a SparkPython manifest ships it: the session comes from the runtime.
SPARK_SCORE_PY = """
import json, os
from pyspark.ml import PipelineModel
from scoring_server.spark import spark

def init():
    global model
    model = PipelineModel.load(os.path.join(os.environ["AZUREML_MODEL_DIR"], "housing.model"))

def run(raw_data):
    frame = spark.createDataFrame(json.loads(raw_data)["data"], ["rooms", "age", "distance"])
    return [row.prediction for row in model.transform(frame).select("prediction").collect()]
"""

_TRAIN = """
import json, sys
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.feature import VectorAssembler
from pyspark.ml.regression import LinearRegression
from pyspark.sql import SparkSession

spark = (SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false")
         .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
         .getOrCreate())
spark.sparkContext.setLogLevel("ERROR")
rows = [(float(3 + i % 5), float(10 + 7 * i % 40), float(1 + i % 9)) for i in range(24)]
train = spark.createDataFrame([(r, a, d, 50 + 20 * r - 0.3 * a - 4 * d + (i % 3)) for i, (r, a, d) in enumerate(rows)],
                              ["rooms", "age", "distance", "label"])
stages = [VectorAssembler(inputCols=["rooms", "age", "distance"], outputCol="features"),
          LinearRegression(maxIter=10)]
Pipeline(stages=stages).fit(train).write().overwrite().save(sys.argv[1])
sample = [list(r) for r in rows[:5]]
# Predictions of the model as saved and loaded back, as the image will load it.
loaded = PipelineModel.load(sys.argv[1])
frame = spark.createDataFrame(sample, ["rooms", "age", "distance"])
predicted = [row.prediction for row in loaded.transform(frame).select("prediction").collect()]
print(json.dumps({"rows": sample, "predictions": predicted}))
spark.stop()
"""


@dataclass(frozen=True)
class HousingModel:
    folder: Path  # .../housing.model
    rows: list[list[float]]
    predictions: list[float]

    def zipped(self) -> bytes:
        """The folder as a zip whose root is ``housing.model/``, as the seed registers it."""
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for path, rel in walk_tree(self.folder):
                if path.is_file():
                    zf.write(path, f"{self.folder.name}/{rel}")
        return archive.getvalue()


def train_housing_model(dest: Path) -> HousingModel:
    """Train a VectorAssembler + LinearRegression ``PipelineModel`` and save it under ``dest``."""
    folder = dest / "housing.model"
    done = subprocess.run(
        [sys.executable, "-c", _TRAIN, str(folder)], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return HousingModel(folder, result["rows"], result["predictions"])
