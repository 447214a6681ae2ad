"""`mms service create realtime|list|show|logs|keys|regen-key|update|delete` (the web-services preview).

create, update and delete wait (``--wait``, the default) until the service settles or is gone,
at most ``--timeout`` seconds: exit 0 Healthy (or gone), 2 Failed, 3 Unhealthy, 4 timed out.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from mms_client.api import CliError, ServiceClient, ServiceError, all_pages, idempotency_headers
from mms_client.operations import (
    Uploads,
    deployment_config,
    find_service,
    follow,
    inference_config_body,
    preview_call,
    wait_for_service,
)
from mms_client.output import Output, OutputOption, QueryOption, err, field, printer, show

service_cli = typer.Typer(
    help="Web services: images deployed as scoring endpoints (web-services preview).", no_args_is_help=True
)
create_cli = typer.Typer(help="Deploy an image as a web service.", no_args_is_help=True)
service_cli.add_typer(create_cli, name="create")


def _replicas(service: dict[str, Any]) -> str:
    status = service.get("deploymentStatus") or {}
    return f"{status.get('readyReplicas', 0)}/{status.get('desiredReplicas', 0)}"


COLUMNS = [
    ("name", field("name")),
    ("id", field("id")),
    ("state", field("state")),
    ("compute", field("computeName")),
    ("ready", _replicas),
    ("auth", field("authEnabled")),
    ("scoring uri", field("scoringUri")),
    ("updated", field("updatedTime")),
]
DETAIL_COLUMNS = [
    *COLUMNS,
    ("image", field("imageId")),
    ("image location", field("imageLocation")),
    ("replicas", field("numReplicas")),
    ("autoscaler", field("autoScaler")),
    ("resources", field("containerResourceRequirements")),
    ("error", field("error.message")),
]
KEY_COLUMNS = [("primary key", field("primaryKey")), ("secondary key", field("secondaryKey"))]
DONE = {"Healthy": 0, "Failed": 2, "Unhealthy": 3}  # exit codes of a wait
TIMED_OUT = 4

NameOption = Annotated[str | None, typer.Option("--name", "-n", help="the service's name")]
IdOption = Annotated[str | None, typer.Option("--id", "-i", help="the service's id (instead of -n)")]
WaitOption = Annotated[
    bool, typer.Option("--wait/--no-wait", help="wait until the service settles (or is gone), at most --timeout")
]
TimeoutOption = Annotated[int, typer.Option(help="give up waiting after this many seconds (exit 4)")]
Replicas = Annotated[int | None, typer.Option("--replicas", "--num-replicas", help="a fixed number of replicas")]
AutoscaleMin = Annotated[int | None, typer.Option("--autoscale-min", help="kubernetes: the fewest replicas")]
AutoscaleMax = Annotated[int | None, typer.Option("--autoscale-max", help="kubernetes: the most replicas")]
AutoscaleTarget = Annotated[
    int | None, typer.Option("--autoscale-target-utilization", help="kubernetes: the CPU % to scale at")
]
Cpu = Annotated[float | None, typer.Option("--cpu", help="CPU cores of each replica")]
MemoryGb = Annotated[float | None, typer.Option("--memory-gb", help="memory of each replica (GB)")]
Auth = Annotated[bool | None, typer.Option("--auth/--no-auth", help="scoring requests need a key (default: yes)")]


def _reference(name: str | None, service_id: str | None) -> None:
    if bool(name) == bool(service_id):
        raise CliError("name the service with -n NAME or -i ID (one of them)", exit_code=2)


def _autoscaler(
    replicas: int | None, low: int | None, high: int | None, target: int | None, current: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The autoScaler the --autoscale-* options ask for (over ``current``'s values), or None."""
    given = {"minReplicas": low, "maxReplicas": high, "targetUtilization": target}
    if all(value is None for value in given.values()):
        return None
    if replicas is not None:
        raise CliError("--replicas cannot be given with --autoscale-*: choose one", exit_code=2)
    return {**(current or {}), "autoscaleEnabled": True, **{k: v for k, v in given.items() if v is not None}}


def _resources(cpu: float | None, memory_gb: float | None, current: dict[str, Any] | None) -> dict[str, Any] | None:
    if cpu is None and memory_gb is None:
        return None
    merged = dict(current or {})
    if cpu is not None:
        merged["cpu"] = cpu
    if memory_gb is not None:
        merged["memoryInGB"] = memory_gb
    return merged


def _read_deployment_config(path: Path) -> tuple[dict[str, Any], str | None]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CliError(f"--dc: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"--dc: cannot read {path}: {exc}") from None
    except ValueError as exc:
        raise CliError(f"--dc: {path} is not JSON: {exc}") from None
    config, compute_type, ignored = deployment_config(document, f"--dc {path}")
    if ignored:
        err.print(f"[yellow]warning:[/yellow] {path}: ignored here: {', '.join(ignored)}", highlight=False)
    return config, compute_type


def _finish(
    client: ServiceClient, service: dict[str, Any], wait: bool, timeout: int, output: Output, query: Any
) -> None:
    """Show the service now (--no-wait), or once it settles; the exit code says how it ended."""
    if not wait:
        show(service, output, DETAIL_COLUMNS, query)
        err.print(
            f"Service {service['name']} is {service['state']} (`mms service show -n {service['name']}` follows it).",
            highlight=False,
        )
        return
    settled = wait_for_service(client, service["id"], timeout, status_console=err)
    assert settled is not None
    show(settled, output, DETAIL_COLUMNS, query)
    state = settled["state"]
    if state in DONE:
        if state != "Healthy":
            reason = (settled.get("error") or {}).get("message") or ""
            err.print(
                f"[red]error:[/red] service {settled['name']} is {state}{': ' + reason if reason else ''}",
                highlight=False,
            )
        raise typer.Exit(DONE[state])
    err.print(
        f"[red]error:[/red] service {settled['name']} is still {state} after {timeout} s "
        f"(the change is not applied yet; `mms service show -n {settled['name']}` follows it)",
        highlight=False,
    )
    raise typer.Exit(TIMED_OUT)


def _model_ids(client: ServiceClient, references: list[str]) -> list[str]:
    """Model ids from ``name:version`` (as the seeds write them) or ids."""
    ids = []
    for reference in references:
        name, sep, version = reference.rpartition(":")
        if not sep or not version.isdigit():
            ids.append(reference)  # an id
            continue
        versions = all_pages(client, client.account_url("models"), params={"name": name})
        found = [m["id"] for m in versions if str(m.get("version")) == version]
        if not found:
            raise CliError(
                f"-m {reference}: no model {name!r} with version {version} in this account "
                f"(`mms model list -n {name}` shows its versions)",
                exit_code=2,
            )
        ids.append(found[0])
    return ids


def deploy_from_models(
    name: Annotated[str, typer.Option("--name", "-n", help="the service's name: 3-32 lower-case letters, digits, '-'")],
    model: Annotated[
        list[str], typer.Option("--model", "-m", help="a registered model as name:version (or its id); repeatable")
    ],
    ic: Annotated[
        Path,
        typer.Option("--ic", "--inference-config-file", help="an inferenceconfig.json (entryScript, runtime, ...)"),
    ],
    dc: Annotated[Path | None, typer.Option("--dc", "--deploy-config-file", help="a deploymentconfig.json")] = None,
    compute_target: Annotated[
        str | None, typer.Option("--compute-target", "--ct", help="the compute target's name (default: local)")
    ] = None,
    wait: WaitOption = True,
    timeout: TimeoutOption = 3600,
    output: OutputOption = Output.table,
    query: QueryOption = None,
) -> None:
    """Build an image from registered models and an inference configuration, and deploy it as a
    web service: one operation; waits (the build log, then the service) until it settles.

    Exit code: 0 Healthy, 2 Failed, 3 Unhealthy, 4 still Transitioning at the timeout.

    Example: mms model deploy -n housing-svc -m housing.model:1 --ic inferenceconfig.json
    --dc deploymentconfig.json --ct local
    """
    try:
        inference = json.loads(ic.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CliError(f"--ic {ic}: not a JSON file: {exc}", exit_code=2) from None
    if not isinstance(inference, dict):
        raise CliError(f"--ic {ic}: needs an entryScript (the scoring script's path)", exit_code=2)
    config, compute_type = _read_deployment_config(dc) if dc else ({}, None)
    with ServiceClient() as client, Uploads(client) as uploads:
        model_ids = _model_ids(client, model)
        manifest = inference_config_body(client, uploads, inference, ic.parent, name, model_ids, [], f"--ic {ic}")
        manifest.pop("name"), manifest.pop("modelIds")
        body: dict[str, Any] = {"name": name, "modelIds": model_ids, "inferenceConfig": manifest}
        body["deploymentConfig"] = config
        if compute_target:
            body["computeName"] = compute_target
        if compute_type:
            body["computeType"] = compute_type
        service = preview_call(client, "POST", client.account_url("services"), json=body, headers=idempotency_headers())
    with ServiceClient() as client:
        if wait:
            err.print(f"Building image {service['imageId']} for service {name}:", highlight=False)
            started = time.monotonic()
            image = follow(client, service["imageId"], timeout, printer(err), status_console=err)
            if image["CreationState"] != "Succeeded":
                service = find_service(client, None, service["id"])
            timeout = max(1, int(timeout - (time.monotonic() - started)))
        _finish(client, service, wait, timeout, output, query)


@create_cli.command("realtime")
def create_realtime(
    image_id: Annotated[str, typer.Option("--image-id", help="a Succeeded image of the account")],
    name: Annotated[str, typer.Option("--name", "-n", help="3-32 lower-case letters, digits or '-'")],
    compute_target: Annotated[
        str | None, typer.Option("--compute-target", "--ct", help="the compute target's name (default: local)")
    ] = None,
    replicas: Replicas = None,
    autoscale_min: AutoscaleMin = None,
    autoscale_max: AutoscaleMax = None,
    autoscale_target_utilization: AutoscaleTarget = None,
    cpu: Cpu = None,
    memory_gb: MemoryGb = None,
    auth: Auth = None,
    dc: Annotated[
        Path | None, typer.Option("--dc", "--deploy-config-file", help="a deploymentconfig.json (options override it)")
    ] = None,
    description: Annotated[str | None, typer.Option("--description", "-d")] = None,
    wait: WaitOption = True,
    timeout: TimeoutOption = 3600,
    output: OutputOption = Output.table,
    query: QueryOption = None,
) -> None:
    """Deploy a Succeeded image as a web service on a compute target, then wait until it settles.

    Exit code: 0 Healthy, 2 Failed, 3 Unhealthy, 4 still Transitioning at the timeout.

    Example: mms service create realtime --image-id 7d2e... -n housing-svc --replicas 1 --cpu 0.5 --memory-gb 1
    """
    config, compute_type = _read_deployment_config(dc) if dc else ({}, None)
    autoscaler = _autoscaler(
        replicas, autoscale_min, autoscale_max, autoscale_target_utilization, config.get("autoScaler")
    )
    if autoscaler is not None:
        config["autoScaler"] = autoscaler
        config.pop("numReplicas", None)
    if replicas is not None:
        config["numReplicas"] = replicas
        config.pop("autoScaler", None)
    resources = _resources(cpu, memory_gb, config.get("containerResourceRequirements"))
    if resources is not None:
        config["containerResourceRequirements"] = resources
    if auth is not None:
        config["authEnabled"] = auth
    body: dict[str, Any] = {"name": name, "imageId": image_id, "deploymentConfig": config}
    if compute_target:
        body["computeName"] = compute_target
    if compute_type:
        body["computeType"] = compute_type  # the service checks it against the target's
    if description:
        body["description"] = description
    with ServiceClient() as client:
        service = preview_call(client, "POST", client.account_url("services"), json=body, headers=idempotency_headers())
        _finish(client, service, wait, timeout, output, query)


@service_cli.command("list")
def list_services(
    compute_target: Annotated[
        str | None, typer.Option("--compute-target", "--ct", help="only the services of this target")
    ] = None,
    image_id: Annotated[str | None, typer.Option("--image-id", help="only the services running this image")] = None,
    output: OutputOption = Output.table,
    query: QueryOption = None,
) -> None:
    """The account's web services.

    Example: mms service list --ct local
    """
    params = {k: v for k, v in (("computeName", compute_target), ("imageId", image_id)) if v}
    with ServiceClient() as client:
        services = preview_call(client, "GET", client.account_url("services"), params=params)["value"]
    show(services, output, COLUMNS, query)


@service_cli.command("show")
def show_service(
    name: NameOption = None, service_id: IdOption = None, output: OutputOption = Output.table, query: QueryOption = None
) -> None:
    """One web service: its state, replicas, scoring URI and why it failed.

    Example: mms service show -n housing-svc
    """
    _reference(name, service_id)
    with ServiceClient() as client:
        service = find_service(client, name, service_id)
    show(service, output, DETAIL_COLUMNS, query)


@service_cli.command("logs")
def logs(
    name: NameOption = None,
    service_id: IdOption = None,
    tail: Annotated[int, typer.Option(min=1, max=1000, help="how many of the newest lines")] = 200,
) -> None:
    """What the service's replicas printed lately (init(), run(), the scoring server), each line
    prefixed with its generation and replica; kept after a failed deployment.

    Example: mms service logs -n housing-svc --tail 50
    """
    _reference(name, service_id)
    with ServiceClient() as client:
        service = find_service(client, name, service_id)
        path = client.account_url("services", service["id"], "logs")
        try:
            text = client.call("GET", path, params={"tail": tail}).text
        except ServiceError as exc:
            if exc.status_code == 404 and exc.code == "NotFound":
                raise CliError(f"{client.server} does not keep web services' logs (an older service)") from None
            raise
    typer.echo(text, nl=False)


@service_cli.command("keys")
def keys(
    name: NameOption = None, service_id: IdOption = None, output: OutputOption = Output.table, query: QueryOption = None
) -> None:
    """The service's two scoring keys (send one as Authorization: Bearer <key>).

    Example: mms service keys -n housing-svc
    """
    _reference(name, service_id)
    with ServiceClient() as client:
        service = find_service(client, name, service_id)
        found = preview_call(client, "POST", client.account_url("services", service["id"], "keys"))
    show(found, output, KEY_COLUMNS, query)


@service_cli.command("regen-key")
def regen_key(
    key: Annotated[str, typer.Option("--key", help="primary or secondary")],
    name: NameOption = None,
    service_id: IdOption = None,
    output: OutputOption = Output.table,
    query: QueryOption = None,
) -> None:
    """Replace the primary or the secondary key; the old one stops working within seconds.

    Example: mms service regen-key -n housing-svc --key primary
    """
    _reference(name, service_id)
    if key.lower() not in ("primary", "secondary"):
        raise CliError(f"--key: {key!r} is not a key: give primary or secondary", exit_code=2)
    with ServiceClient() as client:
        service = find_service(client, name, service_id)
        url = client.account_url("services", service["id"], "regenerateKeys")
        found = preview_call(client, "POST", url, json={"keyType": key.capitalize()})
    show(found, output, KEY_COLUMNS, query)


@service_cli.command("update")
def update(
    name: NameOption = None,
    service_id: IdOption = None,
    image_id: Annotated[str | None, typer.Option("--image-id", help="swap the image (a rolling update)")] = None,
    replicas: Replicas = None,
    autoscale_min: AutoscaleMin = None,
    autoscale_max: AutoscaleMax = None,
    autoscale_target_utilization: AutoscaleTarget = None,
    cpu: Cpu = None,
    memory_gb: MemoryGb = None,
    auth: Auth = None,
    wait: WaitOption = True,
    timeout: TimeoutOption = 3600,
    output: OutputOption = Output.table,
    query: QueryOption = None,
) -> None:
    """Swap the image, scale, resize or switch key auth of a settled service, then wait until it settles.

    Exit code: 0 Healthy, 2 Failed, 3 Unhealthy, 4 still Transitioning at the timeout.

    Example: mms service update -n housing-svc --replicas 2
    """
    _reference(name, service_id)
    with ServiceClient() as client:
        service = find_service(client, name, service_id)
        body: dict[str, Any] = {}
        if image_id:
            body["imageId"] = image_id
        autoscaler = _autoscaler(
            replicas, autoscale_min, autoscale_max, autoscale_target_utilization, service.get("autoScaler")
        )
        if autoscaler is not None:
            body["autoScaler"] = autoscaler
        if replicas is not None:
            body["numReplicas"] = replicas
        # The service takes the whole requirements: the one not given stays as it is.
        resources = _resources(cpu, memory_gb, service.get("containerResourceRequirements"))
        if resources is not None:
            body["containerResourceRequirements"] = resources
        if auth is not None:
            body["authEnabled"] = auth
        if not body:
            raise CliError(
                "nothing to change: give --image-id, --replicas, --autoscale-*, --cpu, --memory-gb or --auth/--no-auth",
                exit_code=2,
            )
        changed = preview_call(client, "PATCH", client.account_url("services", service["id"]), json=body)
        _finish(client, changed, wait, timeout, output, query)


@service_cli.command("delete")
def delete(
    name: NameOption = None,
    service_id: IdOption = None,
    wait: WaitOption = True,
    timeout: TimeoutOption = 3600,
    force: Annotated[
        bool,
        typer.Option(
            help="forget it now, for a target you attached (a swarm or cluster) that will never answer again: "
            "what it runs there is removed in the background if that target answers again; refused on the "
            "built-in targets (local, swarm), whose plain delete always completes"
        ),
    ] = False,
    output: OutputOption = Output.table,
    query: QueryOption = None,
) -> None:
    """Delete a web service and everything it made; waits until it is gone.

    A service whose attached target is gone for good stays Deleting: --force removes it at once
    (refused on the built-in targets local and swarm, where a plain delete always completes).

    Exit code: 0 gone (or Deleting with --no-wait), 4 still Deleting at the timeout.

    Example: mms service delete -n housing-svc [--force]
    """
    _reference(name, service_id)
    with ServiceClient() as client:
        service = find_service(client, name, service_id)
        params = {"force": "true"} if force else None
        deleting = preview_call(client, "DELETE", client.account_url("services", service["id"]), params=params)
        if force:
            err.print(f"Deleted service {service['name']}.", highlight=False)
            return
        if not wait:
            show(deleting, output, DETAIL_COLUMNS, query)
            err.print(f"Deleting service {deleting['name']}.", highlight=False)
            return
        left = wait_for_service(client, service["id"], timeout, gone=True, status_console=err)
    if left is None:
        err.print(f"Deleted service {service['name']}.", highlight=False)
        return
    show(left, output, DETAIL_COLUMNS, query)
    err.print(
        f"[red]error:[/red] service {left['name']} is still {left['state']} after {timeout} s "
        f"(`mms service show -n {left['name']}` follows it)",
        highlight=False,
    )
    raise typer.Exit(TIMED_OUT)
