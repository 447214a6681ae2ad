"""Sign-in and context: `mms login`, `mms logout`, `mms env set|show`."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from jmespath.parser import ParsedResult

from mms_client.api import CliError, fetch_token
from mms_client.output import Output, OutputOption, QueryOption, err, field, show
from mms_client.profile import (
    DEFAULT_SUBSCRIPTION,
    SERVER_ENV,
    TOKEN_ENV,
    ConfigStore,
    Credentials,
    env_server,
    env_token,
    server_url,
)

env_cli = typer.Typer(help="The current service, subscription, resource group and account.", no_args_is_help=True)


def login(
    username: Annotated[str, typer.Option("--username", "-u", help="the service principal's client id")],
    server: Annotated[
        str | None,
        typer.Option("--server", help=f"the service's URL (or host:port), e.g. http://127.0.0.1:8000 [{SERVER_ENV}]"),
    ] = None,
    service_principal: Annotated[
        bool, typer.Option("--service-principal", help="sign in as a service principal (the only kind)")
    ] = False,
    password: Annotated[
        str | None, typer.Option("--password", "-p", help="its secret (asked for when left out)")
    ] = None,
    subscription: Annotated[
        str, typer.Option("--subscription", "-s", help="the subscription id to work in")
    ] = DEFAULT_SUBSCRIPTION,
    authority: Annotated[
        str | None,
        typer.Option(help="an external OAuth 2.0 token endpoint (client credentials); default: the service's own"),
    ] = None,
    scope: Annotated[
        str | None, typer.Option(help="the scope to ask the external authority for, e.g. api://mms/.default")
    ] = None,
) -> None:
    """Sign in with a service principal; the token is cached (owner-only) and renewed when it expires.

    Example: mms login --service-principal -u 5f0c... -p $SECRET --server http://127.0.0.1:8000
    """
    if not service_principal:
        raise CliError("only service principals can sign in: add --service-principal")
    store = ConfigStore()
    profile = store.load_profile()
    if server is not None:
        try:
            server = server_url(server)
        except ValueError as exc:
            raise CliError(f"--server: {exc}") from None
    server = server or env_server() or profile.server
    if not server:
        raise CliError(f"no service given: pass --server <URL> (or host:port), or set {SERVER_ENV}")
    if password is None:
        password = typer.prompt("Secret", hide_input=True)
    token_url = authority or f"{server}/oauth2/token"
    token, expires_at = fetch_token(token_url, username, password, scope)
    if profile.server != server or profile.subscription != subscription:
        profile.resource_group = profile.account = None  # they belonged to the old context
    profile.server, profile.subscription, profile.client_id = server, subscription, username
    profile.authority, profile.scope = authority, scope
    store.save_profile(profile)
    store.save_credentials(Credentials(password, token, expires_at))
    err.print(f"Signed in to {server} as {username} (subscription {subscription}).", highlight=False)


def logout() -> None:
    """Forget the cached token and secret (the context stays).

    Example: mms logout
    """
    store = ConfigStore()
    store.save_credentials(Credentials())
    err.print("Signed out.")


@env_cli.command("set")
def env_set(
    server: Annotated[str | None, typer.Option(help="the service's URL, or host:port")] = None,
    subscription: Annotated[str | None, typer.Option("--subscription", "-s")] = None,
    resource_group: Annotated[str | None, typer.Option("--resource-group", "-g")] = None,
    account: Annotated[str | None, typer.Option("--account", "-n", help="the model management account")] = None,
    output: OutputOption = Output.table,
    query: QueryOption = None,
) -> None:
    """Change the current context; what is not given stays.

    Example: mms env set -g rg1 -n acct1
    """
    store = ConfigStore()
    profile = store.load_profile()
    if server is not None:
        try:
            profile.server = server_url(server)
        except ValueError as exc:
            raise CliError(f"--server: {exc}") from None
    if subscription is not None:
        profile.subscription = subscription
    if resource_group is not None:
        profile.resource_group = resource_group
    if account is not None:
        profile.account = account
    store.save_profile(profile)
    _show_profile(output, query)


@env_cli.command("show")
def env_show(output: OutputOption = Output.table, query: QueryOption = None) -> None:
    """The current context (never the secret).

    Example: mms env show -o json
    """
    _show_profile(output, query)


def _show_profile(output: Output, query: ParsedResult | None) -> None:
    store = ConfigStore()
    profile = store.load_profile()
    credentials = store.load_credentials()
    if env_token():
        signed_in = f"token from {TOKEN_ENV}"
    elif credentials.client_secret:
        left = (credentials.expires_at or 0) - time.time()
        signed_in = (
            f"yes (token valid {int(left // 60)} more minutes)" if left > 0 else "yes (token renews on next use)"
        )
    else:
        signed_in = "no"
    record = {
        "server": env_server() or profile.server,
        "subscription": profile.subscription,
        "resourceGroup": profile.resource_group,
        "account": profile.account,
        "clientId": profile.client_id,
        "authority": profile.authority,
        "signedIn": signed_in,
        "configDir": str(store.root),
    }
    show(record, output, [(k, field(k)) for k in record], query)
