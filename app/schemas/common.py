"""Field types and shapes shared by the API's schemas."""

from __future__ import annotations

import re
from typing import Annotated, Any, Generic, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    field_validator,
)

T = TypeVar("T")

# NUL (PostgreSQL refuses it) and lone surrogates (a JSON "\ud800" escape: no UTF-8 can carry one).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def unstorable(value: str) -> str | None:
    """Why no column can hold ``value`` (a NUL or a lone surrogate), or None when it can."""
    found = _UNSTORABLE.search(value)
    if found is None:
        return None
    char = found.group()
    what = "NUL" if char == "\x00" else "a lone surrogate"
    return f"must not contain {what} (U+{ord(char):04X})"


def _printable(value: str) -> str:
    # Control characters have no place in names or text.
    if any(ord(ch) < 32 and ch not in "\t\n\r" for ch in value):
        raise ValueError("must not contain control characters")
    return value


def not_a_dot_segment(value: str) -> str:
    """A name that becomes a file or directory of an image: '.' and '..' would name another one."""
    if value in (".", ".."):
        raise ValueError(f"must not be '{value}': it becomes a directory name in the image")
    return value


_MAX_DEPTH = 32  # no body of this API nests deeper; a deeper one would exhaust the stack


def _storable(value: Any, where: str = "", depth: int = 0) -> None:
    """Raise a ValueError naming the item of ``value`` (a JSON value) that holds an unstorable
    string, or that nests too deeply."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"{where} nests deeper than {_MAX_DEPTH} levels".lstrip())
    if isinstance(value, str):
        reason = unstorable(value)
        if reason:
            raise ValueError(f"{where} {reason}".lstrip())
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _storable(item, f"{where} item {index}".lstrip(), depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            _storable(key, f"{where} key".lstrip(), depth + 1)
            _storable(item, f"{where} {key!r}".lstrip(), depth + 1)


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
    str,
    StringConstraints(min_length=1, max_length=4096),
    AfterValidator(_http_url),
    Field(json_schema_extra={"format": "uri"}),
]


class ApiModel(BaseModel):
    """Base of request and response bodies: unknown request fields are ignored, as ARM does."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    @field_validator("*", mode="before")
    @classmethod
    def _storable_text(cls, value: Any) -> Any:
        # Every string field of every body, whatever its own type says: one of these would
        # otherwise fail in the database driver or an encoder as a 500.
        _storable(value)
        return value


class Page(ApiModel, Generic[T]):
    """A page of a list: the items and, when there are more, the link to the next page."""

    value: list[T]
    nextLink: str | None = None


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error of the API (app.errors): a stable code, a message for people, the status again,
    and one detail per offending field of a refused request."""

    code: str = Field(description="stable, e.g. ValidationError, AccountNotFound, ImageBuildRunning")
    message: str
    statusCode: int
    details: list[ErrorDetail]


class OAuthErrorBody(ErrorBody):
    """The token endpoint's errors also carry RFC 6749's fields."""

    error: str = Field(description="invalid_request, invalid_client or unsupported_grant_type")
    error_description: str


class DistributionErrorItem(BaseModel):
    code: str = Field(description="the OCI Distribution spec's code, e.g. MANIFEST_UNKNOWN")
    message: str
    detail: Any = None


class DistributionErrorBody(BaseModel):
    """A /v2 route's errors, in the OCI Distribution spec's shape."""

    errors: list[DistributionErrorItem]
