"""The HTTP API: health, certificates for agents, and the dev issuer's discovery and keys.

Every call but health and the dev issuer's public documents needs an OIDC bearer token.
"""

from __future__ import annotations

import fnmatch
import ssl
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bastion.config import is_loopback
from bastion.identity import AuthError, Identity

if TYPE_CHECKING:
    from bastion.services import Services

GATEWAY_KEY = web.AppKey("gateway", object)
MAX_BODY = 64 * 1024


def _error(status: int, reason: str, message: str) -> web.Response:
    return web.json_response({"error": reason, "message": message}, status=status)


async def _identity(request: web.Request) -> Identity:
    gw: Services = request.app[GATEWAY_KEY]  # type: ignore[assignment]
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("missing_token", "send 'Authorization: Bearer TOKEN'")
    return await gw.verifier.verify(token.strip(), method="bearer")


def _authenticated(handler: Any) -> Any:
    async def wrapper(request: web.Request) -> web.StreamResponse:
        gw: Services = request.app[GATEWAY_KEY]  # type: ignore[assignment]
        try:
            identity = await _identity(request)
        except AuthError as exc:
            gw.audit.emit("auth.failure", method="bearer", source=request.remote, path=request.path,
                          reason=exc.reason, detail=str(exc))
            return _error(401, "unauthorized", "the bearer token was not accepted"
                          if exc.reason != "missing_token" else str(exc))
        return await handler(request, identity)

    return wrapper


async def healthz(request: web.Request) -> web.Response:
    """Alive (stays 200 while draining, so the platform does not kill a draining gateway)."""
    gw: Services = request.app[GATEWAY_KEY]  # type: ignore[assignment]
    return web.json_response({"status": "ok", "draining": gw.draining},
                             headers={"Cache-Control": "no-store"})


async def readyz(request: web.Request) -> web.Response:
    """Ready for new connections: store, state database, OIDC keys, not draining (bastion/health.py)."""
    gw: Services = request.app[GATEWAY_KEY]  # type: ignore[assignment]
    ready, body = await gw.readiness.report()
    return web.json_response(body, status=200 if ready else 503, headers={"Cache-Control": "no-store"})


def metrics_public(gw: Services) -> bool:
    """``gateway.metrics_public``; unset: public unless roles exist and the API is not on loopback."""
    config = gw.config
    if config.dev:
        return True
    if config.metrics_public is not None:
        return config.metrics_public
    roles = getattr(config, "roles", None)
    members = [getattr(roles, name, None) for name in ("operators", "auditors")]
    has_roles = any(m is not None and (m.subjects or m.groups) for m in members)
    return is_loopback(config.http_listen[0]) or not has_roles


def may_read_metrics(gw: Services, identity: Identity) -> bool:
    """Operators and auditors ([roles]) read metrics when they are not public."""
    roles = gw.config.roles
    for members in (roles.operators, roles.auditors):
        if any(fnmatch.fnmatchcase(identity.subject, p) or (identity.email and fnmatch.fnmatchcase(identity.email, p))
               for p in members.subjects):
            return True
        if any(fnmatch.fnmatchcase(g, p) for g in identity.groups for p in members.groups):
            return True
    return False


async def metrics(request: web.Request) -> web.StreamResponse:
    """Prometheus metrics (bastion/metrics.py)."""
    gw: Services = request.app[GATEWAY_KEY]  # type: ignore[assignment]
    if not metrics_public(gw):
        try:
            identity = await _identity(request)
        except AuthError as exc:
            gw.audit.emit("auth.failure", method="bearer", source=request.remote, path=request.path,
                          reason=exc.reason, detail=str(exc))
            return _error(401, "unauthorized", "metrics need the bearer token of an operator or auditor "
                          "(or gateway.metrics_public = true)")
        if not may_read_metrics(gw, identity):
            return _error(403, "forbidden", f"{identity.display} may not read metrics: it takes the operator or "
                          "auditor role ([roles])")
    from bastion.metrics import CONTENT_TYPE

    await gw.metrics.refresh()
    return web.Response(body=gw.metrics.render(), headers={"Content-Type": CONTENT_TYPE,
                                                           "Cache-Control": "no-store"})


@_authenticated
async def ssh_cert(request: web.Request, identity: Identity) -> web.Response:
    gw: Services = request.app[GATEWAY_KEY]  # type: ignore[assignment]
    try:
        body = await request.json()
        public_key = str(body["public_key"])
        ttl = float(body.get("ttl") or gw.user_ca.max_ttl)
    except (ValueError, KeyError, TypeError):
        return _error(400, "bad_request", 'send JSON {"public_key": "ssh-ed25519 AAAA...", "ttl": seconds}')
    try:
        cert, expires = gw.user_ca.issue(identity, public_key, ttl)
    except ValueError as exc:
        return _error(400, "bad_public_key", str(exc))
    except AuthError as exc:
        return _error(400, exc.reason, str(exc))
    gw.audit.emit("cert.issued", subject=identity.subject, issuer=identity.issuer, source=request.remote,
                  expires_at=expires)
    return web.json_response({"certificate": cert, "expires_at": expires, "identity": identity.to_dict()})


@_authenticated
async def whoami(request: web.Request, identity: Identity) -> web.Response:
    from bastion.control import roles_of

    gw: Services = request.app[GATEWAY_KEY]  # type: ignore[assignment]
    return web.json_response(identity.to_dict() | {"method": identity.method,
                                                   "roles": roles_of(gw.config.roles, identity)})


async def kube_ca(request: web.Request) -> web.Response:
    """The CA that signs the Kubernetes front door's certificate (public, like any CA
    certificate: `bastion kubeconfig` puts it in the kubeconfig it writes)."""
    gw: Services = request.app[GATEWAY_KEY]  # type: ignore[assignment]
    kube = gw.kube
    if kube is None or not kube.ca_pem:
        return _error(404, "no_kube", "this gateway serves no Kubernetes clusters (configure [[clusters]])")
    return web.Response(body=kube.ca_pem, content_type="application/x-pem-file",
                        headers={"Guarita-Kube-Port": str(kube.port)})


# -- approvals ------------------------------------------------------------------------------


def _approval_json(row: dict[str, Any]) -> dict[str, Any]:
    from bastion.approvals.webhooks import public_request

    return public_request(row)


@_authenticated
async def approvals_list(request: web.Request, identity: Identity) -> web.Response:
    """Requests the caller may act on (in an approver group) or made; ``?status=pending``."""
    gw: Services = request.app[GATEWAY_KEY]  # type: ignore[assignment]
    status = request.query.get("status") or None
    if status == "all":
        status = None
    if status not in (None, "pending", "approved", "denied", "expired", "cancelled"):
        return _error(400, "bad_status", "status must be pending, approved, denied, expired, cancelled or all")
    try:
        limit = max(1, min(int(request.query.get("limit") or 200), 1000))
    except ValueError:
        return _error(400, "bad_limit", "limit must be a number")
    rows = await gw.approvals.state.list_requests(status=status, limit=limit)
    visible = [_approval_json(r) for r in rows if gw.approvals.may_view(r, identity)]
    return web.json_response({"approvals": visible})


@_authenticated
async def approvals_show(request: web.Request, identity: Identity) -> web.Response:
    gw: Services = request.app[GATEWAY_KEY]  # type: ignore[assignment]
    rid = request.match_info["id"]
    row = await gw.approvals.state.get_request(rid)
    if row is None:
        return _error(404, "not_found", f"no approval request {rid!r}")
    if not gw.approvals.may_view(row, identity):
        return _error(403, "forbidden", f"{identity.display} is neither the requester nor in an approver group "
                                        f"of request {rid}")
    return web.json_response(_approval_json(row))


async def _decide(request: web.Request, identity: Identity, decision: str) -> web.Response:
    from bastion.approvals.engine import DecisionError

    gw: Services = request.app[GATEWAY_KEY]  # type: ignore[assignment]
    rid = request.match_info["id"]
    try:
        body = await request.json() if request.can_read_body else {}
        if not isinstance(body, dict):
            raise ValueError("not an object")
        reason = str(body.get("reason") or "")
    except ValueError:
        return _error(400, "bad_request", 'send JSON {"reason": "why"}')
    try:
        row = await gw.approvals.decide(rid, identity, decision, reason)
    except DecisionError as exc:
        return _error(exc.status, exc.code, str(exc))
    return web.json_response(_approval_json(row))


@_authenticated
async def approvals_approve(request: web.Request, identity: Identity) -> web.Response:
    return await _decide(request, identity, "approve")


@_authenticated
async def approvals_deny(request: web.Request, identity: Identity) -> web.Response:
    return await _decide(request, identity, "deny")


async def dev_discovery(request: web.Request) -> web.Response:
    gw: Services = request.app[GATEWAY_KEY]  # type: ignore[assignment]
    assert gw.dev_issuer is not None
    return web.json_response(gw.dev_issuer.discovery())


async def dev_jwks(request: web.Request) -> web.Response:
    gw: Services = request.app[GATEWAY_KEY]  # type: ignore[assignment]
    assert gw.dev_issuer is not None
    return web.json_response(gw.dev_issuer.jwks())


async def dev_token(request: web.Request) -> web.Response:
    """Mint a token from the dev issuer. Only in --dev, only from loopback."""
    gw: Services = request.app[GATEWAY_KEY]  # type: ignore[assignment]
    assert gw.dev_issuer is not None
    if not (request.remote or "").startswith("127.") and request.remote != "::1":
        return _error(403, "forbidden", "dev tokens are minted only for loopback callers")
    try:
        body = await request.json()
        token = gw.dev_issuer.mint(str(body["sub"]), groups=[str(g) for g in body.get("groups") or []],
                                   email=body.get("email"), ttl=float(body.get("ttl") or 3600),
                                   extra=body.get("claims") or None)
    except (ValueError, KeyError, TypeError) as exc:
        return _error(400, "bad_request", f'send JSON {{"sub": "...", "groups": [...], "ttl": seconds}} ({exc})')
    return web.json_response({"token": token})


def _api_error(status: int, message: str) -> web.Response:
    reason = {404: "not_found", 405: "method_not_allowed"}.get(status, "bad_request" if status < 500 else "internal")
    return _error(status, reason, message)


def build_app(gw: Services, more_routes: Sequence[Callable[[web.Application], None]] = ()) -> web.Application:
    from bastion.http.badrequest import route_errors

    app = web.Application(client_max_size=MAX_BODY, middlewares=[route_errors("api", _api_error, gw.audit.emit)])
    app[GATEWAY_KEY] = gw
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/ssh/cert", ssh_cert)
    app.router.add_get("/v1/whoami", whoami)
    app.router.add_get("/v1/approvals", approvals_list)
    app.router.add_get("/v1/approvals/{id}", approvals_show)
    app.router.add_post("/v1/approvals/{id}/approve", approvals_approve)
    app.router.add_post("/v1/approvals/{id}/deny", approvals_deny)
    app.router.add_get("/v1/kube/ca", kube_ca)
    # Given by the composition root (bastion/gateway.py), whose modules build on this one: locks,
    # live sessions and kills (bastion/http/control_api.py), the MCP door, the web console.
    for add in more_routes:
        add(app)
    if gw.dev_issuer is not None:
        app.router.add_get("/dev/.well-known/openid-configuration", dev_discovery)
        app.router.add_get("/dev/jwks", dev_jwks)
        app.router.add_post("/dev/token", dev_token)
    return app


class HttpApi:
    """The HTTP API's listener (health, metrics, approvals, the console, and the doors mounted
    on it: MCP). A :class:`bastion.doors.FrontDoor`, but not among the gateway's session doors:
    it starts before the token verifier (the dev issuer's keys are served here) and stays up
    through the drain (``/readyz`` answers 503, approvers decide on held commands, metrics are
    scraped) until the recordings are sealed."""

    def __init__(self, gw: Services, more_routes: Sequence[Callable[[web.Application], None]] = ()) -> None:
        self.gw = gw
        self.more_routes = more_routes
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        from bastion.http.badrequest import install

        gw = self.gw
        self.runner = runner = web.AppRunner(build_app(gw, self.more_routes), access_log=None)
        await runner.setup()
        install(runner, "api", _api_error, gw.audit.emit)  # unparsable requests: JSON, audited
        host, port = gw.config.http_listen
        context = None
        if gw.config.tls_cert and gw.config.tls_key:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(gw.config.tls_cert, gw.config.tls_key)
        site = web.TCPSite(runner, host, port, ssl_context=context)
        await site.start()
        server = site._server  # noqa: SLF001 - the only way to learn the port when 0 was asked
        sockets = getattr(server, "sockets", None)
        self.port = sockets[0].getsockname()[1] if sockets else port

    async def stop_accepting(self) -> None:
        """Nothing: the API serves the drain itself (see the class)."""

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()  # then the mounted doors' on_cleanup (MCP)
            self.runner = None
