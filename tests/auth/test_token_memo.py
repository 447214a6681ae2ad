"""A token that passed is taken again without jose's check only while that check would pass:
the same key object for its kid, and its times compared again at each use. A token that
failed is never remembered, and the memory is bounded."""

from __future__ import annotations

import datetime
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


class Clock:
    """One clock for the memory (``time.time``) and jose (``datetime.now``), set by the test."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = int(time.time())
        clock = self

        class FakeTime:
            @staticmethod
            def time() -> float:
                return clock.now + 0.5

        class FakeDatetime(datetime.datetime):
            @classmethod
            def now(cls, tz: datetime.tzinfo | None = None) -> datetime.datetime:  # type: ignore[override]
                return datetime.datetime.fromtimestamp(clock.now + 0.5, tz)

        monkeypatch.setattr(tokens, "time", FakeTime)
        monkeypatch.setattr(jwt, "datetime", FakeDatetime)  # jose.jwt's clock


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    return Clock(monkeypatch)


@pytest.fixture()
def lenient(keys: Keys) -> TokenVerifier:
    return TokenVerifier([TrustedIssuerKeys(ISSUER.issuer, "mms-api", keys)], leeway_seconds=30)


def test_a_remembered_token_is_taken_to_the_last_second_of_its_leeway_and_not_after(
    lenient: TokenVerifier, checks: list[str], clock: Clock
) -> None:
    expires = clock.now + 60
    token = ISSUER.token(subject="alice", exp=expires)  # not from the real clock, which may have ticked
    lenient.verify(token)
    clock.now = expires + 30  # exp < now - leeway is false: still good
    lenient.verify(token)
    assert checks == [token]
    clock.now = expires + 31
    with pytest.raises(Unauthorized, match="expired"):
        lenient.verify(token)
    assert checks == [token, token]


def test_a_remembered_token_is_refused_when_the_clock_goes_back_before_its_nbf(
    lenient: TokenVerifier, checks: list[str], clock: Clock
) -> None:
    not_before = clock.now + 100
    token = ISSUER.token(subject="alice", nbf=not_before, ttl=600)
    clock.now = not_before - 30  # nbf > now + leeway is false: good, and remembered
    lenient.verify(token)
    lenient.verify(token)
    assert checks == [token]
    clock.now = not_before - 31
    with pytest.raises(Unauthorized, match="not valid"):
        lenient.verify(token)
    assert checks == [token, token]


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("exp", lambda now: str(now + 600)),
        ("exp", lambda now: now + 600.5),
        ("nbf", lambda now: str(now)),
        ("nbf", lambda now: float(now)),
    ],
    ids=["exp-string", "exp-float", "nbf-string", "nbf-float"],
)
def test_times_jose_reads_from_other_types_are_checked_every_time(
    verifier: TokenVerifier, checks: list[str], claim: str, value: Any
) -> None:
    token = ISSUER.token(subject="alice", **{claim: value(int(time.time()))})
    verifier.verify(token)
    verifier.verify(token)
    assert checks == [token, token]


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_a_time_that_is_a_list_is_a_401_not_a_500(verifier: TokenVerifier, claim: str) -> None:
    token = ISSUER.token(subject="alice", **{claim: [1, 2]})
    with pytest.raises(Unauthorized, match="not valid"):
        verifier.verify(token)


def test_a_remembered_tokens_claims_cannot_be_changed_for_the_next_request(verifier: TokenVerifier) -> None:
    token = ISSUER.token(subject="alice")
    first = verifier.verify(token)
    with pytest.raises(TypeError):
        first.claims["oid"] = "mallory"  # type: ignore[index]
    assert verifier.verify(token).claims["oid"] == "alice"
