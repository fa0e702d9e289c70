"""A tiny PKI for a storage cloud: one CA, node certificates with IP SANs, client certificates."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from transfer.errors import TransferError, ValidationError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def init_ca(
    directory: str | os.PathLike[str],
    *,
    name: str = "medstream CA",
    days: int = 3650,
    force: bool = False,
) -> Issued:
    """Create ``ca.crt`` and ``ca.key`` (0600) in ``directory``. Refuses to overwrite unless forced."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cert_p, key_p = d / CA_CERT, d / CA_KEY
    if cert_p.exists() and not force:
        raise TransferError(f"{cert_p} already exists (use --force to replace the CA)")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
    _write(key_p, _key_pem(key), 0o600)
    _write(cert_p, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return Issued(cert_p, key_p)


def _load_ca(d: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((d / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((d / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError:
        raise TransferError(f"no CA in {d} (run `transfer pki init {d}` first)") from None
    except ValueError as exc:
        raise TransferError(f"cannot load the CA in {d}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TransferError(f"{d / CA_KEY} is not an EC key")
    return cert, key


def issue(
    directory: str | os.PathLike[str],
    name: str,
    *,
    ips: list[str] | tuple[str, ...] = (),
    dns: list[str] | tuple[str, ...] = (),
    client: bool = False,
    days: int = 825,
) -> Issued:
    """Sign ``<name>.crt`` / ``<name>.key`` with the CA in ``directory``.

    Node certificates carry the given IP and DNS SANs (clients verify the node's IP against
    them); ``client=True`` makes a client certificate for mutual TLS.
    """
    if not _NAME_RE.match(name):
        raise ValidationError(f"bad certificate name {name!r} (letters, digits, . _ -)")
    sans: list[x509.GeneralName] = []
    for ip in ips:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise ValidationError(f"bad IP address {ip!r}") from None
    sans += [x509.DNSName(n) for n in (*dns, name)]
    d = Path(directory)
    ca_cert, ca_key = _load_ca(d)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    eku = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_p, cert_p = d / f"{name}.key", d / f"{name}.crt"
    _write(key_p, _key_pem(key), 0o600)
    _write(cert_p, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return Issued(cert_p, key_p)


def new_token(path: str | os.PathLike[str]) -> str:
    """Write a fresh random token (0600) and return it."""
    import secrets

    token = secrets.token_urlsafe(32)
    _write(Path(path), (token + "\n").encode(), 0o600)
    return token
