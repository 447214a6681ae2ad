"""Request body examples for the OpenAPI document (``openapi_examples``), taken from the seed
documents (models-manifests-images.md, custom-base-image.md) with their placeholders filled in
with values the service accepts."""

from __future__ import annotations

from typing import Any

SAS = "?sv=2017-04-17&sr=b&sp=r&se=2030-01-01T00%3A00%3A00Z&sig=c2lnbmF0dXJl"
STORAGE = "https://mystorage.blob.core.windows.net"
MODEL_ID = "07b56951-3ce6-481a-bcb7-e76ee669e990"


def _example(summary: str, value: Any) -> dict[str, Any]:
    return {"summary": summary, "value": value}


# `az ml account modelmanagement create -l eastus2 --sku-instances 1 --sku-name S1`
ACCOUNT = {"seed": _example("An S1 account in eastus2", {"location": "eastus2", "sku": {"name": "S1", "capacity": 1}})}

MODEL = {
    "seed": _example(
        "housing.model, zipped and uploaded (`az ml model register -m housing.model -n housing.model -t myTag`)",
        {
            "name": "housing.model",
            "tags": ["myTag"],
            "description": "my housing.model",
            "url": f"{STORAGE}/models/housing.model.zip{SAS}",
            "mimeType": "application/zip",
            "unpack": "true",
        },
    )
}

MANIFEST = {
    "seed": _example(
        "The seed's manifest: a scoring file and a conda file for a registered model",
        {
            "driverProgram": "scoringFileId",
            "description": "housing model, scored by scoring.py",
            "modelType": "Registered",
            "name": "housingmodel-manifest",
            "modelIds": [MODEL_ID],
            "assets": [
                {
                    "id": "scoringFileId",
                    "url": f"{STORAGE}/assets/scoring.py{SAS}",
                    "mimeType": "application/x-python",
                    "unPack": "False",
                }
            ],
            "targetRuntime": {
                "runtimeType": "SparkPython",
                "properties": {"condaEnvFile": f"{STORAGE}/assets/myConda.yml{SAS}"},
            },
        },
    ),
    "inference-config": _example(
        "An inference configuration on a custom base image (custom-base-image.md)",
        {
            "name": "housingmodel-manifest",
            "modelIds": [MODEL_ID],
            "assets": [
                {"id": "score.py", "url": f"{STORAGE}/assets/score.py{SAS}", "mimeType": "text/x-python"},
                {"id": "infenv.yml", "url": f"{STORAGE}/assets/infenv.yml{SAS}", "mimeType": "text/yaml"},
            ],
            "entryScript": "score.py",
            "runtime": "python",
            "condaFile": "infenv.yml",
            "extraDockerfileSteps": None,
            "sourceDirectory": None,
            "enableGpu": False,
            "baseImage": "mcr.microsoft.com/azureml/o16n-sample-user-base/ubuntu-miniconda",
            "baseImageRegistry": "mcr.microsoft.com",
        },
    ),
}

IMAGE = {
    "seed": _example(
        "`az ml image create -n housingmodel-image --manifest-id e6b50818-…`",
        {
            "manifestId": "e6b50818-0dfe-4e75-a987-c2fb6dc61431",
            "imageType": "Docker",
            "computeResourceId": "/subscriptions/sub-1/resourceGroups/rg/providers/"
            "Microsoft.ContainerService/managedClusters/mycluster",
            "name": "housingmodel-image",
        },
    )
}

WEBHOOK = {
    "create": _example(
        "Every image and web service state change of the account, to a receiver of yours",
        {"url": "https://hooks.example.com/mms", "description": "all notifications"},
    ),
    "services": _example(
        "Only web service changes (eventTypes: ImageStateChanged, ImageDeleted, ServiceStateChanged, ServiceDeleted)",
        {
            "url": "https://hooks.example.com/mms-services",
            "description": "endpoint notifications",
            "eventTypes": ["ServiceStateChanged", "ServiceDeleted"],
        },
    ),
}
WEBHOOK_UPDATE = {
    "pause": _example("Pause a webhook", {"active": False}),
    "event-types": _example("Receive image builds only from now on", {"eventTypes": ["ImageStateChanged"]}),
    "every-type": _example("Receive every event type again (null)", {"eventTypes": None}),
}

SERVICE_PRINCIPAL = {
    "seed": _example(
        "A Contributor of one account (`az ad sp create-for-rbac`)",
        {
            "displayName": "housing-ci",
            "role": "Contributor",
            "scope": "/subscriptions/sub-1/resourceGroups/rg/accounts/acct",
        },
    )
}

TOKEN = {
    "client_credentials": _example(
        "A service principal's client id and secret (also accepted as HTTP Basic)",
        {
            "grant_type": "client_credentials",
            "client_id": "3f8a2c9e-5b1d-4e7a-9c2f-0d6b8e4a1c7f",
            "client_secret": "the secret shown when the principal was created",
        },
    )
}

COMPUTE = {
    "swarm": _example(
        "A Docker Swarm manager reached over TLS (`mms compute attach -n myswarm --type swarm`)",
        {
            "type": "swarm",
            "properties": {
                "dockerHost": "tcp://swarm.example.com:2376",
                "tls": {
                    "ca": "-----BEGIN CERTIFICATE-----\nMIIBexampleOnly\n-----END CERTIFICATE-----\n",
                    "cert": "-----BEGIN CERTIFICATE-----\nMIIBexampleOnly\n-----END CERTIFICATE-----\n",
                    "key": "-----BEGIN PRIVATE KEY-----\nMIIEexampleOnly\n-----END PRIVATE KEY-----\n",
                },
            },
        },
    ),
    "kubernetes": _example(
        "A kubernetes cluster, with inline credentials",
        {
            "type": "kubernetes",
            "properties": {
                "namespace": "scoring",
                "kubeconfig": "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n"
                "    server: https://k8s.example.com:6443\n    certificate-authority-data: TFMwdExT\n"
                "users:\n- name: u\n  user:\n    token: abc\ncontexts:\n- name: x\n  context:\n"
                "    cluster: c\n    user: u\ncurrent-context: x\n",
            },
        },
    ),
}

# `az ml service create realtime --image-id <id> -n myservice` with the seed's deployment configuration.
SERVICE = {
    "seed": _example(
        "Deploy a built image on the workers' engine, one replica, key auth",
        {
            "name": "myservice",
            "imageId": MODEL_ID,
            "computeName": "local",
            "deploymentConfig": {
                "containerResourceRequirements": {"cpu": 0.5, "memoryInGB": 1},
                "numReplicas": 1,
                "authEnabled": True,
            },
        },
    )
}
SERVICE_UPDATE = {
    "scale": _example("Scale to two replicas", {"numReplicas": 2}),
    "image": _example("Swap the image (a rolling update)", {"imageId": MODEL_ID}),
}
REGENERATE_KEYS = {"primary": _example("A new primary key", {"keyType": "Primary"})}
