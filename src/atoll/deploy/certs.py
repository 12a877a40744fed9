"""Enrolment: a private certificate authority, server and client certificates, tokens.

``init(dir, hosts)`` writes ``ca.pem``/``ca.key`` (the authority), ``server.pem``/``server.key``
(valid for ``hosts``: DNS names and IP addresses) and an empty ``clients.json`` registry.
``issue(dir, name)`` enrols one client: a certificate ``clients/NAME.pem``/``NAME.key`` signed by
the authority, or with ``token=True`` a random bearer token in ``clients/NAME.token`` (only its
SHA-256 is kept in the registry). Every enrolled client gets a numeric id: the client index the
server samples (``0 .. data.num_clients-1``), written in its certificate (USER_ID) so that peers
can check whose it is (``[secure] malicious``, ``atoll.secure.active``). The server admits only registry entries: a
certificate must carry the enrolled name *and* serial, so ``revoke(dir, name)`` locks a client out.

Keys are ECDSA P-256; private keys, tokens and the registry are written mode 0600 in directories
mode 0700. Uses the ``cryptography`` package only.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REGISTRY = "clients.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def init(directory, hosts=("localhost", "127.0.0.1"), *, days: int = 825, force: bool = False) -> Path:
    """Create the authority and the server certificate in ``directory``; returns the directory."""
    d = _private_dir(directory)
    if (d / "ca.key").exists() and not force:
        raise ValueError(f"{d / 'ca.key'} already exists: this directory already holds an "
                         "authority (pass force=True / --force to replace it and every enrolment)")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "atoll private CA")])
    ca = (_builder(name, name, ca_key.public_key(), days)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    _write_key(d / "ca.key", ca_key)
    _write(d / "ca.pem", ca.public_bytes(serialization.Encoding.PEM), 0o644)
    _server_cert(d, ca, ca_key, list(hosts), days)
    _save_registry(d, {})
    return d


def issue(directory, name: str, *, token: bool = False, client_id: int | None = None,
          observer: bool = False, days: int = 825) -> dict:
    """Enrol client ``name``; returns its registry entry plus the paths (and token) written."""
    d = Path(directory)
    if not _NAME.match(name):
        raise ValueError(f"client name {name!r}: use 1-64 letters, digits, '_', '.', '-'")
    reg = load_registry(d)
    if name in reg:
        raise ValueError(f"client {name!r} is already enrolled (revoke it first to re-issue)")
    if observer:
        client_id = None
    elif client_id is None:
        used = {e["id"] for e in reg.values() if e["id"] is not None}
        client_id = next(i for i in range(len(used) + 1) if i not in used)
    elif client_id < 0 or any(e["id"] == client_id for e in reg.values()):
        raise ValueError(f"client id {client_id} is negative or already taken")
    out = _private_dir(d / "clients")
    entry: dict = {"id": client_id, "token_sha256": None, "serial": None}
    files = {}
    if token:
        secret = "atl_" + secrets.token_urlsafe(32)
        entry["token_sha256"] = _sha256(secret)
        _write(out / f"{name}.token", secret.encode() + b"\n", 0o600)
        files = {"token": str(out / f"{name}.token")}
    else:
        ca_key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
        ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        uid = [] if client_id is None else [x509.NameAttribute(NameOID.USER_ID, str(client_id))]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name), *uid])
        cert = (_builder(subject, ca.subject, key.public_key(), days)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        entry["serial"] = format(cert.serial_number, "x")
        _write_key(out / f"{name}.key", key)
        _write(out / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
        files = {"cert": str(out / f"{name}.pem"), "key": str(out / f"{name}.key")}
    reg[name] = entry
    _save_registry(d, reg)
    return {"name": name, **entry, **files, "ca": str(d / "ca.pem")}


def revoke(directory, name: str) -> None:
    reg = load_registry(directory)
    if reg.pop(name, None) is None:
        raise ValueError(f"client {name!r} is not enrolled in {directory}")
    _save_registry(Path(directory), reg)


def load_registry(directory) -> dict[str, dict]:
    path = Path(directory) / REGISTRY
    if not path.exists():
        raise FileNotFoundError(f"no enrolment registry {path}: run `atoll certs init` first")
    return json.loads(path.read_text())["clients"]


def by_token(registry: dict[str, dict], token: str) -> str | None:
    """The enrolled name whose token is ``token`` (constant-time comparisons), or None."""
    digest = _sha256(token)
    found = None
    for name, e in registry.items():
        if e.get("token_sha256") and hmac.compare_digest(e["token_sha256"], digest):
            found = name
    return found


def by_certificate(registry: dict[str, dict], pem: bytes) -> str | None:
    """The enrolled name of a (CA-verified) peer certificate, if its name and serial match."""
    cert = x509.load_pem_x509_certificate(pem)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = cns[0].value if cns else None
    e = registry.get(name)
    return name if e and e.get("serial") == format(cert.serial_number, "x") else None


def _server_cert(d: Path, ca, ca_key, hosts: list[str], days: int) -> None:
    if not hosts:
        raise ValueError("give at least one host name or IP address for the server certificate")
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    cert = (_builder(subject, ca.subject, key.public_key(), days)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_key(d / "server.key", key)
    _write(d / "server.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _builder(subject, issuer, public_key, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days)))


def _sha256(s: str) -> str:
    return hashlib.sha256(s.strip().encode()).hexdigest()


def _private_dir(path) -> Path:
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    return d


def _write_key(path: Path, key) -> None:
    _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()), 0o600)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically; the file never exists with looser permissions than ``mode``."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_registry(d: Path, reg: dict) -> None:
    _write(d / REGISTRY, json.dumps({"format": 1, "clients": reg}, indent=1).encode(), 0o600)
