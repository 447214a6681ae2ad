"""This installation's id, and whether the database it lives in is still the one it was made in.

The id labels every engine object the reconciler makes; the orphan sweep removes objects that
carry it and whose service the database does not know. A copy of the database (a staging
database cloned from production, a second compose project started from a dump) carries the
same id: beside the original on a shared engine it would take the original's replicas for its
own and sweep the services made after the copy. So the row also records where it was made (the
database's identity: PostgreSQL's cluster and database, or the SQLite file), and nothing is
deployed or swept while the two differ, until the operator says which it is:
``mms admin installation --new-id`` (a copy: an id of its own) or ``--adopt`` (the same
installation, restored or moved: keep the id).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from app.orm import Installation

__all__ = ["InstallationCopied", "InstallationState", "adopt", "database_identity", "new_id", "read", "require"]


class InstallationCopied(Exception):
    """The database is not the one its installation id was made in; the message says what to do."""


@dataclass(frozen=True)
class InstallationState:
    id: uuid.UUID
    recorded: str | None  # the identity the id was made (or last adopted) in
    current: str  # the database's identity now

    @property
    def label(self) -> str:
        """What the engine objects carry."""
        return self.id.hex[:16]

    @property
    def copied(self) -> bool:
        return self.recorded is not None and self.recorded != self.current


def database_identity(session: Session) -> str:
    """Where this database is: PostgreSQL's cluster (its system identifier, new with every
    initdb) and the database's oid (new with every CREATE DATABASE, a TEMPLATE copy's too); the
    SQLite file's device and inode (a copied file has its own)."""
    if session.get_bind().dialect.name == "postgresql":
        row = session.execute(
            text(
                "SELECT (SELECT system_identifier FROM pg_control_system()), "
                "(SELECT oid FROM pg_database WHERE datname = current_database())"
            )
        ).one()
        return f"postgresql:{row[0]}:{row[1]}"
    files = [r[2] for r in session.execute(text("PRAGMA database_list")) if r[1] == "main"]
    if not files or not files[0]:
        return "sqlite:memory"
    stat = os.stat(files[0])
    return f"sqlite:{stat.st_dev}:{stat.st_ino}"


def read(session: Session) -> InstallationState:
    row = session.execute(select(Installation.id, Installation.database_identity)).one()
    return InstallationState(row.id, row.database_identity, database_identity(session))


def require(session: Session) -> InstallationState:
    """This installation, its identity recorded if it had none; InstallationCopied when the
    database is a copy (or a restore) the operator has not yet said what to do with."""
    state = read(session)
    if state.recorded is None:
        session.execute(update(Installation).values(database_identity=state.current))
        return InstallationState(state.id, state.current, state.current)
    if state.copied:
        raise InstallationCopied(
            f"this database is not the one installation {state.label} was made in (it was {state.recorded}, "
            f"it is {state.current}): a copy beside the original would take the original's web services for "
            "its own, so nothing is deployed or swept. If it is a copy, run `mms admin installation --new-id`; "
            "if it is the same installation restored or moved, `mms admin installation --adopt`"
        )
    return state


def adopt(session: Session) -> InstallationState:
    """The same installation in another database (restored, moved): keep the id, record where."""
    state = read(session)
    session.execute(update(Installation).values(database_identity=state.current))
    return InstallationState(state.id, state.current, state.current)


def new_id(session: Session) -> InstallationState:
    """A copy becomes an installation of its own: a new id, recorded here. Engine objects of
    the old id are the original's: never touched by this one again."""
    state = read(session)
    fresh = uuid.uuid4()
    session.execute(update(Installation).values(id=fresh, database_identity=state.current))
    return InstallationState(fresh, state.current, state.current)
