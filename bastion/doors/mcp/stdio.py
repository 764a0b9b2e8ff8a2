"""``bastion mcp``: the MCP door over stdio, for clients that only launch local servers.

A thin relay built of the SDK's own parts: a low-level MCP server on stdin/stdout whose
tools/list and tools/call are forwarded to the gateway's ``/mcp`` by the SDK's streamable-HTTP
client, with the caller's token obtained as `bastion token` does (again for every request,
so a refreshed login is picked up). Progress notifications from the gateway (an approval
wait) are relayed to the local client. Nothing is decided here: the gateway runs the
session, checks the token and records everything.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import httpx2
import mcp_types as types
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server


class _FreshToken(httpx2.Auth):
    """The bearer token, obtained again for every request (it may have been refreshed)."""

    def __init__(self, obtain: Callable[[], str | None]) -> None:
        self.obtain = obtain

    def auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response, None]:
        token = self.obtain()
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        yield request


def _error(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=True)


async def serve_stdio(gateway_url: str, obtain: Callable[[], str | None]) -> None:
    url = gateway_url.rstrip("/") + "/mcp"
    async with httpx2.AsyncClient(auth=_FreshToken(obtain), timeout=httpx2.Timeout(30, read=3600)) as http, \
            Client(streamable_http_client(url, http_client=http)) as upstream:

        async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
            return await upstream.list_tools()

        async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
            async def relay(progress: float, total: float | None, message: str | None) -> None:
                await ctx.session.report_progress(progress, total, message)

            try:
                return await upstream.call_tool(params.name, params.arguments or {}, progress_callback=relay)
            except httpx2.HTTPError as exc:
                return _error(f"guarita: cannot reach the gateway at {url}: {exc}")

        server: Server[Any] = Server("guarita", instructions=upstream.instructions,
                                     on_list_tools=list_tools, on_call_tool=call_tool)
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())
