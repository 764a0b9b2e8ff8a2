"""The Kubernetes front door: ``kubectl`` -> ``https://bastion:8443/clusters/NAME/...``.

HTTPS only. Each request: the path is checked (``/clusters/NAME/`` and nothing that
could be read two ways), the caller's bearer JWT is verified, policy decides whether
this identity may reach this cluster and namespace, every client ``Authorization`` and
``Impersonate-*`` header is dropped, and the request goes to the API server with the
gateway's own credentials plus ``Impersonate-User`` / ``Impersonate-Group``. Bodies
stream both ways without buffering (watches, ``logs -f``). ``exec``, ``attach`` and
``portforward`` are handed to bastion.doors.kube.exec. Every refusal is a ``Status`` object
kubectl prints; nothing here ever answers with a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from bastion.config import AccessRule, ClusterConfig
from bastion.doors.kube.held import HeldStream
from bastion.doors.kube.logmask import MaskedLogRelay, log_masker
from bastion.doors.kube.policy import PathError, authorize_kube, parse_path, reachable_clusters
from bastion.doors.kube.status import status_response, wants_text_errors
from bastion.doors.kube.tls import ensure_server_cert, server_context, server_names
from bastion.identity import AuthError, Identity
from bastion.identity.delegation import chain_fields
from bastion.refusal import Refused as BaseRefused
from bastion.upstreams.kube.upstream import ClusterUpstream, UpstreamConfigError

if TYPE_CHECKING:
    from bastion.doors.kube.policy import KubeRequest
    from bastion.services import Services

log = logging.getLogger("guarita.kube")

# (door, request, identity, parsed request, cluster, upstream, source, the access rule that allowed it)
StreamingHandler = Callable[..., Awaitable[web.StreamResponse]]

BEARER_PROTOCOL = "base64url.bearer.authorization.k8s.io."
# Request headers never forwarded: hop-by-hop ones, the caller's credentials, and every
# header that asks the API server to act as someone else or trusts a front proxy.
_DROP_REQUEST = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
                 "te", "trailer", "transfer-encoding", "upgrade", "host", "authorization", "cookie",
                 "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "forwarded", "x-real-ip",
                 "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                 "sec-websocket-protocol", "content-length", "expect"}
_DROP_PREFIXES = ("impersonate-", "x-remote-")
_DROP_RESPONSE = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "trailer",
                  "te", "set-cookie"}


class Refused(BaseRefused):
    """A request the gateway answers itself with a Status: ``code`` its HTTP status,
    ``status_reason`` the Status reason (derived from the code when None). One of the
    gateway's refusals (bastion/refusal.py): ``reason`` is the short word audits use."""

    def __init__(self, code: int, message: str, reason: str | None = None) -> None:
        super().__init__(_REFUSAL_WORDS.get(code, "refused"), message, code)
        self.code = code
        self.status_reason = reason


_REFUSAL_WORDS = {400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found",
                  429: "limit", 502: "upstream_error", 503: "unavailable", 504: "upstream_timeout"}


def smuggled_headers(headers: Any) -> list[str]:
    """Names of client headers that try to impersonate or pose as a front proxy."""
    return sorted({k for k in headers if k.lower().startswith(_DROP_PREFIXES)})


def forward_headers(headers: Any) -> CIMultiDict[str]:
    listed = {h.strip().lower() for v in headers.getall("Connection", []) for h in v.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        low = key.lower()
        if low in _DROP_REQUEST or low in listed or low.startswith(_DROP_PREFIXES):
            continue
        out.add(key, value)
    return out


def impersonation(cluster: ClusterConfig, identity: Identity) -> list[tuple[str, str]]:
    """``Impersonate-User`` and one ``Impersonate-Group`` per group of the identity."""
    user = cluster.user_prefix + identity.subject
    if not cluster.user_prefix and user.startswith("system:"):
        raise Refused(403, f"guarita: the subject {identity.subject!r} starts with 'system:', a prefix Kubernetes "
                           "reserves for itself; set user_prefix on the cluster to use it")
    values = [("Impersonate-User", user)]
    for group in identity.groups:
        name = cluster.group_prefix + group
        if not cluster.group_prefix and name.startswith("system:"):
            continue  # never let an identity provider's group name become a Kubernetes built-in group
        values.append(("Impersonate-Group", name))
    for _, value in values:
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise Refused(403, "guarita: the identity's subject or groups contain control characters")
    return values


def bearer_token(request: web.BaseRequest) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    # Browser clients cannot set headers on a WebSocket: the API server accepts the token
    # as a subprotocol "base64url.bearer.authorization.k8s.io.<base64url token>".
    for proto in _header_list(request.headers, "Sec-WebSocket-Protocol"):
        if proto.startswith(BEARER_PROTOCOL):
            encoded = proto[len(BEARER_PROTOCOL):]
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except (binascii.Error, UnicodeDecodeError):
                return None
    return None


def _header_list(headers: Any, name: str) -> list[str]:
    return [p.strip() for v in headers.getall(name, []) for p in v.split(",") if p.strip()]


def source_of(request: web.BaseRequest) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return f"{peer[0]}:{peer[1]}" if peer else (request.remote or "?")


class KubeFrontDoor:
    """The Kubernetes listener (a :class:`bastion.doors.FrontDoor`): HTTPS, one handler per request."""

    def __init__(self, gateway: Services, streaming: Mapping[str, StreamingHandler] | None = None) -> None:
        self.gw = gateway
        # exec, attach, portforward (bastion/doors/kube/exec.py), given by the gateway: that module
        # builds on this one.
        self.streaming = dict(streaming or {})
        self.upstreams = {c.name: ClusterUpstream(c) for c in gateway.config.clusters}
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.ca_pem: bytes = b""
        self.relays: set[Any] = set()  # live port-forward relays (closed at shutdown)
        self.tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            with contextlib.suppress(Exception):
                await self.stop()  # the upstreams already started
            raise

    async def _start(self) -> None:
        config = self.gw.config
        for name, upstream in self.upstreams.items():
            try:
                await upstream.start()
            except UpstreamConfigError as exc:
                raise RuntimeError(f"cluster {name}: {exc}") from None
        if config.kube_tls_cert and config.kube_tls_key:
            cert, key = config.kube_tls_cert, config.kube_tls_key
            self.ca_pem = cert.read_bytes()
        else:
            names = server_names(config.kube_listen[0], config.kube_server_names)
            cert, key, self.ca_pem = await asyncio.to_thread(ensure_server_cert, config.data_dir, names)
        context = server_context(cert, key)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True, auto_decompress=False,
                                    max_line_size=65536, max_field_size=65536, shutdown_timeout=2.0)
        await self.runner.setup()
        from bastion.http.badrequest import install

        # Unparsable requests: a Kubernetes Status, audited (bastion/http/badrequest.py).
        install(self.runner, "kube", lambda code, msg: status_response(code, f"guarita: {msg}"), self.gw.audit.emit)
        host, port = config.kube_listen
        site = web.TCPSite(self.runner, host, port, ssl_context=context)
        await site.start()
        server = site._server  # noqa: SLF001 - the only way to learn the port when 0 was asked
        sockets = getattr(server, "sockets", None)
        self.port = sockets[0].getsockname()[1] if sockets else port

    async def stop_accepting(self) -> None:
        """The listener closes; requests and streams already open go on."""
        if self.runner is not None:
            for site in list(self.runner.sites):
                with contextlib.suppress(Exception):
                    await site.stop()

    async def stop(self) -> None:
        for relay in list(self.relays):
            await relay.close("gateway shutting down")
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for upstream in self.upstreams.values():
            await upstream.close()

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- every request ------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        source = source_of(request)
        if self.gw.draining:  # SIGTERM: no new requests (bastion/lifecycle.py)
            return status_response(503, "guarita: this gateway is shutting down; retry to reach another replica",
                                   "ServiceUnavailable")
        try:
            req = parse_path(request.raw_path)
        except PathError as exc:
            self.gw.audit.emit("kube.refused", reason="bad_path", path=request.raw_path[:300], source=source,
                               detail=str(exc))
            return status_response(400, f"guarita: {exc}")
        text = wants_text_errors(request.headers.get("Accept", ""), req.discovery)
        token = bearer_token(request)
        try:
            if token is None:
                raise AuthError("missing_token", "no bearer token")
            identity = await self.gw.verifier.verify(token, method="bearer")
        except AuthError as exc:
            self.gw.audit.emit("auth.failure", method="bearer", front_door="kube", source=source,
                               cluster=req.cluster, reason=exc.reason, detail=str(exc))
            return status_response(401, _auth_message(exc), text=text)
        smuggled = smuggled_headers(request.headers)
        if smuggled:
            # Dropped below either way; the attempt itself belongs in the audit log.
            self.gw.audit.emit("kube.impersonation_stripped", subject=identity.subject, source=source,
                               cluster=req.cluster, headers=smuggled)
        try:
            response = await self._dispatch(request, identity, req, source)
        except Refused as exc:
            response = status_response(exc.code, str(exc), exc.status_reason, text=text)
        if not isinstance(response, web.WebSocketResponse):
            self.gw.audit.emit("kube.request", subject=identity.subject, source=source, cluster=req.cluster,
                               method=request.method, path=req.raw_path[:500], namespace=req.namespace,
                               resource=req.resource, status=response.status,
                               duration=round(time.monotonic() - started, 3), **chain_fields(identity))
        return response

    async def _dispatch(self, request: web.Request, identity: Identity, req: KubeRequest,
                        source: str) -> web.StreamResponse:
        cluster = self.gw.config.cluster(req.cluster)
        if cluster is None:
            known = reachable_clusters(self.gw.config, identity)
            hint = f" (clusters you may use: {', '.join(known)})" if known else ""
            raise Refused(404, f"guarita: no cluster named {req.cluster!r}{hint}")
        decision = authorize_kube(self.gw.config, identity, req)
        if not decision.allowed:
            event = "kube.portforward.denied" if req.needs_port_forward else "kube.denied"
            self.gw.audit.emit(event, subject=identity.subject, source=source, cluster=req.cluster,
                               namespace=req.namespace, method=request.method, path=req.raw_path[:500],
                               reason=decision.reason, ports=request.query.getall("ports", None),
                               **chain_fields(identity))
            raise Refused(403, decision.reason)
        lock = self.gw.control.locked(identity, cluster.name)
        if lock is not None:  # every request, not only sessions (bastion/control)
            self.gw.audit.emit("kube.refused", reason="locked", lock=lock.id, subject=identity.subject,
                               source=source, cluster=req.cluster, method=request.method, path=req.raw_path[:500])
            raise Refused(403, f"guarita: {lock.refusal()}")
        upstream = self.upstreams[cluster.name]
        if req.streaming is not None:
            handler = self.streaming.get(req.streaming)
            if handler is None:
                raise Refused(400, f"guarita: {req.streaming} is not served by this gateway")
            return await handler(self, request, identity, req, cluster, upstream, source, decision.rule)
        if "upgrade" in request.headers.get("Connection", "").lower() or request.headers.get("Upgrade"):
            raise Refused(400, "guarita: protocol upgrades (WebSocket, SPDY) are relayed only for exec, attach and "
                               "port-forward")
        return await self.proxy(request, identity, req, cluster, upstream, decision.rule)

    # -- plain requests, watches and logs ------------------------------------------------

    async def proxy(self, request: web.Request, identity: Identity, req: KubeRequest, cluster: ClusterConfig,
                    upstream: ClusterUpstream, rule: AccessRule | None = None) -> web.StreamResponse:
        creds = await upstream.credentials()
        headers = forward_headers(request.headers)
        for key, value in (*creds.auth_headers().items(), *impersonation(cluster, identity)):
            headers.add(key, value)
        headers["X-Forwarded-For"] = request.remote or ""
        masker = log_masker(self.gw, req, cluster.name, identity)
        if masker is not None:  # the masker reads plain text: no compression on this response
            headers.popall("Accept-Encoding", None)
            headers["Accept-Encoding"] = "identity"
        query = request.raw_path.partition("?")[2]
        url = URL(creds.server + req.raw_path + (f"?{query}" if query else ""), encoded=True)
        body: Any = None
        if request.body_exists:
            body = request.content.iter_chunked(256 * 1024)
            if request.content_length is not None:
                headers["Content-Length"] = str(request.content_length)
        assert upstream.session is not None
        try:
            async with asyncio.timeout(cluster.response_timeout):
                resp = await upstream.session.request(request.method, url, headers=headers, data=body,
                                                      ssl=creds.ssl, server_hostname=creds.server_hostname,
                                                      allow_redirects=False)
        except TimeoutError:
            raise Refused(504, f"guarita: the API server of cluster {cluster.name!r} did not answer within "
                               f"{cluster.response_timeout:g}s") from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise Refused(502, f"guarita: the API server of cluster {cluster.name!r} has a certificate the "
                               f"gateway does not trust: {exc.certificate_error}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise Refused(502, f"guarita: cannot reach the API server of cluster {cluster.name!r}: "
                               f"{_short(exc)}") from None
        try:
            if masker is not None and resp.headers.get("Content-Encoding", "identity").lower() != "identity":
                raise Refused(502, f"guarita: the API server of cluster {cluster.name!r} compressed a log stream "
                                   "that guarita must mask; it is not passed on")
            out = web.StreamResponse(status=resp.status, reason=resp.reason)
            for key, value in resp.headers.items():
                if key.lower() not in _DROP_RESPONSE and not (masker is not None and key.lower() == "content-length"):
                    out.headers.add(key, value)
            await out.prepare(request)
            if masker is not None:
                body = MaskedLogRelay(self.gw, masker, {
                    "subject": identity.subject, "cluster": cluster.name, "namespace": req.namespace,
                    "pod": req.name, "container": request.query.get("container"), "status": resp.status,
                }).relay(resp, out)
            else:
                body = _copy(resp, out)
            try:
                if _long_lived(request):
                    if await self._held(body, request, identity, req, cluster, resp, out, rule):
                        return out  # ended by the gateway (lock, kill, expiry)
                else:
                    await body
            except (aiohttp.ClientError, TimeoutError) as exc:
                # Headers are gone already: the only honest signal left is a cut connection.
                log.info("cluster %s: upstream stream ended: %s", cluster.name, _short(exc))
                if request.transport is not None:
                    request.transport.close()
                return out
            await out.write_eof()
            return out
        finally:
            resp.release()


    async def _held(self, body: Coroutine[Any, Any, None], request: web.Request, identity: Identity,
                    req: KubeRequest, cluster: ClusterConfig, resp: aiohttp.ClientResponse,
                    out: web.StreamResponse, rule: AccessRule | None) -> bool:
        """A watch or followed log, held to its caller (bastion/doors/kube/held.py); True if the
        gateway ended it: the client gets the reason as a last watch event or log line."""
        relay = asyncio.create_task(body)

        def stop(message: str) -> None:
            relay.cancel()

        held = HeldStream(self.gw, "stream", identity, request.remote or "", cluster.name,
                          {"namespace": req.namespace, "resource": req.resource, "name": req.name,
                           "subresource": req.subresource}, stop, rule)
        try:
            with held:
                await relay
            return False
        except asyncio.CancelledError:
            if not held.stopping or not relay.cancelled():
                raise
            await _last_word(resp, out, held.reason or "ended by the gateway")
            if request.transport is not None:
                request.transport.close()
            return True
        finally:
            relay.cancel()


async def _copy(resp: aiohttp.ClientResponse, out: web.StreamResponse) -> None:
    async for chunk in resp.content.iter_any():
        await out.write(chunk)


def _long_lived(request: web.Request) -> bool:
    """A watch or a followed log: open until someone closes it."""
    return any(request.query.get(key, "").lower() in ("1", "true") for key in ("watch", "follow"))


async def _last_word(resp: aiohttp.ClientResponse, out: web.StreamResponse, reason: str) -> None:
    """Why the gateway ends a stream, in the stream's own terms: an ERROR watch event with a
    Status (kubectl prints its message), or a line of text in a log."""
    message = f"guarita: {reason}"
    kind = resp.headers.get("Content-Type", "")
    if "json" in kind:
        event = {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                             "status": "Failure", "message": message, "reason": "Forbidden",
                                             "code": 403}}
        data = json.dumps(event).encode() + b"\n"
    elif kind.startswith("text/"):
        data = f"\n{message}\n".encode()
    else:
        return
    with contextlib.suppress(ConnectionError, RuntimeError):
        await out.write(data)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:300]


def _auth_message(exc: AuthError) -> str:
    if exc.reason == "missing_token":
        return ("guarita: no bearer token: use a kubeconfig from `bastion kubeconfig`, whose credential plugin "
                "is `bastion token --exec-credential`")
    if exc.reason == "expired":
        return "guarita: the bearer token has expired: get a fresh one"
    return "guarita: the bearer token was not accepted"
