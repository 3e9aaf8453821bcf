"""An MCP server built with the official SDK (``mcp.server.mcpserver.MCPServer``), for the
tests and the benchmark: run it as a program, never imported by the gevent-patched tests.

    python tests/mcp_server.py            # streamable HTTP on a free 127.0.0.1 port
    python tests/mcp_server.py --json     # the same, answering requests as JSON, not SSE
    python tests/mcp_server.py --stdio    # over stdin and stdout

Over HTTP it prints ``listening on http://127.0.0.1:PORT/mcp`` once it accepts connections.
Besides the MCP endpoint it serves a few broken ones, for the tests of a server that answers
garbage (``/garbage``), never answers (``/hang``) or answers without end (``/endless``).
"""

from __future__ import annotations

import argparse
import re
import socket
import sys

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

server = MCPServer("crm", instructions="A demo CRM.", log_level="WARNING")


@server.tool()
def lookup_order(order_id: str) -> str:
    """Look an order up by its id."""
    return f"Order {order_id}: shipped"


@server.tool(name="orders.search")
def search_orders(query: str) -> dict[str, object]:
    """Find orders matching a query; the answer is structured."""
    return {"query": query, "orders": ["A-1", "A-2"]}


# Whom each bearer token stands for.
USERS = {"Bearer token-of-alice": "alice", "Bearer token-of-bob": "bob"}


@server.tool()
def whoami(ctx: Context) -> str:
    """Tell whom the credentials of the request that called this tool stand for."""
    headers = ctx.headers or {}
    user = USERS.get(headers.get("authorization", ""), "nobody")
    return f"user={user} tenant={headers.get('x-tenant', '')}"


def _number(text: str) -> float:
    """The first number in a text: the scripted model passes the user's whole message."""
    return float(re.search(r"\d+(?:\.\d+)?", text).group())  # type: ignore[union-attr]


@server.tool()
async def slow(seconds: str) -> str:
    """Answer after the number of seconds given."""
    await anyio.sleep(_number(seconds))
    return f"slept {seconds}"


@server.tool()
def fail(reason: str) -> str:
    """Fail with the reason given."""
    raise ToolError(reason)


@server.tool()
def huge(size: str) -> str:
    """Answer with as many characters as the number given."""
    return "x" * int(_number(size))


@server.tool()
async def add_tool(name: str, ctx: Context) -> str:
    """Add a tool named ``name`` and tell clients the tool list changed."""

    def added() -> str:
        return f"{name} is here"

    server.add_tool(added, name=name, description=f"The tool {name}, added at run time.")
    await ctx.session.send_tool_list_changed()
    return f"added {name}"


@server.custom_route("/garbage", methods=["GET", "POST", "DELETE"])
async def garbage(request: Request) -> Response:
    return PlainTextResponse("<html>this is not JSON-RPC</html>", media_type="application/json")


@server.custom_route("/hang", methods=["GET", "POST", "DELETE"])
async def hang(request: Request) -> Response:
    await anyio.sleep(3600)
    return PlainTextResponse("")


@server.custom_route("/endless", methods=["GET", "POST", "DELETE"])
async def endless(request: Request) -> Response:
    async def chunks():
        # Until the client leaves: once it has, sending returns at once, and a loop that never
        # waited would hold the server's event loop for good.
        while not await request.is_disconnected():
            yield b"x" * 65536
            await anyio.sleep(0)

    return StreamingResponse(chunks(), media_type="application/json")


def serve_http(json_response: bool) -> None:
    import uvicorn

    app = server.streamable_http_app(json_response=json_response)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
    uvicorn_server = uvicorn.Server(config)

    async def serve() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(uvicorn_server.serve, [listener])
            while not uvicorn_server.started:
                await anyio.sleep(0.01)
            print(f"listening on http://127.0.0.1:{port}/mcp", flush=True)

    anyio.run(serve)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--stdio", action="store_true")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    if options.stdio:
        server.run("stdio")
    else:
        serve_http(options.json)
    sys.exit(0)
