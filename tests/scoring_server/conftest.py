"""Fixtures for the scoring_server tests."""

from __future__ import annotations

import pytest

from .scoring_server_harness import Server, launch, stop


@pytest.fixture
def start_server(tmp_path):
    """Factory around ``launch`` in tmp_path; every server started is stopped at teardown."""
    servers: list[Server] = []

    def start(source: str, *, env: dict[str, str] | None = None, files=None) -> Server:
        workdir = tmp_path / f"app{len(servers)}"
        workdir.mkdir()
        servers.append(launch(workdir, source, env, files))
        return servers[-1]

    yield start
    for server in servers:
        stop(server.proc)
