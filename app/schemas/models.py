"""Request and response bodies of registered models (the seed's shapes)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, Field, StringConstraints, field_validator

from app.schemas.common import ApiModel, HttpUrlText, SeedBool, Text, not_a_dot_segment

# The original service allowed letters, digits and '-'; '.' and '_' are accepted too so
# that the seed's own `housing.model` registers.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9._-]{1,32}$"
MAX_TAGS = 50

# A model's files land at models/<name>/<version> in the image; manifests and images share the rule.
ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN), AfterValidator(not_a_dot_segment)]
Tag = Annotated[Text, StringConstraints(min_length=1, max_length=30)]


def mime_type(value: str) -> str:
    """A MIME type such as application/zip, or a ValueError saying so."""
    if not re.fullmatch(r"[\w.+-]+/[\w.+-]+", value):
        raise ValueError("must be a MIME type such as application/zip")
    return value


# The rule in the OpenAPI document, so that clients and generated requests can follow it.
MimeType = Annotated[
    Text,
    StringConstraints(max_length=255),
    AfterValidator(mime_type),
    Field(json_schema_extra={"pattern": r"^[\w.+-]+/[\w.+-]+$"}),
]


class ModelCreate(ApiModel):
    name: ModelName = Field(description="1-32 letters, digits, '-', '.' or '_'")
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    description: Annotated[Text, StringConstraints(max_length=200)] | None = None
    url: HttpUrlText = Field(description="where the model file is, usually a SAS URL")
    mimeType: MimeType
    unpack: SeedBool = False
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")] | None = None

    @field_validator("name", mode="before")
    @classmethod
    def _explain_name(cls, value: object) -> object:
        if isinstance(value, str) and not re.fullmatch(MODEL_NAME_PATTERN, value):
            raise ValueError("must be 1-32 characters: letters, digits, '-', '.' or '_'")
        return value

    @field_validator("tags")
    @classmethod
    def _unique_tags(cls, tags: list[str]) -> list[str]:
        return list(dict.fromkeys(tags))

    @field_validator("sha256")
    @classmethod
    def _lower_sha(cls, value: str | None) -> str | None:
        return value.lower() if value else value


class ModelRead(ApiModel):
    id: str
    name: str
    version: int
    description: str | None
    url: str
    tags: list[str]
    mimeType: str
    unpack: bool
    sha256: str | None = None
    createdAt: datetime
