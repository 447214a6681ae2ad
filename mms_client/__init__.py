"""The `mms` command-line client, the Python SDK, and the client both use (`mms_client.api.ServiceClient`).

It speaks to the service over its REST API only and imports nothing of the service (`app`,
`workers`, `scoring_server`): installed alone (`pip install mms`, no extras) it brings httpx,
typer, rich and stamina, not the server's dependencies. The server's commands join the same
`mms` command through the `mms.commands` entry points (see `mms_client.cli`).

The SDK, in the Azure ML SDK v1 shape (see `mms_client.sdk`)::

    from mms_client import InferenceConfig, Model, ServicePrincipalAuthentication, Workspace

Its names load on first use, so `import mms_client` (and `mms --help`) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mms_client.api import ServiceError
    from mms_client.sdk import (
        AksWebservice,
        ContainerRegistry,
        DeploymentConfiguration,
        Image,
        InferenceConfig,
        LocalWebservice,
        Model,
        ServicePrincipalAuthentication,
        SwarmWebservice,
        Webservice,
        Workspace,
    )

__all__ = [
    "AksWebservice",
    "ContainerRegistry",
    "DeploymentConfiguration",
    "Image",
    "InferenceConfig",
    "LocalWebservice",
    "Model",
    "ServiceError",
    "ServicePrincipalAuthentication",
    "SwarmWebservice",
    "Webservice",
    "Workspace",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mms_client import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'mms_client' has no attribute {name!r}")
