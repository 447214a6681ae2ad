"""`mms image create|show|list|logs|cancel|delete` and `mms base-image list`."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from mms_client.api import ServiceClient, all_pages
from mms_client.operations import create_image, follow
from mms_client.output import Output, OutputOption, QueryOption, err, field, out, printer, show

image_cli = typer.Typer(help="Scoring images built from manifests.", no_args_is_help=True)


def smoke_test(image: dict[str, Any]) -> str | None:
    """``Passed``, or ``Skipped, <why>``: whether the image was started once before it was called good."""
    found = image.get("SmokeTest") or {}
    result, reason = found.get("result"), found.get("reason")
    return f"{result}, {reason}" if result and reason else result


COLUMNS = [
    ("id", field("Id")),
    ("name", field("Name")),
    ("version", field("Version")),
    ("state", field("CreationState")),
    ("builder", field("Builder")),
    ("location", field("ImageLocation")),
    ("created", field("CreatedTime")),
    ("smoke test", smoke_test),
]
DONE = {"Succeeded": 0, "Failed": 2, "Cancelled": 3}  # exit codes of `image create`
TIMED_OUT = 4
ImageId = Annotated[str, typer.Option("--id", "-i", help="the image's id")]


@image_cli.command("create")
def create(
    name: Annotated[str, typer.Option("--name", "-n", help="the image's name")],
    manifest_id: Annotated[str, typer.Option("--manifest-id", help="the manifest to build")],
    builder: Annotated[str | None, typer.Option(help="oci (daemonless) or docker; default: the service's")] = None,
    description: Annotated[str | None, typer.Option("--description", "-d")] = None,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="return once the build is queued, without following it")
    ] = False,
    wait: Annotated[bool, typer.Option("--wait", hidden=True, help="deprecated: waiting is the default")] = False,
    timeout: Annotated[int, typer.Option(help="give up following after this many seconds (exit 4)")] = 3600,
    output: OutputOption = Output.table,
    query: QueryOption = None,
) -> None:
    """Build an image from a manifest, following the build's log until it ends.

    Exit code: 0 Succeeded, 2 Failed, 3 Cancelled, 4 still building at the timeout.

    With --no-wait it returns the queued image at once (then: mms image logs -f).

    Example: mms image create -n housingmodel-image --manifest-id 9b1c...
    """
    del wait  # `--wait` was needed before waiting became the default: still accepted
    with ServiceClient() as client:
        image = create_image(client, name, manifest_id, builder, description)
        if no_wait:
            show(image, output, COLUMNS, query)
            return
        image = follow(client, image["Id"], timeout, printer(err), err)  # stdout keeps the result alone
    show(image, output, COLUMNS, query)
    state = image["CreationState"]
    if state != "Succeeded":
        reason = (image.get("Error") or {}).get("message") or ""
        err.print(
            f"[red]error:[/red] image {image['Name']} version {image['Version']} "
            f"{'is still ' + state if state not in DONE else state}{': ' + reason if reason else ''}",
            highlight=False,
        )
    raise typer.Exit(DONE.get(state, TIMED_OUT))


@image_cli.command("show")
def show_image(image_id: ImageId, output: OutputOption = Output.table, query: QueryOption = None) -> None:
    """One image: its state, where to pull it from, and why it failed.

    Example: mms image show -i 7d2e...
    """
    with ServiceClient() as client:
        image = client.json("GET", client.account_url("images", image_id))
    show(image, output, [*COLUMNS, ("digest", field("Digest")), ("error", field("Error.message"))], query)


@image_cli.command("list")
def list_images(
    manifest_id: Annotated[str | None, typer.Option("--manifest-id", help="only images of this manifest")] = None,
    manifest_name: Annotated[
        str | None, typer.Option("--manifest-name", help="only images of manifests of this name")
    ] = None,
    output: OutputOption = Output.table,
    query: QueryOption = None,
) -> None:
    """The account's images.

    Example: mms image list --manifest-name housingmodel-manifest
    """
    params = {k: v for k, v in (("manifestId", manifest_id), ("manifestName", manifest_name)) if v}
    with ServiceClient() as client:
        images = all_pages(client, client.account_url("images"), params)
    show(images, output, COLUMNS, query)


@image_cli.command("logs")
def logs(
    image_id: ImageId,
    follow_log: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until the build ends")] = False,
) -> None:
    """The build log (kept after a failure: its last lines name the failing step).

    Example: mms image logs -i 7d2e... --follow
    """
    with ServiceClient() as client:
        if follow_log:
            follow(client, image_id, 24 * 3600, printer(out), err)
            return
        sys.stdout.write(client.call("GET", client.account_url("images", image_id, "log")).text)


@image_cli.command("cancel")
def cancel(image_id: ImageId, output: OutputOption = Output.table, query: QueryOption = None) -> None:
    """Cancel a build: a queued one at once, a running one within seconds.

    Example: mms image cancel -i 7d2e...
    """
    with ServiceClient() as client:
        image = client.json("POST", client.account_url("images", image_id, "cancel"))
    show(image, output, COLUMNS, query)


@image_cli.command("delete")
def delete(image_id: ImageId) -> None:
    """Forget an image that is not being built.

    Example: mms image delete -i 7d2e...
    """
    with ServiceClient() as client:
        client.call("DELETE", client.account_url("images", image_id))
    err.print(f"Deleted image {image_id}.", highlight=False)


def list_base_images(output: OutputOption = Output.table, query: QueryOption = None) -> None:
    """The prebuilt inference base images, newest first (the newest CPU one is the default).

    Example: mms base-image list
    """
    with ServiceClient() as client:
        bases = all_pages(client, client.account_url("baseImages"))
    show(
        bases,
        output,
        [
            ("name", field("name")),
            ("reference", field("reference")),
            ("python", field("pythonVersion")),
            ("variant", field("variant")),
            ("published", field("publishedAt")),
        ],
        query,
    )
