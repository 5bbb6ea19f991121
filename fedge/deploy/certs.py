"""TLS certificates and SuperNode authentication keys for a Flower 1.41 deployment.

What Flower 1.41 expects (checked against its source):

* SuperLink: `--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key`
  (PEM). One HTTPS port serves the Fleet, Control and Runtime APIs, and the SuperLink's
  own ServerApp process connects back to it over loopback, so the server certificate
  always names 127.0.0.1 and localhost besides the hosts you give.
* SuperNode / `flwr` CLI: `--root-certificates ca.crt` / `root-certificates = ".../ca.crt"`.
* SuperNode authentication: `--auth-supernode-private-key` reads an *OpenSSH* private
  key holding an EC key (`load_ssh_private_key`); `flwr supernode register` reads the
  *OpenSSH* public key and accepts NIST curves only. We use P-384, as Flower's docs do.

Nothing here overwrites a key unless asked to (`force=True`): a reissued CA or node
key silently locks every deployed SuperNode out.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import stat
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
"""Always in the server certificate: the SuperLink's ServerApp connects to itself here."""

CURVE = ec.SECP384R1
CA_DAYS = 3650

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"


def node_key_name(index: int) -> str:
    return f"supernode-{index}.key"


def node_pub_name(index: int) -> str:
    return f"supernode-{index}.pub"


class _FileInDirectory:
    """`certs.ca_cert` and its kind: one rule for every file kept under a fixed name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, certs: CertificateSet, owner: type[CertificateSet]) -> Path:
        return certs.directory / self.name


@dataclass(frozen=True)
class CertificateSet:
    """Where each file of a deployment's PKI lives (all inside `directory`)."""

    directory: Path
    nodes: int

    ca_cert = _FileInDirectory(CA_CERT)
    ca_key = _FileInDirectory(CA_KEY)
    server_cert = _FileInDirectory(SERVER_CERT)
    server_key = _FileInDirectory(SERVER_KEY)

    def node_private_key(self, index: int) -> Path:
        return self.directory / node_key_name(index)

    def node_public_key(self, index: int) -> Path:
        return self.directory / node_pub_name(index)


@dataclass
class CertificateReport:
    """The certificate set plus which files this call created and which it kept."""

    certs: CertificateSet
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def create_certificates(
    directory: str | os.PathLike[str],
    hosts: Iterable[str] = (),
    nodes: int = 0,
    *,
    force: bool = False,
    days: int = 365,
) -> CertificateReport:
    """Create a CA, a SuperLink certificate and `nodes` SuperNode key pairs in `directory`.

    Re-running is safe: existing files are kept and checked (the server certificate must
    be issued by the CA and name every requested host), missing ones are added, e.g.
    more SuperNode keys. With `force=True` the CA, server certificate and the first
    `nodes` key pairs are all reissued.
    """
    if nodes < 0:
        raise ValueError(f"--nodes must be 0 or more, got {nodes}")
    if days < 1:
        raise ValueError(f"--days must be at least 1, got {days}")
    san_hosts = _normalise_hosts([*LOOPBACK_HOSTS, *hosts])
    certs = CertificateSet(Path(directory), nodes)
    certs.directory.mkdir(parents=True, exist_ok=True)
    report = CertificateReport(certs)

    ca_cert, ca_key = _ensure_ca(certs, report, force)
    _ensure_server(certs, report, force, ca_cert, ca_key, san_hosts, days)
    for index in range(nodes):
        _ensure_node_keys(certs, report, force, index)
    return report


def generate_node_keypair(private_path: Path, public_path: Path, *, comment: str = "") -> None:
    """Write one SuperNode key pair (OpenSSH, EC P-384) without overwriting anything."""
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} already exists; delete it or choose another name")
    key = ec.generate_private_key(CURVE())
    _write_private(private_path, _ssh_private_bytes(key), replace=False)
    _write_public(public_path, _ssh_public_bytes(key.public_key(), comment), replace=False)


def load_server_hosts(cert_path: Path) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names: list[str] = list(san.get_values_for_type(x509.DNSName))
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return names


# --- CA and server certificate -------------------------------------------------------


def _ensure_ca(
    certs: CertificateSet, report: CertificateReport, force: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    have_cert, have_key = certs.ca_cert.exists(), certs.ca_key.exists()
    if have_cert and have_key and not force:
        cert = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or (
            key.public_key().public_numbers() != cert.public_key().public_numbers()
        ):
            raise ValueError(
                f"{certs.ca_key} does not belong to {certs.ca_cert}; restore the matching "
                "pair, or reissue everything with --force (every SuperNode then needs the "
                "new ca.crt)"
            )
        _warn_if_readable(certs.ca_key)
        report.kept += [certs.ca_cert, certs.ca_key]
        return cert, key
    if (have_cert or have_key) and not force:
        missing = certs.ca_key if have_cert else certs.ca_cert
        raise FileExistsError(
            f"{missing} is missing but its partner exists, so the CA cannot be reused; "
            "restore it, or reissue everything with --force"
        )
    if not force and certs.server_cert.exists():
        raise FileExistsError(
            f"{certs.server_cert} exists without a CA to check it against; restore "
            f"{CA_CERT} and {CA_KEY}, or reissue everything with --force"
        )
    key = ec.generate_private_key(CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedge deployment CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(certs.ca_key, _pem_private_bytes(key), replace=force)
    _write_public(certs.ca_cert, cert.public_bytes(serialization.Encoding.PEM), replace=force)
    report.created += [certs.ca_cert, certs.ca_key]
    return cert, key


def _ensure_server(
    certs: CertificateSet,
    report: CertificateReport,
    force: bool,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: Sequence[str],
    days: int,
) -> None:
    have_cert, have_key = certs.server_cert.exists(), certs.server_key.exists()
    if have_cert and have_key and not force:
        _check_existing_server(certs, ca_cert, hosts)
        _warn_if_readable(certs.server_key)
        report.kept += [certs.server_cert, certs.server_key]
        return
    if (have_cert or have_key) and not force:
        missing = certs.server_key if have_cert else certs.server_cert
        raise FileExistsError(
            f"{missing} is missing but its partner exists; restore it, or delete both "
            "server files and run again to reissue just the server certificate"
        )
    key = ec.generate_private_key(CURVE())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(certs.server_key, _pem_private_bytes(key), replace=force)
    _write_public(certs.server_cert, cert.public_bytes(serialization.Encoding.PEM), replace=force)
    report.created += [certs.server_cert, certs.server_key]


def _check_existing_server(
    certs: CertificateSet, ca_cert: x509.Certificate, hosts: Sequence[str]
) -> None:
    cert = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ValueError(
            f"{certs.server_cert} was not issued by {certs.ca_cert}; delete server.pem and "
            "server.key and run again to reissue it from this CA"
        ) from exc
    key = serialization.load_pem_private_key(certs.server_key.read_bytes(), password=None)
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise ValueError(
            f"{certs.server_key} does not match {certs.server_cert}; delete both and run "
            "again to reissue the server certificate"
        )
    covered = {h.lower() for h in load_server_hosts(certs.server_cert)}
    missing = [h for h in hosts if h.lower() not in covered]
    if missing:
        raise ValueError(
            f"{certs.server_cert} does not cover {', '.join(missing)} (it names "
            f"{', '.join(sorted(covered)) or 'nothing'}); delete server.pem and server.key "
            "and run again with every --hosts entry to reissue it from the same CA"
        )
    if cert.not_valid_after_utc <= _now() + datetime.timedelta(days=1):
        raise ValueError(
            f"{certs.server_cert} expires {cert.not_valid_after_utc:%Y-%m-%d}; delete "
            "server.pem and server.key and run again to reissue it"
        )


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """The CA signs certificates and CRLs; the server signs and agrees keys in TLS handshakes."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not signs_certificates,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def _normalise_hosts(hosts: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for raw in hosts:
        host = raw.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host or (any(c in host for c in " /:") and not _is_ip(host)):
            raise ValueError(
                f"--hosts entry {raw!r} is not a host name or IP address; give names like "
                "'192.168.1.10' or 'superlink.local' (no scheme, no port)"
            )
        if host.lower() not in (h.lower() for h in seen):
            seen.append(host)
    return seen


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --- SuperNode keys --------------------------------------------------------------------


def _ensure_node_keys(
    certs: CertificateSet, report: CertificateReport, force: bool, index: int
) -> None:
    private, public = certs.node_private_key(index), certs.node_public_key(index)
    have_private, have_public = private.exists(), public.exists()
    if have_private and have_public and not force:
        key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
        pub = serialization.load_ssh_public_key(public.read_bytes())
        if (
            not isinstance(key, ec.EllipticCurvePrivateKey)
            or not isinstance(pub, ec.EllipticCurvePublicKey)
            or key.public_key().public_numbers() != pub.public_numbers()
        ):
            raise ValueError(
                f"{public} does not belong to {private}; restore the pair, or delete both "
                "and run again to issue a new key (then register the new .pub)"
            )
        _warn_if_readable(private)
        report.kept += [private, public]
        return
    if have_private and not have_public and not force:
        # The public half can always be recovered from the private key.
        key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{private} is not an EC key; delete it and run again")
        _write_public(public, _ssh_public_bytes(key.public_key(), public.stem), replace=False)
        report.kept.append(private)
        report.created.append(public)
        return
    if have_public and not force:
        raise FileExistsError(
            f"{public} exists without {private}; a SuperNode cannot use it. Restore the "
            "private key, or delete the .pub and run again to issue a new pair"
        )
    key = ec.generate_private_key(CURVE())
    _write_private(private, _ssh_private_bytes(key), replace=force)
    _write_public(public, _ssh_public_bytes(key.public_key(), public.stem), replace=force)
    report.created += [private, public]


def _ssh_private_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def _ssh_public_bytes(key: ec.EllipticCurvePublicKey, comment: str) -> bytes:
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if comment:
        line += b" " + comment.encode("ascii", "replace")
    return line + b"\n"


def _pem_private_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# --- Files ----------------------------------------------------------------------------


def _write_private(path: Path, data: bytes, *, replace: bool) -> None:
    """Private keys are born 0600 (never briefly world-readable) and written atomically."""
    _write_atomic(path, data, 0o600, replace)


def _write_public(path: Path, data: bytes, *, replace: bool) -> None:
    _write_atomic(path, data, 0o644, replace)


def _write_atomic(path: Path, data: bytes, mode: int, replace: bool) -> None:
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it")
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        if replace:
            os.replace(tmp_name, path)
        else:
            _move_exclusive(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _move_exclusive(tmp_name: str, path: Path) -> None:
    """Move into place unless `path` appeared meanwhile (a hard link fails if it exists)."""
    try:
        os.link(tmp_name, path)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it") from None
    except OSError:  # no hard links on this file system
        if path.exists():
            raise FileExistsError(f"{path} already exists; pass --force to overwrite it") from None
        os.replace(tmp_name, path)
        return
    os.unlink(tmp_name)


def _warn_if_readable(path: Path) -> None:
    if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("%s is readable by other users; run: chmod 600 %s", path, path)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
