"""Plain factories: principals with real tokens, accounts, model bodies."""

from __future__ import annotations

import base64
import textwrap
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from app.context import ServiceContext
from app.deployments.transitions import create as create_service
from app.orm import Account, Image, Manifest, ManifestAsset, Service
from app.orm.base import utcnow
from app.services.principals import create_service_principal

SEED_MODEL = {
    "name": "housing.model",
    "tags": ["myTag"],
    "description": "my housing.model",
    "url": "https://example.blob.core.windows.net/models/housing.zip?sv=2021-08-06&sp=r&se=2099-01-01T00:00:00Z&sig=abc",
    "mimeType": "application/zip",
    "unpack": "true",
}


# A tenant's kubeconfig with inline credentials (app/deployments/kubeconfig.py accepts it); the
# token must never appear in an error.
KUBE_SERVER = "https://20.43.0.10:6443"  # a global address: nothing is resolved or connected
KUBE_TOKEN = "tenant-token-never-in-an-error"
KUBE_CA = base64.b64encode(b"-----BEGIN CERTIFICATE-----\n...").decode()


def kubeconfig_text(cluster: str = "", user: str = "", server: str = KUBE_SERVER) -> str:
    """One cluster, user and context; ``cluster`` and ``user`` are YAML lines added to their entries."""
    head = f"""\
apiVersion: v1
kind: Config
clusters:
- name: prod
  cluster:
    server: {server}
    certificate-authority-data: {KUBE_CA}
"""
    users = f"""\
users:
- name: deployer
  user:
    token: {KUBE_TOKEN}
"""
    contexts = """\
contexts:
- name: prod
  context:
    cluster: prod
    user: deployer
    namespace: tenant-a
current-context: prod
"""
    indent = " " * 4
    return head + textwrap.indent(cluster, indent) + users + textwrap.indent(user, indent) + contexts


def client_with(app_context: ServiceContext, **settings: Any) -> TestClient:
    """A client of the same service and database with these settings changed."""
    from app.main import create_app

    context = ServiceContext.build(
        app_context.settings.model_copy(update=settings),
        engine=app_context.engine,
        session_factory=app_context.session_factory,
        read_session_factory=app_context.read_session_factory,
    )
    return TestClient(create_app(context=context), base_url="http://testserver")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def account_url(subscription: str, group: str, account: str | None = None) -> str:
    url = f"/api/subscriptions/{subscription}/resourceGroups/{group}/accounts"
    return f"{url}/{account}" if account else url


def model_body(**overrides: Any) -> dict[str, Any]:
    return {**SEED_MODEL, **overrides}


@dataclass
class Callers:
    """Makes service principals in the test's transaction and signs them in for real."""

    client: TestClient
    session: Session
    issuer: str

    def credentials(self, role: str, scope: str) -> tuple[str, str]:
        principal, secret = create_service_principal(
            self.session,
            issuer=self.issuer,
            display_name=f"test-{role}",
            role=role,
            scope=scope,
            created_by=None,
        )
        return principal.client_id, secret

    def token(self, role: str = "Owner", scope: str = "/") -> str:
        client_id, secret = self.credentials(role, scope)
        response = self.client.post(
            "/oauth2/token",
            data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret},
        )
        assert response.status_code == 200, response.text
        return response.json()["access_token"]

    def headers(self, role: str = "Owner", scope: str = "/") -> dict[str, str]:
        return bearer(self.token(role, scope))


def new_account(
    client: TestClient,
    headers: dict[str, str],
    subscription: str = "sub-1",
    group: str = "rg-1",
    name: str | None = None,
    location: str = "eastus2",
) -> str:
    """Create an account and return its URL."""
    name = name or f"acct-{uuid.uuid4().hex[:8]}"
    url = account_url(subscription, group, name)
    response = client.put(url, json={"location": location, "sku": {"name": "S1", "capacity": 1}}, headers=headers)
    assert response.status_code == 201, response.text
    return url


def new_image_row(db: Session, *, builder: str = "docker", assets: Sequence[dict[str, Any]] = ()) -> Image:
    """A queued build straight in the database (an account, a manifest with ``assets``, an image):
    for tests of what workers and the build state do with it."""
    account = Account(
        subscription_id="s",
        resource_group="rg",
        name=f"a{uuid.uuid4().hex[:8]}",
        location="x",
        sku_name="S1",
        sku_capacity=1,
    )
    db.add(account)
    db.flush()
    manifest = Manifest(
        account_id=account.id,
        name="m",
        version=1,
        driver_program="score",
        model_type="Registered",
        runtime_type="Python",
        webservice_type="Realtime",
    )
    db.add(manifest)
    db.flush()
    for position, asset in enumerate(assets):
        db.add(ManifestAsset(manifest_id=manifest.id, position=position, **asset))
    image = Image(
        account_id=account.id,
        manifest_id=manifest.id,
        name="i",
        version=1,
        image_type="Docker",
        builder=builder,
        state="NotStarted",
        published_at=utcnow(),
    )
    db.add(image)
    db.flush()
    return image


def new_service_row(
    db: Session,
    image: Image | None = None,
    *,
    name: str = "svc",
    compute_name: str = "local",
    compute_type: str = "local",
    compute_attached: bool = False,
) -> Service:
    """A service straight in the database, Transitioning, on a built image (a new one unless
    ``image``) and a target (``local`` unless said): for tests of the service's moves."""
    if image is None:
        image = new_image_row(db)
        db.execute(update(Image).where(Image.id == image.id).values(state="Succeeded"))
    return create_service(
        db,
        account_id=image.account_id,
        name=name,
        compute_name=compute_name,
        compute_type=compute_type,
        compute_attached=compute_attached,
        image_id=image.id,
        num_replicas=1,
        cpu=0.1,
        memory_gb=0.5,
        auth_enabled=True,
        scoring_timeout_ms=60000,
        replicas_desired=1,
        sealed_primary_key="sealed-1",
        sealed_secondary_key="sealed-2",
        primary_key_digest="1" * 64,
        secondary_key_digest="2" * 64,
    )
