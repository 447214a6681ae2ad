"""What --verbose and --debug print never shows a secret: names that say so, and a URL's password."""

from __future__ import annotations

from mms_client.diagnostics import REDACTED, redact, redact_url


def test_members_named_like_a_secret_are_hidden_and_others_shown() -> None:
    body = {
        "client_secret": "s1",
        "DB_PASS": "s2",
        "API_KEY": "s3",
        "apikey": "s4",
        "code": "s5",
        "nested": [{"password": "s6", "access_token": "s7"}],
        "name": "housing",
        "monkey": "shown",
        "keyword": "shown",
        "mimeType": "application/zip",
    }
    shown = redact(body)
    assert not {"s1", "s2", "s3", "s4", "s5", "s6", "s7"} & set(str(shown).replace("'", " ").split())
    assert shown["name"] == "housing" and shown["monkey"] == "shown" and shown["keyword"] == "shown"
    assert shown["nested"][0] == {"password": REDACTED, "access_token": REDACTED}


def test_a_web_services_keys_and_a_targets_credentials_are_hidden() -> None:
    shown = redact(
        {
            "primaryKey": "k1",
            "secondaryKey": "k2",
            "keyValue": "k3",
            "properties": {"kubeconfig": "k4", "tls": {"ca": "shown", "cert": "shown", "key": "k5"}},
            "keyType": "Primary",
        }
    )
    assert not {"k1", "k2", "k3", "k4", "k5"} & set(str(shown).replace("'", " ").split())
    assert shown["keyType"] == "Primary" and shown["properties"]["tls"]["ca"] == "shown"


def test_a_urls_password_and_signature_are_hidden() -> None:
    assert redact_url("https://me:p%40ss@mms.example:8000/api?sig=abc&count=2") == (
        f"https://me:{REDACTED}@mms.example:8000/api?sig={REDACTED}&count=2"
    )
    assert redact_url("https://mms.example/api") == "https://mms.example/api"
