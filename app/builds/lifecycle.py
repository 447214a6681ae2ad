"""The tenant's moves of a build: create it, cancel it, delete it (alone or with its account)."""

from __future__ import annotations

import uuid

from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Session

from app.builds.states import CreationState
from app.builds.transitions import Transition, create, move
from app.errors import Conflict, NotFound
from app.orm import Image
from app.orm.base import utcnow


def create_build(session: Session, **fields: object) -> Image:
    """Record a build as NotStarted (``fields``: the Image's other columns), with its event."""
    return create(session, **fields)


def cancel_build(session: Session, image: Image) -> Image:
    """Cancel a queued build at once, or ask the worker running it to stop; 409 once it is final."""
    # A few rounds at most: each lost race (a claim, a hand-back) moves the build on by one step.
    for _ in range(3):
        if CreationState(image.state).is_final:
            raise Conflict(f"the build already ended: {image.state}", code="ImageBuildFinished")
        where = Image.id == image.id
        if move(session, Transition.CANCEL, where, ended_at=utcnow(), error="cancelled before it started"):
            break
        # Running: the worker's heartbeat sees the flag and stops the build.
        if move(session, Transition.REQUEST_CANCEL, where, cancel_requested=True):
            break
        _reread(session, image)
    session.flush()
    _reread(session, image)
    return image


def delete_build(session: Session, image: Image) -> None:
    """Forget a build that is not running, with its deletion event; 409 while it runs."""
    if not move(session, Transition.DELETE, Image.id == image.id, to=None):
        _reread(session, image)  # 404 when a concurrent delete got there first
        raise Conflict("the image is being built; cancel it first", code="ImageBuildRunning")


def _reread(session: Session, image: Image) -> None:
    """``image`` as the database has it now; 404 once another request deleted it."""
    try:
        session.refresh(image)
    except InvalidRequestError:  # the row is gone
        raise NotFound(f"image '{image.id}' was not found in this account", code="ImageNotFound") from None


def delete_account_builds(session: Session, account_id: uuid.UUID) -> None:
    """Forget every build of an account that is going, running or not: dashboards and
    webhooks hear of each (a running build's worker finds its lease gone)."""
    move(session, Transition.DELETE_WITH_ACCOUNT, Image.account_id == account_id, to=None)
