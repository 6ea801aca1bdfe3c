"""Calls that end badly: a WriteRaw commits only on a clean end, an Exec's child never reads a
reset as a closed stdin, and an Exec always ends.

The rule: a WriteRaw upload replaces its target only when the client ended its side cleanly
(END_STREAM) and the call was not cancelled. Every other ending leaves the old file
byte-identical and no temp file (`.NAME.XXXXXX.tmp` beside it) behind; each test then shows
that a clean upload with the same client stack still commits, so it can fail both ways.

Two foreign client stacks end the calls the way they do in the field:
- Python grpcio: `future.cancel()`, `channel.close()` and an expired deadline all send
  RST_STREAM(CANCEL) on the call's stream (channel.close() then closes the TCP connection at
  once, without a GOAWAY; a deadline also travels as `grpc-timeout`); the `abort` chunk
  (WriteRawChunk field 3) ends the upload on purpose.
- A raw HTTP/2 client on the `h2` package (prior-knowledge h2c), which sends exactly the
  frames chosen: RST_STREAM(CANCEL), RST_STREAM(NO_ERROR), GOAWAY then close, a bare close.

Two targets: "server", the container-server of conftest on loopback TCP (checked through the
filesystem and the API), and "agent", a real agent's unix socket (WIRE_AGENT_SOCKET) routing
each call to the bot named by WIRE_AGENT_BOT in `x-memoh-bot` (checked through the API only,
paths relative to the bot's /data). Without those variables the "agent" cases are skipped.
"""

import hashlib
import os
import queue
import re
import signal
import socket
import struct
import time
import uuid

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from h2.errors import ErrorCodes

from conftest import pb, pb_grpc, wait_for

STDOUT, STDERR, EXIT = 0, 1, 2
AGENT_SOCKET = os.environ.get("WIRE_AGENT_SOCKET", "")
AGENT_BOT = os.environ.get("WIRE_AGENT_BOT", "")
CALL = 20  # deadline of the helper calls, seconds
CHUNK = 64 * 1024
TEMP = re.compile(r"^\..+\.tmp$")


# ----------------------------------------------------------------------------------- targets


class Target:
    """Where the calls go: a grpcio channel, the address for the raw client, call metadata,
    and the data dir when it is on this machine."""

    def __init__(self, name, address, authority, metadata, data_dir=None, channel=None):
        self.name = name
        self.address = address  # ("tcp", (host, port)) or ("unix", path)
        self.authority = authority
        self.md = metadata
        self.data_dir = data_dir
        self.channel = channel or self.new_channel()
        self.stub = pb_grpc.ContainerServiceStub(self.channel)

    def new_channel(self):
        kind, where = self.address
        if kind == "unix":
            return grpc.insecure_channel("unix:" + where, options=[("grpc.default_authority", "localhost")])
        return grpc.insecure_channel("%s:%d" % where)

    def local(self, rel):
        return os.path.join(self.data_dir, rel) if self.data_dir else None


@pytest.fixture(scope="session")
def agent_target():
    if not (AGENT_SOCKET and AGENT_BOT):
        pytest.skip("WIRE_AGENT_SOCKET and WIRE_AGENT_BOT are not set")
    t = Target("agent", ("unix", AGENT_SOCKET), "localhost", (("x-memoh-bot", AGENT_BOT),))
    try:
        grpc.channel_ready_future(t.channel).result(timeout=20)
    except grpc.FutureTimeoutError:
        pytest.fail("agent socket %s is not ready" % AGENT_SOCKET)
    yield t
    t.channel.close()


@pytest.fixture(params=["server", "agent"])
def t(request):
    if request.param == "agent":
        return request.getfixturevalue("agent_target")
    srv = request.getfixturevalue("server")
    host, port = srv.target.rsplit(":", 1)
    return Target("server", ("tcp", (host, int(port))), srv.target, (), srv.data_dir, srv.channel)


@pytest.fixture
def d(t, request):
    """A fresh directory for one test, relative to the target's data dir (made through the API)."""
    name = request.node.originalname.replace("test_", "", 1)[:40]
    rel = "t-%s-%s" % (name, uuid.uuid4().hex[:6])
    t.stub.Mkdir(pb.MkdirRequest(path=rel), metadata=t.md, timeout=CALL)
    yield rel
    try:
        t.stub.DeleteFile(pb.DeleteFileRequest(path=rel, recursive=True), metadata=t.md, timeout=CALL)
    except grpc.RpcError:
        pass


# ----------------------------------------------------------------------------------- helpers


def fingerprint(b):
    return "%d bytes sha256 %s" % (len(b), hashlib.sha256(b).hexdigest()[:16])


def read_api(t, path):
    return b"".join(c.data for c in t.stub.ReadRaw(pb.ReadRawRequest(path=path), metadata=t.md, timeout=CALL))


def exists_api(t, path):
    try:
        t.stub.Stat(pb.StatRequest(path=path), metadata=t.md, timeout=CALL)
        return True
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            return False
        raise


def temps(t, rel_dir):
    """Temp files in the directory, as the API and (for a local target) the filesystem see them."""
    entries = t.stub.ListDir(pb.ListDirRequest(path=rel_dir), metadata=t.md, timeout=CALL).entries
    found = {os.path.basename(e.path) for e in entries if TEMP.match(os.path.basename(e.path))}
    if t.data_dir:
        found |= {n for n in os.listdir(t.local(rel_dir)) if TEMP.match(n)}
    return sorted(found)


def put_old(t, path, content):
    if t.data_dir:
        with open(t.local(path), "wb") as f:
            f.write(content)
    else:
        t.stub.WriteFile(pb.WriteFileRequest(path=path, content=content), metadata=t.md, timeout=CALL)


def content_of(t, path):
    """The file's bytes through the API; for a local target the filesystem must agree."""
    got = read_api(t, path)
    if t.data_dir:
        with open(t.local(path), "rb") as f:
            assert f.read() == got, "filesystem and readraw disagree"
    return got


def chunks_of(path, data):
    """WriteRawChunk messages of at most 64 KiB; the path travels in the first only."""
    parts = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
    return [pb.WriteRawChunk(path=path, data=parts[0])] + [pb.WriteRawChunk(data=p) for p in parts[1:]]


class Case:
    """One file with old content and the two contents an upload may try to put there."""

    def __init__(self, t, rel_dir):
        self.t = t
        self.dir = rel_dir
        self.path = rel_dir + "/f.bin"
        self.old = b"old content\n" + os.urandom(100_000)
        self.aborted = os.urandom(4 * CHUNK)  # sent by the upload that ends badly
        self.clean = os.urandom(3 * CHUNK + 123)  # sent by the upload that ends cleanly
        put_old(t, self.path, self.old)
        assert content_of(t, self.path) == self.old

    def wait_in_progress(self):
        assert wait_for(lambda: temps(self.t, self.dir), 5.0), "no temp file while the upload is open"

    def assert_untouched(self, what):
        """After a bad ending: the server settles (temp file gone), the old content stays."""
        wait_for(lambda: not temps(self.t, self.dir), 3.0)
        left = temps(self.t, self.dir)
        got = content_of(self.t, self.path)
        if got == self.aborted:
            pytest.fail("%s: the server committed the aborted upload" % what)
        assert fingerprint(got) == fingerprint(self.old), "%s: the old content changed" % what
        assert left == [], "%s: temp file left behind" % what

    def assert_committed(self, what, bytes_written=None):
        """After a clean ending: the new content is there and nothing else."""
        got = content_of(self.t, self.path)
        assert fingerprint(got) == fingerprint(self.clean), "%s: the clean upload did not commit" % what
        if bytes_written is not None:
            assert bytes_written == len(self.clean), "bytes_written is the total received"
        assert temps(self.t, self.dir) == [], "%s: temp file left behind" % what


class Feed:
    """A request iterator for grpcio: yields what is queued and stays open until close()."""

    def __init__(self, items=()):
        self.q = queue.Queue()
        for item in items:
            self.q.put(item)

    def put(self, item):
        self.q.put(item)

    def close(self):
        self.q.put(None)

    def __iter__(self):
        while True:
            try:
                item = self.q.get(timeout=60)
            except queue.Empty:
                return
            if item is None:
                return
            yield item


# ------------------------------------------------------------------------ raw HTTP/2 client


class RawCall:
    def __init__(self):
        self.headers = {}
        self.data = b""
        self.trailers = {}
        self.ended = False
        self.reset = None

    def status(self):
        return self.trailers.get("grpc-status", self.headers.get("grpc-status"))

    def message(self):
        return self.trailers.get("grpc-message", self.headers.get("grpc-message"))

    def messages(self):
        out, buf = [], self.data
        while len(buf) >= 5:
            flag, n = struct.unpack(">BI", buf[:5])
            assert flag == 0, "compressed response message"
            out.append(buf[5:5 + n])
            buf = buf[5 + n:]
        assert buf == b"", "truncated grpc message in the response"
        return out


class RawH2:
    """A minimal gRPC client written on the h2 package: prior-knowledge h2c on a plain socket,
    messages framed by hand (flag 0, 4-byte big-endian length, protobuf), flow control honoured.
    Ends its calls exactly as told: END_STREAM, RST_STREAM with any code, GOAWAY, a bare close."""

    def __init__(self, t, timeout=10.0):
        self.t = t
        self.timeout = timeout
        kind, where = t.address
        if kind == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(where)
        else:
            self.sock = socket.create_connection(where, timeout=timeout)
        self.conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.calls = {}
        self.eof = False
        self.goaway = None
        self.flush()

    def flush(self):
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)

    def pump(self, wait):
        """Reads what arrives within `wait` seconds and handles it; False once the peer closed."""
        if self.eof:
            return False
        self.sock.settimeout(max(wait, 0.001))
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return True
        except ConnectionResetError:
            data = b""
        finally:
            self.sock.settimeout(self.timeout)
        if not data:
            self.eof = True
            return False
        for ev in self.conn.receive_data(data):
            call = self.calls.get(getattr(ev, "stream_id", None))
            if isinstance(ev, h2.events.ResponseReceived) and call:
                call.headers = dict(ev.headers)
            elif isinstance(ev, h2.events.TrailersReceived) and call:
                call.trailers = dict(ev.headers)
            elif isinstance(ev, h2.events.DataReceived):
                if call:
                    call.data += ev.data
                try:
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                except h2.exceptions.StreamClosedError:
                    pass
            elif isinstance(ev, h2.events.StreamEnded) and call:
                call.ended = True
            elif isinstance(ev, h2.events.StreamReset) and call:
                call.reset = ev.error_code
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev.error_code
        self.flush()
        return True

    def idle(self, seconds):
        """Keeps the connection serviced (settings, pings, window updates) for a while."""
        end = time.time() + seconds
        while time.time() < end and self.pump(end - time.time()):
            pass

    def start(self, method):
        sid = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/mcpcontainer.ContainerService/" + method),
            (":authority", self.t.authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ] + list(self.t.md)
        self.conn.send_headers(sid, headers)
        self.flush()
        self.calls[sid] = RawCall()
        return sid

    def send(self, sid, msg):
        body = msg.SerializeToString()
        view = memoryview(b"\x00" + struct.pack(">I", len(body)) + body)
        deadline = time.time() + self.timeout
        while view:
            n = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size, len(view))
            if n <= 0:
                assert time.time() < deadline, "the flow control window never opened"
                assert self.pump(0.2), "the server closed the connection while the client was sending"
                continue
            self.conn.send_data(sid, view[:n].tobytes())
            view = view[n:]
            self.flush()

    def end(self, sid):
        self.conn.end_stream(sid)
        self.flush()

    def reset(self, sid, code):
        self.conn.reset_stream(sid, error_code=code)
        self.flush()

    def close_with_goaway(self):
        self.conn.close_connection()
        self.flush()
        self.close()

    def close(self):
        """A bare close: whatever arrived is read first, so the kernel sends FIN, not RST."""
        if self.sock.fileno() < 0:
            return
        self.sock.setblocking(False)
        try:
            while self.sock.recv(65536):
                pass
        except OSError:
            pass
        self.sock.close()

    def result(self, sid, timeout=None):
        """Waits for the call's end (END_STREAM or RST_STREAM from the server)."""
        call = self.calls[sid]
        end = time.time() + (timeout or self.timeout)
        while not call.ended and call.reset is None and time.time() < end:
            if not self.pump(end - time.time()):
                break
        assert call.ended or call.reset is not None, "the server never ended the call"
        return call


def raw_ending(name):
    """The bad endings of the raw client, applied to one open stream."""

    def rst_cancel(c, sid):
        c.reset(sid, ErrorCodes.CANCEL)

    def rst_no_error(c, sid):
        c.reset(sid, ErrorCodes.NO_ERROR)

    def goaway_close(c, sid):
        c.close_with_goaway()

    def tcp_close(c, sid):
        c.close()

    return {"rst_cancel": rst_cancel, "rst_no_error": rst_no_error,
            "goaway_close": goaway_close, "tcp_close": tcp_close}[name]


# ------------------------------------------------------------------- WriteRaw, raw HTTP/2


def raw_upload_ending_badly(t, d, ending):
    """4 x 64 KiB through the raw client, 0.5 s pause, then `ending`; a RST leaves the connection
    open while the server settles. Then a clean upload (END_STREAM) on a new connection."""
    case = Case(t, d)
    c = RawH2(t)
    try:
        sid = c.start("WriteRaw")
        for m in chunks_of(case.path, case.aborted):
            c.send(sid, m)
        c.idle(0.5)
        case.wait_in_progress()
        raw_ending(ending)(c, sid)
        case.assert_untouched("raw h2 %s" % ending)
    finally:
        c.close()

    c = RawH2(t)
    try:
        sid = c.start("WriteRaw")
        for m in chunks_of(case.path, case.clean):
            c.send(sid, m)
        c.end(sid)
        call = c.result(sid)
    finally:
        c.close()
    assert call.headers.get(":status") == "200", "http status %r" % call.headers
    assert call.status() == "0", "grpc-status %r, message %r" % (call.status(), call.message())
    (msg,) = call.messages()
    case.assert_committed("raw h2 end_stream", pb.WriteRawResponse.FromString(msg).bytes_written)


def test_writeraw_h2_rst_stream_cancel_keeps_old_file(t, d):
    """RST_STREAM(CANCEL) mid-body, connection kept open: what grpcio (cancel, channel close,
    deadline), grpc-go and tonic clients send when a call is given up. tonic's server used to
    read it as a clean end of the request stream."""
    raw_upload_ending_badly(t, d, "rst_cancel")


def test_writeraw_h2_rst_stream_no_error_keeps_old_file(t, d):
    """RST_STREAM(NO_ERROR) mid-body without END_STREAM, connection kept open (raw h2 client):
    a peer stopping a stream it no longer needs, as RFC 9113 lets it. hyper used to hand it to
    the server as a clean end of the body."""
    raw_upload_ending_badly(t, d, "rst_no_error")


def test_writeraw_h2_goaway_then_close_keeps_old_file(t, d):
    """GOAWAY(NO_ERROR) then a TCP close mid-body: a client stack shutting down its connection
    politely while a call is still open (raw h2 client)."""
    raw_upload_ending_badly(t, d, "goaway_close")


def test_writeraw_h2_tcp_close_keeps_old_file(t, d):
    """A bare TCP close (FIN) mid-body, no HTTP/2 frame: a client process that dies or a proxy
    that drops the connection (raw h2 client)."""
    raw_upload_ending_badly(t, d, "tcp_close")


# ----------------------------------------------------------------------- WriteRaw, grpcio


def grpcio_clean_upload(t, case):
    r = t.stub.WriteRaw(iter(chunks_of(case.path, case.clean)), metadata=t.md, timeout=CALL)
    case.assert_committed("grpcio clean end", r.bytes_written)


def test_writeraw_grpcio_cancel_keeps_old_file(t, d):
    """grpcio `future.cancel()` with the request iterator still open: grpcio sends
    RST_STREAM(CANCEL) and keeps the connection."""
    case = Case(t, d)
    feed = Feed(chunks_of(case.path, case.aborted))
    try:
        fut = t.stub.WriteRaw.future(iter(feed), metadata=t.md, timeout=CALL)
        time.sleep(0.7)
        case.wait_in_progress()
        assert fut.cancel(), "the call had already ended before the cancel"
        case.assert_untouched("grpcio cancel")
    finally:
        feed.close()
    grpcio_clean_upload(t, case)


def test_writeraw_grpcio_channel_close_keeps_old_file(t, d):
    """grpcio `channel.close()` mid-upload with the iterator open: grpcio sends
    RST_STREAM(CANCEL) and closes the TCP connection right after, without GOAWAY."""
    case = Case(t, d)
    feed = Feed(chunks_of(case.path, case.aborted))
    ch = t.new_channel()
    try:
        fut = pb_grpc.ContainerServiceStub(ch).WriteRaw.future(iter(feed), metadata=t.md, timeout=CALL)
        time.sleep(0.7)
        case.wait_in_progress()
        ch.close()
        with pytest.raises(grpc.RpcError):
            fut.result(timeout=CALL)
        case.assert_untouched("grpcio channel close")
    finally:
        feed.close()
        ch.close()
    grpcio_clean_upload(t, case)


def test_writeraw_grpcio_deadline_keeps_old_file(t, d):
    """A grpcio deadline (timeout=1.0) expiring mid-upload with the iterator open: grpcio sends
    `grpc-timeout` with the call and RST_STREAM(CANCEL) when it expires; the server's own
    timer on `grpc-timeout` may fire first."""
    case = Case(t, d)
    feed = Feed(chunks_of(case.path, case.aborted))
    try:
        fut = t.stub.WriteRaw.future(iter(feed), metadata=t.md, timeout=1.0)
        case.wait_in_progress()
        with pytest.raises(grpc.RpcError) as exc:
            fut.result(timeout=CALL)
        # tonic enforces grpc-timeout itself and may answer first: CANCELLED "Timeout expired".
        assert exc.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED), \
            "status %s: %s" % (exc.value.code(), exc.value.details())
        case.assert_untouched("grpcio deadline")
    finally:
        feed.close()
    grpcio_clean_upload(t, case)


@pytest.mark.parametrize("where", ["first_chunk", "then_end", "kept_open"])
def test_writeraw_abort_chunk_is_aborted_and_keeps_old_file(t, d, where):
    """A chunk with `abort = true` (WriteRawChunk field 3, today's Memoh clients) sent by
    grpcio: in the first chunk with the path, after data with the client then ending cleanly,
    or after data with the stream kept open. The call is ABORTED at once and nothing lands."""
    case = Case(t, d)
    if where == "first_chunk":
        first = chunks_of(case.path, case.aborted)[0]
        first.abort = True
        items = [first]
    else:
        items = chunks_of(case.path, case.aborted) + [pb.WriteRawChunk(abort=True)]
    feed = Feed(items)
    if where != "kept_open":
        feed.close()
    try:
        try:
            r = t.stub.WriteRaw(iter(feed), metadata=t.md, timeout=10)
            status = "OK, bytes_written %d" % r.bytes_written
        except grpc.RpcError as e:
            status = "%s: %s" % (e.code().name, e.details())
        case.assert_untouched("abort chunk (%s)" % where)
        assert status.startswith("ABORTED:"), "abort chunk (%s): status %s" % (where, status)
    finally:
        feed.close()
    grpcio_clean_upload(t, case)


# ------------------------------------------------------------------ Exec: reset mid-stdin

RESET_CMD = "echo $$ > pid; cat >/dev/null; touch mark; sleep 30"
CLEAN_CMD = "cat >/dev/null; touch clean-mark"


def pid_alive(t, pid):
    """True while the process exists (a zombie counts: nobody reaped it)."""
    if t.data_dir:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    r = exec_api(t, "kill -0 %d 2>/dev/null && echo alive || echo gone" % pid)
    return r.stdout.strip() == b"alive"


def kill_group(t, pid):
    if t.data_dir:
        for fn, target in ((os.killpg, pid), (os.kill, pid)):
            try:
                fn(target, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    else:
        exec_api(t, "kill -9 -%d %d 2>/dev/null; true" % (pid, pid))


class ExecResult:
    def __init__(self, msgs):
        self.stdout = b"".join(m.data for m in msgs if m.stream == STDOUT)
        self.stderr = b"".join(m.data for m in msgs if m.stream == STDERR)
        self.exits = [m for m in msgs if m.stream == EXIT]
        self.code = self.exits[-1].exit_code if self.exits else None


def exec_api(t, command, stdin=(), timeout=CALL, **kw):
    reqs = [pb.ExecInput(command=command, **kw)] + [pb.ExecInput(stdin_data=s) for s in stdin]
    return ExecResult(list(t.stub.Exec(iter(reqs), metadata=t.md, timeout=timeout)))


def read_pid(t, path):
    box = []

    def ready():
        try:
            text = read_api(t, path)
        except grpc.RpcError:
            return False
        if text.endswith(b"\n"):
            box.append(int(text))
            return True
        return False

    assert wait_for(ready, 10.0), "the command never wrote %s" % path
    return box[0]


def assert_reset_kills_the_child(t, d, what, pid):
    """MARK never appears (the child never saw a clean end of stdin) and the group dies."""
    try:
        end = time.time() + 3.0
        while time.time() < end:
            assert not exists_api(t, d + "/mark"), "%s: the child read a clean end of stdin" % what
            time.sleep(0.1)
        assert wait_for(lambda: not pid_alive(t, pid), 5.0), "%s: the command still runs" % what
        assert not exists_api(t, d + "/mark"), "%s: the child read a clean end of stdin" % what
    finally:
        kill_group(t, pid)


def assert_clean_end_closes_stdin(t, d, what, result):
    assert result.code == 0, "%s: clean end gave exit %r, stderr %r" % (what, result.code, result.stderr)
    assert len(result.exits) == 1, "exactly one exit message"
    assert exists_api(t, d + "/clean-mark"), "%s: a clean end did not close the child's stdin" % what


def grpcio_exec_reset(t, d, how):
    """The command reads stdin from a grpcio request iterator that stays open; then `how`
    ends the call. Then the same command ended cleanly (iterator done) with the same stack."""
    feed = Feed([pb.ExecInput(command=RESET_CMD, work_dir=d, timeout_seconds=60),
                 pb.ExecInput(stdin_data=b"partial input\n")])
    ch = t.new_channel() if how == "channel_close" else t.channel
    pid = None
    try:
        call = pb_grpc.ContainerServiceStub(ch).Exec(iter(feed), metadata=t.md, timeout=CALL)
        pid = read_pid(t, d + "/pid")
        if how == "cancel":
            assert call.cancel(), "the call had already ended before the cancel"
        else:
            ch.close()
        assert_reset_kills_the_child(t, d, "grpcio %s" % how, pid)
    finally:
        feed.close()
        if ch is not t.channel:
            ch.close()
        if pid is not None:
            kill_group(t, pid)
    r = exec_api(t, CLEAN_CMD, stdin=[b"all of it\n"], work_dir=d)
    assert_clean_end_closes_stdin(t, d, "grpcio", r)


def raw_exec_reset(t, d, ending):
    """The command reads stdin from a raw h2 stream that stays open; then `ending`. Then the
    same command ended cleanly with END_STREAM on a new connection."""
    c = RawH2(t)
    pid = None
    try:
        sid = c.start("Exec")
        c.send(sid, pb.ExecInput(command=RESET_CMD, work_dir=d, timeout_seconds=60))
        c.send(sid, pb.ExecInput(stdin_data=b"partial input\n"))
        pid = read_pid(t, d + "/pid")
        c.idle(0.2)
        raw_ending(ending)(c, sid)
        assert_reset_kills_the_child(t, d, "raw h2 %s" % ending, pid)
    finally:
        c.close()
        if pid is not None:
            kill_group(t, pid)

    c = RawH2(t)
    try:
        sid = c.start("Exec")
        c.send(sid, pb.ExecInput(command=CLEAN_CMD, work_dir=d))
        c.send(sid, pb.ExecInput(stdin_data=b"all of it\n"))
        c.end(sid)
        call = c.result(sid)
    finally:
        c.close()
    assert call.status() == "0", "grpc-status %r, message %r" % (call.status(), call.message())
    r = ExecResult([pb.ExecOutput.FromString(m) for m in call.messages()])
    assert_clean_end_closes_stdin(t, d, "raw h2", r)


def test_exec_grpcio_cancel_mid_stdin_kills_the_command(t, d):
    """grpcio `call.cancel()` with the request iterator still open: RST_STREAM(CANCEL)."""
    grpcio_exec_reset(t, d, "cancel")


def test_exec_grpcio_channel_close_mid_stdin_kills_the_command(t, d):
    """grpcio `channel.close()` with the iterator open: RST_STREAM(CANCEL), then a TCP close."""
    grpcio_exec_reset(t, d, "channel_close")


def test_exec_h2_rst_stream_cancel_mid_stdin_kills_the_command(t, d):
    """RST_STREAM(CANCEL) from the raw h2 client mid-stdin, connection kept open."""
    raw_exec_reset(t, d, "rst_cancel")


def test_exec_h2_rst_stream_no_error_mid_stdin_kills_the_command(t, d):
    """RST_STREAM(NO_ERROR) from the raw h2 client mid-stdin, connection kept open."""
    raw_exec_reset(t, d, "rst_no_error")


def test_exec_h2_goaway_then_close_mid_stdin_kills_the_command(t, d):
    """GOAWAY then a TCP close from the raw h2 client mid-stdin."""
    raw_exec_reset(t, d, "goaway_close")


def test_exec_h2_tcp_close_mid_stdin_kills_the_command(t, d):
    """A bare TCP close (FIN, no HTTP/2 frame) from the raw h2 client mid-stdin."""
    raw_exec_reset(t, d, "tcp_close")


# ---------------------------------------------------------- Exec: a call that always ends


def exec_with_escaped_grandchild(t, d, command, timeout_seconds):
    """Runs `command` (which starts `setsid` grandchildren writing their pid to pid2) through
    grpcio; returns the result and the seconds until its end. The grandchildren are killed."""
    started = time.time()
    try:
        r = exec_api(t, command, work_dir=d, timeout=15, timeout_seconds=timeout_seconds)
    except grpc.RpcError as e:
        pytest.fail("the exec never ended: %s %s" % (e.code(), e.details()))
    finally:
        elapsed = time.time() - started
        try:
            pid = read_pid(t, d + "/pid2")
        except AssertionError:
            pid = None
        if pid is not None:
            kill_group(t, pid)
    assert pid is not None, "the grandchild never started"
    return r, elapsed


def test_exec_ends_when_the_command_exits_despite_a_setsid_grandchild(t, d):
    """`setsid sh -c ... &` leaves a grandchild outside the process group holding stdout and
    stderr; the call still ends with its EXIT soon after the shell exits (grpcio client)."""
    r, elapsed = exec_with_escaped_grandchild(
        t, d, "setsid sh -c 'echo $$ > pid2; exec sleep 60' & echo started", 0)
    assert r.stdout == b"started\n"
    assert r.code == 0
    assert len(r.exits) == 1, "exactly one exit message"
    assert elapsed < 6, "exit came after %.1f s" % elapsed


def test_exec_ends_after_a_timeout_kill_despite_a_setsid_grandchild(t, d):
    """timeout_seconds=1 kills the group, but a `setsid` grandchild outside it still holds
    stdout and stderr; the call still ends with one EXIT of -1 (grpcio client)."""
    r, elapsed = exec_with_escaped_grandchild(
        t, d, "setsid sh -c 'echo $$ > pid2; exec sleep 60' & sleep 60", 1)
    assert r.code == -1
    assert len(r.exits) == 1, "exactly one exit message"
    assert elapsed < 6, "exit came after %.1f s" % elapsed
