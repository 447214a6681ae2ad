"""The SparkPython runtime: one local SparkSession, started before the driver script loads.

With ``SCORING_RUNTIME=spark-py`` (set in images built from a ``SparkPython`` manifest) the
server starts the session before it imports the script, so a script reaches it at import
time or in ``init()``, as it did in Azure ML's Spark images::

    from scoring_server.spark import spark          # the running SparkSession

    def init():
        global model
        model = PipelineModel.load(os.path.join(os.environ["AZUREML_MODEL_DIR"], "housing.model"))

``SparkSession.builder.getOrCreate()`` in a script returns this same session. Spark starts
in full before the port opens, so no request waits for it, and its JVM logs only warnings
(to stderr), so a request's path stays quiet. Settings, all from the environment:

===============================  ==========================================================
``SPARK_MASTER``                 ``local[*]``: every core of the container
``SPARK_DRIVER_MEMORY``          ``512m``: the JVM heap (the driver runs the executors too)
``SPARK_UI_ENABLED``             ``false``: no web UI (it costs start-up time and a port)
``SPARK_LOG_LEVEL``              ``WARN``: the JVM's log level (log4j2)
``SPARK_DRIVER_JAVA_OPTIONS``    JVM flags; default ``-XX:+UseSerialGC -XX:TieredStopAtLevel=1``
                                 (a small heap and a fast start matter more than peak speed)
``SCORING_SPARK_CONF``           more ``key=value`` Spark settings, separated by spaces
===============================  ==========================================================

``PYSPARK_SUBMIT_ARGS`` and ``JAVA_HOME`` keep their usual meaning.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["session_config", "spark", "start_session"]

log = logging.getLogger("scoring_server.spark")

spark: Any = None  # the SparkSession, once start_session() has run

DEFAULT_JAVA_OPTIONS = "-XX:+UseSerialGC -XX:TieredStopAtLevel=1"
_LOG4J2 = """\
# Written by scoring_server.spark: Spark's JVM logs {level} and above, to stderr only.
rootLogger.level = {level}
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{{yy/MM/dd HH:mm:ss}} %p %c{{1}}: %m%n%ex
# Expected on a plain JRE, said once per start or first request: not worth a line.
logger.netlib.name = dev.ludovic.netlib
logger.netlib.level = error
logger.hadoop.name = org.apache.hadoop.util.NativeCodeLoader
logger.hadoop.level = error
"""


def session_config(env: Mapping[str, str], log4j_file: str) -> dict[str, str]:
    """The Spark settings the session starts with, defaults overridden by ``env``."""
    java_options = env.get("SPARK_DRIVER_JAVA_OPTIONS", DEFAULT_JAVA_OPTIONS)
    conf = {
        "spark.master": env.get("SPARK_MASTER") or "local[*]",
        "spark.app.name": "scoring_server",
        "spark.driver.memory": env.get("SPARK_DRIVER_MEMORY") or "512m",
        "spark.ui.enabled": env.get("SPARK_UI_ENABLED") or "false",
        "spark.ui.showConsoleProgress": "false",  # a progress bar per job, on stderr
        # Local mode: nothing connects from outside, and the container's host name may not
        # resolve (host networking), which would cost a DNS timeout at start.
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{log4j_file} {java_options}".strip(),
        # A scoring request holds a few rows: one partition after a shuffle, not 200.
        "spark.sql.shuffle.partitions": "1",
    }
    for item in shlex.split(env.get("SCORING_SPARK_CONF") or ""):
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("spark."):
            raise ValueError(f"SCORING_SPARK_CONF: expected spark.<name>=<value>, got {item!r}")
        conf[key] = value
    return conf


def start_session(env: Mapping[str, str] = os.environ) -> Any:
    """Start the local SparkSession, publish it as ``scoring_server.spark.spark``, return it."""
    global spark
    started = time.monotonic()
    level = (env.get("SPARK_LOG_LEVEL") or "WARN").upper()
    # Python workers (UDFs) must run this interpreter, which sees the image's packages.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    # py4j logs every call at DEBUG/INFO: keep it out of the request path.
    logging.getLogger("py4j").setLevel(logging.WARNING)
    conf_dir = tempfile.mkdtemp(prefix="scoring-spark-")
    log4j_file = os.path.join(conf_dir, "log4j2.properties")
    with open(log4j_file, "w", encoding="utf-8") as f:
        f.write(_LOG4J2.format(level=level))
    conf = session_config(env, log4j_file)

    from pyspark.sql import SparkSession  # the image has it; plain Python images never import it

    builder = SparkSession.builder
    for key, value in conf.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel(level)
    spark = session
    log.info(
        "Spark %s started in %.1f s (master %s, driver memory %s)",
        session.version,
        time.monotonic() - started,
        conf["spark.master"],
        conf["spark.driver.memory"],
    )
    return session
