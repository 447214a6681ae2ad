"""Image builds through the API, without a worker: states, operations, cancel, log, in-use rules."""

from __future__ import annotations

import uuid

from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlalchemy.orm import Session

from app.context import ServiceContext
from app.orm import BuildLogChunk, Image
from tests.factories import Callers


def _create(
    client: TestClient, account: str, owner: dict[str, str], manifest_id: str, name: str = "housingmodel-image"
):
    body = {
        "manifestId": manifest_id,
        "imageType": "Docker",
        "computeResourceId": "/subscriptions/s/compute/c",
        "name": name,
    }
    return client.post(f"{account}/images", json=body, headers=owner)


def test_create_answers_202_with_the_seed_shape_and_an_operation(
    client: TestClient, owner: dict[str, str], account: str, manifest_id: str
) -> None:
    created = _create(client, account, owner, manifest_id)
    assert created.status_code == 202, created.text
    image = created.json()
    for field in (
        "Id",
        "Name",
        "Version",
        "Description",
        "CreatedTime",
        "CreationState",
        "ImageBuildLogUri",
        "ImageLocation",
        "ImageType",
        "Manifest",
        "WebserviceType",
        "ComputeResourceId",
    ):
        assert field in image
    assert image["CreationState"] == "NotStarted"
    assert image["Version"] == 1
    assert image["Manifest"]["id"] == manifest_id
    assert image["ImageBuildLogUri"].endswith(f"/images/{image['Id']}/log")

    operation_url = created.headers["Operation-Location"]
    operation = client.get(operation_url, headers=owner).json()
    assert operation["state"] == "NotStarted"
    assert operation["resourceLocation"].endswith(f"/images/{image['Id']}")
    assert _create(client, account, owner, manifest_id).json()["Version"] == 2
    assert client.get(f"{account}/images/{image['Id']}", headers=owner).json()["Id"] == image["Id"]


def test_bad_image_requests(client: TestClient, owner: dict[str, str], account: str, manifest_id: str) -> None:
    missing = _create(client, account, owner, str(uuid.uuid4()))
    assert missing.status_code == 404 and missing.json()["code"] == "ManifestNotFound"
    bad_type = client.post(
        f"{account}/images", json={"name": "x", "manifestId": manifest_id, "imageType": "Zip"}, headers=owner
    )
    assert bad_type.status_code == 400 and "imageType" in bad_type.text
    assert client.get(f"{account}/images/{uuid.uuid4()}", headers=owner).status_code == 404
    assert client.get(f"{account}/operations/not-an-id", headers=owner).status_code == 404


def test_cancel_a_queued_build_and_cancel_twice(
    client: TestClient, owner: dict[str, str], account: str, manifest_id: str
) -> None:
    image = _create(client, account, owner, manifest_id).json()
    cancelled = client.post(f"{account}/images/{image['Id']}/cancel", headers=owner)
    assert cancelled.status_code == 200
    assert cancelled.json()["CreationState"] == "Cancelled"
    again = client.post(f"{account}/images/{image['Id']}/cancel", headers=owner)
    assert again.status_code == 409


def test_cancel_a_running_build_asks_the_worker(
    client: TestClient, owner: dict[str, str], account: str, manifest_id: str, db: Session
) -> None:
    image = _create(client, account, owner, manifest_id).json()
    row = db.get(Image, uuid.UUID(image["Id"]))
    row.state = "Running"
    db.flush()
    response = client.post(f"{account}/images/{image['Id']}/cancel", headers=owner)
    assert response.json()["CreationState"] == "Running"
    db.refresh(row)
    assert row.cancel_requested is True
    assert client.delete(f"{account}/images/{image['Id']}", headers=owner).status_code == 409


def test_log_list_and_the_manifest_in_use(
    client: TestClient, owner: dict[str, str], account: str, manifest_id: str, db: Session
) -> None:
    image = _create(client, account, owner, manifest_id).json()
    db.add_all(
        [
            BuildLogChunk(image_id=uuid.UUID(image["Id"]), seq=s, attempt=1, text=t)
            for s, t in ((2, "second\n"), (1, "first\n"))
        ]
    )
    db.flush()
    log = client.get(image["ImageBuildLogUri"].replace("http://testserver", ""), headers=owner)
    assert log.text == "first\nsecond\n"
    assert log.headers["content-type"].startswith("text/plain")
    assert log.headers["accept-ranges"] == "bytes" and log.headers["retry-after"] == "2"
    # What the build printed is the tenant's text: never a page of the API's origin.
    assert log.headers["x-content-type-options"] == "nosniff"
    assert log.headers["content-security-policy"] == "default-src 'none'; sandbox"

    # A follower asks only for what it has not seen.
    url = image["ImageBuildLogUri"].replace("http://testserver", "")
    rest = client.get(url, headers={**owner, "Range": "bytes=6-"})
    assert rest.status_code == 206 and rest.text == "second\n"
    assert rest.headers["content-range"] == "bytes 6-12/13"
    nothing_new = client.get(url, headers={**owner, "Range": "bytes=13-"})
    assert nothing_new.status_code == 416 and nothing_new.headers["content-range"] == "bytes */13"
    assert client.get(url, headers={**owner, "Range": "bytes=-5"}).text == "first\nsecond\n"

    listed = client.get(f"{account}/images?manifestId={manifest_id}", headers=owner).json()["value"]
    assert [i["Id"] for i in listed] == [image["Id"]]
    assert client.get(f"{account}/images?manifestName=nothing", headers=owner).json()["value"] == []

    in_use = client.delete(f"{account}/manifests/{manifest_id}", headers=owner)
    assert in_use.status_code == 409 and in_use.json()["code"] == "ManifestInUse"
    assert client.delete(f"{account}/images/{image['Id']}", headers=owner).status_code == 204
    assert client.delete(f"{account}/manifests/{manifest_id}", headers=owner).status_code == 204


def test_a_reader_cannot_build(
    client: TestClient, callers: Callers, owner: dict[str, str], account: str, manifest_id: str
) -> None:
    reader = callers.headers("Reader", account.removeprefix("/api"))
    assert _create(client, account, reader, manifest_id).status_code == 403


def test_a_builder_that_does_not_exist_is_refused(
    client: TestClient, owner: dict[str, str], account: str, manifest_id: str
) -> None:
    body = {"name": "x", "manifestId": manifest_id, "builder": "kaniko"}
    response = client.post(f"{account}/images", json=body, headers=owner)
    assert response.status_code == 400 and "builder" in response.json()["message"]


def test_the_docker_builder_is_taken_where_images_are_stored_by_the_service(
    app_context, owner: dict[str, str], account: str, manifest_id: str
) -> None:
    # The embedded default: the docker builder exports its image into the service's own store.
    from app.context import ServiceContext
    from app.main import create_app

    embedded = ServiceContext.build(
        app_context.settings.model_copy(update={"registry": None}),
        engine=app_context.engine,
        session_factory=app_context.session_factory,
    )
    client = TestClient(create_app(context=embedded), base_url="http://testserver")
    body = {"name": "dockerbuilt", "manifestId": manifest_id, "builder": "docker"}
    taken = client.post(f"{account}/images", json=body, headers=owner)
    assert taken.status_code == 202, taken.text
    accepted = client.post(f"{account}/images", json={**body, "builder": "oci"}, headers=owner)
    assert accepted.status_code == 202 and accepted.json()["ImageLocation"] in (None, "")


def test_the_openapi_document_names_every_creation_state(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    states = ["NotStarted", "Running", "Succeeded", "Failed", "Cancelled"]
    assert schemas["CreationState"]["enum"] == states
    for body, field in (("ImageRead", "CreationState"), ("OperationRead", "state")):
        assert schemas[body]["properties"][field] == {"$ref": "#/components/schemas/CreationState"}


def test_a_poll_of_an_image_reads_the_roles_the_account_and_the_image_only(
    client: TestClient, owner: dict[str, str], account: str, manifest_id: str, app_context: ServiceContext
) -> None:
    created = _create(client, account, owner, manifest_id).json()
    url = f"{account}/images/{created['Id']}"
    first = client.get(url, headers=owner)  # renders the manifest, once per process
    selects: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(statement)

    event.listen(app_context.engine, "before_cursor_execute", count)
    try:
        again = client.get(url, headers=owner)
        unchanged = client.get(url, headers={**owner, "If-None-Match": first.headers["ETag"]})
    finally:
        event.remove(app_context.engine, "before_cursor_execute", count)
    assert again.json() == first.json()  # the embedded manifest as first rendered
    assert again.json()["Manifest"] == client.get(f"{account}/manifests/{manifest_id}", headers=owner).json()
    assert unchanged.status_code == 304
    # Roles (MMS_AUTH_CACHE_SECONDS is 0 in the tests), the account, the image with its version: per request.
    assert len(selects) == 2 * 3, "\n\n".join(selects)
