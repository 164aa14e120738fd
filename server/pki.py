"""A local certificate authority for the server's TLS: CA, server and client certificates.

`free-server init` makes a CA (``ca.pem`` / ``ca.key``) whose certificate owners
pin with ``--ca``, and a server certificate for the names the server is reached
by, always including ``localhost``, ``127.0.0.1`` and ``::1`` (the Flower TLS
front and the tests reach it on loopback). With mutual TLS, the same CA issues
the owners' client certificates. Keys are EC P-384; private keys are written
with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from free_common.errors import ConfigError, SecurityError
from free_common.security.files import read_key_file, write_key_file

__all__ = [
    "LOOPBACK_NAMES",
    "CertificateAuthority",
    "IssuedCertificate",
    "create_ca",
    "issue_client_certificate",
    "issue_server_certificate",
    "load_ca",
    "server_alt_names",
]

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_CA_DAYS = 3650
_LEAF_DAYS = 825  # the longest validity common TLS clients accept for a leaf
_CLOCK_SKEW = dt.timedelta(minutes=5)
_DNS_NAME = re.compile(
    r"(?=.{1,253}$)(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def certificate_pem(self) -> bytes:
        """The certificate as PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write the certificate (0644) and the key (0600); refuses to overwrite either."""
        for path in (cert_path, key_path):
            if path.exists():
                raise ConfigError(f"{path} already exists: move it away or choose another path")
        write_key_file(key_path, _key_pem(self.key), private=True, overwrite=False)
        write_key_file(cert_path, self.certificate_pem, private=False, overwrite=False)


@dataclass(frozen=True)
class CertificateAuthority(IssuedCertificate):
    """The local CA: a self-signed certificate and the key that signs leaves."""


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FREE-Fed"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def create_ca(common_name: str = "FREE-Fed local CA", days: int = _CA_DAYS) -> CertificateAuthority:
    """Make a new self-signed CA that may sign leaf certificates only (path length 0)."""
    key = _new_key()
    name = _name(common_name)
    certificate = (
        _builder(name, name, key, days)
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
        .sign(key, hashes.SHA384())
    )
    return CertificateAuthority(certificate, key)


def load_ca(cert_path: Path, key_path: Path) -> CertificateAuthority:
    """Load a CA written by `create_ca` (to issue more certificates later).

    Raises
    ------
    SecurityError
        A file is missing, unreadable, or the key does not belong to the certificate.
    """
    try:
        certificate = x509.load_pem_x509_certificate(read_key_file(cert_path, "CA certificate"))
        key = serialization.load_pem_private_key(
            read_key_file(key_path, "CA private key"), password=None
        )
    except (ValueError, TypeError) as exc:
        raise SecurityError(f"cannot load the CA from {cert_path} and {key_path}: {exc}") from exc
    if (
        not isinstance(key, ec.EllipticCurvePrivateKey)
        or key.public_key() != certificate.public_key()
    ):
        raise SecurityError(f"{key_path} is not the private key of the CA in {cert_path}")
    return CertificateAuthority(certificate, key)


def server_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Subject alternative names for `hosts` plus the loopback names, without repeats.

    Raises
    ------
    ConfigError
        A host is neither an IP address nor a valid DNS name.
    """
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in (*hosts, *LOOPBACK_NAMES):
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            if not _DNS_NAME.fullmatch(host):
                raise ConfigError(
                    f"--host {host!r} is neither an IP address nor a DNS name"
                ) from None
            key = host.lower()
            entry: x509.GeneralName = x509.DNSName(key)
        else:
            key = str(address)
            entry = x509.IPAddress(address)
        if key not in seen:
            seen.add(key)
            names.append(entry)
    return names


def issue_server_certificate(
    ca: CertificateAuthority, hosts: Sequence[str] = (), days: int = _LEAF_DAYS
) -> IssuedCertificate:
    """Issue a TLS server certificate for `hosts` plus localhost, 127.0.0.1 and ::1."""
    key = _new_key()
    alt_names = server_alt_names(hosts)
    common_name = hosts[0] if hosts else LOOPBACK_NAMES[0]
    certificate = (
        _leaf(ca, _name(common_name), key, days, ExtendedKeyUsageOID.SERVER_AUTH)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(ca.key, hashes.SHA384())
    )
    return IssuedCertificate(certificate, key)


def issue_client_certificate(
    ca: CertificateAuthority, client_name: str, days: int = _LEAF_DAYS
) -> IssuedCertificate:
    """Issue a TLS client certificate (for mutual TLS) naming `client_name`."""
    if not client_name or len(client_name) > 64:
        raise ConfigError("a client certificate needs a name of 1 to 64 characters")
    key = _new_key()
    # RFC 5280 profiles (and cryptography's verifier) want a SAN even on client certificates.
    uri = x509.UniformResourceIdentifier(f"urn:free-fed:client:{quote(client_name, safe='')}")
    certificate = (
        _leaf(ca, _name(client_name), key, days, ExtendedKeyUsageOID.CLIENT_AUTH)
        .add_extension(x509.SubjectAlternativeName([uri]), critical=False)
        .sign(ca.key, hashes.SHA384())
    )
    return IssuedCertificate(certificate, key)


def _leaf(
    ca: CertificateAuthority,
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    days: int,
    usage: x509.ObjectIdentifier,
) -> x509.CertificateBuilder:
    return (
        _builder(subject, ca.certificate.subject, key, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
