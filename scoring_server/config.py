"""Settings read once from the environment at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_APP_ROOT = Path("/var/azureml-app")
DEFAULT_MODEL_DIR = str(DEFAULT_APP_ROOT / "azureml-models")
DEFAULT_PORT = 5001  # Azure's inference server port, so existing probes keep working
DEFAULT_MAX_BODY_BYTES = 100 * 1024 * 1024
RUNTIMES = ("python", "spark-py")


@dataclass(frozen=True)
class Settings:
    """Everything the server reads from the environment."""

    entry_script: Path
    model_dir: str
    host: str
    port: int
    max_body_bytes: int
    log_level: str
    http: str
    loop: str
    runtime: str = "python"  # spark-py: a SparkSession is started before init()
    app_root: Path | None = None  # AML_APP_ROOT: the source directory's root, importable as Azure's is

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """Build settings from ``env`` (``os.environ`` by default)."""
        return cls(
            entry_script=resolve_entry_script(env),
            model_dir=env.get("AZUREML_MODEL_DIR") or DEFAULT_MODEL_DIR,
            host=env.get("HOST") or "0.0.0.0",
            port=_int(env, "PORT", DEFAULT_PORT),
            max_body_bytes=_int(env, "SCORING_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
            log_level=(env.get("SCORING_LOG_LEVEL") or "INFO").upper(),
            http=env.get("SCORING_HTTP") or "auto",
            loop=env.get("SCORING_LOOP") or "auto",
            runtime=_runtime(env),
            app_root=Path(env["AML_APP_ROOT"]) if env.get("AML_APP_ROOT") else None,
        )


def _runtime(env: Mapping[str, str]) -> str:
    runtime = (env.get("SCORING_RUNTIME") or "python").lower()
    if runtime not in RUNTIMES:
        raise ValueError(f"SCORING_RUNTIME must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    return runtime


def resolve_entry_script(env: Mapping[str, str]) -> Path:
    """Find the driver script the way Azure's server does, falling back to the image layout."""
    script = Path(env.get("AZUREML_ENTRY_SCRIPT") or "score.py")
    if script.is_absolute():
        return script
    roots = [Path(env["AML_APP_ROOT"])] if env.get("AML_APP_ROOT") else [Path.cwd()]
    roots.append(DEFAULT_APP_ROOT)
    for root in roots:
        if (root / script).is_file():
            return (root / script).resolve()
    return roots[0] / script  # missing: the loader reports this path


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
