"""Repository names in the image store: ``<account id>/<lower-cased image name>``.

One store (or one registry) serves every account; the account id as first component keeps
tenants apart and tells the ``/v2/`` routes whose roles decide a pull.
"""

from __future__ import annotations

import uuid

from app.image_store.oci_layout import check_repository

__all__ = ["image_repository", "is_valid_repository", "repository_account_id"]


def image_repository(account_id: uuid.UUID | str, image_name: str) -> str:
    """The repository an account's image is pushed to."""
    return f"{account_id}/{image_name.lower()}"


def repository_account_id(repository: str) -> uuid.UUID | None:
    """The account a repository belongs to: its first component, a UUID in canonical form."""
    first = repository.split("/", 1)[0]
    try:
        parsed = uuid.UUID(first)
    except ValueError:
        return None
    return parsed if str(parsed) == first else None


def is_valid_repository(name: str) -> bool:
    """Whether ``name`` follows the distribution spec's repository grammar."""
    try:
        check_repository(name)
    except ValueError:
        return False
    return True
