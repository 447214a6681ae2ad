"""What the Azure store adds to the contract: block uploads, SAS shape, safe errors (on Azurite)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit
from uuid import uuid4

import pytest
from azure.storage.blob import BlobServiceClient

from app.storage.azure import BLOCK_SIZE, AzureBlobStore
from app.storage.base import StorageError
from app.storage.sas import check_azure_sas_url

OTHER_KEY = "b3RoZXIta2V5LW5vdC10aGUtYWNjb3VudHMtb3duLWtleS0wMTIzNDU2Nzg5MDEy"


@pytest.fixture()
def store(azure_connection_string: str, azure_container: str) -> AzureBlobStore:
    return AzureBlobStore(connection_string=azure_connection_string, container=azure_container)


def test_opening_the_container_again_is_fine(
    store: AzureBlobStore, azure_connection_string: str, azure_container: str
) -> None:
    AzureBlobStore(connection_string=azure_connection_string, container=azure_container)


def test_a_large_file_goes_up_in_blocks(
    store: AzureBlobStore, tmp_path: Path, azure_connection_string: str, azure_container: str
) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(BLOCK_SIZE + 1))
    key = f"acct-1/{uuid4().hex}/big.bin"

    store.put_file(key, source, content_type="application/octet-stream")

    with BlobServiceClient.from_connection_string(azure_connection_string) as service:
        committed, _ = service.get_blob_client(azure_container, key).get_block_list()
    assert len(committed) == 2


def test_read_urls_grant_read_only_until_the_expiry(store: AzureBlobStore) -> None:
    expires_at = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)

    query = parse_qs(urlsplit(store.read_url("a/b.zip", expires_at=expires_at)).query)

    assert query["sp"] == ["r"]
    assert query["se"] == ["2031-05-06T07:08:09Z"]
    assert query["spr"] == ["https,http"]  # Azurite speaks http; a real account gets "https"


def test_its_read_urls_pass_the_sas_check(store: AzureBlobStore) -> None:
    now = datetime.now(UTC)
    url = store.read_url("a/b.zip", expires_at=now + timedelta(hours=1))

    check_azure_sas_url(url, now=now, require_https=False)
    with pytest.raises(ValueError, match="https"):
        check_azure_sas_url(url, now=now, require_https=True)


def test_owns_no_url_outside_its_container(store: AzureBlobStore) -> None:
    base = store.read_url("a/b.zip", expires_at=datetime.now(UTC)).split("?")[0]
    container_url = base.removesuffix("/a/b.zip")

    assert store.owns_url(f"{container_url}/a/b.zip")
    assert not store.owns_url(f"{container_url}x/a/b.zip")  # a container whose name starts alike
    assert not store.owns_url(f"{container_url}/../other/a/b.zip")
    assert not store.owns_url(f"{container_url}/%2e%2e/other/a/b.zip")
    assert not store.owns_url(f"{container_url}/")
    assert not store.owns_url(container_url.replace(":10000", ":10001") + "/a/b.zip")
    assert not store.owns_url(container_url.replace("http:", "https:") + "/a/b.zip")


def test_a_wrong_account_key_fails_without_telling_the_key(azure_connection_string: str, azure_container: str) -> None:
    key = next(p for p in azure_connection_string.split(";") if p.startswith("AccountKey="))
    wrong = azure_connection_string.replace(key, f"AccountKey={OTHER_KEY}")

    with pytest.raises(StorageError, match="HTTP 403") as refused:
        AzureBlobStore(connection_string=wrong, container=azure_container)

    assert OTHER_KEY not in str(refused.value)
    assert key.removeprefix("AccountKey=") not in str(refused.value)


@pytest.mark.parametrize(
    "connection_string",
    [
        "not a connection string",
        "BlobEndpoint=http://127.0.0.1:10000/a;SharedAccessSignature=sv=2024-01-01&sig=SECRET",
    ],
    ids=["malformed", "no-account-key"],
)
def test_an_unusable_connection_string_is_refused_plainly(connection_string: str) -> None:
    with pytest.raises(StorageError, match="connection string") as refused:
        AzureBlobStore(connection_string=connection_string, container="assets")

    assert "SECRET" not in str(refused.value)
