"""The local CA: certificate names, chain verification, real TLS handshakes, key modes."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from free_common.errors import ConfigError, SecurityError
from free_server.pki import (
    create_ca,
    issue_client_certificate,
    issue_server_certificate,
    load_ca,
    server_alt_names,
)

CN = NameOID.COMMON_NAME


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    ca = create_ca()
    ca.write(folder / "ca.pem", folder / "ca.key")
    issue_server_certificate(ca, ["fed.example.org", "10.1.2.3"]).write(
        folder / "tls.pem", folder / "tls.key"
    )
    issue_client_certificate(ca, "alice").write(folder / "alice.pem", folder / "alice.key")
    return folder


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_server_certificate_names_the_hosts_and_loopback(pki: Path) -> None:
    sans = _cert(pki / "tls.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sans.value.get_values_for_type(x509.DNSName) == ["fed.example.org", "localhost"]
    assert sans.value.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]


@pytest.mark.parametrize("name", ["fed.example.org", "localhost", "127.0.0.1", "::1", "10.1.2.3"])
def test_chain_verifies_for_every_name(pki: Path, name: str) -> None:
    try:
        subject: x509.verification.Subject = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = x509.DNSName(name)
    verifier = PolicyBuilder().store(Store([_cert(pki / "ca.pem")])).build_server_verifier(subject)
    chain = verifier.verify(_cert(pki / "tls.pem"), [])
    assert chain[-1] == _cert(pki / "ca.pem")


def test_chain_fails_for_another_name_or_another_ca(pki: Path) -> None:
    trusted = Store([_cert(pki / "ca.pem")])
    with pytest.raises(VerificationError):
        PolicyBuilder().store(trusted).build_server_verifier(x509.DNSName("evil.org")).verify(
            _cert(pki / "tls.pem"), []
        )
    stranger = Store([create_ca().certificate])
    with pytest.raises(VerificationError):
        PolicyBuilder().store(stranger).build_server_verifier(x509.DNSName("localhost")).verify(
            _cert(pki / "tls.pem"), []
        )


def test_client_certificate_verifies_as_a_client(pki: Path) -> None:
    verifier = PolicyBuilder().store(Store([_cert(pki / "ca.pem")])).build_client_verifier()
    result = verifier.verify(_cert(pki / "alice.pem"), [])
    assert result.chain[-1] == _cert(pki / "ca.pem")


def test_private_keys_are_owner_only(pki: Path) -> None:
    for name in ("ca.key", "tls.key", "alice.key"):
        assert stat.S_IMODE((pki / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE((pki / "ca.pem").stat().st_mode) == 0o644


def _handshake(pki: Path, host: str, *, client_cert: bool, require: bool) -> str:
    """Serve one TLS connection on loopback and return the peer name the server saw."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki / "tls.pem", pki / "tls.key")
    if require:
        server_ctx.verify_mode = ssl.CERT_REQUIRED
        server_ctx.load_verify_locations(pki / "ca.pem")
    client_ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if client_cert:
        client_ctx.load_cert_chain(pki / "alice.pem", pki / "alice.key")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    seen: list[str] = []
    with socket.socket(family) as listener:
        listener.bind((host, 0))
        listener.listen(1)

        def serve() -> None:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                der = tls.getpeercert(binary_form=True)
                subject = x509.load_der_x509_certificate(der).subject if der else x509.Name([])
                seen.append(",".join(str(a.value) for a in subject.get_attributes_for_oid(CN)))
                tls.sendall(b"ok")

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname()[:2], timeout=10) as raw,
                client_ctx.wrap_socket(raw, server_hostname=host) as tls,
            ):
                assert tls.recv(2) == b"ok"
        finally:
            thread.join(timeout=10)
    return seen[0]


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_real_tls_handshake_on_loopback(pki: Path, host: str) -> None:
    assert _handshake(pki, host, client_cert=False, require=False) == ""


def test_mutual_tls_handshake_presents_the_client_name(pki: Path) -> None:
    assert _handshake(pki, "127.0.0.1", client_cert=True, require=True) == "alice"


def test_bad_host_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="neither an IP address nor a DNS name"):
        server_alt_names(["bad host!"])
    assert len(server_alt_names(["LOCALHOST", "127.0.0.1"])) == 3  # no repeats


def test_load_ca_round_trips_and_refuses_a_foreign_key(pki: Path, tmp_path: Path) -> None:
    ca = load_ca(pki / "ca.pem", pki / "ca.key")
    assert ca.certificate == _cert(pki / "ca.pem")
    with pytest.raises(SecurityError, match="not the private key"):
        load_ca(pki / "ca.pem", pki / "tls.key")
    with pytest.raises(ConfigError, match="already exists"):
        ca.write(pki / "ca.pem", tmp_path / "new.key")
    assert not (tmp_path / "new.key").exists()
