"""Fixtures of the wire-compatibility suite.

The client code is generated at test time from tests/wire/mcpcontainer.proto (written from
WIRE.md, independent of proto/) into a temp dir. The server under test is
target/debug/container-server (WIRE_SERVER_BIN overrides), started once per session on a
loopback port with a fresh data dir and template dir; a few tests start their own instances.
The server runs with TZ=UTC and umask 022, the conditions WIRE.md's examples assume.
"""

import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import grpc
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SERVER_BIN = os.environ.get("WIRE_SERVER_BIN", os.path.join(ROOT, "target", "debug", "container-server"))

TEMPLATE_FILES = {"README.md": b"# template readme\n", "notes.txt": b"from the template\n"}


def _generate():
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="wire-pb-")
    rc = protoc.main([
        "grpc_tools.protoc",
        "-I" + HERE,
        "--python_out=" + out,
        "--grpc_python_out=" + out,
        os.path.join(HERE, "mcpcontainer.proto"),
    ])
    if rc != 0:
        raise RuntimeError("protoc failed for mcpcontainer.proto")
    sys.path.insert(0, out)
    return out


_GEN_DIR = _generate()
pb = importlib.import_module("mcpcontainer_pb2")
pb_grpc = importlib.import_module("mcpcontainer_pb2_grpc")


def _generate_bridge():
    """bridgepb stubs from the project's proto/bridge.proto, written from WIRE-BRIDGE.md's field
    table (the contract: names and numbers are fixed there)."""
    from grpc_tools import protoc

    rc = protoc.main([
        "grpc_tools.protoc",
        "-I" + os.path.join(ROOT, "proto"),
        "--python_out=" + _GEN_DIR,
        "--grpc_python_out=" + _GEN_DIR,
        os.path.join(ROOT, "proto", "bridge.proto"),
    ])
    if rc != 0:
        raise RuntimeError("protoc failed for bridge.proto")


_generate_bridge()
bp = importlib.import_module("bridge_pb2")
bp_grpc = importlib.import_module("bridge_pb2_grpc")


def _generate_process():
    """memoh.process.v1 stubs from the project's proto/process.proto (the contract)."""
    from grpc_tools import protoc

    rc = protoc.main([
        "grpc_tools.protoc",
        "-I" + os.path.join(ROOT, "proto"),
        "--python_out=" + _GEN_DIR,
        "--grpc_python_out=" + _GEN_DIR,
        os.path.join(ROOT, "proto", "process.proto"),
    ])
    if rc != 0:
        raise RuntimeError("protoc failed for process.proto")


_generate_process()
ppb = importlib.import_module("process_pb2")
ppb_grpc = importlib.import_module("process_pb2_grpc")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    """A container-server process with its own data and template dirs."""

    def __init__(self, data_dir, template_dir, listen=None, env=None, args=None):
        self.data_dir = data_dir
        self.template_dir = template_dir
        if listen is None:
            listen = "127.0.0.1:%d" % free_port()
        self.listen = listen
        self.target = listen if listen.startswith("unix:") else listen.replace("0.0.0.0", "127.0.0.1")
        if self.target.startswith(":"):
            self.target = "127.0.0.1" + self.target
        full_env = dict(os.environ)
        full_env["TZ"] = "UTC"
        full_env["WIRE_MARKER"] = "inherited-from-server"
        full_env.pop("MCP_LISTEN_ADDR", None)
        # The ReverseHTTP listener on a free loopback port (env overrides), never the fixed
        # default, so servers started side by side do not compete for it.
        full_env["MEMOH_ACP_TOOLS_PROXY_ADDR"] = "127.0.0.1:%d" % free_port()
        # The process service's files beside the data dir, never the machine's default
        # directory (which a server clears of old runs' files at start).
        full_env["MEMOH_PROCESS_DIR"] = os.path.join(
            os.path.dirname(data_dir), "processes-" + uuid.uuid4().hex[:6])
        full_env.update(env or {})
        self.reverse_http_addr = full_env["MEMOH_ACP_TOOLS_PROXY_ADDR"]
        if args is None:
            args = ["--listen", listen, "--data-dir", data_dir, "--template-dir", template_dir]
        self.log_path = os.path.join(os.path.dirname(data_dir), "server-%s.log" % uuid.uuid4().hex[:6])
        self.log = open(self.log_path, "wb")
        # The umask is set in the parent around the spawn: a preexec_fn forks with grpc's
        # threads running, which breaks the client's poller.
        old_umask = os.umask(0o022)
        try:
            self.proc = subprocess.Popen(
                [SERVER_BIN] + args,
                env=full_env,
                stdout=self.log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            os.umask(old_umask)
        # grpc C-core sends a unix socket's path as :authority, which hyper rejects; Go and
        # Rust clients send "localhost", as this option does.
        options = [("grpc.default_authority", "localhost")] if self.target.startswith("unix:") else []
        self.channel = grpc.insecure_channel(self.target, options=options)
        try:
            grpc.channel_ready_future(self.channel).result(timeout=20)
        except grpc.FutureTimeoutError:
            self.stop()
            raise RuntimeError("server at %s did not become ready; log:\n%s" % (self.target, self.read_log()))
        self.stub = pb_grpc.ContainerServiceStub(self.channel)

    def read_log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-4000:]

    def stop(self):
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def make_dirs(base):
    """A not-yet-existing data dir named `data` (the server creates it) and a template dir."""
    data = os.path.join(base, "data")
    template = os.path.join(base, "template")
    os.makedirs(template)
    for name, content in TEMPLATE_FILES.items():
        with open(os.path.join(template, name), "wb") as f:
            f.write(content)
    os.makedirs(os.path.join(template, "subdir-not-a-regular-file"))
    return data, template


@pytest.fixture(scope="session")
def server():
    if not os.access(SERVER_BIN, os.X_OK):
        pytest.exit("server binary not found: %s (cargo build -p container-server)" % SERVER_BIN, 2)
    base = tempfile.mkdtemp(prefix="wire-")
    data, template = make_dirs(base)
    srv = Server(data, template)
    yield srv
    srv.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def stub(server):
    return server.stub


@pytest.fixture
def data(server):
    return server.data_dir


@pytest.fixture
def d(server, request):
    """A fresh directory for one test, as (relative name, absolute path) under the data dir."""
    name = "t-" + request.node.name.replace("[", "-").replace("]", "")[:60] + "-" + uuid.uuid4().hex[:6]
    path = os.path.join(server.data_dir, name)
    os.makedirs(path)
    return name, path


@pytest.fixture
def spawn(tmp_path):
    """Start extra servers for tests of startup behaviour; stopped at the end of the test."""
    started = []

    def _spawn(**kw):
        srv = Server(**kw)
        started.append(srv)
        return srv

    yield _spawn
    for srv in started:
        srv.stop()


def wait_for(pred, timeout=5.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With WIRE_FAIL_ON_SKIP set (tests/mcp/run.sh, which runs the agent cases), a skipped
    test counts as a failure: there a skip means the agent cases did not run."""
    outcome = yield
    rep = outcome.get_result()
    if os.environ.get("WIRE_FAIL_ON_SKIP") and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else rep.longrepr
        rep.outcome = "failed"
        rep.longrepr = "skipped, but WIRE_FAIL_ON_SKIP is set: %s" % reason
