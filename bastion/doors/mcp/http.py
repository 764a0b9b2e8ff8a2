"""``/mcp`` on the gateway's HTTP API: the MCP SDK's streamable-HTTP app, mounted in aiohttp.

The SDK serves ASGI (Starlette); the HTTP API is aiohttp. Rather than a second listener, the
routes below hand each ``/mcp`` request to the SDK's app through a small ASGI adapter (one
request: its body in, the response streamed out, so progress notifications reach the client
as they are sent). The bearer token is verified here first, with the gateway's own
TokenVerifier, exactly as for the rest of the API: a refused token never reaches the SDK, and
the verified Identity rides in the ASGI scope to the tools. The SDK runs stateless (every
POST carries its own token and is checked on its own), so a token that expires between two
calls stops the next one, and one that expires during a call ends its session
(bastion/session.py's limits). See docs/decisions.md.

``/.well-known/oauth-protected-resource`` (and ``.../mcp``, RFC 9728's path form) tells MCP
clients which issuers' tokens the resource accepts, per the MCP authorization spec.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from aiohttp import web
from mcp.server.transport_security import TransportSecuritySettings

from bastion.doors import FrontDoor
from bastion.doors.mcp.tools import build_server
from bastion.identity import AuthError, Identity
from bastion.identity.delegation import chain_fields

if TYPE_CHECKING:
    from bastion.services import Services

MCP_PATH = "/mcp"
METADATA_PATH = "/.well-known/oauth-protected-resource"
_DISCONNECT_POLL = 0.25


class McpHttpDoor:
    """The MCP door (a :class:`bastion.doors.FrontDoor`), mounted on the HTTP API's listener:
    started and stopped with that listener's app, which accepts for it."""

    def __init__(self, gw: Services) -> None:
        self.gw = gw
        self.server, self.tools = build_server(gw)
        # Stateless: no Mcp-Session-Id to track across replicas, each request authenticated on its
        # own. DNS-rebinding protection guards unauthenticated local servers; every request here
        # carries a bearer token a rebinding page does not have.
        self.app = self.server.streamable_http_app(
            streamable_http_path=MCP_PATH, stateless_http=True,
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle (the SDK's session manager runs in a task group of its own) ---------------------

    async def start(self) -> None:
        ready = asyncio.Event()

        async def serve() -> None:
            async with self.server.session_manager.run():
                ready.set()
                await self._stop.wait()

        self._task = asyncio.create_task(serve(), name="mcp-session-manager")
        await asyncio.wait([self._task, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED)

    async def stop_accepting(self) -> None:
        """Nothing of its own: the HTTP API stays up through the drain, and admission refuses
        new tool calls while the gateway drains."""

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._task, 5)

    # -- routes ---------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("*", MCP_PATH, self.handle)
        app.router.add_get(METADATA_PATH, self.metadata)
        app.router.add_get(METADATA_PATH + MCP_PATH, self.metadata)
        app.on_startup.append(lambda _app: self.start())
        app.on_cleanup.append(lambda _app: self.stop())

    @staticmethod
    def _origin(request: web.Request) -> str:
        return f"{request.scheme}://{request.host}"

    async def metadata(self, request: web.Request) -> web.Response:
        """RFC 9728 protected-resource metadata: which authorization servers to get a token from."""
        body = {"resource": self._origin(request) + MCP_PATH,
                "authorization_servers": [i.issuer for i in self.gw.config.issuers],
                "bearer_methods_supported": ["header"], "resource_name": "guarita",
                "resource_documentation": "https://github.com/guarita/guarita/blob/main/docs/mcp.md"}
        return web.json_response(body, headers={"Access-Control-Allow-Origin": "*"})

    def _unauthorized(self, request: web.Request, error: str, description: str) -> web.Response:
        meta = self._origin(request) + METADATA_PATH + MCP_PATH
        safe = description.replace('"', "'").replace("\\", "/")
        header = f'Bearer error="{error}", error_description="{safe}", resource_metadata="{meta}"'
        return web.json_response({"error": error, "error_description": description}, status=401,
                                 headers={"WWW-Authenticate": header})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        source = f"{request.remote}:mcp"
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self.gw.audit.emit("auth.failure", method="mcp", source=source, reason="no_token",
                               detail="no bearer token on /mcp")
            return self._unauthorized(request, "invalid_token", "a bearer token (OIDC access token) is required")
        try:
            identity = await self.gw.verifier.verify(token.strip(), method="bearer")
        except AuthError as exc:
            self.gw.audit.emit("auth.failure", method="mcp", source=source, reason=exc.reason, detail=str(exc))
            return self._unauthorized(request, "invalid_token", str(exc))
        if request.method == "POST":
            self.gw.audit.emit("auth.success", method="mcp", source=source, subject=identity.subject,
                               issuer=identity.issuer, **chain_fields(identity))
        return await self._asgi(request, identity, source)

    # -- the ASGI adapter -----------------------------------------------------------------------

    async def _asgi(self, request: web.Request, identity: Identity, source: str) -> web.StreamResponse:
        body = await request.read()
        host, port = (request.transport.get_extra_info("sockname") or ("127.0.0.1", 0))[:2] \
            if request.transport is not None else ("127.0.0.1", 0)
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
            "scheme": request.scheme, "path": request.path, "raw_path": request.raw_path.split("?")[0].encode(),
            "query_string": request.query_string.encode(), "root_path": "",
            "headers": [(k.lower(), v) for k, v in request.raw_headers],
            "client": (request.remote or "", 0), "server": (host, port), "state": {},
            "guarita.identity": identity, "guarita.source": source,
        }
        delivered = False
        finished = False
        response: web.StreamResponse | None = None

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            # After the body, the only news is the client going away (a closed response stream
            # cancels the request in MCP): aiohttp has no event for it, so look at the socket.
            # A finished response counts too, so no watcher outlives its request on a kept-alive
            # connection.
            while not finished and request.transport is not None and not request.transport.is_closing():
                await asyncio.sleep(_DISCONNECT_POLL)
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal response, finished
            if message["type"] == "http.response.start":
                response = web.StreamResponse(status=message["status"])
                for name, value in message.get("headers") or ():
                    key = name.decode("latin-1")
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        response.headers.add(key, value.decode("latin-1"))
                await response.prepare(request)
            elif message["type"] == "http.response.body" and response is not None:
                chunk = message.get("body") or b""
                if chunk:
                    await response.write(chunk)
                if not message.get("more_body"):
                    finished = True
                    await response.write_eof()

        try:
            await self.app(scope, receive, send)
        except ConnectionError:  # aiohttp's ClientConnectionResetError too
            pass  # the client went away mid-response; the SDK has cancelled what it was doing
        finally:
            finished = True
        if response is None:
            return web.json_response({"error": "no response from the MCP server"}, status=500)
        return response


def add_mcp_routes(app: web.Application, gw: Services) -> FrontDoor:
    door = McpHttpDoor(gw)
    door.add_routes(app)
    return door
