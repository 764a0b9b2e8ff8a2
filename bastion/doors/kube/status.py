"""Kubernetes ``Status`` objects: the error body kubectl knows how to print."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
           500: "InternalError", 502: "ServiceUnavailable", 503: "ServiceUnavailable", 504: "Timeout"}


def status(code: int, message: str, reason: str | None = None, details: dict[str, Any] | None = None,
           success: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Success" if success else "Failure", "message": message,
                            "reason": reason or REASONS.get(code, "Unknown"), "code": code}
    if success:
        body.pop("reason")
        body.pop("message")
    if details:
        body["details"] = details
    return body


def status_response(code: int, message: str, reason: str | None = None, text: bool = False) -> web.Response:
    """A Status body; ``text`` sends the message as text/plain instead, for kubectl's discovery
    client, which cannot decode a JSON Status and would print "unknown" (it prints text as is)."""
    headers = {"Cache-Control": "no-store"}
    if code == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="guarita"'
    if text:
        return web.Response(status=code, text=message, content_type="text/plain", headers=headers)
    return web.Response(status=code, body=json.dumps(status(code, message, reason)).encode(),
                        content_type="application/json", headers=headers)


def wants_text_errors(accept: str, discovery: bool) -> bool:
    return discovery or "apidiscovery.k8s.io" in accept


def exit_status(code: int) -> dict[str, Any]:
    """What the API server sends on the error channel when a command ends."""
    if code == 0:
        return {"metadata": {}, "status": "Success"}
    return {"metadata": {}, "status": "Failure", "message": f"command terminated with non-zero exit code: {code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}


def parse_exit(body: dict[str, Any]) -> tuple[int | None, str | None]:
    """(exit code, failure message) from an error-channel Status."""
    if body.get("status") == "Success":
        return 0, None
    if body.get("reason") == "NonZeroExitCode":
        for cause in (body.get("details") or {}).get("causes") or []:
            if cause.get("reason") == "ExitCode":
                try:
                    return int(cause.get("message")), None
                except (TypeError, ValueError):
                    break
    return None, str(body.get("message") or "the command failed")
