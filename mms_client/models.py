"""`mms model register|list|show|delete|deploy`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mms_client.api import ServiceClient, all_pages
from mms_client.operations import Uploads, register_model
from mms_client.output import Output, OutputOption, QueryOption, err, field, show
from mms_client.services import deploy_from_models

model_cli = typer.Typer(help="Registered models.", no_args_is_help=True)

COLUMNS = [
    ("id", field("id")),
    ("name", field("name")),
    ("version", field("version")),
    ("tags", field("tags")),
    ("description", field("description")),
    ("created", field("createdAt")),
]
ModelId = Annotated[str, typer.Option("--id", "-i", help="the model's id")]


@model_cli.command("register")
def register(
    model: Annotated[
        Path, typer.Option("--model", "-m", help="a model file, or a folder (zipped and unpacked in the image)")
    ],
    name: Annotated[str, typer.Option("--name", "-n", help="1-32 letters, digits, '-', '.' or '_'")],
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="a tag; repeat for more")] = None,
    description: Annotated[str | None, typer.Option("--description", "-d")] = None,
    output: OutputOption = Output.table,
    query: QueryOption = None,
) -> None:
    """Upload a model and register it under NAME: each registration gets the next version.

    Example: mms model register -m housing.model -n housing.model -t myTag -d "my housing.model"
    """
    with ServiceClient() as client, Uploads(client) as uploads:
        registered = register_model(client, model, name, tag or [], description, uploads)
    show(registered, output, COLUMNS, query)


@model_cli.command("list")
def list_models(
    name: Annotated[str | None, typer.Option("--name", "-n", help="only this name, newest version first")] = None,
    tag: Annotated[str | None, typer.Option("--tag", "-t", help="only models with this tag")] = None,
    output: OutputOption = Output.table,
    query: QueryOption = None,
) -> None:
    """The account's models.

    Example: mms model list -n housing.model
    """
    params = {k: v for k, v in (("name", name), ("tag", tag)) if v}
    with ServiceClient() as client:
        models = all_pages(client, client.account_url("models"), params)
    show(models, output, COLUMNS, query)


@model_cli.command("show")
def show_model(model_id: ModelId, output: OutputOption = Output.table, query: QueryOption = None) -> None:
    """One model version.

    Example: mms model show -i 3f2a...
    """
    with ServiceClient() as client:
        model = client.json("GET", client.account_url("models", model_id))
    show(model, output, [*COLUMNS, ("url", field("url"))], query)


@model_cli.command("delete")
def delete_model(model_id: ModelId) -> None:
    """Delete a model version (its version number is never reused).

    Example: mms model delete -i 3f2a...
    """
    with ServiceClient() as client:
        client.call("DELETE", client.account_url("models", model_id))
    err.print(f"Deleted model {model_id}.", highlight=False)


# `az ml model deploy`: its home is with the other service commands.
model_cli.command("deploy")(deploy_from_models)
