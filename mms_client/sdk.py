"""The Python SDK, in the shape of the Azure ML SDK v1 (``azureml.core``): ``Workspace``,
``ServicePrincipalAuthentication``, ``Model`` (register, list, package), ``InferenceConfig``
(with ``base_image`` and ``base_image_registry``) and ``Image`` (``wait_for_creation``).

It is the CLI's own client underneath: the same ``ServiceClient`` (tokens fetched and renewed,
retries and timeouts) and the same functions the commands call (``mms_client.operations``).
A failure is a ``ServiceError`` carrying the service's ``code``, ``message`` and HTTP status.

Example::

    from mms_client import InferenceConfig, Model, ServicePrincipalAuthentication, Workspace

    ws = Workspace("http://127.0.0.1:8000", "default", "rg1", "acct1",
                   auth=ServicePrincipalAuthentication(client_id, client_secret))
    model = Model.register(workspace=ws, model_path="housing.model", model_name="housing.model")
    inference_config = InferenceConfig(entry_script="score.py", runtime="python", conda_file="myenv.yml")
    image = Model.package(ws, [model], inference_config, image_name="housing-image")
    image.wait_for_creation(show_output=True)
    print(image.creation_state, image.image_location)
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from mms_client import operations
from mms_client.api import ServiceClient, ServiceError, all_pages, idempotency_headers
from mms_client.profile import ConfigStore, Credentials, MemoryStore, Profile, ProfileError, server_url

__all__ = [
    "ContainerRegistry",
    "Image",
    "InferenceConfig",
    "Model",
    "ServiceError",
    "ServicePrincipalAuthentication",
    "Webservice",
    "Workspace",
]


def _hidden(secret: str | None) -> str:
    return "None" if secret is None else "'***'"


class ServicePrincipalAuthentication:
    """Sign in as a service principal (OAuth 2.0 client credentials).

    :param client_id: the service principal's client id (``mms admin bootstrap`` prints one).
    :param client_secret: its secret; never shown by ``repr``.
    :param token_url: an external token endpoint; default: the service's own ``/oauth2/token``.
    :param scope: the scope to ask an external endpoint for, e.g. ``api://mms/.default``.
    """

    def __init__(
        self, client_id: str, client_secret: str, token_url: str | None = None, scope: str | None = None
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_url = token_url
        self.scope = scope

    def __repr__(self) -> str:
        return (
            f"ServicePrincipalAuthentication(client_id={self.client_id!r}, client_secret={_hidden(self.client_secret)})"
        )


class Workspace:
    """A model management account on a service: what every other object works in.

    :param service_url: the service, e.g. ``http://127.0.0.1:8000`` (or a bare ``host:port``).
    :param subscription_id: the subscription id (``"default"`` on a service of your own).
    :param resource_group: the account's resource group.
    :param account_name: the model management account.
    :param auth: a ``ServicePrincipalAuthentication``; a token is fetched when first needed and
        renewed before it expires. To use the ``mms login`` of the command line instead, call
        ``Workspace.from_login()``.
    :param timeout: seconds to wait for one answer; calls that are safe to repeat are retried
        after a dropped connection, a 429 or a 5xx, as the CLI does.
    """

    def __init__(
        self,
        service_url: str,
        subscription_id: str,
        resource_group: str,
        account_name: str,
        auth: ServicePrincipalAuthentication,
        *,
        timeout: float = 60.0,
    ) -> None:
        try:
            server = server_url(service_url)
        except ValueError as exc:
            raise ServiceError(str(exc)) from None
        profile = Profile(
            server=server,
            subscription=subscription_id,
            resource_group=resource_group,
            account=account_name,
            client_id=auth.client_id,
            authority=auth.token_url,
            scope=auth.scope,
        )
        store = MemoryStore(profile, Credentials(client_secret=auth.client_secret))
        self._client = ServiceClient(store, timeout=timeout, environment=False)

    @classmethod
    def from_login(cls, config_dir: str | Path | None = None, *, timeout: float = 60.0) -> Workspace:
        """The workspace of the command line's sign-in and current account (``mms login``, then
        ``mms account modelmanagement set``), with ``MMS_SERVER`` and ``MMS_TOKEN`` as the CLI
        reads them. A renewed token is cached where the CLI caches it.

        :param config_dir: the CLI's configuration folder; default: ``MMS_CONFIG_DIR`` or ``~/.config/mms``.
        """
        try:
            client = ServiceClient(ConfigStore(Path(config_dir).expanduser() if config_dir else None), timeout=timeout)
            client.profile.account_path()
        except ProfileError as exc:
            raise ServiceError(str(exc)) from None
        workspace = cls.__new__(cls)
        workspace._client = client
        return workspace

    @classmethod
    def create(
        cls,
        name: str,
        service_url: str,
        subscription_id: str,
        resource_group: str,
        auth: ServicePrincipalAuthentication,
        location: str = "eastus2",
        sku_name: str = "S1",
        sku_instances: int = 1,
    ) -> Workspace:
        """Create the account ``name`` (as ``mms account modelmanagement create``) and return its workspace."""
        workspace = cls(service_url, subscription_id, resource_group, name, auth)
        body = {"location": location, "sku": {"name": sku_name, "capacity": sku_instances}}
        workspace._client.json("PUT", workspace._client.account_url(), json=body)
        return workspace

    @classmethod
    def get(
        cls,
        name: str,
        service_url: str,
        subscription_id: str,
        resource_group: str,
        auth: ServicePrincipalAuthentication,
    ) -> Workspace:
        """The workspace of the existing account ``name``; a ServiceError (NotFound) if there is none."""
        workspace = cls(service_url, subscription_id, resource_group, name, auth)
        workspace.get_details()
        return workspace

    @property
    def name(self) -> str:
        return self._client.profile.account or ""

    @property
    def subscription_id(self) -> str:
        return self._client.profile.subscription

    @property
    def resource_group(self) -> str:
        return self._client.profile.resource_group or ""

    @property
    def service_url(self) -> str:
        return self._client.server

    def get_details(self) -> dict[str, Any]:
        """The account as the service describes it (location, sku, account id)."""
        return self._client.json("GET", self._client.account_url())

    def close(self) -> None:
        """Close the HTTP connections (also done on leaving a ``with`` block)."""
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Workspace.create(name={self.name!r}, subscription_id={self.subscription_id!r}, "
            f"resource_group={self.resource_group!r}, service_url={self.service_url!r})"
        )


def _tags(tags: Sequence[str] | Mapping[str, str] | None) -> list[str]:
    """The service's tags are strings: a mapping's items become ``key=value``."""
    if tags is None:
        return []
    if isinstance(tags, Mapping):
        return [f"{key}={value}" if value not in (None, "") else str(key) for key, value in tags.items()]
    if isinstance(tags, str):
        return [tags]
    return list(tags)


def _not_found(what: str) -> ServiceError:
    return ServiceError(what, code="ModelNotFound", status_code=404, service_message=what)


class Model:
    """A registered model version.

    ``Model(ws, name="housing.model")`` is the name's latest version, ``Model(ws, name=...,
    version=2)`` that version, ``Model(ws, id=...)`` the version with that id.

    :ivar id: the version's id (what a manifest names).
    :ivar name: the model's name.
    :ivar version: its version number, 1 for the first registration of a name.
    :ivar tags: its tags (strings).
    :ivar description: its description.
    :ivar created_time: when it was registered (ISO 8601).
    :ivar url: where the service keeps the model's file.
    """

    def __init__(
        self, workspace: Workspace, name: str | None = None, id: str | None = None, version: int | None = None
    ) -> None:
        client = workspace._client
        if id is not None:
            record = client.json("GET", client.account_url("models", id))
        elif name is not None:
            versions = all_pages(client, client.account_url("models"), {"name": name})
            matching = [m for m in versions if m.get("name") == name and (version is None or m["version"] == version)]
            if not matching:
                which = f"version {version} of model {name!r}" if version is not None else f"model {name!r}"
                raise _not_found(f"no {which} in account {workspace.name} (Model.list shows them)")
            record = max(matching, key=lambda m: m["version"])
        else:
            raise ServiceError("Model() needs a name (and optionally a version) or an id")
        self._set(workspace, record)

    def _set(self, workspace: Workspace, record: dict[str, Any]) -> None:
        self.workspace = workspace
        self._record = record
        self.id: str = record["id"]
        self.name: str = record["name"]
        self.version: int = record["version"]
        self.tags: list[str] = list(record.get("tags") or [])
        self.description: str | None = record.get("description")
        self.created_time: str | None = record.get("createdAt")
        self.url: str | None = record.get("url")

    @classmethod
    def _of(cls, workspace: Workspace, record: dict[str, Any]) -> Model:
        model = cls.__new__(cls)
        model._set(workspace, record)
        return model

    @staticmethod
    def register(
        workspace: Workspace,
        model_path: str | Path,
        model_name: str,
        tags: Sequence[str] | Mapping[str, str] | None = None,
        description: str | None = None,
    ) -> Model:
        """Upload a model and register it under ``model_name``: each registration gets the next version.

        A file is uploaded as it is; a folder is zipped, and unpacked again in the image.
        What was uploaded is deleted again if the registration fails.

        :param workspace: the workspace to register in.
        :param model_path: a model file or folder.
        :param model_name: 1-32 letters, digits, '-', '.' or '_'.
        :param tags: strings, or a mapping (each item becomes the tag ``key=value``).
        :param description: a description.
        :return: the new model version.
        """
        client = workspace._client
        with operations.Uploads(client) as uploads:
            record = operations.register_model(client, Path(model_path), model_name, _tags(tags), description, uploads)
        return Model._of(workspace, record)

    @staticmethod
    def list(
        workspace: Workspace, name: str | None = None, tag: str | None = None, latest: bool = False
    ) -> list[Model]:
        """The account's models, newest version first.

        :param name: only the versions of this name.
        :param tag: only the models with this tag.
        :param latest: only the newest version of each name.
        """
        params = {k: v for k, v in (("name", name), ("tag", tag)) if v}
        records = all_pages(workspace._client, workspace._client.account_url("models"), params)
        if latest:
            newest: dict[str, dict[str, Any]] = {}
            for record in records:
                if record["name"] not in newest or record["version"] > newest[record["name"]]["version"]:
                    newest[record["name"]] = record
            records = list(newest.values())
        return [Model._of(workspace, record) for record in records]

    @staticmethod
    def package(
        workspace: Workspace,
        models: Iterable[Model | str],
        inference_config: InferenceConfig,
        image_name: str | None = None,
        *,
        builder: str | None = None,
        description: str | None = None,
    ) -> Image:
        """Bundle the models with the inference configuration's files and environment, and
        build a scoring image of them.

        The source directory (one zip) or the entry script, and the conda file, are uploaded and
        made a manifest (named as the image); the build is then queued. Follow it with
        ``image.wait_for_creation(show_output=True)``.

        :param models: ``Model`` objects, or model ids.
        :param inference_config: the scoring script and its environment.
        :param image_name: the image's (and its manifest's) name; default: the first model's name.
        :param builder: ``oci`` (daemonless) or ``docker``; default: the service's.
        :return: the queued ``Image``.
        """
        client = workspace._client
        given = list(models)
        model_ids = [m.id if isinstance(m, Model) else str(m) for m in given]
        name = image_name or _image_name(next((m.name for m in given if isinstance(m, Model)), None))
        operations.check_models_exist(client, model_ids)  # before anything is uploaded
        with operations.Uploads(client) as uploads:
            body = operations.inference_config_body(
                client, uploads, inference_config._as_config(), Path.cwd(), name, model_ids, [], "InferenceConfig"
            )
            manifest = operations.create_manifest(client, body)
        record = operations.create_image(
            client, name, manifest["id"], builder, description or inference_config.description
        )
        return Image._of(workspace, record)

    @staticmethod
    def deploy(
        workspace: Workspace,
        name: str,
        models: Iterable[Model | str],
        inference_config: InferenceConfig,
        deployment_config: DeploymentConfiguration | dict[str, Any] | None = None,
        deployment_target: str | None = None,
    ) -> Webservice:
        """Build a scoring image of the models and the inference configuration and deploy it as
        the web service ``name``, in one operation; follow it with ``wait_for_deployment()``.

        :param models: ``Model`` objects, or model ids.
        :param deployment_config: ``LocalWebservice.deploy_configuration(...)`` (or the
            ``SwarmWebservice`` or ``AksWebservice`` one), or a deploymentconfig.json document
            (``containerResourceRequirements``, ``numReplicas``, ``authEnabled``, ...); its compute
            type is checked against the target's.
        :param deployment_target: the compute target's name; default: ``local``.
        :return: the ``Webservice``, ``Transitioning`` while its image builds and its replicas start.
        """
        client = workspace._client
        model_ids = [m.id if isinstance(m, Model) else str(m) for m in models]
        operations.check_models_exist(client, model_ids)  # before anything is uploaded
        config, compute_type = _deployment_document(deployment_config)
        with operations.Uploads(client) as uploads:
            manifest = operations.inference_config_body(
                client, uploads, inference_config._as_config(), Path.cwd(), name, model_ids, [], "InferenceConfig"
            )
            manifest.pop("name"), manifest.pop("modelIds")
            body: dict[str, Any] = {"name": name, "modelIds": model_ids, "inferenceConfig": manifest}
            body["deploymentConfig"] = config
            if deployment_target:
                body["computeName"] = deployment_target
            if compute_type:
                body["computeType"] = compute_type
            record = operations.preview_call(
                client, "POST", client.account_url("services"), json=body, headers=idempotency_headers()
            )
        service = Webservice.__new__(Webservice)
        service._set(workspace, record)
        return service

    def delete(self) -> None:
        """Delete this model version (its version number is never reused)."""
        self.workspace._client.call("DELETE", self.workspace._client.account_url("models", self.id))

    def serialize(self) -> dict[str, Any]:
        """The model as the service describes it."""
        return dict(self._record)

    def __repr__(self) -> str:
        return f"Model(workspace={self.workspace!r}, name={self.name!r}, id={self.id!r}, version={self.version!r})"


def _image_name(model_name: str | None) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", model_name or "")[:26]
    return f"{name}-image" if name else "package"


class ContainerRegistry:
    """A private registry the base image is pulled from; the password is never shown by ``repr``.

    :ivar address: the registry's host[:port], e.g. ``myregistry.azurecr.io``.
    :ivar username: the user name to pull with.
    :ivar password: the password (sealed by the service, never returned by it).
    """

    def __init__(self, address: str | None = None, username: str | None = None, password: str | None = None) -> None:
        self.address = address
        self.username = username
        self.password = password

    def __repr__(self) -> str:
        shown = f"address={self.address!r}, username={self.username!r}, password={_hidden(self.password)}"
        return f"ContainerRegistry({shown})"


class InferenceConfig:
    """How a model is served: the scoring script and the environment it runs in.

    :param entry_script: the scoring script (``init()`` and ``run(raw_data)``), relative to
        ``source_directory`` when one is given.
    :param runtime: ``"python"`` or ``"spark-py"``.
    :param conda_file: a conda environment file (relative to ``source_directory`` when given).
    :param extra_docker_file_steps: Dockerfile steps run after the environment is set up: the
        steps, or a file holding them.
    :param source_directory: a folder that goes into the image whole, as its app root (one zip,
        dot-files left out); ``entry_script`` is its path inside it, and a module beside it or a
        package at the folder's root imports.
    :param enable_gpu: build on the newest published GPU base image (or on ``base_image``).
    :param base_image: an image to build on instead of the service's base image, e.g.
        ``"myregistry.azurecr.io/myimage:v1"``.
    :param base_image_registry: the private registry of ``base_image`` (or set its
        ``address``, ``username`` and ``password`` attributes).
    :param description: the image's description.
    """

    def __init__(
        self,
        entry_script: str | Path,
        runtime: str = "python",
        conda_file: str | Path | None = None,
        extra_docker_file_steps: str | Path | None = None,
        source_directory: str | Path | None = None,
        enable_gpu: bool = False,
        description: str | None = None,
        base_image: str | None = None,
        base_image_registry: ContainerRegistry | None = None,
    ) -> None:
        self.entry_script = entry_script
        self.runtime = runtime
        self.conda_file = conda_file
        self.extra_docker_file_steps = extra_docker_file_steps
        self.source_directory = source_directory
        self.enable_gpu = enable_gpu
        self.description = description
        self.base_image = base_image
        self.base_image_registry = base_image_registry or ContainerRegistry()

    def _as_config(self) -> dict[str, Any]:
        """The inference configuration document's members (``--ic`` of ``mms manifest create``)."""
        config: dict[str, Any] = {
            "entryScript": str(self.entry_script),
            "runtime": self.runtime,
            "condaFile": str(self.conda_file) if self.conda_file else None,
            "sourceDirectory": str(self.source_directory) if self.source_directory else None,
            "extraDockerfileSteps": str(self.extra_docker_file_steps) if self.extra_docker_file_steps else None,
            "enableGpu": self.enable_gpu,
            "baseImage": self.base_image,
            "description": self.description,
        }
        registry = self.base_image_registry
        if registry.address:
            config["baseImageRegistry"] = {
                "address": registry.address,
                "username": registry.username,
                "password": registry.password,
            }
        return config

    def __repr__(self) -> str:
        fields = ("entry_script", "runtime", "conda_file", "source_directory", "enable_gpu", "base_image")
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in fields)
        return f"InferenceConfig({shown}, base_image_registry={self.base_image_registry!r})"


class Image:
    """A scoring image and its build.

    ``Image(ws, id=...)`` is an existing image; ``Model.package`` returns a new one.

    :ivar id: the image's id.
    :ivar name: its name.
    :ivar version: its version number.
    :ivar creation_state: ``NotStarted``, ``Running``, ``Succeeded``, ``Failed`` or ``Cancelled``
        (as of the last ``update_creation_state``).
    :ivar image_location: where to pull it from once ``Succeeded``.
    :ivar error: why it failed (the service's ``{code, message}``), else None.
    :ivar smoke_test: whether it was started once before it was called good
        (``{result: Passed | Failed | Skipped, reason}``), None until the build ends.
    :ivar manifest_id: the manifest it was built from.
    """

    def __init__(self, workspace: Workspace, id: str) -> None:
        self._set(workspace, workspace._client.json("GET", workspace._client.account_url("images", id)))

    def _set(self, workspace: Workspace, record: dict[str, Any]) -> None:
        self.workspace = workspace
        self._record = record
        self.id: str = record["Id"]
        self.name: str = record["Name"]
        self.version: int = record["Version"]
        self.creation_state: str = record["CreationState"]
        self.image_location: str | None = record.get("ImageLocation")
        self.error: dict[str, Any] | None = record.get("Error")
        self.smoke_test: dict[str, Any] | None = record.get("SmokeTest")
        self.manifest_id: str | None = (record.get("Manifest") or {}).get("id")
        self.image_build_log_uri: str | None = record.get("ImageBuildLogUri")
        self.description: str | None = record.get("Description")
        self.created_time: str | None = record.get("CreatedTime")

    @classmethod
    def _of(cls, workspace: Workspace, record: dict[str, Any]) -> Image:
        image = cls.__new__(cls)
        image._set(workspace, record)
        return image

    @staticmethod
    def list(workspace: Workspace, manifest_name: str | None = None) -> list[Image]:
        """The account's images (only those of manifests named ``manifest_name``, when given)."""
        params = {"manifestName": manifest_name} if manifest_name else None
        records = all_pages(workspace._client, workspace._client.account_url("images"), params)
        return [Image._of(workspace, record) for record in records]

    def update_creation_state(self) -> None:
        """Read the image's state again from the service."""
        client = self.workspace._client
        self._set(self.workspace, client.json("GET", client.account_url("images", self.id)))

    def wait_for_creation(self, show_output: bool = False, timeout: float | None = None) -> None:
        """Wait until the build ends (``Succeeded``, ``Failed`` or ``Cancelled``), or ``timeout`` seconds.

        :param show_output: print the build log to stdout as it grows (only the new bytes are
            fetched each second), then the outcome.
        :param timeout: give up waiting after this many seconds (the build goes on).
        """

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        record = operations.follow(
            self.workspace._client,
            self.id,
            math.inf if timeout is None else timeout,
            write if show_output else None,
        )
        self._set(self.workspace, record)
        if show_output:
            reason = f": {self.error.get('message')}" if self.error and self.error.get("message") else ""
            print(
                f"Image creation operation finished for image {self.name}:{self.version}, operation "
                f'"{self.creation_state}"{reason}'
            )

    def get_logs(self) -> str:
        """The build log (kept after a failure: its last lines name the failing step)."""
        client = self.workspace._client
        return client.call("GET", client.account_url("images", self.id, "log")).text

    def cancel(self) -> None:
        """Cancel the build: a queued one at once, a running one within seconds."""
        client = self.workspace._client
        self._set(self.workspace, client.json("POST", client.account_url("images", self.id, "cancel")))

    def delete(self) -> None:
        """Forget the image (not while it is being built)."""
        self.workspace._client.call("DELETE", self.workspace._client.account_url("images", self.id))

    def serialize(self) -> dict[str, Any]:
        """The image as the service describes it."""
        return dict(self._record)

    def __repr__(self) -> str:
        return (
            f"Image(workspace={self.workspace!r}, name={self.name!r}, id={self.id!r}, version={self.version!r}, "
            f"creation_state={self.creation_state!r})"
        )


class Webservice:
    """A web service (the web-services preview: the service must run with
    ``MMS_WEB_SERVICES_PREVIEW=true``).

    ``Webservice(ws, name=...)`` (or ``id=...``) is an existing service; ``Model.deploy`` makes
    one from models (``mms service create realtime`` from an image).

    :ivar id: the service's id.
    :ivar name: its name.
    :ivar state: ``Transitioning``, ``Healthy``, ``Unhealthy``, ``Failed`` or ``Deleting`` (as of
        the last ``update_deployment_state``).
    :ivar scoring_uri: where to POST scoring requests, None until it takes requests.
    :ivar swagger_uri: its swagger document, likewise.
    :ivar auth_enabled: whether scoring requests need a key (``get_keys``).
    :ivar compute_type: ``local``, ``swarm`` or ``kubernetes``.
    :ivar image_id: the image it runs.
    :ivar error: why it failed (``{code, message}``), else None.
    """

    def __init__(self, workspace: Workspace, name: str | None = None, id: str | None = None) -> None:
        if bool(name) == bool(id):
            raise ServiceError("give the service's name or its id (one of them)")
        self._set(workspace, operations.find_service(workspace._client, name, id))

    def _set(self, workspace: Workspace, record: dict[str, Any]) -> None:
        self.workspace = workspace
        self._record = record
        self.id: str = record["id"]
        self.name: str = record["name"]
        self.state: str = record["state"]
        self.scoring_uri: str | None = record.get("scoringUri")
        self.swagger_uri: str | None = record.get("swaggerUri")
        self.auth_enabled: bool = record["authEnabled"]
        self.compute_type: str = record["computeType"]
        self.image_id: str = record["imageId"]
        self.error: dict[str, Any] | None = record.get("error")

    @staticmethod
    def list(workspace: Workspace, compute_type: str | None = None) -> list[Webservice]:
        """The account's web services (only those on targets of ``compute_type``, when given)."""
        client = workspace._client
        records = operations.preview_call(client, "GET", client.account_url("services"))["value"]
        found = []
        for record in records:
            if compute_type is None or record["computeType"] == compute_type:
                service = Webservice.__new__(Webservice)
                service._set(workspace, record)
                found.append(service)
        return found

    @staticmethod
    def deploy_from_image(
        workspace: Workspace,
        name: str,
        image: Image | str,
        deployment_config: DeploymentConfiguration | dict[str, Any] | None = None,
        deployment_target: str | None = None,
    ) -> Webservice:
        """Deploy a ``Succeeded`` image as the web service ``name`` on ``deployment_target``
        (default: ``local``); follow it with ``wait_for_deployment()``.

        :param image: an ``Image``, or an image id.
        :param deployment_config: as ``Model.deploy`` takes it.
        """
        client = workspace._client
        config, compute_type = _deployment_document(deployment_config)
        body: dict[str, Any] = {
            "name": name,
            "imageId": image.id if isinstance(image, Image) else str(image),
            "deploymentConfig": config,
        }
        if deployment_target:
            body["computeName"] = deployment_target
        if compute_type:
            body["computeType"] = compute_type
        service = Webservice.__new__(Webservice)
        service._set(
            workspace,
            operations.preview_call(
                client, "POST", client.account_url("services"), json=body, headers=idempotency_headers()
            ),
        )
        return service

    def update(
        self,
        *,
        image: Image | str | None = None,
        num_replicas: int | None = None,
        cpu_cores: float | None = None,
        memory_gb: float | None = None,
        auth_enabled: bool | None = None,
        autoscale_enabled: bool | None = None,
        autoscale_min_replicas: int | None = None,
        autoscale_max_replicas: int | None = None,
        autoscale_target_utilization: int | None = None,
    ) -> None:
        """Swap the image (a rolling update: the old one serves until the new one answers),
        scale, resize or switch key auth; the service is ``Transitioning`` until it settles
        (``wait_for_deployment()``). A service still ``Transitioning`` refuses (``ServiceBusy``)."""
        body: dict[str, Any] = {}
        if image is not None:
            body["imageId"] = image.id if isinstance(image, Image) else str(image)
        if num_replicas is not None:
            body["numReplicas"] = num_replicas
        if cpu_cores is not None or memory_gb is not None:
            # The service takes the whole requirements: the one not given stays as it is.
            current = dict(self._record.get("containerResourceRequirements") or {})
            body["containerResourceRequirements"] = {
                **current,
                **({"cpu": cpu_cores} if cpu_cores is not None else {}),
                **({"memoryInGB": memory_gb} if memory_gb is not None else {}),
            }
        if auth_enabled is not None:
            body["authEnabled"] = auth_enabled
        autoscaler = _autoscaler(
            autoscale_enabled, autoscale_min_replicas, autoscale_max_replicas, autoscale_target_utilization
        )
        if autoscaler is not None:
            body["autoScaler"] = {**(self._record.get("autoScaler") or {}), **autoscaler}
        if not body:
            raise ServiceError(
                "update: give at least one of image, num_replicas, cpu_cores, memory_gb, auth_enabled, autoscale_*"
            )
        client = self.workspace._client
        url = client.account_url("services", self.id)
        self._set(self.workspace, operations.preview_call(client, "PATCH", url, json=body))

    def update_deployment_state(self) -> None:
        """Read the service's state again from the service."""
        self._set(self.workspace, operations.find_service(self.workspace._client, service_id=self.id))

    def wait_for_deployment(self, timeout: float = 3600) -> None:
        """Wait until the service settles (``Healthy``, ``Unhealthy``, ``Failed``) or ``timeout`` seconds."""
        settled = operations.wait_for_service(self.workspace._client, self.id, timeout)
        assert settled is not None
        self._set(self.workspace, settled)

    def run(self, input_data: str | bytes | dict[str, Any] | list[Any], *, timeout: float = 60.0) -> Any:
        """Score ``input_data`` (the JSON text ``run()`` takes, or a value to send as JSON) through
        the service's scoring URI, with its primary key when it needs one; ``run()``'s answer,
        decoded from JSON (as text when it is not JSON)."""
        import httpx

        if isinstance(input_data, dict | list):
            input_data = json.dumps(input_data)

        if not self.scoring_uri:
            self.update_deployment_state()
        if not self.scoring_uri:
            raise ServiceError(f"service {self.name} takes no requests yet (it is {self.state})")
        headers = {"Content-Type": "application/json"}
        if self.auth_enabled:
            headers["Authorization"] = f"Bearer {self.get_keys()[0]}"
        try:
            answer = httpx.post(self.scoring_uri, content=input_data, headers=headers, timeout=timeout)
        except httpx.HTTPError as exc:
            raise ServiceError(f"cannot reach {self.scoring_uri}: {exc}") from None
        if answer.status_code != 200:
            raise ServiceError(f"scoring answered {answer.status_code}: {answer.text[:500]}")
        try:
            return answer.json()
        except ValueError:
            return answer.text

    def get_logs(self, tail: int = 200) -> str:
        """What the service's replicas printed lately, each line prefixed with generation and replica."""
        client = self.workspace._client
        return client.call("GET", client.account_url("services", self.id, "logs"), params={"tail": tail}).text

    def get_keys(self) -> tuple[str, str]:
        """The primary and secondary scoring keys (send one as ``Authorization: Bearer <key>``)."""
        client = self.workspace._client
        keys = operations.preview_call(client, "POST", client.account_url("services", self.id, "keys"))
        return keys["primaryKey"], keys["secondaryKey"]

    def regen_key(self, key: str) -> None:
        """Replace the ``"Primary"`` or the ``"Secondary"`` key; the old one stops working within seconds."""
        if key.lower() not in ("primary", "secondary"):
            raise ServiceError(f"key: {key!r} is not a key: give 'Primary' or 'Secondary'")
        client = self.workspace._client
        url = client.account_url("services", self.id, "regenerateKeys")
        operations.preview_call(client, "POST", url, json={"keyType": key.capitalize()})

    def delete(self, force: bool = False) -> None:
        """Ask for the service to be removed (it is ``Deleting`` until nothing of it is left);
        ``force``: gone at once, for a swarm or kubernetes cluster the account attached that will
        never answer again (what runs there is removed in the background if it does). Refused
        (ServiceError ``ForceDeleteNotAllowed``, 409) on the built-in targets, ``local`` and the
        operator's ``swarm``: their plain delete always completes."""
        client = self.workspace._client
        url = client.account_url("services", self.id)
        params = {"force": "true"} if force else None
        self._set(self.workspace, operations.preview_call(client, "DELETE", url, params=params))

    def serialize(self) -> dict[str, Any]:
        """The service as the service describes it (never its keys)."""
        return dict(self._record)

    def __repr__(self) -> str:
        return f"Webservice(workspace={self.workspace!r}, name={self.name!r}, id={self.id!r}, state={self.state!r})"


class DeploymentConfiguration:
    """How a web service runs: what ``LocalWebservice``, ``SwarmWebservice`` and ``AksWebservice``
    ``.deploy_configuration()`` make, for ``Model.deploy`` and ``Webservice.deploy_from_image``
    (the SDK's counterpart of a deploymentconfig.json). Only what is given is sent; the service
    fills in the rest (0.1 CPU, 0.5 GB, one replica, key auth on)."""

    def __init__(self, compute_type: str, **fields: Any) -> None:
        self.compute_type = compute_type
        self._fields = {key: value for key, value in fields.items() if value is not None}

    def as_document(self) -> dict[str, Any]:
        """The deploymentconfig.json document it stands for."""
        fields = self._fields
        document: dict[str, Any] = {"computeType": self.compute_type}
        if "cpu_cores" in fields or "memory_gb" in fields:
            document["containerResourceRequirements"] = {
                **({"cpu": fields["cpu_cores"]} if "cpu_cores" in fields else {}),
                **({"memoryInGB": fields["memory_gb"]} if "memory_gb" in fields else {}),
            }
        for field, member in (
            ("num_replicas", "numReplicas"),
            ("auth_enabled", "authEnabled"),
            ("scoring_timeout_ms", "scoringTimeoutMs"),
        ):
            if field in fields:
                document[member] = fields[field]
        autoscaler = _autoscaler(
            fields.get("autoscale_enabled"),
            fields.get("autoscale_min_replicas"),
            fields.get("autoscale_max_replicas"),
            fields.get("autoscale_target_utilization"),
            fields.get("autoscale_refresh_seconds"),
        )
        if autoscaler is not None:
            document["autoScaler"] = autoscaler
        return document

    def __repr__(self) -> str:
        return f"DeploymentConfiguration({self.as_document()!r})"


class LocalWebservice:
    """Web services on the ``local`` target (the service's own Docker engine)."""

    _compute_type = "local"

    @classmethod
    def deploy_configuration(
        cls,
        *,
        cpu_cores: float | None = None,
        memory_gb: float | None = None,
        num_replicas: int | None = None,
        auth_enabled: bool | None = None,
        scoring_timeout_ms: int | None = None,
    ) -> DeploymentConfiguration:
        return DeploymentConfiguration(
            cls._compute_type,
            cpu_cores=cpu_cores,
            memory_gb=memory_gb,
            num_replicas=num_replicas,
            auth_enabled=auth_enabled,
            scoring_timeout_ms=scoring_timeout_ms,
        )


class SwarmWebservice(LocalWebservice):
    """Web services on a ``swarm`` target (Docker Swarm mode): configured as on ``local``."""

    _compute_type = "swarm"


class AksWebservice:
    """Web services on a ``kubernetes`` target (``aks`` in Azure's files): the one that autoscales."""

    @staticmethod
    def deploy_configuration(
        *,
        cpu_cores: float | None = None,
        memory_gb: float | None = None,
        num_replicas: int | None = None,
        auth_enabled: bool | None = None,
        scoring_timeout_ms: int | None = None,
        autoscale_enabled: bool | None = None,
        autoscale_min_replicas: int | None = None,
        autoscale_max_replicas: int | None = None,
        autoscale_target_utilization: int | None = None,
        autoscale_refresh_seconds: int | None = None,
    ) -> DeploymentConfiguration:
        if autoscale_enabled and num_replicas is not None:
            raise ServiceError("deploy_configuration: num_replicas cannot be given with autoscale_enabled: choose one")
        return DeploymentConfiguration(
            "kubernetes",
            cpu_cores=cpu_cores,
            memory_gb=memory_gb,
            num_replicas=num_replicas,
            auth_enabled=auth_enabled,
            scoring_timeout_ms=scoring_timeout_ms,
            autoscale_enabled=autoscale_enabled,
            autoscale_min_replicas=autoscale_min_replicas,
            autoscale_max_replicas=autoscale_max_replicas,
            autoscale_target_utilization=autoscale_target_utilization,
            autoscale_refresh_seconds=autoscale_refresh_seconds,
        )


def _autoscaler(
    enabled: bool | None,
    low: int | None,
    high: int | None,
    target: int | None,
    refresh: int | None = None,
) -> dict[str, Any] | None:
    given = {
        "autoscaleEnabled": enabled,
        "minReplicas": low,
        "maxReplicas": high,
        "targetUtilization": target,
        "refreshPeriodInSeconds": refresh,
    }
    if all(value is None for value in given.values()):
        return None
    if enabled is None:  # a bound alone turns it on, as `mms service update --autoscale-*` does
        given["autoscaleEnabled"] = True
    return {key: value for key, value in given.items() if value is not None}


def _deployment_document(config: DeploymentConfiguration | dict[str, Any] | None) -> tuple[dict[str, Any], str | None]:
    """The body's deploymentConfig and the compute type to check, from either form."""
    document = config.as_document() if isinstance(config, DeploymentConfiguration) else (config or {})
    body, compute_type, _ = operations.deployment_config(document, "deployment_config")
    return body, compute_type
