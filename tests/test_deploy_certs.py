"""`fedge certs`: files Flower 1.41 can load, safe permissions, nothing overwritten."""

from __future__ import annotations

import contextlib
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedge.cli import main
from fedge.deploy.certs import create_certificates, generate_node_keypair, load_server_hosts


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_deploy_certs_layout_and_permissions(tmp_path: Path) -> None:
    report = create_certificates(tmp_path / "certs", ["192.168.1.10", "pi-server.local"], 3)
    certs = report.certs
    expected = [certs.ca_cert, certs.ca_key, certs.server_cert, certs.server_key]
    expected += [certs.node_private_key(i) for i in range(3)]
    expected += [certs.node_public_key(i) for i in range(3)]
    assert sorted(report.created) == sorted(expected)
    for private in [certs.ca_key, certs.server_key, *map(certs.node_private_key, range(3))]:
        assert _mode(private) == 0o600, private
    for public in [certs.ca_cert, certs.server_cert, *map(certs.node_public_key, range(3))]:
        assert _mode(public) == 0o644, public
    assert not list(certs.directory.glob(".*")), "temporary files left behind"


def test_deploy_certs_server_certificate_verifies_and_names_hosts(tmp_path: Path) -> None:
    certs = create_certificates(tmp_path, ["192.168.1.10", "pi-server.local"]).certs
    hosts = set(load_server_hosts(certs.server_cert))
    # Loopback is always there: the SuperLink's own ServerApp connects to it over TLS.
    assert hosts == {"127.0.0.1", "localhost", "192.168.1.10", "pi-server.local"}
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, name: str) -> str:
    """An in-memory TLS handshake (bounded, no sockets); returns the TLS version."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_out, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(to_server, server_out, server_side=True)
    client = client_ctx.wrap_bio(to_client, client_out, server_hostname=name)
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        to_server.write(client_out.read())
        to_client.write(server_out.read())
    version = client.version()
    assert version is not None
    return version


def test_deploy_certs_tls_handshake_with_python_ssl(tmp_path: Path) -> None:
    """What uvicorn (SuperLink) and httpx (SuperNode, flwr CLI) do: load and verify."""
    certs = create_certificates(tmp_path, ["superlink.local"]).certs
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    client_ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    for name in ("127.0.0.1", "localhost", "superlink.local"):
        assert _handshake(server_ctx, client_ctx, name).startswith("TLS")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_ctx, client_ctx, "evil.example")
    stranger_ctx = ssl.create_default_context(
        cafile=str(create_certificates(tmp_path / "other").certs.ca_cert)
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_ctx, stranger_ctx, "localhost")


def test_deploy_certs_node_keys_load_with_flowers_own_loaders(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    certs = create_certificates(tmp_path, nodes=2).certs
    for i in range(2):
        # flower-supernode --auth-supernode-private-key: load_ssh_private_key, EC required.
        private = serialization.load_ssh_private_key(certs.node_private_key(i).read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        # flwr supernode register: OpenSSH public key on a NIST curve.
        registered = try_load_public_key(certs.node_public_key(i))
        assert registered == public_key_to_bytes(private.public_key())
    assert certs.node_public_key(0).read_text() != certs.node_public_key(1).read_text()


def test_deploy_certs_rerun_keeps_everything_and_adds_nodes(tmp_path: Path) -> None:
    first = create_certificates(tmp_path, ["10.0.0.5"], 2)
    before = {p: p.read_bytes() for p in first.created}
    second = create_certificates(tmp_path, ["10.0.0.5"], 4)
    assert sorted(second.kept) == sorted(first.created)
    assert {p.name for p in second.created} == {
        "supernode-2.key",
        "supernode-2.pub",
        "supernode-3.key",
        "supernode-3.pub",
    }
    assert all(p.read_bytes() == data for p, data in before.items())
    # The new node keys belong to the same deployment: the server cert is unchanged.
    assert second.certs.server_cert.read_bytes() == before[first.certs.server_cert]


def test_deploy_certs_refuses_to_drop_a_host_silently(tmp_path: Path) -> None:
    create_certificates(tmp_path, ["10.0.0.5"])
    with pytest.raises(ValueError, match=r"does not cover 10\.0\.0\.9.*delete server\.pem"):
        create_certificates(tmp_path, ["10.0.0.9"])


def test_deploy_certs_force_reissues(tmp_path: Path) -> None:
    certs = create_certificates(tmp_path, nodes=1).certs
    old_ca, old_key = certs.ca_cert.read_bytes(), certs.node_private_key(0).read_bytes()
    create_certificates(tmp_path, ["10.0.0.9"], 1, force=True)
    assert certs.ca_cert.read_bytes() != old_ca
    assert certs.node_private_key(0).read_bytes() != old_key
    assert _mode(certs.node_private_key(0)) == 0o600
    assert "10.0.0.9" in load_server_hosts(certs.server_cert)


def test_deploy_certs_half_pairs_are_errors_not_overwrites(tmp_path: Path) -> None:
    certs = create_certificates(tmp_path, nodes=1).certs
    certs.ca_key.unlink()
    with pytest.raises(FileExistsError, match="--force"):
        create_certificates(tmp_path, nodes=1)
    certs = create_certificates(tmp_path / "b", nodes=1).certs
    private = certs.node_private_key(0).read_bytes()
    certs.node_private_key(0).unlink()
    with pytest.raises(FileExistsError, match=r"delete the \.pub"):
        create_certificates(tmp_path / "b", nodes=1)
    # A lost .pub is recovered from the private key rather than reissued.
    certs.node_private_key(0).write_bytes(private)
    certs.node_public_key(0).unlink()
    report = create_certificates(tmp_path / "b", nodes=1)
    assert certs.node_public_key(0) in report.created
    assert certs.node_private_key(0).read_bytes() == private


def test_deploy_certs_mismatched_ca_key_is_reported(tmp_path: Path) -> None:
    create_certificates(tmp_path / "a")
    create_certificates(tmp_path / "b")
    (tmp_path / "a" / "ca.key").write_bytes((tmp_path / "b" / "ca.key").read_bytes())
    with pytest.raises(ValueError, match="does not belong to"):
        create_certificates(tmp_path / "a")


def test_deploy_certs_generate_node_keypair_never_overwrites(tmp_path: Path) -> None:
    generate_node_keypair(tmp_path / "k", tmp_path / "k.pub", comment="pi-7")
    assert (tmp_path / "k.pub").read_text().strip().endswith("pi-7")
    with pytest.raises(FileExistsError):
        generate_node_keypair(tmp_path / "k", tmp_path / "k2.pub")


def test_deploy_certs_concurrent_runs_do_not_clobber(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def make() -> None:
        try:
            create_certificates(tmp_path, nodes=2)
        except (OSError, ValueError) as exc:
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    # Whoever lost a race got an error; whatever is on disk is one consistent set.
    report = create_certificates(tmp_path, nodes=2)
    assert not report.created
    assert all(isinstance(e, (FileExistsError, ValueError)) for e in errors)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nodes", "-1"], "--nodes must be 0 or more"),
        (["--hosts", "https://x:8000"], "no scheme, no port"),
        (["--days", "0"], "--days must be at least 1"),
    ],
)
def test_deploy_certs_cli_errors_name_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["certs", str(tmp_path), *argv]) == 1
    assert message in capsys.readouterr().err


def test_deploy_certs_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", str(tmp_path), "--hosts", "10.1.2.3", "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "created" in out and "10.1.2.3" in out and "--enable-supernode-auth" in out
    assert main(["certs", str(tmp_path), "--nodes", "2"]) == 0
    assert "created" not in capsys.readouterr().out
