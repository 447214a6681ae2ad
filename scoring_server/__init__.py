"""Scoring server baked into every built image: runs an Azure ML ``score.py`` unchanged.

The driver script's ``init()`` is called once before the port is opened and ``run(raw_data)``
once per ``POST /score`` with the request body as a str; the return value is sent as JSON.
Start it with ``python -m scoring_server``. Settings come from the environment:

=========================  ===============================================================
``AZUREML_ENTRY_SCRIPT``   driver script; relative paths resolve against ``AML_APP_ROOT``
                           (else the working directory, then ``/var/azureml-app``);
                           default ``score.py``
``AZUREML_MODEL_DIR``      model files; set to ``/var/azureml-app/azureml-models`` if unset
``PORT`` / ``HOST``        listen address; default ``0.0.0.0:5001`` as Azure's server
``SCORING_MAX_BODY_BYTES`` request body limit, 413 above it; default 100 MiB
``SCORING_LOG_LEVEL``      ``INFO`` by default; tracebacks of failed run() calls are ERROR
``SCORING_HTTP``           ``auto`` (httptools if installed, else h11) / ``h11`` / ``httptools``
``SCORING_LOOP``           ``auto`` (uvloop if installed, else asyncio) / ``asyncio`` / ``uvloop``
``SCORING_RUNTIME``        ``python`` (default) or ``spark-py``: a local SparkSession starts
                           before the script loads (see ``scoring_server.spark``)
=========================  ===============================================================

It runs on the base image's own Python, 3.8 or newer: the modules use nothing newer at run
time (annotations stay strings), and ``workers.build_context.SERVER_REQUIREMENTS`` picks, by
environment marker, the uvicorn and click releases that run on the image's Python.

Why uvicorn and a bare ASGI callable rather than a framework or ``http.server``: uvicorn and
h11 are pure-Python wheels (plus click), so the server installs into any image, while the
compiled httptools/uvloop speed-ups are picked up automatically when present. A bare ASGI
callable with three routes needs no router. ``http.server`` would need a thread per
connection and has no request-size or keep-alive hardening; uvicorn is well exercised.

``run()`` executes on one dedicated thread, one call at a time like Azure's default single
sync worker (scoring scripts are rarely thread-safe), so health checks keep answering while
a long ``run()`` is busy.

Not supported (Azure features beyond plain scripts): ``@rawhttp``, ``@input_schema`` argument
binding, ``WORKER_COUNT`` > 1 and ``GET /score`` with query parameters (answered with 405).
"""

import os as _os
import site as _site

# The oci builder installs packages into a plain folder named by MMS_SITE_PACKAGES and put
# on PYTHONPATH (so they win over the base image's); Python processes the .pth files only
# of site folders, so register it as one (it is already on sys.path and keeps its place).
if _os.environ.get("MMS_SITE_PACKAGES"):
    _site.addsitedir(_os.environ["MMS_SITE_PACKAGES"])
