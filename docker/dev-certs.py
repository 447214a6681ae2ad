"""Make a private CA and a TLS certificate for the compose file's internal services (Azurite).

Run by the `certs` one-shot service of docker-compose.yml, in the service image (it has
`cryptography`). Idempotent: an existing CA and certificate are kept until 30 days before
they expire. Writes to the folder given (default /certs):

    ca.crt            the CA, for MMS_EXTRA_CA_BUNDLE (the workers' downloads)
    ca-bundle.crt     certifi's public CAs plus ca.crt, for REQUESTS_CA_BUNDLE (the Azure SDK)
    <name>.crt/.key   the server certificate (every name below as a DNS name) and its key

Usage: python3 dev-certs.py [FOLDER] [NAME ...]   (names default to: azurite localhost)
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import sys
from pathlib import Path

import certifi
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID = datetime.timedelta(days=825)
RENEW_BEFORE = datetime.timedelta(days=30)


def _still_valid(path: Path) -> bool:
    if not path.exists():
        return False
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.not_valid_after_utc - RENEW_BEFORE > datetime.datetime.now(datetime.UTC)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = folder / "ca.crt", folder / "ca.key"
    if _still_valid(cert_path) and key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), key
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mms compose internal CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALID)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def _server(folder: Path, names: list[str], ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> None:
    cert_path, key_path = folder / f"{names[0]}.crt", folder / f"{names[0]}.key"
    if _still_valid(cert_path) and key_path.exists():
        issued = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if issued.issuer == ca.subject:
            return
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    alt_names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALID)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def main(argv: list[str]) -> None:
    folder = Path(argv[0] if argv else "/certs")
    names = argv[1:] or ["azurite", "localhost"]
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ca(folder)
    _server(folder, names, ca, ca_key)
    bundle = Path(certifi.where()).read_bytes().rstrip(b"\n") + b"\n" + (folder / "ca.crt").read_bytes()
    _write(folder / "ca-bundle.crt", bundle, 0o644)
    print(f"certificates for {', '.join(names)} in {folder} (CA {folder / 'ca.crt'})")


if __name__ == "__main__":
    main(sys.argv[1:])
