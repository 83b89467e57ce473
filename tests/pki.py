"""Throwaway certificates for the TLS tests, made with the `cryptography` package: a CA, a server certificate for
loopback (127.0.0.1, ::1, localhost) and one for another name, a client certificate, and a second CA that signed
only a stranger's client certificate. PEM files in one folder; nothing else keeps them."""
from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1")),
                  x509.DNSName("localhost")]


@dataclasses.dataclass(frozen=True)
class Pki:
    """The PEM files' paths."""
    ca: str
    server_cert: str  # for 127.0.0.1, ::1 and localhost, signed by `ca`
    server_key: str
    elsewhere_cert: str  # for elsewhere.invalid only, signed by `ca`
    elsewhere_key: str
    client_cert: str  # signed by `ca`
    client_key: str
    other_ca: str
    stranger_cert: str  # a client certificate signed by `other_ca`
    stranger_key: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer: x509.Certificate | None, issuer_key, extensions: list) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject))
               .issuer_name(issuer.subject if issuer else _name(subject)).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30)))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(pki: Pki, name: str, certificate: x509.Certificate, key=None) -> None:
    """`name`'s certificate (and key: `<name minus _cert>_key`) into the PEM files `pki` names."""
    Path(getattr(pki, name)).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        Path(getattr(pki, name.replace("_cert", "_key"))).write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _ca(common_name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    usage = x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False)
    return _certificate(common_name, key, None, key, [(x509.BasicConstraints(ca=True, path_length=None), True),
                                                       (usage, True)]), key


def _leaf(common_name: str, ca, ca_key, usage, names: list | None = None):
    key = ec.generate_private_key(ec.SECP256R1())
    extensions = [(x509.BasicConstraints(ca=False, path_length=None), True), (x509.ExtendedKeyUsage([usage]), False)]
    if names:
        extensions.append((x509.SubjectAlternativeName(names), False))
    return _certificate(common_name, key, ca, ca_key, extensions), key


def write_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    pki = Pki(**{field.name: str(folder / f"{field.name}.pem") for field in dataclasses.fields(Pki)})
    ca, ca_key = _ca("throwaway test CA")
    _write(pki, "ca", ca)
    server, client = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    _write(pki, "server_cert", *_leaf("localhost", ca, ca_key, server, LOOPBACK_NAMES))
    _write(pki, "elsewhere_cert", *_leaf("elsewhere.invalid", ca, ca_key, server, [x509.DNSName("elsewhere.invalid")]))
    _write(pki, "client_cert", *_leaf("test client", ca, ca_key, client))
    other, other_key = _ca("another throwaway CA")
    _write(pki, "other_ca", other)
    _write(pki, "stranger_cert", *_leaf("stranger", other, other_key, client))
    return pki
