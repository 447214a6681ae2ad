"""A token that passed is taken again without jose's check only while that check would pass:
the same key object for its kid, and its times compared again at each use. A token that
failed is never remembered, and the memory is bounded."""

from __future__ import annotations

import time
from typing import Any

import pytest
from jose import jwt

from app.auth import tokens
from app.auth.tokens import TokenVerifier, TrustedIssuerKeys
from app.errors import Unauthorized
from tests.external_issuer import ExternalIssuer

ISSUER = ExternalIssuer("https://login.example.test/memo/v2.0")


class Keys:
    """A key source whose set can be reloaded, as a JWKS refresh does (new objects)."""

    def __init__(self, jwks: dict[str, Any]) -> None:
        self.reload(jwks)

    def reload(self, jwks: dict[str, Any]) -> None:
        self.by_kid = {key["kid"]: dict(key) for key in jwks["keys"]}

    def public_key(self, kid: str, *, refresh: bool = True) -> dict[str, Any] | None:
        return self.by_kid.get(kid)


@pytest.fixture()
def keys() -> Keys:
    return Keys(ISSUER.jwks)


@pytest.fixture()
def verifier(keys: Keys) -> TokenVerifier:
    return TokenVerifier([TrustedIssuerKeys(ISSUER.issuer, "mms-api", keys)], leeway_seconds=0)


@pytest.fixture()
def checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tokens jose checked (the signature and claims), in order."""
    checked: list[str] = []
    decode = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        checked.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(tokens.jwt, "decode", counting)
    return checked


def test_a_token_is_checked_once_and_then_remembered(verifier: TokenVerifier, checks: list[str]) -> None:
    token = ISSUER.token(subject="alice")
    first = verifier.verify(token)
    assert [verifier.verify(token, keys_at_hand=True) for _ in range(3)] == [first] * 3
    assert checks == [token]
    assert first.subject == "alice"


def test_a_remembered_token_still_expires(verifier: TokenVerifier, checks: list[str]) -> None:
    token = ISSUER.token(subject="alice", ttl=1)
    verifier.verify(token)
    deadline = time.time() + 5
    while time.time() < deadline:  # exp < now: two seconds at most, with no leeway
        try:
            verifier.verify(token)
        except Unauthorized as refused:
            assert "expired" in refused.message
            break
        time.sleep(0.2)
    else:
        pytest.fail("a remembered token outlived its exp")
    assert len(checks) >= 2  # the refusal is jose's own check, not the memory's


def test_a_token_not_yet_valid_is_refused_every_time(verifier: TokenVerifier, checks: list[str]) -> None:
    token = ISSUER.token(subject="alice", nbf=int(time.time()) + 120)
    for _ in range(2):
        with pytest.raises(Unauthorized, match="not valid"):
            verifier.verify(token)
    assert checks == [token, token]


def test_a_failed_token_is_never_remembered(verifier: TokenVerifier, checks: list[str]) -> None:
    token = ISSUER.token(subject="alice")
    verifier.verify(token)
    head, payload, signature = token.split(".")
    tampered = f"{head}.{payload}.{signature[:-4]}{'AAAA' if signature[-4:] != 'AAAA' else 'BBBB'}"
    for _ in range(2):
        with pytest.raises(Unauthorized):
            verifier.verify(tampered)
    assert checks == [token, tampered, tampered]


def test_a_reloaded_key_set_has_every_token_checked_again(
    verifier: TokenVerifier, keys: Keys, checks: list[str]
) -> None:
    token = ISSUER.token(subject="alice")
    verifier.verify(token)
    keys.reload(ISSUER.jwks)  # the same keys, as new objects: checked anew, and passes
    verifier.verify(token)
    assert checks == [token, token]
    keys.reload({"keys": []})  # the key is gone (revoked, rotated out): refused at once
    with pytest.raises(Unauthorized, match="unknown key"):
        verifier.verify(token)


def test_the_memory_is_bounded_and_forgets_the_oldest(
    verifier: TokenVerifier, checks: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(verifier, "MEMO_SIZE", 3)
    issued = [ISSUER.token(subject=f"user-{n}") for n in range(5)]
    for token in issued:
        verifier.verify(token)
    assert len(verifier._memo) == 3
    verifier.verify(issued[-1])  # remembered
    verifier.verify(issued[0])  # forgotten: checked again
    assert checks == [*issued, issued[0]]
