"""Field types and shapes shared by the API's schemas."""

from __future__ import annotations

from typing import Annotated, Generic, TypeVar
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Strict, StringConstraints

T = TypeVar("T")


def _printable(value: str) -> str:
    # Control characters (NUL above all, which PostgreSQL refuses) have no place in names or text.
    if any(ord(ch) < 32 and ch not in "\t\n\r" for ch in value):
        raise ValueError("must not contain control characters")
    return value


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if any(ch.isspace() for ch in value):
        raise ValueError("must not contain spaces; percent-encode them")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ValueError("has an invalid port") from None
    return value


def _seed_bool(value: object) -> object:
    # The seed writes "unPack": "False" and "unpack": "true"; any other string is a mistake.
    if isinstance(value, str):
        if value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ValueError('must be true or false (a JSON boolean, or the string "true" or "false")')
    return value


Text = Annotated[str, AfterValidator(_printable)]
# A boolean that also takes the seed's "true"/"false" strings (any case), and nothing else.
SeedBool = Annotated[bool, Strict(), BeforeValidator(_seed_bool)]
HttpUrlText = Annotated[
    str, StringConstraints(min_length=1, max_length=4096), AfterValidator(_http_url)
]


class ApiModel(BaseModel):
    """Base of request and response bodies: unknown request fields are ignored, as ARM does."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")


class Page(ApiModel, Generic[T]):
    """A page of a list: the items and, when there are more, the link to the next page."""

    value: list[T]
    nextLink: str | None = None
