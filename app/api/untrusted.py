"""Headers for responses that carry a tenant's bytes from the API's own origin."""

from __future__ import annotations

import re
from urllib.parse import quote

# The dashboard keeps its token on this origin: a tenant's bytes must never run as a page
# here, whatever type they claim (HTML, SVG) or a browser would sniff.
NOT_A_PAGE = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
}
_UNSAFE_IN_QUOTES = re.compile(r"[^A-Za-z0-9._+-]")


def download_headers(filename: str) -> dict[str, str]:
    """``NOT_A_PAGE`` plus ``Content-Disposition: attachment`` naming ``filename``."""
    plain = _UNSAFE_IN_QUOTES.sub("_", filename)[:200] or "download"
    disposition = f'attachment; filename="{plain}"'
    if plain != filename:
        disposition += f"; filename*=UTF-8''{quote(filename, safe='')}"
    return {**NOT_A_PAGE, "Content-Disposition": disposition}
