"""MCP benchmark (issue 6), each figure against a baseline measured in the same run, calls
interleaved so both sides see the same machine load:

- `read` tool call through the agent (`/bots/BOT/mcp`) against a direct gRPC ReadFile to the
  same bot's container-server (its address and token, as the agent's pool calls it);
- a tool call (`echo`) to mcp-fixture through the agent (`/bots/BOT/mcp/fx`, the server runs in
  the bot) against the same fixture binary run locally over stdio, with the same client.

The client is a lean JSON-RPC client (one keep-alive HTTP connection, one MCP session; the
same framing code over a pipe for the local fixture) so that client-side cost stays small and
equal on both sides. Run through `tests/mcp/run.sh --bench`, which starts the agent and the bot.
Prints a markdown section; with --out FILE also writes it there.
"""

import argparse
import datetime
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
URL = os.environ["MEMOH_MCP_URL"]
BOT = os.environ["MEMOH_MCP_BOT"]
SOCK = os.environ["MEMOH_AGENT_SOCKET"]
AGENT = os.environ["MEMOH_AGENT_BIN"]
STATE = os.environ["MEMOH_AGENT_STATE_DIR"]
FIXTURE = os.environ.get(
    "MEMOH_FIXTURE_BIN", os.path.join(ROOT, "target/static/x86_64-unknown-linux-gnu/debug/mcp-fixture")
)


def cli(*args):
    p = subprocess.run([AGENT, "--socket", SOCK, *args], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        sys.exit(f"bench: memoh-agent {args}: {p.stderr.strip()}")
    return p.stdout


class Rpc:
    """JSON-RPC request framing shared by both transports."""

    def __init__(self):
        self.next_id = 0

    def request(self, method, params):
        self.next_id += 1
        return {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}

    @staticmethod
    def result(body):
        if "error" in body:
            raise RuntimeError(f"json-rpc error: {body['error']}")
        r = body["result"]
        if r.get("isError"):
            raise RuntimeError(f"tool error: {r['content']}")
        return r

    def handshake(self):
        self.send(
            self.request(
                "initialize",
                {"protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}},
            )
        )
        self.notify({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def call(self, name, args):
        return self.result(self.send(self.request("tools/call", {"name": name, "arguments": args})))


class HttpMcp(Rpc):
    """Streamable HTTP: one session, one keep-alive connection."""

    HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}

    def __init__(self, url):
        super().__init__()
        self.url = url
        self.http = httpx.Client(timeout=30)
        self.headers = dict(self.HEADERS)
        token = os.environ.get("MEMOH_MCP_TOKEN", "")
        if token:
            self.headers["Authorization"] = "Bearer " + token
        self.handshake()

    def _post(self, msg):
        r = self.http.post(self.url, content=json.dumps(msg), headers=self.headers)
        r.raise_for_status()
        sid = r.headers.get("mcp-session-id")
        if sid:
            self.headers["Mcp-Session-Id"] = sid
        return r

    def send(self, msg):
        r = self._post(msg)
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            for line in r.text.splitlines():
                if line.startswith("data:") and line[5:].strip():
                    body = json.loads(line[5:])
                    if body.get("id") == msg["id"]:
                        return body
            raise RuntimeError(f"no response in {r.text!r}")
        return r.json()

    def notify(self, msg):
        self._post(msg)

    def close(self):
        try:
            self.http.delete(self.url, headers=self.headers)
        finally:
            self.http.close()


class StdioMcp(Rpc):
    """The same framing over a local child's stdin and stdout."""

    def __init__(self, argv):
        super().__init__()
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.handshake()

    def notify(self, msg):
        self.p.stdin.write(json.dumps(msg).encode() + b"\n")
        self.p.stdin.flush()

    def send(self, msg):
        self.notify(msg)
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError("local fixture exited")
            body = json.loads(line)
            if body.get("id") == msg["id"]:
                return body

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=5)


def grpc_stubs():
    """Generates the container service's Python stubs into a temp dir and imports them."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="mcp-bench-pb-")
    rc = protoc.main(
        ["protoc", f"-I{ROOT}/proto", f"--python_out={out}", f"--grpc_python_out={out}", "mcpcontainer.proto"]
    )
    if rc != 0:
        sys.exit("bench: protoc failed")
    sys.path.insert(0, out)
    return importlib.import_module("mcpcontainer_pb2"), importlib.import_module("mcpcontainer_pb2_grpc")


def timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def p(samples, q):
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q / 100))]


def ms(x):
    return f"{x * 1e3:.3f} ms"


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        load = open("/proc/loadavg").read().split()[:3]
    except OSError:
        load = ["?"] * 3
    from importlib.metadata import version

    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "httpx": version("httpx"),
        "grpcio": version("grpcio"),
        "load": " ".join(load),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=int(os.environ.get("MEMOH_MCP_BENCH_RUNS", "500")))
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--out")
    a = ap.parse_args()

    import grpc

    pb, pb_grpc = grpc_stubs()
    info = json.loads(cli("bot", "inspect", BOT))
    ip = info["ip"]
    token = open(os.path.join(STATE, "bots", BOT, "token")).read().strip()
    channel = grpc.insecure_channel(f"{ip}:9090")
    stub = pb_grpc.ContainerServiceStub(channel)
    md = [("authorization", f"Bearer {token}")]

    # A 100-line text file, the same window on both sides.
    content = "".join(f"line {i:03d} of the benchmark file, some words to make it realistic\n" for i in range(100))
    tools = HttpMcp(f"{URL}/bots/{BOT}/mcp")
    tools.call("write", {"path": "bench/read.txt", "content": content})
    cli("mcp", "add", BOT, "benchfx", "--", "mcp-fixture")
    fx_agent = HttpMcp(f"{URL}/bots/{BOT}/mcp/benchfx")
    fx_local = StdioMcp([FIXTURE])

    def read_agent():
        r = tools.call("read", {"path": "bench/read.txt", "line_offset": 1, "n_lines": 100})
        assert r["structuredContent"]["total_lines"] == 100

    def read_direct():
        r = stub.ReadFile(pb.ReadFileRequest(path="/data/bench/read.txt", line_offset=1, n_lines=100), metadata=md, timeout=10)
        assert r.total_lines == 100

    def echo_agent():
        assert fx_agent.call("echo", {"text": "ping"})["content"][0]["text"] == "ping"

    def echo_local():
        assert fx_local.call("echo", {"text": "ping"})["content"][0]["text"] == "ping"

    # The floor of the stdio path: a line through `cat` in the bot over a direct gRPC Exec stream.
    import queue

    stdin_q = queue.Queue()

    def requests():
        yield pb.ExecInput(command="cat", timeout_seconds=3600)
        while True:
            item = stdin_q.get()
            if item is None:
                return
            yield pb.ExecInput(stdin_data=item)

    exec_out = stub.Exec(requests(), metadata=md)

    def cat_direct():
        stdin_q.put(b"ping\n")
        got = b""
        while not got.endswith(b"\n"):
            got += next(exec_out).data
        assert got == b"ping\n", got

    cases = [read_agent, read_direct, echo_agent, echo_local, cat_direct]
    for _ in range(a.warmup):
        for c in cases:
            c()
    samples = {c.__name__: [] for c in cases}
    started = time.time()
    for _ in range(a.runs):
        for c in cases:
            samples[c.__name__].append(timed(c))
    elapsed = time.time() - started
    stdin_q.put(None)
    exec_out.cancel()
    fx_agent.close()
    fx_local.close()
    tools.close()
    channel.close()
    cli("mcp", "rm", BOT, "benchfx")

    m = machine()
    s = {k: (p(v, 50), p(v, 90), p(v, 99)) for k, v in samples.items()}
    read_added = s["read_agent"][0] - s["read_direct"][0]
    echo_added = s["echo_agent"][0] - s["echo_local"][0]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = [
        ("`read` tool through the agent (100-line window)", "read_agent", "direct gRPC ReadFile to the bot", "read_direct", read_added, 2e-3),
        ("fixture `echo` through the agent (server in the bot)", "echo_agent", "same fixture run locally over stdio", "echo_local", echo_added, 3e-3),
    ]
    out = [
        f"## MCP ({now})",
        "",
        "The agent's MCP endpoints against same-run baselines, calls interleaved. Source:",
        "`tests/mcp/bench.py`, run by `tests/mcp/run.sh --bench` (its own agent, bot and config on",
        "the private containerd of `scripts/test-env.sh up`; needs root). The client is a lean",
        "JSON-RPC client in Python (httpx, one keep-alive connection and one MCP session; the same",
        "framing over a pipe for the local fixture); the gRPC baseline uses grpcio against the",
        "bot's address with its token, as the agent's pool does.",
        "",
        "```sh",
        "cargo build --release -p memoh-agent",
        'eval "$(scripts/test-env.sh env)"',
        "MEMOH_AGENT_BIN=target/release/memoh-agent tests/mcp/run.sh --bench [--runs N] [--out FILE]",
        "```",
        "",
        f"- Date: {now}; {a.runs} interleaved rounds after {a.warmup} warm-up rounds, {elapsed:.1f} s",
        f"- Machine: {m['cpus']} vCPUs ({m['cpu']}), kernel {m['kernel']}; load average at the end {m['load']} (cores shared with other engineers' builds)",
        f"- Agent: `{os.path.relpath(AGENT, ROOT) if AGENT.startswith(ROOT) else AGENT}`; container-server and mcp-fixture from the test image (`scripts/build-image.sh`); client: Python {m['python']}, httpx {m['httpx']}, grpcio {m['grpcio']}",
        "",
        "| Figure | p50 | p90 | p99 | Baseline (same run) | Baseline p50 | Added at p50 | Target | Met? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for what, k, base_what, b, added, target in rows:
        met = "yes" if added <= target else "**no**"
        out.append(
            f"| {what} | {ms(s[k][0])} | {ms(s[k][1])} | {ms(s[k][2])} | {base_what} | {ms(s[b][0])} | {ms(added)} | ≤ {target * 1e3:.0f} ms | {met} |"
        )
    out.append(
        f"| line through `cat` in the bot, direct gRPC Exec stream (floor of the stdio path) | {ms(s['cat_direct'][0])} | {ms(s['cat_direct'][1])} | {ms(s['cat_direct'][2])} | – | – | – | – | – |"
    )
    out.append("")
    text = "\n".join(out)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
