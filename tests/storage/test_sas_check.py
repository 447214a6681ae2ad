"""check_azure_sas_url: a bad SAS URL is refused with a reason that leaks no query value."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from app.storage.sas import check_azure_sas_url

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
SIG = "SECRETsignature%2Babc%3D"
AZURITE = "http://127.0.0.1:10000/devstoreaccount1/assets/model.zip"


def sas(base: str = "https://acct.blob.core.windows.net/models/model.zip", **params: str) -> str:
    """A SAS URL with a good read token; ``params`` replace its fields (an empty one drops it)."""
    fields = {"sv": "2024-11-04", "sr": "b", "sp": "r", "se": "2026-11-23T10:00:00Z", "sig": SIG}
    fields.update(params)
    return base + "?" + "&".join(f"{k}={v}" for k, v in fields.items() if v)


@pytest.mark.parametrize(
    "url",
    [
        sas(),
        sas(se="2026-11-24"),  # date only: midnight UTC
        sas(se="2026-11-23T10:00Z"),
        sas(se="2026-11-23T10:00:00.1234567Z"),
        sas(se="2026-11-23T10%3A00%3A00Z"),  # as Azure's libraries encode it
        sas(se="2026-11-23T11:00:00%2B01:00"),  # an offset, "+" encoded
        sas(sp="racwdl"),
        sas(st="2026-11-23T09:04:00Z"),  # a start within the clock skew
        sas(sp="", se="", si="read-policy"),  # a stored access policy holds sp and se
        sas(AZURITE, se="2026-11-23T09:30:00Z"),
    ],
)
def test_a_readable_sas_url_passes(url: str) -> None:
    check_azure_sas_url(url, now=NOW, require_https=False)


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/housing.zip",
        "http://example.com/housing.zip?se=2000-01-01&sp=w",  # no signature: not a SAS
        "https://example.com/x?sig=abc",  # a sig alone is someone else's scheme
        "https://acct.blob.core.windows.net/public/model.zip",  # a public blob, no token
        "http://[::1",  # not parseable: left to the URL validation
    ],
)
def test_a_url_that_is_no_azure_sas_is_left_alone(url: str) -> None:
    check_azure_sas_url(url, now=NOW, require_https=True)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (sas(se="2026-11-23T08:59:59Z"), "has expired"),
        (sas(se="2026-11-23T09:00:00Z"), "has expired"),
        (sas(se="2026-11-22"), "has expired"),
        (sas(se="2020-01-01T00:00:00Z"), "has expired"),
        (sas(sp="w"), "does not grant read access"),
        (sas(AZURITE.replace("http:", "https:"), sp="w"), "does not grant read access"),
        (sas(sp=""), "grants no permissions"),
        (sas(se=""), "has no expiry"),
        (sas(se="next-tuesday"), "expiry (se) is not an ISO 8601"),
        (sas(se="2026-13-01"), "expiry (se) is not an ISO 8601"),
        (sas(sig=""), "has no signature"),
        (sas(st="2026-11-23T09:06:00Z"), "not valid yet"),
        (sas(st="soon"), "start (st) is not an ISO 8601"),
        (sas("http://acct.blob.core.windows.net/models/model.zip"), "must use https"),
        (sas(AZURITE), "must use https"),
    ],
)
def test_a_bad_sas_url_is_refused_with_a_clean_reason(url: str, reason: str) -> None:
    with pytest.raises(ValueError) as refused:
        check_azure_sas_url(url, now=NOW, require_https=True)

    message = str(refused.value)
    assert message.startswith("url: ")
    assert reason in message
    for leak in ("sig=", "SECRET", "2026", "2020", "next-tuesday", "soon", "?"):
        assert leak not in message


def test_http_is_accepted_outside_production() -> None:
    check_azure_sas_url(sas(AZURITE), now=NOW, require_https=False)


def test_a_naive_now_is_taken_as_utc() -> None:
    check_azure_sas_url(sas(), now=datetime(2026, 11, 23, 9, 0), require_https=True)
