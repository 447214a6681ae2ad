"""Where `mms gateway` listens by default: loopback, on the port of the scoring URL."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.config import Settings


@pytest.mark.parametrize(
    ("values", "host", "port"),
    [
        ({}, "127.0.0.1", 8001),
        ({"scoring_url": "http://127.0.0.1:9100"}, "127.0.0.1", 9100),
        ({"scoring_url": "https://scoring.example.com"}, "127.0.0.1", 443),
        ({"scoring_url": "http://scoring.example.com"}, "127.0.0.1", 80),
        (
            {"scoring_url": "https://scoring.example.com", "gateway_port": 8443, "gateway_host": "0.0.0.0"},
            "0.0.0.0",
            8443,
        ),
    ],
)
def test_the_gateway_listens_on_loopback_at_the_scoring_urls_port(values: dict, host: str, port: int) -> None:
    settings = Settings(_env_file=None, **values)
    assert (settings.gateway_host, settings.resolved_gateway_port) == (host, port)


def test_a_cache_longer_than_five_seconds_is_refused() -> None:
    # A regenerated key must stop working within 5 s.
    with pytest.raises(ValidationError, match="gateway_cache_seconds"):
        Settings(_env_file=None, gateway_cache_seconds=6)
