"""Throw-away TLS material for local deployments: a CA, a server certificate, SuperNode keys.

For tests and demos only; docs/deployment.md says how to make real ones.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["TlsFiles", "make_supernode_key", "make_tls_files"]

_CA = "layerfed dev CA"
_NO_ENCRYPTION = serialization.NoEncryption()


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS-enabled SuperLink: the CA and the server's certificate and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write_pem(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    extension: x509.ExtensionType,
    days: int,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(_CA))
    builder = builder.public_key(key.public_key()).serial_number(x509.random_serial_number())
    builder = builder.not_valid_before(now - dt.timedelta(minutes=5))
    builder = builder.not_valid_after(now + dt.timedelta(days=days))
    critical = isinstance(extension, x509.BasicConstraints)
    return builder.add_extension(extension, critical=critical).sign(ca_key, hashes.SHA256())


def make_tls_files(folder: Path, host: str = "127.0.0.1", days: int = 30) -> TlsFiles:
    """A throw-away CA and a server certificate for ``host`` (tests and demos only)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca = _certificate(_CA, ca_key, ca_key, x509.BasicConstraints(ca=True, path_length=None), days)
    sans: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        sans.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        sans.append(x509.DNSName(host))
    cert = _certificate(host, key, ca_key, x509.SubjectAlternativeName(sans), days)
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, _NO_ENCRYPTION)
    return TlsFiles(
        ca_cert=_write_pem(folder / "ca.crt", ca.public_bytes(pem)),
        server_cert=_write_pem(folder / "server.pem", cert.public_bytes(pem)),
        server_key=_write_pem(folder / "server.key", key_pem, 0o600),
    )


def make_supernode_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format for SuperNode authentication: (private, public)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, _NO_ENCRYPTION
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return (
        _write_pem(folder / name, private, 0o600),
        _write_pem(folder / f"{name}.pub", public),
    )
