"""Model Management accounts: the containers every other resource lives in."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import and_, func, or_, select, true, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.builds.lifecycle import delete_account_builds
from app.deployments.lifecycle import delete_account_services
from app.errors import Conflict, NotFound
from app.orm import Account, Image, Manifest, ModelVersion, Service
from app.schemas.accounts import AccountCreate
from app.services.paging import decode_token, encode_token, page_size


@dataclass(frozen=True)
class AccountPath:
    subscription_id: str
    resource_group: str
    name: str


def _find(session: Session, path: AccountPath) -> Account | None:
    return session.scalars(
        select(Account).where(
            func.lower(Account.subscription_id) == path.subscription_id.lower(),
            func.lower(Account.resource_group) == path.resource_group.lower(),
            func.lower(Account.name) == path.name.lower(),
        )
    ).first()


def get_account(session: Session, path: AccountPath) -> Account:
    """The account at ``path``, or 404."""
    account = _find(session, path)
    if account is None:
        raise NotFound(
            f"account '{path.name}' was not found in resource group '{path.resource_group}'",
            code="AccountNotFound",
        )
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
