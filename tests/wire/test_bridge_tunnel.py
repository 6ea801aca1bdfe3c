"""bridgepb Tunnel and ReverseHTTP (WIRE-BRIDGE.md section 3) with grpcio over the unix socket
and DEFAULT channel options: a tunnel to a Python echo server, a refused non-loopback target,
and a ReverseHTTP round trip in which this client is the host."""

import http.client
import os
import queue
import socket
import threading
import time

import grpc
import pytest

from conftest import make_dirs, free_port, bp, bp_grpc



@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    from conftest import Server
    base = str(tmp_path_factory.mktemp("tunnel"))
    data, template = make_dirs(base)
    sock = os.path.join(base, "bridge.sock")
    tcp = "127.0.0.1:%d" % free_port()
    srv = Server(data, template, listen=tcp,
                 args=["--listen", tcp, "--listen", "unix:" + sock,
                       "--data-dir", data, "--template-dir", template])
    ch = grpc.insecure_channel("unix:" + sock)
    grpc.channel_ready_future(ch).result(timeout=20)
    yield srv, bp_grpc.ContainerServiceStub(ch)
    ch.close()
    srv.stop()


def echo_server(host="127.0.0.1"):
    """Echoes each connection until its EOF, then closes its write side."""
    ls = socket.socket()
    ls.bind((host, 0))
    ls.listen(8)

    def serve(c):
        with c:
            while True:
                d = c.recv(65536)
                if not d:
                    break
                c.sendall(d)
            c.shutdown(socket.SHUT_WR)

    def accept():
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return ls, ls.getsockname()[1]


def feed(q):
    """A request iterator fed by a queue; None ends it (half-close)."""
    while True:
        m = q.get()
        if m is None:
            return
        yield m


def test_tunnel_echo(bridge):
    _, b = bridge
    ls, port = echo_server()
    payload = os.urandom(300 * 1024 + 5)
    frames = [bp.TunnelFrame(open=bp.TunnelOpen(address="127.0.0.1:%d" % port))]
    frames += [bp.TunnelFrame(data=bp.TunnelData(data=payload[i:i + 50000]))
               for i in range(0, len(payload), 50000)]
    call = b.Tunnel(iter(frames), timeout=30)
    first = next(call)
    assert first.WhichOneof("frame") == "data" and first.data.data == b""
    got, closed = b"", None
    for f in call:
        kind = f.WhichOneof("frame")
        if kind == "data":
            assert len(f.data.data) <= 32 * 1024
            got += f.data.data
        else:
            assert kind == "close"
            closed = f.close.error
    # The iterator ran out (half-close), the target's EOF came back, the call ended OK.
    assert closed == ""
    assert got == payload
    assert call.code() == grpc.StatusCode.OK
    ls.close()


def test_tunnel_refuses_non_loopback(bridge):
    _, b = bridge
    ls, port = echo_server("0.0.0.0")
    for addr, code in [("0.0.0.0:%d" % port, grpc.StatusCode.PERMISSION_DENIED),
                       ("[::ffff:10.1.2.3]:%d" % port, grpc.StatusCode.PERMISSION_DENIED),
                       ("2130706433:%d" % port, grpc.StatusCode.INVALID_ARGUMENT)]:
        with pytest.raises(grpc.RpcError) as e:
            list(b.Tunnel(iter([bp.TunnelFrame(open=bp.TunnelOpen(address=addr))]), timeout=10))
        assert e.value.code() == code, (addr, e.value)
        assert "tunnel address" in e.value.details()
    ls.close()


def http_request(addr, path, body, answers):
    """POSTs until a stream is registered (503 before that), then records the answer."""
    host, port = addr.rsplit(":", 1)
    end = time.time() + 10
    while True:
        c = http.client.HTTPConnection(host, int(port), timeout=20)
        c.request("POST", path, body=body, headers={"X-Test": "yes", "Keep-Alive": "timeout=1"})
        r = c.getresponse()
        result = (r.status, r.getheader("X-Answer"), r.getheader("X-Hop"), r.read())
        c.close()
        if result[0] != 503 or time.time() > end:
            answers.put(result)
            return
        time.sleep(0.05)


def test_reverse_http_round_trip(bridge):
    srv, b = bridge
    q = queue.Queue()
    call = b.ReverseHTTP(feed(q), metadata=(("x-memoh-reverse-http-route", "/mcp/abc"),), timeout=30)
    answers = queue.Queue()
    t = threading.Thread(target=http_request,
                         args=(srv.reverse_http_addr, "/mcp/abc?x=1", b"ping", answers), daemon=True)
    t.start()
    f = next(call)
    assert f.WhichOneof("frame") == "request"
    r = f.request
    assert r.id.startswith("reverse-http-")
    assert (r.method, r.url, r.body) == ("POST", "/mcp/abc?x=1", b"ping")
    names = [h.name for h in r.headers]
    assert "X-Test" in names and "Keep-Alive" not in names and "Content-Length" not in names
    q.put(bp.ReverseHTTPFrame(response=bp.ReverseHTTPResponse(
        id=r.id, status_code=202, body=b"pong",
        headers=[bp.HTTPHeader(name="X-Answer", values=["42"]),
                 bp.HTTPHeader(name="Connection", values=["X-Hop"]),
                 bp.HTTPHeader(name="X-Hop", values=["dropped"])])))
    status, answer, hop, body = answers.get(timeout=20)
    assert (status, answer, hop, body) == (202, "42", None, b"pong")
    t.join(5)
    q.put(None)
    assert list(call) == []
    assert call.code() == grpc.StatusCode.OK
