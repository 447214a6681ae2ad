"""Event ids as they leave the service: opaque tokens, not counts.

Events take their ids from one sequence shared by every account (``app.event_log``), which
orders them and lets the event hub keep one cursor. Sent as they are, those ids would let a
Reader of one account count every other account's activity (the gaps between its own
events' ids, a stream's start). So every id a client sees (an SSE frame's ``id:``, an event's
``"id"``, a webhook's, an image's ETag) is a keyed pseudorandom permutation of the id:
AES-128 over one block of the 8-byte id and 8 fixed check bytes, base64url without padding.
The same event always has the same token (clients dedupe by it), tokens say nothing of order
or distance, and one that does not decrypt to the check bytes names no event. The key comes
from ``MMS_SECRET_KEY``, so every API process and worker agrees on the tokens.
"""

from __future__ import annotations

import base64
import binascii
import re
import threading

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["BEGINNING", "EventIds"]

BEGINNING = 0  # the position before every event (ids start at 1)
_CHECK = b"mms.evid"  # 8 bytes: a block that does not end with them is no token of ours
_MAX_ID = 2**63 - 1  # a BIGINT column
_TOKEN = re.compile(r"[A-Za-z0-9_-]{22}")  # 16 bytes in base64url, unpadded


class EventIds:
    """Turns internal event ids into the tokens clients see, and back."""

    def __init__(self, secret_key: str) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=16, salt=None, info=b"mms.event-ids.v1").derive(
            secret_key.encode()
        )
        # One block each way: ECB of a single block is the block cipher itself, a permutation.
        # Its contexts keep no state between blocks, so one of each serves every call (under
        # a lock: making one per call costs more than the cipher).
        cipher = Cipher(algorithms.AES(key), modes.ECB())
        self._encryptor, self._decryptor = cipher.encryptor(), cipher.decryptor()
        self._lock = threading.Lock()

    def token(self, event_id: int) -> str:
        """The token of ``event_id`` (or of ``BEGINNING``): the same every time, on every process."""
        if not BEGINNING <= event_id <= _MAX_ID:
            raise ValueError(f"not an event id: {event_id}")
        with self._lock:
            block = self._encryptor.update(event_id.to_bytes(8, "big") + _CHECK)
        return base64.urlsafe_b64encode(block).rstrip(b"=").decode("ascii")

    def event_id(self, token: str) -> int | None:
        """The event id ``token`` stands for, or None when it is no token this service made."""
        if not _TOKEN.fullmatch(token):
            return None
        try:
            block = base64.urlsafe_b64decode(token + "==")
        except (binascii.Error, ValueError):
            return None
        # One spelling per block: the last character's two spare bits must be zero.
        if base64.urlsafe_b64encode(block).rstrip(b"=").decode("ascii") != token:
            return None
        with self._lock:
            plain = self._decryptor.update(block)
        event_id = int.from_bytes(plain[:8], "big")
        if plain[8:] != _CHECK or event_id > _MAX_ID:
            return None
        return event_id
