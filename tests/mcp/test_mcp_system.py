"""MCP system test: the official MCP Python SDK against a real agent and a real bot.

tests/mcp/run.sh starts the agent and the bot and sets MEMOH_MCP_URL (the agent's MCP address),
MEMOH_MCP_BOT, MEMOH_AGENT_SOCKET and MEMOH_AGENT_BIN.
"""

import asyncio
import json
import os
import subprocess
import time

import httpx
import pytest

from mcpclient import auth_headers, http_session, is_error, structured, text, tool_names

URL = os.environ.get("MEMOH_MCP_URL", "")
BOT = os.environ.get("MEMOH_MCP_BOT", "")
SOCK = os.environ.get("MEMOH_AGENT_SOCKET", "")
AGENT = os.environ.get("MEMOH_AGENT_BIN", "memoh-agent")

pytestmark = pytest.mark.skipif(not URL, reason="run through tests/mcp/run.sh")


def cli(*args, check=True, stdin=subprocess.DEVNULL):
    """Runs the agent's CLI; returns the completed process."""
    p = subprocess.run(
        [AGENT, "--socket", SOCK, *args],
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert p.returncode == 0, f"memoh-agent {args}: {p.returncode} {p.stderr}"
    return p


def run(coro):
    return asyncio.run(coro)


def tools_url():
    return f"{URL}/bots/{BOT}/mcp"


def fixture_url(name="fx"):
    return f"{URL}/bots/{BOT}/mcp/{name}"


# --- the container as tools -----------------------------------------------------------------


def test_tools_listed():
    async def go():
        async with http_session(tools_url()) as s:
            return tool_names(await s.list_tools())

    assert run(go()) == [
        "edit",
        "exec",
        "list",
        "process_list",
        "process_output",
        "process_signal",
        "process_wait",
        "read",
        "write",
    ]


def test_background_process_poll_and_kill():
    """exec with background starts a counter that outlives the call; process_output polls it
    from advancing offsets (every line once, in order); process_list shows it; process_signal
    TERM stops it and process_wait reports the signal. Each step is its own MCP session, as an
    agent working across many calls would do."""
    tag = f"mcp-e2e-{os.getpid()}"
    counter = "i=0; while :; do i=$((i+1)); echo line-$i; sleep 0.05; done"

    async def call(name, args):
        async with http_session(tools_url()) as s:
            r = await s.call_tool(name, args)
            assert not is_error(r), f"{name}: {text(r)}"
            return structured(r)

    started = run(call("exec", {"command": counter, "background": True, "tag": tag}))
    pid = started["id"]
    assert isinstance(pid, str) and pid, started
    assert started["pid"] > 0, started

    seen = ""
    offset = 0
    offsets = []
    deadline = time.time() + 30
    while seen.count("\n") < 20:
        assert time.time() < deadline, f"only {seen!r} after 30 s"
        v = run(call("process_output", {"id": pid, "offset": offset, "max_bytes": 64}))
        assert v["running"] is True and v["state"] == "running", v
        assert v["next_offset"] == offset + len(v["stdout"].encode()), v
        assert "lost" not in v, v
        seen += v["stdout"]
        offset = v["next_offset"]
        offsets.append(offset)
        time.sleep(0.1)
    assert offsets == sorted(offsets) and offsets[-1] > offsets[0], offsets
    lines = seen.splitlines()
    complete = lines if seen.endswith("\n") else lines[:-1]
    # Exactly the counter, in order: no gap, no duplicate across the polls.
    assert complete == [f"line-{i}" for i in range(1, len(complete) + 1)], seen

    listed = run(call("process_list", {"tag": tag}))["processes"]
    assert [p["id"] for p in listed] == [pid], listed
    assert listed[0]["state"] == "running" and listed[0]["tag"] == tag, listed
    assert listed[0]["exit_code"] is None, listed
    everyone = run(call("process_list", {}))["processes"]
    assert pid in [p["id"] for p in everyone]

    r = run(call("process_wait", {"id": pid, "timeout_seconds": 0}))
    assert r["exited"] is False and r["state"] == "running", r

    assert run(call("process_signal", {"id": pid, "signal": "TERM"}))["signal"] == 15
    w = run(call("process_wait", {"id": pid, "timeout_seconds": 20}))
    assert w["exited"] is True, w
    assert w["state"] == "signaled" and w["signal"] == 15 and w["exit_code"] == 143, w
    assert w["signal_name"] == "SIGTERM" and "signal 15" in w["summary"], w
    assert w["user_cpu_ms"] is not None and w["max_rss_bytes"] > 0, w

    # The rest of the output after the end: from the last offset, nothing twice.
    rest = run(call("process_output", {"id": pid, "offset": offset, "max_bytes": 1024 * 1024}))
    assert rest["running"] is False and rest["exit_code"] == 143 and rest["signal"] == 15, rest
    assert rest["more"] is False, rest
    whole = run(call("process_output", {"id": pid, "max_bytes": 1024 * 1024}))
    assert whole["stdout"] == seen + rest["stdout"], (whole, seen, rest)

    # Bad input: tool errors with clear text, not protocol failures.
    async def fails(name, args):
        async with http_session(tools_url()) as s:
            r = await s.call_tool(name, args)
            assert is_error(r), f"{name} {args}: {text(r)}"
            return text(r)

    assert "not found" in run(fails("process_output", {"id": "000000000000"})), "unknown id"
    assert "unknown signal" in run(fails("process_signal", {"id": pid, "signal": "BOGUS"}))
    assert "id is required" in run(fails("process_wait", {}))


def test_write_read_list_edit_exec():
    content = "  first line keeps its indent\r\nsecond \u201cquoted\u201d line\r\n\r\ntail  \r\n"

    async def go():
        async with http_session(tools_url()) as s:
            r = await s.call_tool("write", {"path": "mcp-e2e/notes.txt", "content": content})
            assert not is_error(r), text(r)
            assert structured(r) == {"ok": True}

            r = await s.call_tool("read", {"path": "/data/mcp-e2e/notes.txt"})
            assert not is_error(r), text(r)
            v = structured(r)
            assert v["total_lines"] == 4
            assert "  first line keeps its indent" in v["content"]

            r = await s.call_tool("read", {"path": "mcp-e2e/notes.txt", "line_offset": 2, "n_lines": 1})
            v = structured(r)
            assert "second" in v["content"] and "first" not in v["content"]

            r = await s.call_tool("list", {"path": "mcp-e2e"})
            assert not is_error(r), text(r)
            v = structured(r)
            names = [e["path"] for e in v["entries"]]
            assert any(n.endswith("notes.txt") for n in names), names
            entry = next(e for e in v["entries"] if e["path"].endswith("notes.txt"))
            assert entry["is_dir"] is False and entry["size"] == len(content.encode())

            # Tolerant match: ASCII quotes find the curly ones; only that region changes.
            r = await s.call_tool(
                "edit",
                {"path": "mcp-e2e/notes.txt", "old_text": 'second "quoted" line', "new_text": "second  edited\n line"},
            )
            assert not is_error(r), text(r)

            r = await s.call_tool("exec", {"command": "cat mcp-e2e/notes.txt", "timeout_seconds": 10})
            assert not is_error(r), text(r)
            v = structured(r)
            assert v["exit_code"] == 0
            # CRLF kept everywhere, the untouched lines byte for byte.
            assert v["stdout"] == "  first line keeps its indent\r\nsecond  edited\r\n line\r\n\r\ntail  \r\n", repr(v["stdout"])

            # A non-zero exit is a result, not a tool error.
            r = await s.call_tool("exec", {"command": "echo out; echo err >&2; exit 3", "work_dir": "/tmp"})
            assert not is_error(r), text(r)
            v = structured(r)
            assert (v["stdout"], v["stderr"], v["exit_code"]) == ("out\n", "err\n", 3)

            r = await s.call_tool("exec", {"command": "pwd"})
            assert structured(r)["stdout"] == "/data\n"

            # Failures are tool errors with the reason.
            r = await s.call_tool("read", {"path": "mcp-e2e/missing.txt"})
            assert is_error(r) and text(r)
            r = await s.call_tool("edit", {"path": "mcp-e2e/notes.txt", "old_text": "absent", "new_text": "x"})
            assert is_error(r) and text(r)

    run(go())


def test_exec_output_is_cut():
    async def go():
        async with http_session(tools_url()) as s:
            r = await s.call_tool("exec", {"command": "seq 1 1000"})
            assert not is_error(r), text(r)
            out = structured(r)["stdout"]
            lines = out.splitlines()
            assert lines[0] == "1" and lines[-1] == "1000"
            assert len(lines) < 300, len(lines)

    run(go())


# --- a stdio MCP server in the bot ----------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_server():
    p = cli("mcp", "add", BOT, "fx", "--env", "FX_GREETING=hello there", "--", "mcp-fixture")
    assert "fx" in p.stdout
    yield "fx"
    cli("mcp", "rm", BOT, "fx", check=False)


def test_registration_listed(fixture_server):
    listing = json.loads(cli("mcp", "ls", BOT, "--json").stdout)
    fx = next(s for s in listing if s["name"] == "fx")
    assert fx["command"] == ["mcp-fixture"]
    assert fx["env"] == ["FX_GREETING=hello there"]
    # The registration lives in the bot.
    stored = json.loads(cli("exec", BOT, "--", "cat", "/data/.memoh/mcp.json").stdout)
    assert any(s["name"] == "fx" for s in stored["servers"])


def test_fixture_tools_through_agent(fixture_server):
    async def go():
        async with http_session(fixture_url()) as s:
            assert tool_names(await s.list_tools()) == ["cwd", "echo", "env", "pid"]
            r = await s.call_tool("echo", {"text": "  keeps\nwhitespace  "})
            assert not is_error(r) and text(r) == "  keeps\nwhitespace  "
            r = await s.call_tool("env", {"name": "FX_GREETING"})
            assert text(r) == "hello there"
            r = await s.call_tool("cwd", {})
            assert text(r) == "/data"

    run(go())
    assert "mcp-fixture started" in cli("mcp", "logs", BOT, "fx").stdout


def test_fixture_killed_in_bot_comes_back(fixture_server):
    async def go():
        async with http_session(fixture_url()) as s:
            first = int(text(await s.call_tool("pid", {})))
            k = cli("exec", BOT, "--", "kill", "-9", str(first), check=False)
            assert k.returncode == 0, k.stderr
            deadline = time.monotonic() + 60
            errors = []
            while time.monotonic() < deadline:
                try:
                    r = await s.call_tool("pid", {}, read_timeout_seconds=20)
                    if not is_error(r) and text(r).isdigit() and int(text(r)) != first:
                        return first, int(text(r)), errors
                    errors.append(text(r))
                except Exception as e:  # the call that met the dying process may fail
                    errors.append(repr(e))
                await asyncio.sleep(0.2)
            raise AssertionError(f"fixture did not come back after kill of {first}: {errors[-5:]}")

    first, second, _ = run(go())
    assert first != second
    ls = json.loads(cli("mcp", "ls", BOT, "--json").stdout)
    fx = next(s for s in ls if s["name"] == "fx")
    assert fx["starts"] >= 2 and fx["running"], fx
    assert cli("mcp", "logs", BOT, "fx").stdout.count("mcp-fixture started") >= 2


def _post(client, url, msg, sid=None):
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    if sid:
        headers["Mcp-Session-Id"] = sid
    r = client.post(url, content=json.dumps(msg), headers=headers)
    assert r.status_code in (200, 202), (r.status_code, r.text)
    if r.status_code == 202 or "id" not in msg:
        return r, None
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in r.text.splitlines():
            if line.startswith("data:") and line[5:].strip():
                body = json.loads(line[5:])
                if body.get("id") == msg["id"]:
                    return r, body
        raise AssertionError(f"no response to {msg['id']!r} in {r.text!r}")
    return r, r.json()


def test_one_session_across_http_requests(fixture_server):
    """Raw streamable HTTP: one Mcp-Session-Id, several POSTs, the same server process."""
    url = fixture_url()
    with httpx.Client(timeout=30, headers=auth_headers()) as c:
        r, body = _post(
            c,
            url,
            {
                "jsonrpc": "2.0",
                "id": "init-1",
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-03-26",
                    "capabilities": {},
                    "clientInfo": {"name": "raw", "version": "1"},
                },
            },
        )
        sid = r.headers.get("mcp-session-id")
        assert sid, r.headers
        assert body["id"] == "init-1" and "result" in body
        _post(c, url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, sid)
        pids = set()
        for i in range(5):
            # The client's ids come back exactly as sent, strings and numbers alike.
            rid = 1000 + i if i % 2 else f"req-{i}"
            _, body = _post(
                c,
                url,
                {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": "pid", "arguments": {}}},
                sid,
            )
            assert body["jsonrpc"] == "2.0" and body["id"] == rid, body
            pids.add(body["result"]["content"][0]["text"])
        assert len(pids) == 1, pids
        # An unknown method is a JSON-RPC error with the full envelope.
        _, body = _post(c, url, {"jsonrpc": "2.0", "id": 77, "method": "no/such", "params": {}}, sid)
        assert body["id"] == 77 and "error" in body and "code" in body["error"] and "message" in body["error"]
        # Ending the session answers 200, as the SDKs expect (they log a failure otherwise).
        r = c.delete(url, headers={"Mcp-Session-Id": sid})
        assert r.status_code == 200, (r.status_code, r.text)


def test_sdk_session_spans_many_calls(fixture_server):
    async def go():
        async with http_session(fixture_url()) as s:
            pids = {text(await s.call_tool("pid", {})) for _ in range(10)}
            echoes = [text(await s.call_tool("echo", {"text": str(i)})) for i in range(10)]
            return pids, echoes

    pids, echoes = run(go())
    assert len(pids) == 1
    assert echoes == [str(i) for i in range(10)]


def test_unknown_server_and_removal():
    with httpx.Client(timeout=30, headers=auth_headers()) as c:
        r = c.post(
            fixture_url("nosuch"),
            content="{}",
            headers={"Accept": "application/json, text/event-stream", "Content-Type": "application/json"},
        )
        assert r.status_code == 404, (r.status_code, r.text)
    cli("mcp", "add", BOT, "tmp", "--", "mcp-fixture")
    assert "tmp" in cli("mcp", "ls", BOT).stdout
    cli("mcp", "rm", BOT, "tmp")
    assert "tmp" not in cli("mcp", "ls", BOT).stdout
    p = cli("mcp", "rm", BOT, "tmp", check=False)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_the_listener_wants_the_token_a_local_host_and_origin():
    """Authentication is on by default: no token is 401; a foreign Host or Origin (a web page
    rebinding a name of its own to 127.0.0.1) is 403 even with the token; /metrics wants it."""
    assert auth_headers(), "tests/mcp/run.sh must export MEMOH_MCP_TOKEN"
    hdrs = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    with httpx.Client(timeout=30) as c:
        assert c.post(tools_url(), content="{}", headers=hdrs).status_code == 401
        bad = dict(hdrs, Authorization="Bearer not-the-token")
        assert c.post(tools_url(), content="{}", headers=bad).status_code == 401
        ok = dict(hdrs, **auth_headers())
        assert c.post(tools_url(), content="{}", headers=dict(ok, Host="evil.example")).status_code == 403
        assert c.post(tools_url(), content="{}", headers=dict(ok, Origin="http://evil.example")).status_code == 403
        assert c.get(f"{URL}/metrics").status_code == 401
        r = c.get(f"{URL}/metrics", headers=auth_headers())
        assert r.status_code == 200 and "memoh_" in r.text, r.status_code
