"""Operations: what a 202 hands back to poll, an image build's or a service's."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.errors import NotFound
from app.orm import Image, ServiceOperation
from app.services import images, services_deploy
from app.services.accounts import AccountRef
from app.services.lookup import parse_uuid


def get_operation(session: Session, account: AccountRef, *, operation_id: str) -> Image | ServiceOperation:
    """The build or the service operation an operation id stands for, or 404."""
    try:
        return images.get_operation(session, account, operation_id=operation_id)
    except NotFound:
        parsed = parse_uuid(operation_id)
        found = services_deploy.get_operation(session, account, operation_id=parsed) if parsed else None
        if found is None:
            raise
        return found
