"""What `mserve invoke` says when the URL's scheme does not fit the port, or a TLS
file is wrong: a hint naming the right scheme or the file, never raw HTTP/2 bytes,
``BadStatusLine`` or a bare ``Socket closed``; and gRPC's C core does not write its
own ``Handshake failed`` lines to the server's or the client's stderr.

Two real servers (``mserve start --workers 0``, the add servable): one plain (REST and
gRPC), one with TLS on both ports."""

from __future__ import annotations

import pytest

from support import free_port
from test_cli import Started, cli

ADD = ["add:add_common", "-i", "x1=[[1.0,2.0],[3.0,4.0]]", "-i", "x2=[[1.0,2.0],[3.0,4.0]]"]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    trustme = pytest.importorskip("trustme")
    root = tmp_path_factory.mktemp("hint_certs")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(root / "ca.crt"))
    issued = ca.issue_cert("localhost", "127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(str(root / "server.crt"))
    issued.private_key_pem.write_to_path(str(root / "server.key"))
    return root


def _start(tmp_path_factory, name: str, extra: list[str]):
    grpc_port = free_port()
    started = Started(["--servable", "add", "--workers", "0", "--grpc-port", str(grpc_port), *extra],
                      tmp_path_factory.mktemp(name), free_port())
    try:
        started.wait_ready(timeout=300)
    except BaseException:
        started.proc.kill()
        raise
    started.grpc_port = grpc_port
    return started


@pytest.fixture(scope="module")
def servers(tmp_path_factory, certificates):
    plain = _start(tmp_path_factory, "plain", [])
    try:
        tls = _start(tmp_path_factory, "tls", ["--ssl-certfile", str(certificates / "server.crt"),
                                               "--ssl-keyfile", str(certificates / "server.key")])
    except BaseException:
        plain.stop()
        raise
    yield plain, tls
    assert plain.stop() == 0 and tls.stop() == 0


def test_http_url_to_a_grpc_port_says_it_is_a_grpc_port(servers):
    plain, _ = servers
    result = cli("invoke", *ADD, "--url", f"http://127.0.0.1:{plain.grpc_port}")
    assert result.exit_code == 2
    assert f"that is a gRPC port; use --url grpc://127.0.0.1:{plain.grpc_port}" in result.stderr, result.stderr
    assert "BadStatusLine" not in result.stderr and "\x00" not in result.stderr


def test_grpc_url_to_a_tls_grpc_port_hints_grpcs(servers, capfd):
    _, tls = servers
    result = cli("invoke", *ADD, "--url", f"grpc://127.0.0.1:{tls.grpc_port}")
    assert result.exit_code == 2
    assert f"use --url grpcs://127.0.0.1:{tls.grpc_port} --cacert CA.pem" in result.stderr, result.stderr
    assert "Handshake failed" not in tls.stderr, tls.stderr  # the server's C core stays quiet
    assert "Handshake failed" not in capfd.readouterr().err


def test_grpcs_url_to_a_plain_grpc_port_hints_grpc(servers, certificates, capfd):
    plain, _ = servers
    result = cli("invoke", *ADD, "--url", f"grpcs://localhost:{plain.grpc_port}", "--cacert",
                 certificates / "ca.crt")
    assert result.exit_code == 2
    assert f"does not speak TLS: use --url grpc://localhost:{plain.grpc_port}" in result.stderr, result.stderr
    assert "Handshake failed" not in capfd.readouterr().err  # the client's C core stays quiet too


def test_grpc_url_to_a_rest_port_hints_http(servers):
    plain, _ = servers
    result = cli("invoke", *ADD, "--url", f"grpc://127.0.0.1:{plain.port}")
    assert result.exit_code == 2
    assert f"a REST port: use --url http://127.0.0.1:{plain.port}" in result.stderr, result.stderr


@pytest.mark.parametrize("option", ["--cert", "--cacert", "--key"])
def test_a_missing_tls_file_is_named(servers, tmp_path, certificates, option):
    _, tls = servers
    extra = ["--cert", certificates / "server.crt"] if option == "--key" else []
    result = cli("invoke", *ADD, "--url", f"https://localhost:{tls.port}", *extra, option, tmp_path / "nope.crt")
    assert result.exit_code == 2
    assert f"{option} {tmp_path / 'nope.crt'}: no such file" in result.stderr, result.stderr
    grpc = cli("invoke", *ADD, "--url", f"grpcs://localhost:{tls.grpc_port}", *extra, option, tmp_path / "nope.crt")
    assert grpc.exit_code == 2 and f"{option} {tmp_path / 'nope.crt'}: no such file" in grpc.stderr, grpc.stderr


def test_a_tls_file_that_is_not_pem_is_named(servers, tmp_path):
    _, tls = servers
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate\n")
    result = cli("invoke", *ADD, "--url", f"https://localhost:{tls.port}", "--cert", junk)
    assert result.exit_code == 2 and f"--cert {junk}: not a usable client certificate" in result.stderr
