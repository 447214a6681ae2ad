"""``python -m scoring_server``: load the script, call init(), then serve until SIGTERM."""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback

from .app import ScoringApp, default_swagger
from .config import Settings
from .user_script import UserScript


def main() -> int:
    """Start the server; return 1 with the traceback on stderr if the script fails to init."""
    settings = Settings.from_env()
    # print() in score.py should reach `docker logs` now, not when a block buffer fills.
    sys.stdout.reconfigure(line_buffering=True)
    logging.basicConfig(
        stream=sys.stderr,
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Scripts read this at import or in init(), so it must be set before either.
    os.environ["AZUREML_MODEL_DIR"] = settings.model_dir
    try:
        if settings.runtime == "spark-py":
            # Before the script is imported: it may take the session at import time.
            from . import spark

            spark.start_session()
        script = UserScript(settings.entry_script, settings.app_root)
        script.init()
    except BaseException:  # noqa: BLE001 - anything, even SystemExit: the image must not look healthy
        traceback.print_exc()
        print(f"scoring_server: init of {settings.entry_script} failed", file=sys.stderr)
        return 1
    app = ScoringApp(script, settings.max_body_bytes, _swagger(settings))
    serve(app, settings)
    return 0


def serve(app: ScoringApp, settings: Settings) -> None:
    """Serve ``app`` with uvicorn until a shutdown signal."""
    import uvicorn  # imported late so a broken script fails fast, before the server loads

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=settings.http,
        loop=settings.loop,
        lifespan="off",
        interface="asgi3",
        log_config=None,  # keep our logging setup; uvicorn's loggers propagate to it
        log_level=settings.log_level.lower(),
        access_log=False,  # a log line per request would cost more than scoring a tiny model
        proxy_headers=False,
        server_header=False,
    )
    uvicorn.Server(config).run()


def _swagger(settings: Settings) -> bytes:
    # A swagger.json shipped beside the script (as Azure SDK builds do) wins over the default.
    shipped = settings.entry_script.parent / "swagger.json"
    if shipped.is_file():
        return shipped.read_bytes()
    return json.dumps(default_swagger(settings.entry_script.stem)).encode()


if __name__ == "__main__":
    sys.exit(main())
