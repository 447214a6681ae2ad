"""Event ids as clients see them: deterministic, unordered, unforgeable tokens of the internal ids."""

from __future__ import annotations

import base64
import itertools
import re

import pytest

from app.services.event_ids import BEGINNING, EventIds

KEY = "a service's secret key, long enough to be one"
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def test_a_token_is_the_same_every_time_and_in_every_process() -> None:
    ids, again = EventIds(KEY), EventIds(KEY)  # two processes with one MMS_SECRET_KEY
    for event_id in (BEGINNING, 1, 2, 41, 42, 10**12, 2**63 - 1):
        token = ids.token(event_id)
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", token), token
        assert token == ids.token(event_id) == again.token(event_id)
        assert ids.event_id(token) == again.event_id(token) == event_id


def test_tokens_say_nothing_of_order_or_distance() -> None:
    ids = EventIds(KEY)
    tokens = [ids.token(event_id) for event_id in range(1, 2001)]
    assert len(set(tokens)) == len(tokens)
    # Neither their text nor their bytes follow the ids: consecutive ids share no prefix.
    assert sorted(tokens) != tokens and sorted(tokens, reverse=True) != tokens
    shared = [len(_common_prefix(a, b)) for a, b in itertools.pairwise(tokens)]
    assert sum(shared) / len(shared) < 0.2  # about 1/64: a character's chance to match
    assert not any(token.isdigit() for token in tokens)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def test_what_no_key_of_this_service_made_is_no_event_id() -> None:
    ids = EventIds(KEY)
    token = ids.token(42)
    raw = base64.urlsafe_b64decode(token + "==")
    for bit in range(128):  # every single-bit change, in the id's half and in the check half
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert ids.event_id(base64.urlsafe_b64encode(bytes(flipped)).decode().rstrip("=")) is None, bit
    assert EventIds("another service's secret key, also long enough").event_id(token) is None
    padded = base64.urlsafe_b64encode(raw).decode()  # with its "==": not as it was sent
    standard = base64.b64encode(raw).decode().rstrip("=")  # "+" and "/" for "-" and "_"
    for text in ("", "42", "0", "A" * 22, token + "A", token[:-1], padded, "²" * 22):
        assert ids.event_id(text) is None, text
    assert standard == token or ids.event_id(standard) is None
    # The 4 spare bits of the last character: another spelling of the same block is not taken.
    last = ALPHABET.index(token[-1])
    assert last & 0b1111 == 0 and ids.event_id(token[:-1] + ALPHABET[last | 1]) is None


@pytest.mark.parametrize("event_id", [-1, 2**63])
def test_only_event_ids_have_tokens(event_id: int) -> None:
    with pytest.raises(ValueError, match="not an event id"):
        EventIds(KEY).token(event_id)
