"""The packages' import rules (CONTRIBUTING.md), read from the source: the client imports nothing
of the service, and the service's `app` never imports `workers`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imported(package: str) -> dict[str, set[str]]:
    """Every module each file of ``package`` imports (top-level name), at any depth of the code."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("mms_client", {"app", "workers", "scoring_server", "migrations"}),
        ("app", {"workers"}),
    ],
)
def test_a_package_imports_none_of_what_it_must_not(package: str, forbidden: set[str]) -> None:
    offending = {path: sorted(names & forbidden) for path, names in _imported(package).items() if names & forbidden}
    assert offending == {}
