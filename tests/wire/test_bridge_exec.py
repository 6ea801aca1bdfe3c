"""bridgepb Exec's own behaviour (WIRE-BRIDGE.md section 3) from grpcio over the unix socket
with DEFAULT channel options: PTY mode (a resize, typing, the exit code) and the
clean_env / unset_env rule. The client is generated from proto/bridge.proto."""

import os
import queue
import time

import grpc
import pytest

from conftest import make_dirs, bp, bp_grpc


SERVER_ENV = {"BRIDGE_W_A": "1", "BRIDGE_W_B": "2", "BRIDGE_WX": "3"}


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    from conftest import Server
    base = str(tmp_path_factory.mktemp("bridge-exec"))
    data, template = make_dirs(base)
    sock = os.path.join(base, "bridge.sock")
    srv = Server(data, template, listen="unix:" + sock, env=SERVER_ENV,
                 args=["--listen", "unix:" + sock, "--data-dir", data, "--template-dir", template])
    # grpcio defaults: no grpc.default_authority.
    ch = grpc.insecure_channel("unix:" + sock)
    grpc.channel_ready_future(ch).result(timeout=20)
    yield bp_grpc.ContainerServiceStub(ch)
    ch.close()
    srv.stop()


class Typist:
    """A request iterator fed from the test: `put` a message, `close` to half-close."""

    def __init__(self, first):
        self.q = queue.Queue()
        self.q.put(first)

    def put(self, m):
        self.q.put(m)

    def close(self):
        self.q.put(None)

    def __iter__(self):
        while True:
            m = self.q.get()
            if m is None:
                return
            yield m


def read_until(responses, seen, needle, deadline=10.0):
    """Appends output to `seen` (a bytearray) until `needle` is in it."""
    end = time.monotonic() + deadline
    while needle not in seen:
        assert time.monotonic() < end, "no %r in %r" % (needle, bytes(seen))
        m = next(responses)
        assert m.stream == bp.ExecOutput.STDOUT, m
        assert len(m.data) <= 4096
        seen.extend(m.data)


def finish(responses, seen):
    """Reads to the end; the one EXIT's code, which comes last."""
    code = None
    for m in responses:
        assert code is None, "nothing after EXIT"
        if m.stream == bp.ExecOutput.EXIT:
            code = m.exit_code
        else:
            assert m.stream == bp.ExecOutput.STDOUT and len(m.data) <= 4096, m
            seen.extend(m.data)
    return code


def test_pty_exec_with_resize_and_stdin(bridge):
    cmd = "tty; stty size; read line; stty size; echo \"got:$line term:$TERM\"; exit 5"
    typist = Typist(bp.ExecInput(command=cmd, pty=True, stdin_data=b"ignored\r",
                                 resize=bp.TerminalResize(cols=100, rows=30)))
    responses = bridge.Exec(iter(typist), timeout=30)
    seen = bytearray()
    read_until(responses, seen, b"30 100")
    assert b"/dev/pts/" in seen
    typist.put(bp.ExecInput(resize=bp.TerminalResize(cols=120, rows=40), stdin_data=b"hi\r"))
    typist.close()  # ignored in PTY mode
    assert finish(responses, seen) == 5
    text = bytes(seen)
    assert b"40 120" in text
    assert b"got:hi term:xterm-256color" in text
    assert b"ignored" not in text


def test_pty_echo_round_trip(bridge):
    typist = Typist(bp.ExecInput(command="cat", pty=True, timeout_seconds=30))
    responses = bridge.Exec(iter(typist), timeout=30)
    seen = bytearray()
    times = []
    for ch in b"abcdefghij":
        t = time.monotonic()
        typist.put(bp.ExecInput(stdin_data=bytes([ch])))
        read_until(responses, seen, bytes([ch]))
        times.append(time.monotonic() - t)
    times.sort()
    print("pty echo round trip over grpcio: median %.2f ms, max %.2f ms"
          % (times[len(times) // 2] * 1000, times[-1] * 1000))
    typist.put(bp.ExecInput(stdin_data=b"\r\x04"))
    assert finish(responses, seen) == 0


def env_lines(out):
    return sorted(l.rstrip("\r") for l in out.decode().splitlines() if not l.startswith("PWD="))


def run(bridge, **kw):
    out = list(bridge.Exec(iter([bp.ExecInput(**kw)]), timeout=20))
    stdout = b"".join(m.data for m in out if m.stream == bp.ExecOutput.STDOUT)
    codes = [m.exit_code for m in out if m.stream == bp.ExecOutput.EXIT]
    assert len(codes) == 1 and out[-1].stream == bp.ExecOutput.EXIT
    return stdout, codes[0]


def test_clean_env_and_unset_env(bridge):
    out, code = run(bridge, command="env")
    assert code == 0
    for want in ("BRIDGE_W_A=1", "BRIDGE_W_B=2", "BRIDGE_WX=3"):
        assert want in env_lines(out)
    out, code = run(bridge, command="env", unset_env=["BRIDGE_W_*", "HOME"], env=["X=1", "X=2"])
    lines = env_lines(out)
    assert code == 0
    assert "BRIDGE_WX=3" in lines and "X=2" in lines, lines
    assert not [l for l in lines if l.startswith(("BRIDGE_W_", "HOME=", "X=1"))], lines
    assert [l for l in lines if l.startswith("PATH=")], lines
    out, code = run(bridge, command="env", clean_env=True, env=["A=1"])
    assert (env_lines(out), code) == (["A=1"], 0)
    out, code = run(bridge, command="/usr/bin/env", pty=True, clean_env=True, env=["A=1", "TERM=dumb"])
    assert (env_lines(out), code) == (["A=1", "TERM=xterm-256color"], 0)
