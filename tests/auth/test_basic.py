"""The one HTTP Basic parser both token endpoints use."""

from __future__ import annotations

import base64

import pytest

from app.auth.basic import basic_credentials


def _basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


def test_the_id_and_password_come_back_as_sent() -> None:
    assert basic_credentials(_basic("client:se:cr%2Bet")) == ("client", "se:cr%2Bet")
    assert basic_credentials("basic " + base64.b64encode(b"a:b").decode() + " ") == ("a", "b")
    assert basic_credentials(_basic("only-an-id")) == ("only-an-id", "")


@pytest.mark.parametrize("header", [None, "", "Bearer abc", "Digest x"])
def test_no_basic_header_is_none(header: str | None) -> None:
    assert basic_credentials(header) is None


@pytest.mark.parametrize("header", ["Basic not-base64!", "Basic " + base64.b64encode(b"\xff:\xfe").decode()])
def test_a_malformed_basic_header_is_a_value_error(header: str) -> None:
    with pytest.raises(ValueError, match="malformed"):
        basic_credentials(header)
