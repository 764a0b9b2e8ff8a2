"""TLS for the Kubernetes front door: the operator's certificate, or the gateway's own CA.

kubectl sends no bearer token over plain HTTP, so the front door is HTTPS only. Without
``kube_tls_cert`` / ``kube_tls_key`` the gateway keeps a small CA in its data dir
(``kube_ca.crt`` / ``kube_ca.key``, created once) and a server certificate signed by it
for loopback, the host name and ``kube_server_names``. ``bastion kubeconfig`` puts that
CA in the kubeconfig (the HTTP API serves it at ``GET /v1/kube/ca``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from recorder.secretfile import write_secret

CA_DAYS = 3650
SERVER_DAYS = 365
RENEW_BEFORE = dt.timedelta(days=30)


def _write_private(path: Path, data: bytes) -> None:
    """Create it 0600, first writer wins (recorder/secretfile.py)."""
    if not write_secret(path, data):
        raise FileExistsError(path)


def _replace(path: Path, data: bytes) -> None:
    write_secret(path, data, replace=True)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def load_or_create_ca(data_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = data_dir / "kube_ca.crt", data_dir / "kube_ca.key"
    if not key_path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            _write_private(key_path, _key_pem(key))
        except FileExistsError:
            pass  # another process made it first: use theirs
    loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: expected an EC private key")
    key = loaded
    if cert_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if cert.public_key() == key.public_key() and cert.not_valid_after_utc > _now() + RENEW_BEFORE:
            return cert, key
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "guarita"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "guarita Kubernetes front door CA")])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    _replace(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def server_names(listen_host: str, extra: Iterable[str]) -> list[str]:
    names = ["localhost", "127.0.0.1", "::1"]
    if listen_host not in ("", "0.0.0.0", "::"):
        names.append(listen_host)
    for name in (socket.gethostname(), *extra):
        if name and name not in names:
            names.append(name)
    return names


def _sans(names: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def ensure_server_cert(data_dir: Path, names: list[str]) -> tuple[Path, Path, bytes]:
    """The server certificate and key files for ``names``, (re)issued by the gateway CA
    when missing, expiring soon or made for other names; returns (cert, key, CA PEM)."""
    ca_cert, ca_key = load_or_create_ca(data_dir)
    cert_path, key_path = data_dir / "kube_server.crt", data_dir / "kube_server.key"
    wanted = _sans(names)
    if cert_path.exists() and key_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            if (set(have) == set(wanted) and cert.issuer == ca_cert.subject
                    and cert.public_key() == key.public_key()
                    and cert.not_valid_after_utc > _now() + RENEW_BEFORE):
                return cert_path, key_path, ca_cert.public_bytes(serialization.Encoding.PEM)
        except (ValueError, x509.ExtensionNotFound):
            pass
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName(wanted), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _replace(key_path, _key_pem(key))
    _replace(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path, ca_cert.public_bytes(serialization.Encoding.PEM)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    return context
