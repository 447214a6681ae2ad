"""One contract, every asset store: what a caller holding a read URL can and cannot do."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit
from uuid import uuid4

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.storage.base import AssetStore, StoredObject


@dataclass
class Backend:
    store: AssetStore
    http: httpx.Client  # reaches the store's read URLs
    gone: tuple[int, ...]  # what a read URL answers once its key is deleted


@pytest.fixture(params=["local", "azure"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "local":
        # The embedded store's URLs are served by the app itself: read them through it.
        context = request.getfixturevalue("app_context")
        yield Backend(store=context.asset_store, http=TestClient(create_app(context=context)), gone=(404,))
    else:
        from app.storage.azure import AzureBlobStore

        store = AzureBlobStore(
            connection_string=request.getfixturevalue("azure_connection_string"),
            container=request.getfixturevalue("azure_container"),
        )
        with httpx.Client(timeout=30) as http:
            yield Backend(store=store, http=http, gone=(404,))


def _write(tmp_path: Path, data: bytes) -> Path:
    source = tmp_path / f"upload-{uuid4().hex}"
    source.write_bytes(data)
    return source


def _put(backend: Backend, tmp_path: Path, data: bytes, content_type: str) -> StoredObject:
    # A space and an accent: keys must survive URL quoting.
    key = f"acct-1/{uuid4().hex}/my modèl.zip"
    return backend.store.put_file(key, _write(tmp_path, data), content_type=content_type)


def _in(minutes: float) -> datetime:
    return datetime.now(UTC) + timedelta(minutes=minutes)


def _replace_param(url: str, name: str, change: Callable[[str], str]) -> str:
    def swap(match: re.Match[str]) -> str:
        return match.group(1) + quote(change(unquote(match.group(2))), safe="")

    changed = re.sub(rf"([?&]{name}=)([^&]*)", swap, url, count=1)
    assert changed != url, f"no {name} in the read URL"
    return changed


def test_put_then_read_returns_the_bytes_and_content_type(backend: Backend, tmp_path: Path) -> None:
    data = b"PK\x03\x04 model bytes \x00\xff"
    stored = _put(backend, tmp_path, data, "application/zip")
    assert stored.size == len(data)

    answer = backend.http.get(backend.store.read_url(stored.key, expires_at=_in(10)))

    assert answer.status_code == 200
    assert answer.content == data
    assert answer.headers["content-type"] == "application/zip"


def test_an_expired_url_is_refused(backend: Backend, tmp_path: Path) -> None:
    stored = _put(backend, tmp_path, b"data", "application/octet-stream")

    url = backend.store.read_url(stored.key, expires_at=_in(-1))

    assert backend.http.get(url).status_code == 403


@pytest.mark.parametrize(
    ("param", "change"),
    [
        ("sig", lambda sig: ("B" if sig[0] == "A" else "A") + sig[1:]),
        ("se", lambda se: str(int(se[:4]) + 1) + se[4:]),  # a year longer
        ("sp", lambda sp: sp + "w"),
    ],
    ids=["signature", "expiry", "permission"],
)
def test_a_tampered_url_is_refused(backend: Backend, tmp_path: Path, param: str, change: Callable[[str], str]) -> None:
    stored = _put(backend, tmp_path, b"data", "application/octet-stream")
    url = backend.store.read_url(stored.key, expires_at=_in(10))

    assert backend.http.get(_replace_param(url, param, change)).status_code == 403


def test_a_read_url_cannot_write(backend: Backend, tmp_path: Path) -> None:
    stored = _put(backend, tmp_path, b"original", "text/plain")
    url = backend.store.read_url(stored.key, expires_at=_in(10))

    put = backend.http.put(url, content=b"replaced", headers={"x-ms-blob-type": "BlockBlob"})

    assert put.status_code in (403, 405)
    assert backend.http.get(url).content == b"original"


def test_delete_makes_the_url_fail_and_can_be_repeated(backend: Backend, tmp_path: Path) -> None:
    stored = _put(backend, tmp_path, b"data", "application/octet-stream")
    url = backend.store.read_url(stored.key, expires_at=_in(10))

    backend.store.delete(stored.key)
    backend.store.delete(stored.key)
    backend.store.delete(f"acct-1/{uuid4().hex}/never-stored.zip")

    assert backend.http.get(url).status_code in backend.gone


def test_owns_its_own_urls_only(backend: Backend, tmp_path: Path) -> None:
    stored = _put(backend, tmp_path, b"data", "application/octet-stream")
    url = backend.store.read_url(stored.key, expires_at=_in(10))
    parts = urlsplit(url)

    assert backend.store.owns_url(url)
    assert not backend.store.owns_url(urlunsplit(parts._replace(netloc="other.example")))
    assert not backend.store.owns_url(urlunsplit(parts._replace(path="/elsewhere/model.zip")))
    assert not backend.store.owns_url("https://example.com/housing.zip")
    assert not backend.store.owns_url("not a url")
    # The key, whose first segment names the account, is read back from the URL alone.
    assert backend.store.key_of(url) == stored.key
    assert backend.store.key_of(urlunsplit(parts._replace(netloc="other.example"))) is None
    assert backend.store.key_of("https://example.com/housing.zip") is None


def test_a_5_mb_file_round_trips(backend: Backend, tmp_path: Path) -> None:
    data = os.urandom(5 * 1024 * 1024 + 17)  # more than one upload block, not a round size
    stored = _put(backend, tmp_path, data, "application/octet-stream")
    assert stored.size == len(data)

    digest, received = hashlib.sha256(), 0
    url = backend.store.read_url(stored.key, expires_at=_in(10))
    with backend.http.stream("GET", url) as answer:
        assert answer.status_code == 200
        for chunk in answer.iter_bytes():
            digest.update(chunk)
            received += len(chunk)

    assert received == len(data)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
