"""Thin helpers over the official MCP Python SDK (PyPI `mcp`), for the system test and the
benchmark: open a session over streamable HTTP or stdio, and read tool results the same way
under the SDK's 1.x (camelCase attributes) and 2.x (snake_case) models."""

import contextlib
import json
import os

from mcp import ClientSession

try:  # mcp >= 2: headers travel on the HTTP client the transport is given
    from mcp.client.streamable_http import streamable_http_client as _http_client
    from mcp.shared._httpx_utils import create_mcp_http_client as _mcp_http_client

    def _open(url, headers):
        return _http_client(url, http_client=_mcp_http_client(headers=headers))

except ImportError:  # mcp 1.x
    from mcp.client.streamable_http import streamablehttp_client as _http_client

    def _open(url, headers):
        return _http_client(url, headers=headers)


def auth_headers():
    """The agent's MCP bearer token (tests/mcp/run.sh reads it with `memoh-agent mcp token`)."""
    token = os.environ.get("MEMOH_MCP_TOKEN", "")
    return {"Authorization": "Bearer " + token} if token else {}


@contextlib.asynccontextmanager
async def http_session(url, headers=None):
    """An initialized client session to the streamable HTTP endpoint `url`, with the agent's
    token unless `headers` says otherwise."""
    async with _open(url, auth_headers() if headers is None else headers) as streams:
        read, write = streams[0], streams[1]
        async with ClientSession(read, write) as session:
            await session.initialize()
            yield session


@contextlib.asynccontextmanager
async def stdio_session(command, args=()):
    """An initialized client session to a stdio server started locally."""
    from mcp import StdioServerParameters
    from mcp.client.stdio import stdio_client

    params = StdioServerParameters(command=command, args=list(args))
    with open("/dev/null", "w") as devnull:
        async with stdio_client(params, errlog=devnull) as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session


def is_error(result):
    """Whether a tool result is a tool error."""
    v = getattr(result, "is_error", None)
    if v is None:
        v = getattr(result, "isError", None)
    return bool(v)


def text(result):
    """The concatenated text content of a tool result."""
    return "".join(getattr(c, "text", "") for c in result.content)


def structured(result):
    """The structured result (falls back to the text content parsed as JSON)."""
    v = getattr(result, "structured_content", None)
    if v is None:
        v = getattr(result, "structuredContent", None)
    if v is None:
        v = json.loads(text(result))
    return v


def tool_names(listing):
    """The names in a tools/list result."""
    return sorted(t.name for t in listing.tools)
