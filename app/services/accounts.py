"""Model Management accounts: the containers every other resource lives in."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import and_, func, or_, select, true, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.builds.lifecycle import delete_account_builds
from app.deployments.lifecycle import delete_account_services
from app.errors import Conflict, NotFound, ValidationFailed
from app.orm import Account, Image, Manifest, ModelVersion, Service
from app.schemas.accounts import AccountCreate
from app.services.paging import decode_token, encode_token, page_size


@dataclass(frozen=True)
class AccountPath:
    subscription_id: str
    resource_group: str
    name: str


@dataclass(frozen=True, slots=True)
class AccountRef:
    """Which account a request is about: what routes and services use of it, none of which an
    account's later changes (its SKU) touch, so it may be kept across requests."""

    id: uuid.UUID
    subscription_id: str
    resource_group: str
    name: str

    @classmethod
    def of(cls, account: Account) -> AccountRef:
        return cls(account.id, account.subscription_id, account.resource_group, account.name)


class KnownAccounts:
    """The accounts this process looked up in the last ``ttl`` seconds, by path: a request for
    a resource of one costs no account query (issue 20: the lookup was a quarter of a GET).

    Only accounts that exist are kept. A deleted account is forgotten at once by the process
    that deletes it; another process may, for up to ``ttl`` (MMS_AUTH_CACHE_SECONDS, as for
    roles), still take it for existing: its reads find nothing (the rows went with it) and its
    writes are refused by the foreign keys (409, then a retry looks again)."""

    MAX_ENTRIES = 10_000

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[tuple[str, str, str], tuple[float, AccountRef]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(path: AccountPath) -> tuple[str, str, str]:
        return path.subscription_id.lower(), path.resource_group.lower(), path.name.lower()

    def get(self, path: AccountPath) -> AccountRef | None:
        entry = self._entries.get(self._key(path))
        if entry is None or time.monotonic() - entry[0] > self.ttl:
            return None
        return entry[1]

    def put(self, path: AccountPath, account: AccountRef) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()  # rare: start over rather than track ages
            self._entries[self._key(path)] = (time.monotonic(), account)

    def forget(self, path: AccountPath | None = None) -> None:
        """Drop ``path``'s entry, or every entry."""
        with self._lock:
            if path is None:
                self._entries.clear()
            else:
                self._entries.pop(self._key(path), None)


def _path_key(subscription_id: str, resource_group: str, name: str) -> tuple[str, str, str]:
    # As roles compare scopes (app.auth.roles): lower-cased by Python.
    return subscription_id.lower(), resource_group.lower(), name.lower()


def _find(session: Session, path: AccountPath) -> Account | None:
    key = _path_key(path.subscription_id, path.resource_group, path.name)
    candidates = session.scalars(
        select(Account).where(
            func.lower(Account.subscription_id) == key[0],
            func.lower(Account.resource_group) == key[1],
            func.lower(Account.name) == key[2],
        )
    )
    # The database lower-cases by its own rules (PostgreSQL: 'İ' is 'i', Python: 'i' + U+0307):
    # only an account whose own scope is the path's, the one the caller's roles were checked on.
    return next((a for a in candidates if _path_key(a.subscription_id, a.resource_group, a.name) == key), None)


def get_account(session: Session, path: AccountPath) -> Account:
    """The account at ``path``, or 404."""
    account = _find(session, path)
    if account is None:
        raise NotFound(
            f"account '{path.name}' was not found in resource group '{path.resource_group}'",
            code="AccountNotFound",
        )
    return account


def find_account_ref(session: Session, path: AccountPath, known: KnownAccounts) -> AccountRef:
    """The account at ``path`` as routes use it, from ``known`` when it is there; or 404."""
    account = known.get(path)
    if account is None:
        account = AccountRef.of(get_account(session, path))
        known.put(path, account)
    return account


def put_account(session: Session, path: AccountPath, data: AccountCreate) -> tuple[Account, bool]:
    """Create the account, or update its SKU; returns the account and whether it is new."""
    account = _find(session, path)
    if account is None:
        account = Account(
            subscription_id=path.subscription_id,
            resource_group=path.resource_group,
            name=path.name,
            location=data.location,
            sku_name=data.sku.name,
            sku_capacity=data.sku.capacity,
        )
        try:
            with session.begin_nested():
                session.add(account)
                session.flush()
                if _find(session, path) is not account:  # undone with the savepoint
                    raise ValidationFailed(
                        f"Invalid request: resourceGroup: '{path.resource_group}' holds a letter whose lower case "
                        "the database spells otherwise than the service does; choose another name",
                        details=[{"code": "InvalidField", "message": "resourceGroup: cannot be compared case-blind"}],
                    )
            return account, True
        except IntegrityError:
            # Another request created it a moment ago: this PUT becomes an update.
            account = get_account(session, path)
    if account.location.lower() != data.location.lower():
        raise Conflict(
            f"account '{path.name}' is in location '{account.location}'; the location of an account cannot change",
            code="LocationCannotChange",
        )
    account.sku_name, account.sku_capacity = data.sku.name, data.sku.capacity
    session.flush()
    return account, False


def list_accounts(
    session: Session,
    *,
    subscription_id: str,
    resource_group: str,
    count: int | None,
    skip_token: str | None,
) -> tuple[list[Account], str | None]:
    """A page of a resource group's accounts by name, and the token of the next page."""
    limit = page_size(count)
    query = select(Account).where(
        func.lower(Account.subscription_id) == subscription_id.lower(),
        func.lower(Account.resource_group) == resource_group.lower(),
    )
    position = decode_token(skip_token, fields={"n": str})
    if position is not None:
        query = query.where(func.lower(Account.name) > position["n"])
    rows = list(session.scalars(query.order_by(func.lower(Account.name)).limit(limit + 1)))
    if len(rows) <= limit:
        return rows, None
    return rows[:limit], encode_token({"n": rows[limit - 1].name.lower()})


def list_accounts_under(
    session: Session, *, scopes: Iterable[str], count: int | None, skip_token: str | None
) -> tuple[list[Account], str | None]:
    """A page of the accounts under any of ``scopes`` (normalised role scopes: ``/``, a
    subscription, a resource group, an account), by path, and the token of the next page."""
    path = (func.lower(Account.subscription_id), func.lower(Account.resource_group), func.lower(Account.name))
    under = []
    for scope in scopes:
        if scope == "/":
            under = [true()]
            break
        values = scope.strip("/").split("/")[1::2]  # subscription, resource group, account
        under.append(and_(*(column == value for column, value in zip(path, values, strict=False))))
    if not under:
        return [], None
    limit = page_size(count)
    query = select(Account).where(or_(*under))
    position = decode_token(skip_token, fields={"s": str, "g": str, "n": str})
    if position is not None:
        query = query.where(tuple_(*path) > tuple_(position["s"], position["g"], position["n"]))
    rows = list(session.scalars(query.order_by(*path).limit(limit + 1)))
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    token = {"s": last.subscription_id.lower(), "g": last.resource_group.lower(), "n": last.name.lower()}
    return rows[:limit], encode_token(token)


def delete_account(session: Session, path: AccountPath, *, force: bool) -> None:
    """Delete an account; refused while it holds models unless ``force``, which deletes them too."""
    account = get_account(session, path)
    held = {
        kind: session.scalar(select(func.count()).select_from(table).where(table.account_id == account.id))
        for kind, table in (("model", ModelVersion), ("manifest", Manifest), ("image", Image), ("service", Service))
    }
    if any(held.values()) and not force:
        summary = " and ".join(f"{n} {kind}(s)" for kind, n in held.items() if n)
        raise Conflict(
            f"account '{path.name}' still holds {summary}; delete them first "
            "or repeat with ?force=true to delete the account with everything in it",
            code="AccountNotEmpty",
        )
    # Services first: they hold their images. Dashboards and webhooks hear of every image that goes.
    delete_account_services(session, account.id)
    delete_account_builds(session, account.id)
    session.delete(account)
    session.flush()
