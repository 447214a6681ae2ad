"""Assets on the embedded local store: upload, signed read URLs, and what a bad URL gets."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from fastapi.testclient import TestClient

from app.context import ServiceContext
from tests.factories import Callers, model_body, new_account


def _upload(
    client: TestClient,
    account: str,
    owner: dict[str, str],
    name: str,
    data: bytes,
    content_type: str = "application/zip",
):
    return client.post(f"{account}/assets?name={name}", content=data, headers={**owner, "Content-Type": content_type})


def _path_and_query(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def test_upload_then_read_through_the_signed_url(client: TestClient, owner: dict[str, str], account: str) -> None:
    data = b"PK\x03\x04" + bytes(range(256)) * 400
    response = _upload(client, account, owner, "housing.zip", data)
    assert response.status_code == 201, response.text
    asset = response.json()
    assert asset["size"] == len(data)
    assert asset["sha256"] == hashlib.sha256(data).hexdigest()
    assert set(parse_qs(urlsplit(asset["url"]).query)) == {"sp", "se", "sig"}

    blob = client.get(_path_and_query(asset["url"]))  # no bearer token: the URL is the key
    assert blob.status_code == 200
    assert blob.content == data
    assert blob.headers["content-type"] == "application/zip"

    again = client.get(f"{account}/assets/{asset['id']}", headers=owner)
    assert again.status_code == 200 and again.json()["sha256"] == asset["sha256"]


HOSTILE_PAGES = (
    ("page.html", "text/html", b"<script>parent.postMessage(localStorage.length, '*')</script>"),
    ("image.svg", "image/svg+xml", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'),
    ("notes.txt", "text/plain", b"<html><script>alert(1)</script></html>"),
)


@pytest.mark.parametrize(("name", "content_type", "data"), HOSTILE_PAGES)
def test_an_uploaded_page_is_served_as_a_download_never_inline(
    client: TestClient, owner: dict[str, str], account: str, name: str, content_type: str, data: bytes
) -> None:
    url = _path_and_query(_upload(client, account, owner, name, data, content_type).json()["url"])
    for blob in (client.get(url), client.head(url)):
        assert blob.status_code == 200
        assert blob.headers["content-disposition"] == f'attachment; filename="{name}"'
        assert blob.headers["x-content-type-options"] == "nosniff"
        assert blob.headers["content-security-policy"] == "default-src 'none'; sandbox"
    assert client.get(url).content == data


def test_a_download_name_is_quoted_safely(client: TestClient, owner: dict[str, str], account: str) -> None:
    name = 'a"b;c\u00e9 d.html'
    url = _path_and_query(_upload(client, account, owner, quote(name), b"<p>x</p>", "text/html").json()["url"])
    disposition = client.get(url).headers["content-disposition"]
    assert disposition == "attachment; filename=\"a_b_c__d.html\"; filename*=UTF-8''a%22b%3Bc%C3%A9%20d.html"


def test_a_tampered_expired_or_wrong_permission_url_is_403(
    client: TestClient, owner: dict[str, str], account: str, app_context: ServiceContext
) -> None:
    asset = _upload(client, account, owner, "score.py", b"def run(x): return x", "text/x-python").json()
    url = _path_and_query(asset["url"])
    path, query = url.split("?")
    params = {k: v[0] for k, v in parse_qs(query).items()}

    def get(**changes: str):
        merged = {**params, **changes}
        return client.get(path, params=merged)

    assert get().status_code == 200
    assert get(sig=params["sig"][:-2] + "AA").status_code == 403
    assert get(se="2099-01-01T00:00:00Z").status_code == 403  # a later expiry breaks the signature
    assert get(sp="rw").status_code == 403
    assert client.get(path.replace("score.py", "other.py"), params=params).status_code == 403

    store = app_context.asset_store
    key = path.split("/blobs/", 1)[1]
    expired = store.read_url(key, expires_at=datetime(2020, 1, 1, tzinfo=UTC))
    refused = client.get(_path_and_query(expired))
    assert refused.status_code == 403
    assert "expired" in refused.json()["message"]


def test_upload_limits_and_names(
    client: TestClient,
    owner: dict[str, str],
    account: str,
    app_context: ServiceContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(app_context.settings, "asset_max_bytes", 1000)
    too_big = _upload(client, account, owner, "big.bin", b"x" * 1001)
    assert too_big.status_code == 413
    assert too_big.json()["code"] == "AssetTooLarge"

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(20):
            yield b"y" * 100

    streamed = client.post(f"{account}/assets?name=s.bin", content=chunks(), headers=owner)
    assert streamed.status_code == 413
    incoming = app_context.settings.data_dir / "incoming"
    assert not list(incoming.glob(".upload-*")), "a refused upload left a file behind"
    for bad in ("../x", "a/b", ""):
        assert _upload(client, account, owner, bad, b"data").status_code == 400


def test_deleted_asset_urls_stop_working(client: TestClient, owner: dict[str, str], account: str) -> None:
    asset = _upload(client, account, owner, "m.zip", b"zip").json()
    assert client.delete(f"{account}/assets/{asset['id']}", headers=owner).status_code == 204
    assert client.get(_path_and_query(asset["url"])).status_code == 404
    assert client.get(f"{account}/assets/{asset['id']}", headers=owner).status_code == 404


def test_models_register_with_asset_urls_and_bad_ones_are_refused(
    client: TestClient, owner: dict[str, str], account: str, app_context: ServiceContext
) -> None:
    asset = _upload(client, account, owner, "housing.zip", b"zip").json()
    ok = client.post(f"{account}/models", json=model_body(url=asset["url"]), headers=owner)
    assert ok.status_code == 200, ok.text

    tampered = asset["url"].replace("sig=", "sig=x")
    refused = client.post(f"{account}/models", json=model_body(url=tampered), headers=owner)
    assert refused.status_code == 400
    assert refused.json()["details"][0]["message"].startswith("url:")
    assert "sig=" not in refused.text

    expired_sas = (
        "https://acct.blob.core.windows.net/models/m.zip?sv=2021-08-06&sp=r"
        "&se=2020-01-01T00:00:00Z&sr=b&sig=c2lnbmF0dXJl"
    )
    expired = client.post(f"{account}/models", json=model_body(url=expired_sas), headers=owner)
    assert expired.status_code == 400
    assert "expired" in expired.json()["message"]
    assert "c2lnbmF0dXJl" not in expired.text and "2020-01-01" not in expired.text
    write_only = expired_sas.replace("sp=r", "sp=w").replace("2020-01-01", "2099-01-01")
    assert client.post(f"{account}/models", json=model_body(url=write_only), headers=owner).status_code == 400


def test_azure_store_end_to_end(
    callers: Callers, app_context: ServiceContext, service_context: ServiceContext, db, azure_connection_string: str
) -> None:
    """With MMS_ASSET_STORE=azure an upload lands in Blob storage (Azurite) behind a real SAS."""
    import httpx

    from app.main import create_app

    settings = service_context.settings.model_copy(
        update={
            "asset_store": "azure",
            "azure_storage_connection_string": azure_connection_string,
            "azure_storage_container": "api-test",
        }
    )
    context = ServiceContext.build(settings, engine=service_context.engine, session_factory=db.info["factory"])
    client = TestClient(create_app(context=context))
    owner = Callers(client=client, session=db, issuer=settings.issuer).headers()
    account = new_account(client, owner)
    data = b"model bytes " * 1000
    asset = _upload(client, account, owner, "housing.zip", data).json()
    assert asset["url"].startswith("http://127.0.0.1:10000/devstoreaccount1/api-test/")
    assert "sig=" in asset["url"] and "sp=r" in asset["url"]
    assert httpx.get(asset["url"], timeout=10).content == data
    registered = client.post(f"{account}/models", json=model_body(url=asset["url"]), headers=owner)
    assert registered.status_code == 200, registered.text
