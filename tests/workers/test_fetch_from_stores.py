"""A model URL from either asset store is fetched the same way, through the SSRF-safe fetcher."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from app.config import Settings
from app.context import ServiceContext
from app.main import create_app
from app.orm.base import utcnow
from app.storage.azure import AzureBlobStore
from tests.live_server import free_port, serve
from workers.fetch_policy import fetch_policy
from workers.fetcher import FetchError, fetch

DATA = b"a model archive " * 4096


@pytest.fixture()
def live_local_store(service_context: ServiceContext, tmp_path: Path) -> Iterator[ServiceContext]:
    """The app serving its local store's signed URLs on a real port."""
    port = free_port()
    settings = service_context.settings.model_copy(
        update={"public_url": f"http://127.0.0.1:{port}", "data_dir": tmp_path}
    )
    context = ServiceContext.build(settings, engine=service_context.engine)
    with serve(create_app(context=context), port, lifespan="off"):
        yield context


def _stored(store, tmp_path: Path) -> str:
    source = tmp_path / "model.zip"
    source.write_bytes(DATA)
    store.put_file("acct/asset/model.zip", source, content_type="application/zip")
    return store.read_url("acct/asset/model.zip", expires_at=utcnow() + timedelta(hours=1))


def test_local_store_urls_are_fetched_with_the_development_allow_list(
    live_local_store: ServiceContext, tmp_path: Path
) -> None:
    url = _stored(live_local_store.asset_store, tmp_path)
    policy = fetch_policy(live_local_store.settings)
    result = fetch(url, tmp_path / "fetched", policy=policy, expected_sha256=hashlib.sha256(DATA).hexdigest())
    assert result.size == len(DATA)
    assert (tmp_path / "fetched").read_bytes() == DATA

    with pytest.raises(FetchError) as mismatch:
        fetch(url, tmp_path / "again", policy=policy, expected_sha256="0" * 64)
    assert mismatch.value.reason == "checksum_mismatch"
    assert not (tmp_path / "again").exists()

    production = live_local_store.settings.model_copy(update={"env": "production", "secret_key": "k" * 40})
    with pytest.raises(FetchError) as blocked:
        fetch(url, tmp_path / "blocked", policy=fetch_policy(production))
    assert blocked.value.reason == "blocked_address"
    assert "sig=" not in str(blocked.value)


def test_azure_sas_urls_are_fetched_the_same_way(
    settings: Settings, azure_connection_string: str, tmp_path: Path
) -> None:
    store = AzureBlobStore(connection_string=azure_connection_string, container="fetch-test")
    url = _stored(store, tmp_path)
    policy = fetch_policy(settings.model_copy(update={"azure_storage_connection_string": azure_connection_string}))
    result = fetch(url, tmp_path / "fetched", policy=policy, expected_sha256=hashlib.sha256(DATA).hexdigest())
    assert result.sha256 == hashlib.sha256(DATA).hexdigest()
    store.delete("acct/asset/model.zip")
