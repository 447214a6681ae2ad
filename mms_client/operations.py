"""What a command and the SDK both do, done once: register a model (a folder zipped), upload a
manifest's files and create it, create an image and follow its build log.

The CLI's commands (models.py, manifests.py, images.py) and the SDK (sdk.py) call these; no
typer here, so the SDK does not load the command line.
"""

from __future__ import annotations

import codecs
import hashlib
import mimetypes
import os
import re
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from mms_client.api import CliError, ServiceClient, ServiceError, idempotency_headers, service_error
from mms_client.consoles import err

if TYPE_CHECKING:
    from rich.console import Console

RUNTIMES = {"python": "Python", "spark-py": "SparkPython"}
FINAL_STATES = ("Succeeded", "Failed", "Cancelled")
# The inference configuration's members (the custom-image document's names) sent as they are.
_PASSED_THROUGH = ("extraDockerfileSteps", "enableGpu", "baseImage", "baseImageRegistry", "description")


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
                except ServiceError:  # CliError too: the service failed or could not be reached
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


# -- models -----------------------------------------------------------------------------


def register_model(
    client: ServiceClient, path: Path, name: str, tags: list[str], description: str | None, uploads: Uploads
) -> dict[str, Any]:
    """Upload ``path`` (a folder as a zip) and register it; the new model version."""
    if not path.exists():
        raise CliError(f"{path} does not exist: give -m a model file or folder")
    with tempfile.TemporaryDirectory(prefix="mms-model-") as tmp:
        if path.is_dir():
            # Under its own name, as Azure ML registers a folder: AZUREML_MODEL_DIR/<folder>/<file>.
            zipped = zip_folder(path, Path(tmp) / f"{path.name}.zip", top=path.resolve().name)
            upload, mime_type, unpack = zipped, "application/zip", True
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
    registered = client.json("POST", client.account_url("models"), json=body, headers=idempotency_headers())
    uploads.models.append(registered["id"])
    return registered


def upload_with_progress(client: ServiceClient, path: Path, name: str, uploads: Uploads) -> dict[str, Any]:
    """Upload one file as an asset with a progress bar; checks the service got the same bytes."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

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


def zip_folder(folder: Path, dest: Path, top: str | None = None) -> Path:
    """The folder's files, in name order, as a zip (links are refused, not followed); under a
    folder named ``top`` in the zip when one is given."""
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
            name = path.relative_to(folder).as_posix()
            archive.write(path, f"{top}/{name}" if top else name)
    return dest


def zip_source_directory(folder: Path, dest: Path) -> Path:
    """The whole source directory as a zip, byte for byte the same for the same files (name
    order, fixed dates and modes). Dot-files and dot-folders (.git, .venv, .env) and Python
    caches stay out: they are a checkout's or an editor's, not the service's."""
    entries: list[tuple[Path, str]] = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for entry in sorted(names):
            path = Path(root) / entry
            if entry.startswith(".") or entry.endswith(".pyc"):
                continue
            if path.is_symlink():
                raise CliError(f"{path} is a symbolic link: copy the file it points to into the folder")
            entries.append((path, path.relative_to(folder).as_posix()))
    if not entries:
        raise CliError(f"{folder} is empty: nothing to upload")
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for path, name in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (0o100755 if os.access(path, os.X_OK) else 0o100644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    return dest


# -- manifests --------------------------------------------------------------------------


def check_models_exist(client: ServiceClient, model_ids: list[str]) -> None:
    """CliError naming every model id the account does not have."""
    missing = [
        m for m in model_ids if client.call("GET", client.account_url("models", m), ok=(200, 404)).status_code == 404
    ]
    if missing:
        raise CliError(
            f"no model with id {', '.join(missing)} in this account (`mms model list` shows them); "
            "nothing was uploaded",
            code="ModelNotFound",
            status_code=404,
        )


def upload_asset(client: ServiceClient, uploads: Uploads, path: Path) -> dict[str, Any]:
    """Upload a file (or a folder, zipped and unpacked in the image) as a manifest asset."""
    if path.is_dir():
        with tempfile.TemporaryDirectory(prefix="mms-asset-") as tmp:
            uploaded = upload_with_progress(
                client, zip_folder(path, Path(tmp) / f"{path.name}.zip"), f"{path.name}.zip", uploads
            )
        return {"id": path.name, "url": uploaded["url"], "mimeType": "application/zip", "unPack": True}
    uploaded = upload_with_progress(client, path, path.name, uploads)
    return {"id": path.name, "url": uploaded["url"], "mimeType": uploaded.get("mimeType") or "application/octet-stream"}


def seed_manifest_body(
    client: ServiceClient,
    uploads: Uploads,
    name: str,
    driver: Path,
    runtime: str,
    conda_file: Path | None,
    pip_file: Path | None,
    dependencies: list[Path],
    model_ids: list[str],
    description: str | None,
) -> dict[str, Any]:
    """The seed's manifest body (driverProgram, targetRuntime), its files uploaded."""
    assets = [upload_asset(client, uploads, driver)] + [upload_asset(client, uploads, d) for d in dependencies]
    properties: dict[str, Any] = {}
    if conda_file:
        properties["condaEnvFile"] = upload_with_progress(client, conda_file, conda_file.name, uploads)["url"]
    if pip_file:
        properties["pipRequirements"] = upload_with_progress(client, pip_file, pip_file.name, uploads)["url"]
    return {
        "name": name,
        "description": description,
        "driverProgram": assets[0]["id"],
        "modelType": "Registered",
        "modelIds": model_ids,
        "assets": assets,
        "targetRuntime": {"runtimeType": RUNTIMES[runtime.lower()], "properties": properties},
    }


def inference_config_body(
    client: ServiceClient,
    uploads: Uploads,
    config: dict[str, Any],
    base: Path,
    name: str,
    model_ids: list[str],
    dependencies: list[Path],
    source: str = "the inference configuration",
) -> dict[str, Any]:
    """The custom-image document's inference configuration (``config``, its names: entryScript,
    runtime, condaFile, sourceDirectory, ...) as a manifest body, its local files uploaded.

    Paths are relative to ``base``/sourceDirectory. With a sourceDirectory, the whole folder is
    one zip asset (unPack) that becomes the image's app root, as the Azure ML SDK packages a
    source directory, and entryScript is sent as its path inside it. ``source`` names the
    configuration in errors.
    """
    if not config.get("entryScript"):
        raise CliError(f"{source} needs an entryScript (the scoring script's path)")
    runtime = config.get("runtime") or "python"  # the service checks it
    folder = base / (config.get("sourceDirectory") or "")
    if config.get("sourceDirectory") and not folder.is_dir():
        raise CliError(f"{source}: sourceDirectory {config['sourceDirectory']!r} is not a folder")

    def local(key: str) -> Path:
        path = folder / config[key]
        if not path.is_file():
            raise CliError(f"{source}: {key} {config[key]!r} is not a file (paths are relative to {folder})")
        return path

    entry, conda = local("entryScript"), local("condaFile") if config.get("condaFile") else None
    if config.get("sourceDirectory"):
        script = _inside(folder, entry, source)
        assets = [upload_source_directory(client, uploads, folder)]
        body: dict[str, Any] = {"name": name, "modelIds": model_ids, "entryScript": script, "runtime": runtime}
        body["sourceDirectory"] = assets[0]["id"]
    else:
        assets = [upload_asset(client, uploads, entry)]
        body = {"name": name, "modelIds": model_ids, "entryScript": assets[0]["id"], "runtime": runtime}
    if conda is not None:
        assets.append(upload_asset(client, uploads, conda))
        body["condaFile"] = assets[-1]["id"]
    assets += [upload_asset(client, uploads, d) for d in dependencies]
    body["assets"] = assets
    for key in _PASSED_THROUGH:
        if config.get(key) is not None:
            value = config[key]
            if key == "extraDockerfileSteps" and isinstance(value, str) and _is_file(folder / value):
                value = (folder / value).read_text(encoding="utf-8")  # the doc names a file
            body[key] = value
    return body


def _inside(folder: Path, entry: Path, source: str) -> str:
    """The entry script's path inside the source directory, as the service takes it."""
    try:
        relative = entry.resolve().relative_to(folder.resolve())
    except ValueError:
        raise CliError(f"{source}: entryScript {entry} is not inside the sourceDirectory {folder}") from None
    if any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
        raise CliError(f"{source}: entryScript {relative} is in a dot-folder, which is not uploaded")
    return relative.as_posix()


def upload_source_directory(client: ServiceClient, uploads: Uploads, folder: Path) -> dict[str, Any]:
    """Upload the source directory as one zip asset, unpacked at the image's app root."""
    asset_id = re.sub(r"[^A-Za-z0-9._-]", "-", folder.resolve().name).strip(".")[:60] or "source"
    with tempfile.TemporaryDirectory(prefix="mms-source-") as tmp:
        archive = zip_source_directory(folder, Path(tmp) / f"{asset_id}.zip")
        uploaded = upload_with_progress(client, archive, archive.name, uploads)
    return {"id": asset_id, "url": uploaded["url"], "mimeType": "application/zip", "unPack": True}


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # Dockerfile steps given inline can be longer than a file name may be
        return False


def create_manifest(client: ServiceClient, body: dict[str, Any]) -> dict[str, Any]:
    return client.json("POST", client.account_url("manifests"), json=body, headers=idempotency_headers())


# -- images -----------------------------------------------------------------------------


def create_image(
    client: ServiceClient, name: str, manifest_id: str, builder: str | None = None, description: str | None = None
) -> dict[str, Any]:
    """Queue an image build of a manifest; the image as queued."""
    body: dict[str, Any] = {"name": name, "manifestId": manifest_id, "imageType": "Docker"}
    if builder:
        body["builder"] = builder
    if description:
        body["description"] = description
    return client.json("POST", client.account_url("images"), json=body, headers=idempotency_headers())


def follow(
    client: ServiceClient,
    image_id: str,
    timeout: float,
    write: Callable[[str], None] | None,
    status_console: Console | None = None,
    poll_seconds: float = 1.0,
) -> dict[str, Any]:
    """Pass the build log to ``write`` as it grows, until the build ends or ``timeout``; the image.

    Each poll asks for the part of the log not yet written (``Range: bytes=<printed>-``).
    ``status_console``: where a live state line shows (the CLI's stderr), if anywhere.
    """
    from contextlib import nullcontext

    printed = 0
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span two reads
    last = ""
    deadline = time.monotonic() + timeout
    live = status_console.status("NotStarted: waiting for a build worker") if status_console else nullcontext()
    with live as status:
        while True:
            image = client.json("GET", client.account_url("images", image_id))
            new = log_since(client, image_id, printed)
            printed += len(new)
            text = decoder.decode(new)
            if text and write is not None:
                write(text)
                last = (last + text).rstrip().rsplit("\n", 1)[-1][:100]
            state = image["CreationState"]
            if state in FINAL_STATES or time.monotonic() > deadline:
                return image
            if status is not None:
                status.update(f"{state}" + (f": {last}" if last else ""))
            time.sleep(poll_seconds)


def log_since(client: ServiceClient, image_id: str, start: int) -> bytes:
    """The bytes of the build log from ``start`` on (none yet: empty)."""
    url = client.account_url("images", image_id, "log")
    answer = client.call("GET", url, headers={"Range": f"bytes={start}-"}, ok=(200, 206, 416))
    if answer.status_code == 416:  # nothing past ``start`` yet
        return b""
    if answer.status_code == 206:
        return answer.content
    return answer.content[start:]  # a service that ignores Range sends the whole log


# -- web services (the web-services preview) -----------------------------------------------

SETTLED_SERVICE_STATES = ("Healthy", "Unhealthy", "Failed")
# deploymentconfig.json's computeType (Azure's names too) as the service's target types.
_COMPUTE_TYPES = {"local": "local", "swarm": "swarm", "kubernetes": "kubernetes", "aks": "kubernetes"}
# deploymentconfig.json members the service takes, under deploymentConfig.
_DEPLOYMENT_MEMBERS = ("containerResourceRequirements", "numReplicas", "autoScaler", "authEnabled", "scoringTimeoutMs")


def preview_call(client: ServiceClient, method: str, path: str, **kwargs: Any) -> Any:
    """A call to a web-services route; a service that does not serve them (the preview is off)
    answers a route's plain 404, said as such rather than as a missing resource."""
    try:
        return client.json(method, path, **kwargs)
    except ServiceError as exc:
        if exc.status_code == 404 and exc.code == "NotFound":
            raise CliError(
                f"{client.server} does not serve web services: they are a preview its operator turns on "
                "(MMS_WEB_SERVICES_PREVIEW=true)",
                code=exc.code,
                status_code=404,
            ) from None
        raise


def deployment_config(document: Any, source: str) -> tuple[dict[str, Any], str | None, list[str]]:
    """A deploymentconfig.json as (the body's deploymentConfig, its computeType as a target
    type or None, the members this service ignores)."""
    if not isinstance(document, dict):
        raise CliError(f'{source} is not a JSON object (deploymentconfig.json: {{"computeType": ..., ...}})')
    config = {key: document[key] for key in _DEPLOYMENT_MEMBERS if document.get(key) is not None}
    compute_type = document.get("computeType")
    if compute_type is not None:
        known = _COMPUTE_TYPES.get(str(compute_type).lower())
        if known is None:
            raise CliError(
                f"{source}: computeType {compute_type!r} is not a target here (local, swarm, kubernetes or aks)"
            )
        compute_type = known
    ignored = sorted(set(document) - set(_DEPLOYMENT_MEMBERS) - {"computeType"})
    return config, compute_type, ignored


def find_service(client: ServiceClient, name: str | None = None, service_id: str | None = None) -> dict[str, Any]:
    """A service of the current account by id, or by name (names are unique in an account)."""
    if service_id:
        return preview_call(client, "GET", client.account_url("services", service_id))
    found = preview_call(client, "GET", client.account_url("services"), params={"name": name}).get("value", [])
    if not found:
        raise CliError(
            f"no service named {name!r} in this account (`mms service list` shows them)",
            code="ServiceNotFound",
            status_code=404,
        )
    return found[0]


def wait_for_service(
    client: ServiceClient,
    service_id: str,
    timeout: float,
    *,
    gone: bool = False,
    status_console: Console | None = None,
    poll_seconds: float = 2.0,
) -> dict[str, Any] | None:
    """Poll the service until it settles (Healthy, Unhealthy, Failed) or, with ``gone``, until it
    no longer exists (None), or until ``timeout``; the service as last seen."""
    from contextlib import nullcontext

    deadline = time.monotonic() + timeout
    url = client.account_url("services", service_id)
    live = status_console.status("waiting for the service") if status_console else nullcontext()
    with live as status:
        while True:
            answer = client.call("GET", url, ok=(200, 404))
            if answer.status_code == 404:
                if gone:
                    return None
                raise service_error(answer)
            service = answer.json()
            if (not gone and service["state"] in SETTLED_SERVICE_STATES) or time.monotonic() > deadline:
                return service
            if status is not None:
                ready = service.get("deploymentStatus") or {}
                counts = f"{ready.get('readyReplicas', 0)}/{ready.get('desiredReplicas', 0)}"
                status.update(f"{service['state']}: {counts} replicas ready")
            time.sleep(min(poll_seconds, max(deadline - time.monotonic(), 0.05)))
