"""`mms model register|list|show|delete`."""

from __future__ import annotations

import hashlib
import mimetypes
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Annotated, Any, Self

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from mms_client.accounts import all_pages
from mms_client.api import CliError, ServiceClient
from mms_client.output import Output, OutputOption, QueryOption, err, field, show

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


class Uploads:
    """What a command uploaded or registered, deleted again if the command then fails, so a
    failed command leaves nothing behind in the account."""

    def __init__(self, client: ServiceClient) -> None:
        self.client = client
        self.assets: list[str] = []
        self.models: list[str] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None or not (self.assets or self.models):
            return
        left = []
        # Models first: an asset is what a model's URL points at.
        for kind, ids in (("models", self.models), ("assets", self.assets)):
            for resource_id in reversed(ids):
                try:
                    self.client.call("DELETE", self.client.account_url(kind, resource_id), ok=(204, 404))
                except CliError:
                    left.append(f"{kind[:-1]} {resource_id}")
        if left:
            err.print(
                f"[yellow]warning:[/yellow] could not delete what this command made: {', '.join(left)}", highlight=False
            )
        else:
            err.print(
                f"Deleted the {len(self.assets)} upload(s) and {len(self.models)} model(s) this command made.",
                highlight=False,
            )


def register_model(
    client: ServiceClient, path: Path, name: str, tags: list[str], description: str | None, uploads: Uploads
) -> dict[str, Any]:
    """Upload ``path`` (a folder as a zip) and register it; the new model version."""
    if not path.exists():
        raise CliError(f"{path} does not exist: give -m a model file or folder")
    with tempfile.TemporaryDirectory(prefix="mms-model-") as tmp:
        if path.is_dir():
            upload, mime_type, unpack = zip_folder(path, Path(tmp) / f"{path.name}.zip"), "application/zip", True
        else:
            upload, unpack = path, False
            mime_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        asset = upload_with_progress(client, upload, upload.name, uploads)
    body = {
        "name": name,
        "tags": tags,
        "description": description,
        "url": asset["url"],
        "mimeType": mime_type,
        "unpack": unpack,
        "sha256": asset["sha256"],
    }
    registered = client.json("POST", client.account_url("models"), json=body)
    uploads.models.append(registered["id"])
    return registered


def upload_with_progress(client: ServiceClient, path: Path, name: str, uploads: Uploads) -> dict[str, Any]:
    """Upload one file as an asset with a progress bar; checks the service got the same bytes."""
    size = path.stat().st_size
    local = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            local.update(block)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as progress:
        task = progress.add_task(f"uploading {name}", total=size)
        asset = client.upload(path, name, lambda n: progress.advance(task, n))
    uploads.assets.append(asset["id"])
    if asset.get("sha256") != local.hexdigest():
        raise CliError(f"{name} arrived changed (sha256 {asset.get('sha256')}, sent {local.hexdigest()}): try again")
    return asset


def zip_folder(folder: Path, dest: Path) -> Path:
    """The folder's files, in name order, as a zip (links are refused, not followed)."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for entry in sorted(names):
            path = Path(root) / entry
            if path.is_symlink():
                raise CliError(f"{path} is a symbolic link: copy the file it points to into the folder")
            files.append(path)
    if not files:
        raise CliError(f"{folder} is empty: nothing to register")
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for path in files:
            archive.write(path, path.relative_to(folder).as_posix())
    return dest


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
