"""``exec_in_pod`` and ``list_pods``: Kubernetes through the MCP door.

An exec is a :class:`bastion.doors.mcp.calls.Call` whose command runs in a pod: the same access
rules as ``kubectl exec`` through the Kubernetes front door (cluster, namespace), the same
approval rules (matched on the exact argv, with the cluster and namespace as scope), the
gateway's own credentials with ``Impersonate-*`` of the caller, and the exec WebSocket to the
API server spoken by the gateway (v5, or v4 for servers older than 1.30). No stdin, no TTY.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shlex
from typing import TYPE_CHECKING, Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from bastion.doors.kube.exec import (
    ERROR,
    STDERR,
    STDOUT,
    UPSTREAM_PROTOCOLS,
    V4,
    Codec,
    UpstreamRefused,
    connect_upstream,
)
from bastion.doors.kube.frontdoor import Refused, impersonation
from bastion.doors.kube.policy import KubeRequest, PathError, authorize_kube, parse_path
from bastion.doors.kube.status import parse_exit
from bastion.doors.mcp.calls import Call, CallRefused
from bastion.identity import Identity
from bastion.session import Session, SessionInfo

if TYPE_CHECKING:
    from bastion.services import Services

# DNS-1123 names (namespaces, pods, containers): nothing else may reach a URL path.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class _Origin:
    """What connect_upstream reads of an incoming request, for a call that has none."""

    def __init__(self, source: str) -> None:
        self.headers = CIMultiDictProxy(CIMultiDict[str]())
        self.remote = source


def _check_name(kind: str, value: str | None) -> None:
    if value is not None and not _NAME.match(value):
        raise CallRefused("bad_arguments", f"{kind} {value!r} is not a Kubernetes name (lower-case letters, digits, "
                          "'-' and '.')")


def kube_request(gw: Services, identity: Identity, cluster: str, path: str) -> tuple[Any, Any, KubeRequest]:
    """The cluster, its upstream and the parsed request, authorized for ``identity``."""
    kube = gw.kube
    config = gw.config.cluster(cluster)
    if kube is None or config is None:
        names = ", ".join(c.name for c in gw.config.clusters) or "none"
        raise CallRefused("unknown_cluster", f"unknown cluster {cluster!r} (clusters here: {names})")
    try:
        req = parse_path(f"/clusters/{cluster}{path}")
    except PathError as exc:
        raise CallRefused("bad_arguments", str(exc)) from None
    decision = authorize_kube(gw.config, identity, req)
    if not decision.allowed:
        raise CallRefused("access_denied", decision.reason.removeprefix("guarita: "))
    return config, kube.upstreams[cluster], req


class PodCall(Call):
    def __init__(self, gw: Services, identity: Identity, source: str, cluster: str, namespace: str, pod: str,
                 container: str | None, argv: list[str]) -> None:
        super().__init__(gw, identity, source, cluster, None, shlex.join(argv), "exec_in_pod")
        self.namespace, self.pod, self.container = namespace, pod, container
        self.argv = list(argv)
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._cluster: Any = None
        self._upstream: Any = None
        self._req: KubeRequest | None = None

    def prepare(self) -> tuple[str, SessionInfo]:
        for kind, value in (("namespace", self.namespace), ("pod", self.pod), ("container", self.container)):
            _check_name(kind, value)
        self._cluster, self._upstream, self._req = kube_request(
            self.gw, self.identity, self.target_name, f"/api/v1/namespaces/{self.namespace}/pods/{self.pod}/exec")
        try:
            impersonation(self._cluster, self.identity)
        except Refused as exc:
            raise CallRefused("access_denied", str(exc).removeprefix("guarita: ")) from None
        extra = {"cluster": self.target_name, "namespace": self.namespace, "pod": self.pod,
                 "container": self.container, "argv": self.argv, "stdin": False, "mcp_tool": self.tool,
                 "kube_user": self._cluster.user_prefix + self.identity.subject}
        # Limits come from the rule that allowed the request (the same decision kube_request made).
        rule = authorize_kube(self.gw.config, self.identity, self._req).rule
        return self.target_name, SessionInfo(front_door="mcp", identity=self.identity, source=self.source,
                                             target=self.target_name, kind="exec", command=self.command,
                                             session_id=self.id, extra=extra, rule=rule)

    def preconnect(self) -> None:
        """Nothing: the exec WebSocket runs the command as it opens, so it waits for the decision
        (as in the Kubernetes door)."""

    async def execute(self, session: Session) -> None:
        assert self._req is not None
        query = [("command", c) for c in self.argv or ()]
        if self.container:
            query.append(("container", self.container))
        query += [("stdout", "true"), ("stderr", "true")]
        try:
            self._ws = await connect_upstream(self._cluster, self._upstream, _Origin(self.source),  # type: ignore[arg-type]
                                              self.identity, self._req, query, UPSTREAM_PROTOCOLS)
        except (UpstreamRefused, Refused) as exc:
            body = getattr(exc, "body", None) or {}
            self.outcome, self.reason = "error", str(body.get("message") or exc).removeprefix("guarita: ")
            session.marker("upstream-refused", code=exc.code, message=self.reason)
            return
        codec = Codec(self._ws.protocol or V4)
        reader = asyncio.ensure_future(self._read(codec))
        closed = asyncio.ensure_future(self._closed.wait())
        await asyncio.wait({reader, closed}, return_when=asyncio.FIRST_COMPLETED)
        for task in (reader, closed):
            task.cancel()
        await asyncio.gather(reader, closed, return_exceptions=True)

    async def _read(self, codec: Codec) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            frame = codec.decode(msg)
            if frame is None:
                continue
            channel, data = frame
            if channel in (STDOUT, STDERR):
                self.target_output(data, channel == STDERR)
            elif channel == ERROR and data:
                with contextlib.suppress(ValueError):
                    code, failure = parse_exit(json.loads(data))
                    self.exit_status = code
                    if failure:
                        self.outcome, self.reason = "error", failure
        if self.exit_status is None and self.outcome == "running" and self._ended_by is None:
            self.outcome, self.reason = "error", "the API server ended the stream without an exit status"

    def hang_up(self) -> None:
        if self._ws is not None and not self._ws.closed:
            asyncio.ensure_future(self._ws.close())


async def list_pods(gw: Services, identity: Identity, cluster: str, namespace: str) -> list[dict[str, Any]]:
    """The pods of a namespace, asked of the API server as the caller (impersonated)."""
    _check_name("namespace", namespace)
    config, upstream, req = kube_request(gw, identity, cluster, f"/api/v1/namespaces/{namespace}/pods")
    creds = await upstream.credentials()
    headers = CIMultiDict(creds.auth_headers())
    headers["Accept"] = "application/json"
    headers["Accept-Encoding"] = "identity"  # the upstream session does not decompress
    try:
        for key, value in impersonation(config, identity):
            headers.add(key, value)
    except Refused as exc:
        raise CallRefused("access_denied", str(exc).removeprefix("guarita: ")) from None
    assert upstream.session is not None
    try:
        async with asyncio.timeout(config.response_timeout), upstream.session.get(
                creds.server + req.raw_path, headers=headers, ssl=creds.ssl,
                server_hostname=creds.server_hostname) as resp:
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        raise CallRefused("upstream_error", f"cannot list pods on cluster {cluster!r}: {exc}") from None
    if resp.status != 200:
        message = body.get("message") if isinstance(body, dict) else None
        raise CallRefused("upstream_refused", f"the API server refused: {message or resp.status}")
    return [{"name": (p.get("metadata") or {}).get("name"), "phase": (p.get("status") or {}).get("phase"),
             "containers": [c.get("name") for c in (p.get("spec") or {}).get("containers") or []]}
            for p in body.get("items") or [] if isinstance(p, dict)]
