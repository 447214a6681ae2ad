"""Fixtures for the worker tests: a trained model, and the end-to-end stack (tests/workers/stack.py)
on the session's infrastructure (the ``infra`` fixture, tests/infra.py)."""

from __future__ import annotations

import io
import pickle
import zipfile

import pytest

from tests.infra import Infra


@pytest.fixture(scope="module")
def model() -> tuple[object, list[list[float]], bytes]:
    from sklearn.linear_model import LinearRegression

    rows = [[float(i), float(i % 3), float(i * i % 7)] for i in range(40)]
    target = [2.0 * a - 0.5 * b + 0.25 * c + 1 for a, b, c in rows]
    trained = LinearRegression().fit(rows, target)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("model.pkl", pickle.dumps(trained))
    return trained, rows[:5], archive.getvalue()


@pytest.fixture(scope="module")
def stack(infra: Infra, service_context, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """`mms serve` and `mms worker` against the test database, Redis, the engine and the registry."""
    from tests.workers.stack import running_stack  # here, not at the top: it imports this module

    yield from running_stack(infra, service_context, tmp_path_factory)
