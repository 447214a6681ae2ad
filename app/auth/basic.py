"""HTTP Basic credentials (RFC 7617), as both token endpoints take them: ``/oauth2/token``
and the image store's ``/v2/token``."""

from __future__ import annotations

import base64
import binascii

__all__ = ["basic_credentials"]


def basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """The user id and password of a Basic ``Authorization`` header, as sent; None when the
    header is absent or of another scheme, ValueError when it is Basic but not base64 of
    UTF-8 text. An id or password may be empty: what that means is the caller's rule."""
    scheme, _, encoded = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("the Basic authorization header is malformed") from None
    user_id, _, password = decoded.partition(":")
    return user_id, password
