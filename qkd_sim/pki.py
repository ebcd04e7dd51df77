"""A development certificate authority for KMEs and SAEs, and mutual-TLS contexts.

For a cluster on one machine or a lab, never for production: the CA key sits
in a file next to its certificate (mode 0600, as every private key here).

Identity: an SAE is the Common Name of its client certificate, which also
carries the same ID as a SAN URI ``urn:qstore:sae:<id>`` (a KME's
certificate carries ``urn:qstore:kme:<id>``, DNS/IP names for its hosts, and
may act as a client of another KME). A storage node is an SAE that also
serves HTTPS: its certificate (kind ``"node"``) carries its SAE URI plus the
host names it listens on, and may be used as server and client. :func:`sae_id_from_peercert` reads the
ID back from what :mod:`ssl` reports for a verified peer and refuses a
certificate whose CN and SAE URI disagree. Keys are ECDSA P-256; TLS is 1.3
only, and both sides must present a certificate of the cluster CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qstore.errors import LocalError

SAE_URN = "urn:qstore:sae:"
KME_URN = "urn:qstore:kme:"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CLOCK_SKEW = datetime.timedelta(minutes=5)

Kind = Literal["sae", "kme", "node"]


@dataclass(frozen=True)
class CA:
    """The CA's certificate and key, and where they are stored."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path

    def __repr__(self) -> str:
        return f"CA({self.cert.subject.rfc4514_string()}, {self.cert_path})"


@dataclass(frozen=True)
class Identity:
    """Files of one issued certificate: its PEM certificate, private key and the CA certificate."""

    name: str
    kind: Kind
    cert: Path
    key: Path
    ca: Path


def _now(now: datetime.datetime | None) -> datetime.datetime:
    return now if now is not None else datetime.datetime.now(datetime.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (also when the file existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{**dict.fromkeys(names, False), **allowed})


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise LocalError("a certificate name is 1-64 characters of [A-Za-z0-9._-], starting alphanumeric")
    return name


def create_ca(directory: str | Path, *, name: str = "qstore-dev-ca", days: int = 3650,
              now: datetime.datetime | None = None) -> CA:
    """Make a self-signed CA in ``directory`` (``ca.pem``, ``ca.key``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _check_name(name))])
    t = _now(now)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(t - _CLOCK_SKEW).not_valid_after(t + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CA(cert, key, cert_path, key_path)


def load_ca(directory: str | Path) -> CA:
    """The CA :func:`create_ca` wrote in ``directory``."""
    directory = Path(directory)
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise LocalError(f"{key_path}: not an EC private key")
    return CA(cert, key, cert_path, key_path)


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue(
    ca: CA,
    common_name: str,
    directory: str | Path,
    *,
    kind: Kind = "sae",
    hosts: Iterable[str] = ("127.0.0.1", "localhost"),
    days: int = 825,
    now: datetime.datetime | None = None,
) -> Identity:
    """Issue a certificate for an SAE (client), a storage node (an SAE that also serves) or a KME.

    Writes ``<common_name>.pem`` and ``<common_name>.key`` (mode 0600) in
    ``directory``. ``hosts`` (names or IP addresses) go into the SAN of KME
    certificates; SAE certificates get only their ``urn:qstore:sae:`` URI.
    """
    _check_name(common_name)
    if kind not in ("sae", "kme", "node"):
        raise LocalError('kind must be "sae", "kme" or "node"')
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    t = _now(now)
    names: list[x509.GeneralName]
    if kind == "sae":
        names = [x509.UniformResourceIdentifier(SAE_URN + common_name)]
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    elif kind == "node":
        names = [x509.UniformResourceIdentifier(SAE_URN + common_name)] + [_host_name(h) for h in hosts]
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    else:
        names = [x509.UniformResourceIdentifier(KME_URN + common_name)] + [_host_name(h) for h in hosts]
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(t - _CLOCK_SKEW).not_valid_after(t + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{common_name}.pem", directory / f"{common_name}.key"
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Identity(common_name, kind, cert_path, key_path, ca.cert_path)


def _context(purpose: int, cert: str | Path, key: str | Path, ca: str | Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return ctx


def server_ssl_context(cert: str | Path, key: str | Path, ca: str | Path) -> ssl.SSLContext:
    """TLS 1.3 server context that requires a client certificate issued by ``ca``."""
    return _context(ssl.PROTOCOL_TLS_SERVER, cert, key, ca)


def client_ssl_context(cert: str | Path, key: str | Path, ca: str | Path) -> ssl.SSLContext:
    """TLS 1.3 client context presenting ``cert`` and checking the server's name against ``ca``."""
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, cert, key, ca)
    ctx.check_hostname = True
    return ctx


def sae_id_from_peercert(peercert: object) -> str | None:
    """The SAE ID of a verified peer (``SSLSocket.getpeercert()`` form), or None.

    The ID is the subject's single Common Name. A SAN URI ``urn:qstore:sae:``
    naming another ID, or a KME URI, makes the certificate no SAE identity.
    """
    if not isinstance(peercert, dict):
        return None
    cns = [value for rdn in peercert.get("subject", ()) for (attr, value) in rdn if attr == "commonName"]
    if len(cns) != 1 or not isinstance(cns[0], str) or not _NAME.fullmatch(cns[0]):
        return None
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "URI" and isinstance(value, str):
            if value.startswith(KME_URN):
                return None
            if value.startswith(SAE_URN) and value != SAE_URN + cns[0]:
                return None
    return cns[0]
