"""Strict mutual TLS on the bridge's TCP listener (WIRE-BRIDGE.md section 2), driven by grpcio
with a test CA made here by openssl: the host's identity gets every RPC; another instance's
identity, a bridge's own certificate, another CA's, no certificate, and plain TCP are refused;
a non-loopback BRIDGE_TCP_ADDR stops the server even with TLS, as does strict mode with a file
missing."""

import os
import subprocess

import grpc
import pytest

from conftest import SERVER_BIN, Server, free_port, make_dirs
from test_bridge import bp, bp_grpc, pb_grpc
from test_bridge import test_every_served_rpc_over_the_unix_socket as _every_rpc

INSTANCE = "wire-1"
HOST_URI = "spiffe://memoh/instance/%s/server" % INSTANCE
BRIDGE_URI = "spiffe://memoh/instance/%s/bridge" % INSTANCE
BRIDGE_NAME = "memoh-bridge.%s.bridge.memoh.internal" % INSTANCE


def openssl(*args):
    subprocess.run(["openssl"] + list(args), check=True, capture_output=True)


def make_ca(d, name):
    key, crt = os.path.join(d, name + ".key"), os.path.join(d, name + ".pem")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", key, "-out", crt, "-days", "2", "-subj", "/CN=" + name,
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return key, crt


def make_leaf(d, name, ca, san, eku):
    key, csr, crt = (os.path.join(d, name + s) for s in (".key", ".csr", ".pem"))
    ext = os.path.join(d, name + ".ext")
    with open(ext, "w") as f:
        f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                "extendedKeyUsage=%s\nsubjectAltName=%s\n" % (eku, san))
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=" + name)
    openssl("x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-CAcreateserial",
            "-out", crt, "-days", "2", "-extfile", ext)
    return key, crt


def read(p):
    with open(p, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pki"))
    ca = make_ca(d, "ca")
    other = make_ca(d, "other-ca")
    return {
        "dir": d,
        "ca": ca,
        "bridge": make_leaf(d, "bridge", ca, "DNS:%s,URI:%s" % (BRIDGE_NAME, BRIDGE_URI), "serverAuth"),
        "host": make_leaf(d, "host", ca, "URI:" + HOST_URI, "clientAuth"),
        "other-instance": make_leaf(d, "other-instance", ca,
                                    "URI:spiffe://memoh/instance/wire-2/server", "clientAuth"),
        "server-usage": make_leaf(d, "server-usage", ca, "URI:" + HOST_URI, "serverAuth"),
        "other-ca": make_leaf(d, "host-of-other-ca", other, "URI:" + HOST_URI, "clientAuth"),
    }


def tls_env(pki, addr):
    return {
        "BRIDGE_TCP_ADDR": addr,
        "BRIDGE_TLS_MODE": "strict",
        "BRIDGE_TLS_CERT_FILE": pki["bridge"][1],
        "BRIDGE_TLS_KEY_FILE": pki["bridge"][0],
        "BRIDGE_TLS_CLIENT_CA_FILE": pki["ca"][1],
        "BRIDGE_TLS_EXPECTED_CLIENT_URI": HOST_URI,
    }


@pytest.fixture(scope="module")
def tls_server(pki, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("tls"))
    data, template = make_dirs(base)
    sock = os.path.join(base, "plain.sock")
    addr = "127.0.0.1:%d" % free_port()
    # The plain socket is for readiness; the TLS listener comes from the bridge's variables.
    srv = Server(data, template, listen="unix:" + sock, env=tls_env(pki, addr),
                 args=["--listen", "unix:" + sock, "--data-dir", data, "--template-dir", template])
    yield srv, addr, data
    srv.stop()


def secure(pki, addr, who):
    creds = grpc.ssl_channel_credentials(
        root_certificates=read(pki["ca"][1]),
        private_key=read(pki[who][0]) if who else None,
        certificate_chain=read(pki[who][1]) if who else None,
    )
    return grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", BRIDGE_NAME)])


def test_every_rpc_over_mtls(pki, tls_server):
    srv, addr, data = tls_server
    ch = secure(pki, addr, "host")
    try:
        grpc.channel_ready_future(ch).result(timeout=10)
        _every_rpc((srv, bp_grpc.ContainerServiceStub(ch), pb_grpc.ContainerServiceStub(ch), data))
    finally:
        ch.close()


@pytest.mark.parametrize("who", ["other-instance", "server-usage", "other-ca", None])
def test_other_clients_are_refused(pki, tls_server, who):
    _, addr, _ = tls_server
    ch = secure(pki, addr, who)
    try:
        with pytest.raises(grpc.RpcError) as e:
            bp_grpc.ContainerServiceStub(ch).Stat(bp.StatRequest(path="/"), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
    finally:
        ch.close()


def test_plain_tcp_is_refused(tls_server):
    _, addr, _ = tls_server
    ch = grpc.insecure_channel(addr)
    try:
        with pytest.raises(grpc.RpcError) as e:
            bp_grpc.ContainerServiceStub(ch).Stat(bp.StatRequest(path="/"), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
    finally:
        ch.close()


def run_briefly(env, tmp_path):
    full = dict(os.environ)
    full.update(env)
    return subprocess.run([SERVER_BIN, "--listen", "unix:%s/s.sock" % tmp_path,
                           "--data-dir", str(tmp_path / "d"), "--template-dir", str(tmp_path / "t")],
                          env=full, capture_output=True, timeout=20)


def test_tls_unlocks_no_other_address(pki, tmp_path):
    r = run_briefly(tls_env(pki, "0.0.0.0:%d" % free_port()), tmp_path)
    assert r.returncode == 1 and b"loopback" in r.stderr, r.stderr


def test_strict_mode_needs_its_files(pki, tmp_path):
    env = tls_env(pki, "127.0.0.1:%d" % free_port())
    env["BRIDGE_TLS_CLIENT_CA_FILE"] = ""
    r = run_briefly(env, tmp_path)
    assert r.returncode == 1 and b"BRIDGE_TLS_CLIENT_CA_FILE" in r.stderr, r.stderr
    env = tls_env(pki, "127.0.0.1:%d" % free_port())
    env["BRIDGE_TLS_KEY_FILE"] = os.path.join(pki["dir"], "missing.key")
    r = run_briefly(env, tmp_path)
    assert r.returncode == 1 and b"missing.key" in r.stderr, r.stderr


def test_the_bridge_only_calls_over_mtls(pki, tls_server):
    """PTY exec, Tunnel, the NoFollow calls and ListDir collapse, as their own wire tests drive
    them on the unix socket, here over the mTLS listener."""
    from test_bridge_exec import test_pty_exec_with_resize_and_stdin as pty
    from test_bridge_files import test_list_dir_collapse as collapse
    from test_bridge_files import test_no_follow_read_and_write as no_follow
    from test_bridge_tunnel import test_tunnel_echo as tunnel

    srv, addr, data = tls_server
    ch = secure(pki, addr, "host")
    try:
        grpc.channel_ready_future(ch).result(timeout=10)
        stub = bp_grpc.ContainerServiceStub(ch)
        pty(stub)
        tunnel((srv, stub))
        no_follow((stub, os.path.dirname(data), data))
        collapse((stub, os.path.dirname(data), data))
    finally:
        ch.close()
