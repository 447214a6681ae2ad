"""Fixtures for the builder tests: a BuildSpec factory over the shared infra fixture."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.embedded_service import HOST_CA_BUNDLE
from tests.infra import Infra
from workers.build_context import BuildSpec


@pytest.fixture
def make_spec(infra: Infra, tmp_path: Path) -> Callable[..., BuildSpec]:
    """Write a driver (and model files) under tmp_path and return a BuildSpec for them."""
    count = 0

    def make(score: str, *, models: dict[str, bytes] | None = None, **overrides) -> BuildSpec:
        nonlocal count
        count += 1
        app, model_dir = tmp_path / f"app{count}", tmp_path / f"models{count}"
        app.mkdir()
        (app / "score.py").write_text(score)
        for relative, data in (models or {}).items():
            (model_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            (model_dir / relative).write_bytes(data)
        values = {
            "base_image": infra.base_image,
            "driver_program": "score.py",
            "app_dir": app,
            "model_dir": model_dir if models else None,
            "ca_bundles": (HOST_CA_BUNDLE,) if HOST_CA_BUNDLE.is_file() else (),
        }
        values.update(overrides)
        return BuildSpec(**values)

    return make


@pytest.fixture
def log_lines() -> list[str]:
    """A build log: every line the code under test writes."""
    return []
