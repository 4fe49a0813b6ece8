"""What `mserve invoke` says when the URL's scheme does not fit the port, or a TLS
file is wrong: a hint naming the right scheme or the file, never raw HTTP/2 bytes,
``BadStatusLine`` or a bare ``Socket closed``; and gRPC's C core does not write its
own ``Handshake failed`` lines to the server's or the client's stderr.

Two real servers (``mserve start --workers 0``): one plain (REST and gRPC; the add
servable and one with three outputs), one with TLS on both ports (add)."""

from __future__ import annotations

import pytest

from support import BUNDLED, REPO, free_port, write_servable
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


THREE_OUTPUTS = """
    import numpy as np
    from mserve import register

    def describe(data, text):
        return np.int32(len(data)), text.upper(), data.tobytes()[::-1]

    @register.register_method(output_names=["size", "upper", "reversed"])
    def inspect(data, text):
        size, upper, reversed_ = register.add_stage(describe, data, text, outputs_count=3)
        return size, upper, reversed_
"""


def _start(tmp_path_factory, name: str, extra: list[str], servables: list[str] = ("--servable", "add")):
    grpc_port = free_port()
    started = Started([*servables, "--workers", "0", "--grpc-port", str(grpc_port), *extra],
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
    folder = tmp_path_factory.mktemp("hint_servables")
    (folder / "add").symlink_to(BUNDLED / "add")
    write_servable(folder, "three", THREE_OUTPUTS, {"1/README": b"version 1: Python stages only\n"})
    plain = _start(tmp_path_factory, "plain", [], [str(folder)])
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


def test_rest_and_grpc_tables_list_outputs_in_the_same_order(servers):
    plain, _ = servers
    args = ["invoke", "three:inspect", "-i", "data=@" + str(REPO / "sample_data/digits/digit_3.raw"), "-i", 'text="hi"']
    rest = cli(*args, "--url", plain.url, env={"COLUMNS": "200"})
    grpc = cli(*args, "--url", f"grpc://127.0.0.1:{plain.grpc_port}", env={"COLUMNS": "200"})
    assert rest.exit_code == 0 and grpc.exit_code == 0, rest.output + grpc.output

    def outputs(text: str) -> list[str]:
        return [cells[2].strip() for line in text.splitlines() if len(cells := line.split("│")) > 3
                and cells[1].strip().isdigit()]

    assert outputs(rest.stdout) == outputs(grpc.stdout) == ["reversed", "size", "upper"], rest.stdout + grpc.stdout
