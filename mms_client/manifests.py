"""`mms manifest create|list|show|delete`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer

from mms_client.api import CliError, ServiceClient, all_pages
from mms_client.operations import (
    RUNTIMES,
    Uploads,
    check_models_exist,
    create_manifest,
    inference_config_body,
    register_model,
    seed_manifest_body,
)
from mms_client.output import Output, OutputOption, QueryOption, err, field, show

manifest_cli = typer.Typer(
    help="Manifests: a scoring script, its assets, models and environment.", no_args_is_help=True
)

COLUMNS = [
    ("id", field("id")),
    ("name", field("name")),
    ("version", field("version")),
    ("driver", field("driverProgram")),
    ("runtime", field("targetRuntime.runtimeType")),
    ("models", field("modelIds")),
    ("created", field("CreatedTime")),
]


@manifest_cli.command("create")
def create(
    name: Annotated[str, typer.Option("--name", "-n", help="the manifest's name")],
    driver: Annotated[Path | None, typer.Option("--driver", "-f", help="the scoring script (init() and run())")] = None,
    runtime: Annotated[str, typer.Option("--runtime", "-r", help="python or spark-py")] = "python",
    conda_file: Annotated[Path | None, typer.Option("--conda-file", "-c", help="a conda environment file")] = None,
    pip_file: Annotated[Path | None, typer.Option("--pip-file", "-p", help="a pip requirements file")] = None,
    dependency: Annotated[
        list[Path] | None,
        typer.Option("--dependency", "-d", help="another file or folder the script needs; repeat for more"),
    ] = None,
    model_id: Annotated[
        list[str] | None, typer.Option("--model-id", "-i", help="a registered model's id; repeat for more")
    ] = None,
    model_file: Annotated[
        list[Path] | None,
        typer.Option("--model-file", "-m", help="a model file or folder to register first; repeat for more"),
    ] = None,
    inference_config: Annotated[
        Path | None,
        typer.Option(
            "--inference-config", "--ic", help="an inference configuration JSON (entryScript, runtime, condaFile, ...)"
        ),
    ] = None,
    source_directory: Annotated[
        Path | None,
        typer.Option(
            "--source-directory",
            help="a folder that goes into the image whole, as its app root; the scoring script (-f, or the "
            "configuration's entryScript) is then a path inside it. Overrides the configuration's sourceDirectory",
        ),
    ] = None,
    description: Annotated[str | None, typer.Option("--description")] = None,
    output: OutputOption = Output.table,
    query: QueryOption = None,
) -> None:
    """Bundle a scoring script, its files, models and environment; every local file is uploaded.

    Example: mms manifest create -n housingmodel-manifest -f score.py -c myconda.yml -r python -i <model id>;
    mms manifest create -n housing --source-directory ./src -f score/score.py -c ./src/env.yml -i <model id>
    """
    if runtime.lower() not in RUNTIMES:
        raise CliError(f"--runtime must be python or spark-py, not {runtime!r}")
    if (driver is None) == (inference_config is None):
        raise CliError(
            "give the scoring script with -f score.py, or an inference configuration with --ic (one of them)"
        )
    if source_directory is not None:
        if not source_directory.is_dir():
            raise CliError(f"--source-directory {source_directory} is not a folder")
        if pip_file is not None:
            raise CliError("--pip-file does not go with --source-directory: give the environment as a conda file (-c)")
    # With --source-directory, -f is a path inside it (checked when the body is made).
    local_driver = driver if source_directory is None else None
    for path in [p for p in (local_driver, conda_file, pip_file, inference_config, *(dependency or [])) if p]:
        if not path.exists():
            raise CliError(f"{path} does not exist")
    with ServiceClient() as client:
        model_ids = list(model_id or [])
        check_models_exist(client, model_ids)  # before anything is uploaded
        with Uploads(client) as uploads:
            manifest = _create(
                client,
                uploads,
                name,
                driver,
                runtime,
                conda_file,
                pip_file,
                dependency or [],
                model_ids,
                model_file or [],
                inference_config,
                description,
                source_directory,
            )
    show(manifest, output, COLUMNS, query)


def _create(
    client: ServiceClient,
    uploads: Uploads,
    name: str,
    driver: Path | None,
    runtime: str,
    conda_file: Path | None,
    pip_file: Path | None,
    dependency: list[Path],
    model_ids: list[str],
    model_file: list[Path],
    inference_config: Path | None,
    description: str | None,
    source_directory: Path | None = None,
) -> dict[str, Any]:
    """Register the model files, upload the files and create the manifest; what was made."""
    for path in model_file:
        registered = register_model(client, path, _model_name(path), [], None, uploads)
        err.print(
            f"Registered {path} as model {registered['name']} version {registered['version']} ({registered['id']}).",
            highlight=False,
        )
        model_ids.append(registered["id"])
    if inference_config is not None:
        try:
            config = json.loads(inference_config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CliError(f"{inference_config} is not a JSON file: {exc}") from None
        if not isinstance(config, dict):
            raise CliError(f"{inference_config} needs an entryScript (the scoring script's path)")
        if source_directory is not None:  # from where the command runs, not the configuration's folder
            config["sourceDirectory"] = str(source_directory.resolve())
        body = inference_config_body(
            client, uploads, config, inference_config.parent, name, model_ids, dependency, str(inference_config)
        )
    elif source_directory is not None:
        # -f, -r and -c as an inference configuration: its entryScript is relative to the folder.
        config = {
            "entryScript": str(driver),
            "runtime": runtime.lower(),
            "sourceDirectory": str(source_directory.resolve()),
            "condaFile": str(conda_file.resolve()) if conda_file else None,
            "description": description,
        }
        body = inference_config_body(
            client, uploads, config, Path.cwd(), name, model_ids, dependency, "--source-directory"
        )
    else:
        body = seed_manifest_body(
            client,
            uploads,
            name,
            driver,
            runtime,
            conda_file,
            pip_file,
            dependency,
            model_ids,
            description,  # type: ignore[arg-type]
        )
    return create_manifest(client, body)


def _model_name(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", path.name)[:32]
    return name or "model"


@manifest_cli.command("list")
def list_manifests(
    name: Annotated[str | None, typer.Option("--name", "-n", help="only this name")] = None,
    model_id: Annotated[str | None, typer.Option("--model-id", "-i", help="only manifests bundling this model")] = None,
    output: OutputOption = Output.table,
    query: QueryOption = None,
) -> None:
    """The account's manifests.

    Example: mms manifest list -n housingmodel-manifest
    """
    params = {k: v for k, v in (("manifestName", name), ("modelId", model_id)) if v}
    with ServiceClient() as client:
        manifests = all_pages(client, client.account_url("manifests"), params)
    show(manifests, output, COLUMNS, query)


@manifest_cli.command("show")
def show_manifest(
    manifest_id: Annotated[str, typer.Option("--id", "-i")],
    output: OutputOption = Output.table,
    query: QueryOption = None,
) -> None:
    """One manifest.

    Example: mms manifest show -i 9b1c...
    """
    with ServiceClient() as client:
        manifest = client.json("GET", client.account_url("manifests", manifest_id))
    show(manifest, output, [*COLUMNS, ("assets", lambda m: [a.get("id") for a in m.get("assets") or []])], query)


@manifest_cli.command("delete")
def delete_manifest(manifest_id: Annotated[str, typer.Option("--id", "-i")]) -> None:
    """Delete a manifest that no image uses.

    Example: mms manifest delete -i 9b1c...
    """
    with ServiceClient() as client:
        client.call("DELETE", client.account_url("manifests", manifest_id))
    err.print(f"Deleted manifest {manifest_id}.", highlight=False)
