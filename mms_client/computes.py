"""`mms compute list|show|attach|detach`: the targets services run on (the web-services preview).

Credentials (the swarm manager's TLS key, a kubeconfig) are read from local files and sent
inline; the service seals them and never answers them, so nothing here prints them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mms_client.api import CliError, ServiceClient
from mms_client.operations import preview_call
from mms_client.output import Output, OutputOption, QueryOption, err, field, show

compute_cli = typer.Typer(
    help="Compute targets services run on: local (built in), swarm, kubernetes (web-services preview).",
    no_args_is_help=True,
)

COLUMNS = [
    ("name", field("name")),
    ("type", field("type")),
    ("docker host", field("properties.dockerHost")),
    ("namespace", field("properties.namespace")),
    ("built in", field("builtIn")),
    ("credentials", field("hasCredentials")),
    ("created", field("createdTime")),
]
ComputeName = Annotated[str, typer.Option("--name", "-n", help="the compute target's name")]
_MAX_CREDENTIAL_FILE = 1 << 20  # far above what the service takes: a mistaken file is refused here


@compute_cli.command("list")
def list_computes(output: OutputOption = Output.table, query: QueryOption = None) -> None:
    """The account's compute targets: local, then the attached ones.

    Example: mms compute list
    """
    with ServiceClient() as client:
        targets = preview_call(client, "GET", client.account_url("computes"))["value"]
    show(targets, output, COLUMNS, query)


@compute_cli.command("show")
def show_compute(name: ComputeName, output: OutputOption = Output.table, query: QueryOption = None) -> None:
    """One compute target (never its credentials).

    Example: mms compute show -n myswarm
    """
    with ServiceClient() as client:
        target = preview_call(client, "GET", client.account_url("computes", name))
    show(target, output, COLUMNS, query)


@compute_cli.command("attach")
def attach(
    name: ComputeName,
    compute_type: Annotated[str, typer.Option("--type", help="swarm or kubernetes")],
    docker_host: Annotated[
        str | None, typer.Option("--docker-host", help="swarm: the manager's engine, tcp://host:port (TLS)")
    ] = None,
    tls_ca: Annotated[
        Path | None, typer.Option("--tls-ca", help="swarm: the engine's CA certificate (PEM file)")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="swarm: the client certificate (PEM file)")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="swarm: the client key (PEM file)")] = None,
    kubeconfig: Annotated[
        Path | None, typer.Option("--kubeconfig", help="kubernetes: a kubeconfig with inline credentials")
    ] = None,
    namespace: Annotated[
        str | None, typer.Option("--namespace", help="kubernetes: where the objects go (default: default)")
    ] = None,
    output: OutputOption = Output.table,
    query: QueryOption = None,
) -> None:
    """Attach a swarm or kubernetes target (or replace the settings of one attached before).

    The files are read here and sent inline; the service seals the credentials and never shows them again.

    Example: mms compute attach -n myswarm --type swarm --docker-host tcp://10.0.0.5:2376
    --tls-ca ca.pem --tls-cert cert.pem --tls-key key.pem
    """
    body = {
        "type": compute_type,
        "properties": _properties(compute_type, docker_host, tls_ca, tls_cert, tls_key, kubeconfig, namespace),
    }
    with ServiceClient() as client:
        target = preview_call(client, "PUT", client.account_url("computes", name), json=body)
    show(target, output, COLUMNS, query)


def _properties(
    compute_type: str,
    docker_host: str | None,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    kubeconfig: Path | None,
    namespace: str | None,
) -> dict[str, Any]:
    """The PUT's properties, the files read; options of the other type are refused by name."""
    swarm = {"--docker-host": docker_host, "--tls-ca": tls_ca, "--tls-cert": tls_cert, "--tls-key": tls_key}
    kubernetes = {"--kubeconfig": kubeconfig, "--namespace": namespace}
    if compute_type == "swarm":
        misplaced, missing = kubernetes, [flag for flag, value in swarm.items() if value is None]
    elif compute_type == "kubernetes":
        misplaced, missing = swarm, [] if kubeconfig is not None else ["--kubeconfig"]
    else:
        raise CliError(f"--type: {compute_type!r} cannot be attached: give swarm or kubernetes", exit_code=2)
    given = [flag for flag, value in misplaced.items() if value is not None]
    if given:
        raise CliError(f"{', '.join(given)}: not for a {compute_type} target", exit_code=2)
    if missing:
        raise CliError(f"a {compute_type} target needs {', '.join(missing)}", exit_code=2)
    if compute_type == "kubernetes":
        assert kubeconfig is not None
        return {"kubeconfig": _read("--kubeconfig", kubeconfig)} | ({"namespace": namespace} if namespace else {})
    assert tls_ca is not None and tls_cert is not None and tls_key is not None
    tls = {"ca": _read("--tls-ca", tls_ca), "cert": _read("--tls-cert", tls_cert), "key": _read("--tls-key", tls_key)}
    return {"dockerHost": docker_host, "tls": tls}


def _read(flag: str, path: Path) -> str:
    """A credential file's text; the message names the option, never the content."""
    try:
        if path.stat().st_size > _MAX_CREDENTIAL_FILE:
            raise CliError(f"{flag}: {path} is over {_MAX_CREDENTIAL_FILE >> 20} MiB: not a credential file")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(f"{flag}: {path} does not exist") from None
    except IsADirectoryError:
        raise CliError(f"{flag}: {path} is a folder, not a file") from None
    except UnicodeDecodeError:
        raise CliError(f"{flag}: {path} is not text (PEM or YAML)") from None
    except OSError as exc:
        raise CliError(f"{flag}: cannot read {path}: {exc.strerror}") from None


@compute_cli.command("detach")
def detach(name: ComputeName) -> None:
    """Detach a target no service runs on; its sealed credentials go with it.

    Example: mms compute detach -n myswarm
    """
    with ServiceClient() as client:
        preview_call(client, "DELETE", client.account_url("computes", name))
    err.print(f"Detached compute {name}.", highlight=False)
