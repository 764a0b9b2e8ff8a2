"""Requests aiohttp cannot parse (an oversized header, a NUL in a header, ``GET *``, a path
with invalid characters) and paths no route matches: a JSON error (a Kubernetes ``Status``
on the kube door), an audit event, and one log line, never a traceback.

aiohttp answers a request its parser refuses from ``RequestHandler.handle_error``, in
text/plain, and logs the parser's exception with its traceback. It has no hook for that
answer, so :func:`install` gives each connection's handler our ``handle_error``: the
runner's server becomes a subclass whose handlers carry it. tests/test_http_malformed.py
fails if aiohttp changes this.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web, web_protocol

log = logging.getLogger("guarita.http")

# What a front door answers: (HTTP status, one-line message) -> its error response.
Respond = Callable[[int, str], web.Response]
Audit = Callable[..., None]


def install(runner: web.AppRunner, front_door: str, respond: Respond, audit: Audit) -> None:
    """After ``runner.setup()``: parser errors of every connection answered by ``respond``."""
    server = runner.server
    assert server is not None

    class _Handler(web_protocol.RequestHandler):  # type: ignore[misc]
        __slots__ = ()  # the same layout: an existing handler can take this class

        def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                         message: str | None = None) -> web.StreamResponse:
            if status >= 500:  # a bug in a handler: keep aiohttp's log (with its traceback), answer JSON
                super().handle_error(request, status, exc, message)
                reply = "internal error"
            else:
                reply = _one_line(message or (str(exc) if exc else "") or "bad request")
                source = request.remote or "?"
                log.warning("%s: bad HTTP request from %s refused: %s", front_door, source, reply)
                audit("http.bad_request", front_door=front_door, source=source, status=status, detail=reply)
                if request.writer.output_size > 0:
                    raise ConnectionError("a response was already sent, cannot send the error")
            response = respond(status, reply)
            response.force_close()
            return response

    class _Server(type(server)):  # type: ignore[misc]
        def __call__(self) -> web_protocol.RequestHandler:
            handler = super().__call__()
            handler.__class__ = _Handler
            return handler

    server.__class__ = _Server


def _one_line(text: str, limit: int = 200) -> str:
    """The parser's message without the request bytes it quotes (they may be huge or binary)."""
    first = text.strip().splitlines()[0] if text.strip() else "bad request"
    first = first.rstrip(":").strip()
    if first.startswith("Got more than"):
        first = "a request line or header is too long"
    return first[:limit]


def route_errors(front_door: str, respond: Respond, audit: Audit) -> Callable[..., Awaitable[web.StreamResponse]]:
    """A middleware: a request no route matches (404, 405) gets ``respond``'s error and is audited."""

    @web.middleware
    async def middleware(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        miss: Any = getattr(request.match_info, "http_exception", None)
        if miss is None:
            return await handler(request)
        status = int(getattr(miss, "status", 404))
        what = "no such path" if status == 404 else f"method {request.method} not allowed here"
        audit("http.bad_request", front_door=front_door, source=request.remote or "?", status=status,
              detail=what, path=request.raw_path[:300])
        return respond(status, f"{what}: {request.raw_path[:200]}")

    return middleware

