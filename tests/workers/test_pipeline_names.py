"""A model or asset whose name is not one path segment (a row from before the API refused
such names) fails the fetch step before anything is written outside the build's tree."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from app.context import ServiceContext
from workers.pipeline import BuildInputs, Source, StepFailed, fetch_step


def _inputs(**kinds: dict[str, Source]) -> BuildInputs:
    return BuildInputs(
        image_name="img",
        image_version=1,
        account_id=uuid.uuid4(),
        builder="oci",
        driver_program="score.py",
        assets=kinds.get("assets", {}),
        models=kinds.get("models", {}),
        conda_url=None,
        pip_url=None,
        base_image=None,
        base_registry=None,
        extra_steps=None,
        labels={},
        published_base=None,
    )


@pytest.mark.parametrize(
    ("kind", "key"),
    [("models", "../1"), ("models", "./1"), ("models", "a\\b/1"), ("assets", ".."), ("assets", "/etc/passwd")],
)
def test_a_name_that_leaves_the_tree_fails_the_fetch_step(
    service_context: ServiceContext, tmp_path: Path, kind: str, key: str
) -> None:
    work = tmp_path / "build"
    work.mkdir()
    # Nothing listens there: the step must fail before it fetches anything.
    inputs = _inputs(**{kind: {key: Source("http://127.0.0.1:9/model.pkl", None, False)}})
    with pytest.raises(StepFailed) as failed:
        fetch_step(service_context, inputs, work, lambda line: None)
    assert failed.value.step == "fetch" and f"'{key}' is not a plain name" in failed.value.reason
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"] and not any(work.iterdir())
