"""Throwaway certificates for the security tests (made fresh for every test run)."""

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

TOKEN = "s3cret-token-for-tests"


def make_pki(folder: Path) -> dict[str, Path | tuple[Path, Path]]:
    """A CA with a server (valid for localhost and 127.0.0.1) and a client
    certificate, a rogue CA with a client certificate of its own, a server
    certificate for another name, and a token file."""
    ca = make_ca(folder, "ca")
    other_ca = make_ca(folder, "rogue-ca")
    files = {
        "ca": folder / "ca.pem",
        "rogue-ca": folder / "rogue-ca.pem",
        "server": make_leaf(folder, "server", ca, server=True),
        "other-name": make_leaf(folder, "other-name", ca, server=True, names=("shard-9.example",)),
        "client": make_leaf(folder, "client", ca),
        "rogue": make_leaf(folder, "rogue", other_ca),
    }
    (folder / "token").write_text(TOKEN + "\n")
    files["token"] = folder / "token"
    return files


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _cert(subject, key, issuer, issuer_key, *, ca=False, names=()):
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
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_ca(folder: Path, name: str) -> tuple:
    key = _key()
    cert = _cert(_name(name), key, _name(name), key, ca=True)
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def make_leaf(folder: Path, name: str, ca: tuple, server: bool = False, names: tuple = ()) -> tuple[Path, Path]:
    """A certificate and key signed by ``ca``; a server's is valid for ``names``
    (DNS names or IP addresses; default localhost and 127.0.0.1)."""
    ca_cert, ca_key = ca
    key = _key()
    names = names or (("localhost", "127.0.0.1") if server else ())
    cert = _cert(_name(name), key, ca_cert.subject, ca_key, names=names)
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_pem_key(key))
    return cert_path, key_path
