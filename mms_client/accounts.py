"""`mms account modelmanagement create|set|show|list|delete`."""

from __future__ import annotations

from typing import Annotated

import typer

from mms_client.api import CliError, ServiceClient, all_pages
from mms_client.output import Output, OutputOption, QueryOption, err, field, show

account_cli = typer.Typer(help="Model management accounts.", no_args_is_help=True)
modelmanagement_cli = typer.Typer(
    help="Model management accounts (as `az ml account modelmanagement`).", no_args_is_help=True
)
account_cli.add_typer(modelmanagement_cli, name="modelmanagement")

COLUMNS = [
    ("name", field("name")),
    ("resource group", field("properties.resourceGroup")),
    ("location", field("location")),
    ("sku", field("sku.name")),
    ("instances", field("sku.capacity")),
    ("account id", field("properties.accountId")),
]

Name = Annotated[str | None, typer.Option("--name", "-n", help="the account (default: the current one)")]
Group = Annotated[
    str | None, typer.Option("--resource-group", "-g", help="its resource group (default: the current one)")
]


def _path(client: ServiceClient, name: str | None, group: str | None) -> str:
    name = name or client.profile.account
    if not name:
        raise CliError("no account named: pass -n <account> or set one with `mms account modelmanagement set`")
    return f"{client.profile.group_path(group)}/accounts/{name}"


@modelmanagement_cli.command("create")
def create(
    location: Annotated[str, typer.Option("--location", "-l", help="e.g. eastus2")],
    name: Annotated[str, typer.Option("--name", "-n", help="the new account's name")],
    resource_group: Annotated[str, typer.Option("--resource-group", "-g")],
    sku_instances: Annotated[int, typer.Option("--sku-instances", help="number of instances")] = 1,
    sku_name: Annotated[str, typer.Option("--sku-name", help="e.g. S1")] = "S1",
    output: OutputOption = Output.table,
    query: QueryOption = None,
) -> None:
    """Create a model management account and make it the current one.

    Example: mms account modelmanagement create -l eastus2 -n acct1 -g rg1 --sku-instances 1 --sku-name S1
    """
    with ServiceClient() as client:
        body = {"location": location, "sku": {"name": sku_name, "capacity": sku_instances}}
        account = client.json("PUT", f"{client.profile.group_path(resource_group)}/accounts/{name}", json=body)
        _make_current(client, resource_group, name)
    show(account, output, COLUMNS, query)


@modelmanagement_cli.command("set")
def set_current(
    name: Annotated[str, typer.Option("--name", "-n")],
    resource_group: Annotated[str, typer.Option("--resource-group", "-g")],
) -> None:
    """Make an existing account the current one (checked with the service).

    Example: mms account modelmanagement set -n acct1 -g rg1
    """
    with ServiceClient() as client:
        client.json("GET", f"{client.profile.group_path(resource_group)}/accounts/{name}")
        _make_current(client, resource_group, name)
    err.print(f"Current account: {name} in {resource_group}.", highlight=False)


@modelmanagement_cli.command("show")
def show_account(
    name: Name = None, resource_group: Group = None, output: OutputOption = Output.table, query: QueryOption = None
) -> None:
    """One account (default: the current one).

    Example: mms account modelmanagement show -o json
    """
    with ServiceClient() as client:
        account = client.json("GET", _path(client, name, resource_group))
    show(account, output, COLUMNS, query)


@modelmanagement_cli.command("list")
def list_accounts(
    resource_group: Annotated[
        str | None, typer.Option("--resource-group", "-g", help="only this resource group's (default: every one)")
    ] = None,
    output: OutputOption = Output.table,
    query: QueryOption = None,
) -> None:
    """The accounts you may use: every one your roles reach, or a resource group's with -g.

    Example: mms account modelmanagement list; mms account modelmanagement list -g rg1
    """
    with ServiceClient() as client:
        path = f"{client.profile.group_path(resource_group)}/accounts" if resource_group else "/api/accounts"
        accounts = all_pages(client, path)
    show(accounts, output, COLUMNS, query)


@modelmanagement_cli.command("delete")
def delete(
    name: Annotated[str, typer.Option("--name", "-n")],
    resource_group: Group = None,
    force: Annotated[bool, typer.Option(help="also when it holds models")] = False,
) -> None:
    """Delete an account.

    Example: mms account modelmanagement delete -n acct1 -g rg1
    """
    with ServiceClient() as client:
        client.call("DELETE", _path(client, name, resource_group), params={"force": "true"} if force else None)
    err.print(f"Deleted account {name}.", highlight=False)


def _make_current(client: ServiceClient, resource_group: str, name: str) -> None:
    client.profile.resource_group, client.profile.account = resource_group, name
    client.store.save_profile(client.profile)
