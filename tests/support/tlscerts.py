"""Certificates made for a test: a CA, a server certificate for 127.0.0.1/localhost, a client one.

Made with ``cryptography`` (a dependency already), written as PEM files into a directory.
"""

import dataclasses
import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclasses.dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key, path):
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _sign(subject, key, issuer, issuer_key, *, ca=False, san=None, usage=None):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_certificates(directory, prefix="test"):
    """A CA and the certificates it signs, as PEM files in ``directory``."""
    directory = Path(directory)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"{prefix} CA")
    ca = _sign(ca_name, ca_key, ca_name, ca_key, ca=True)
    paths = Certificates(
        ca=directory / f"{prefix}-ca.pem",
        server_cert=directory / f"{prefix}-server.pem",
        server_key=directory / f"{prefix}-server.key",
        client_cert=directory / f"{prefix}-client.pem",
        client_key=directory / f"{prefix}-client.key",
    )
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _sign(_name("localhost"), server_key, ca_name, ca_key, san=san, usage=[ExtendedKeyUsageOID.SERVER_AUTH])
    paths.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_key(server_key, paths.server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _sign(_name("gateway"), client_key, ca_name, ca_key, usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    paths.client_cert.write_bytes(client.public_bytes(serialization.Encoding.PEM))
    _write_key(client_key, paths.client_key)
    return paths
