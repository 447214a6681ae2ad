"""A real external token issuer for tests: an RSA key and its JWKS served over HTTP."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwt

from app.auth.keys import _public_jwk


class ExternalIssuer:
    """Signs AAD-style tokens and serves the public keys at ``jwks_uri``."""

    def __init__(self, issuer: str) -> None:
        self.issuer = issuer
        self.jwks_uri = ""
        self.token_url = ""  # an OAuth 2.0 client-credentials endpoint, as AAD's
        self.clients: dict[str, tuple[str, str]] = {}  # client id → (secret, the token's oid)
        self.jwks_requests = 0
        self._keys: list[tuple[str, str, dict[str, Any]]] = []
        self.rotate()

    def rotate(self) -> str:
        """Add a new signing key (published from now on) and return its kid."""
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        public = _public_jwk(private)
        self._keys.append((public["kid"], pem, public))
        return public["kid"]

    @property
    def jwks(self) -> dict[str, Any]:
        return {"keys": [public for _, _, public in self._keys]}

    def token(self, *, subject: str, audience: str = "mms-api", ttl: int = 600, **overrides: Any) -> str:
        kid, pem, _ = self._keys[-1]
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": audience,
            "oid": subject,
            "sub": f"pairwise-{subject}",
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": uuid.uuid4().hex,
        }
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, pem, algorithm="RS256", headers={"kid": kid})

    @classmethod
    @contextmanager
    def serve(cls, issuer: str) -> Iterator[ExternalIssuer]:
        external = cls(issuer)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                external.jwks_requests += 1
                body = json.dumps(external.jwks).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                form = dict(parse_qsl(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()))
                client = external.clients.get(form.get("client_id", ""))
                if (
                    form.get("grant_type") != "client_credentials"
                    or client is None
                    or client[0] != form.get("client_secret")
                ):
                    status, answer = (
                        401,
                        {
                            "error": "invalid_client",
                            "error_description": "AADSTS7000215: Invalid client secret provided.",
                        },
                    )
                else:
                    # AAD's v2 endpoint: scope "<audience>/.default" gives a token for that audience.
                    audience = form.get("scope", "mms-api").removesuffix("/.default")
                    status, answer = (
                        200,
                        {
                            "token_type": "Bearer",
                            "expires_in": 600,
                            "access_token": external.token(subject=client[1], audience=audience),
                        },
                    )
                body = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        external.jwks_uri = f"http://127.0.0.1:{server.server_port}/discovery/keys"
        external.token_url = f"http://127.0.0.1:{server.server_port}/oauth2/v2.0/token"
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield external
        finally:
            server.shutdown()
            server.server_close()
