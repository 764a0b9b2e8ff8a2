"""Which Kubernetes API requests an identity may send through the gateway.

The gateway decides *who may reach which cluster and namespaces* (and port-forward);
what they may do there is the cluster's RBAC, applied to the impersonated identity.
Rules are the ``[[access]]`` rules of the config: a rule grants clusters only if it
names them (``clusters = [...]``), in the namespaces it names (``namespaces``, default
all, and only ``"*"`` grants cluster-scoped requests such as nodes or listing pods in
every namespace), with ``port_forward = true`` for port-forward and the pods/services
proxy. Discovery (``/api``, ``/apis``, ``/version``, ``/openapi``) and asking the
cluster about one's own permissions are allowed to anyone who may reach the cluster.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from urllib.parse import unquote

from bastion.config import AccessRule, Config
from bastion.identity import Identity
from bastion.policy import matches_identity

_DISCOVERY = re.compile(r"^/(api|apis|version|openapi(/.*)?|healthz|livez|readyz|api/v1|apis/[^/]+(/[^/]+)?)/?$")
_SELF_REVIEWS = {
    "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
    "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews",
    "/apis/authentication.k8s.io/v1/selfsubjectreviews",
    "/apis/authentication.k8s.io/v1beta1/selfsubjectreviews",
}
STREAMING_SUBRESOURCES = ("exec", "attach", "portforward")


class PathError(ValueError):
    """The request path is not one the gateway forwards (400)."""


@dataclass(frozen=True)
class KubeRequest:
    cluster: str
    raw_path: str  # the path to send upstream, percent-encoding as the client sent it
    segments: tuple[str, ...]  # decoded segments of raw_path
    namespace: str | None = None
    resource: str | None = None
    name: str | None = None
    subresource: str | None = None
    discovery: bool = False

    @property
    def streaming(self) -> str | None:
        """``exec``, ``attach`` or ``portforward`` for a pod's streaming subresource."""
        if self.resource == "pods" and self.subresource in STREAMING_SUBRESOURCES:
            return self.subresource
        return None

    @property
    def needs_port_forward(self) -> bool:
        return self.subresource in ("portforward", "proxy") and self.resource in ("pods", "services")

    @property
    def node_proxy(self) -> bool:
        return self.resource == "nodes" and self.subresource == "proxy"


def parse_path(raw: str) -> KubeRequest:
    """``/clusters/NAME/api/v1/...`` -> a KubeRequest; PathError for anything else.

    Refused: dot segments (``..`` and ``.``, encoded or not), encoded slashes and
    backslashes, empty segments: the gateway's reading of a path and the API server's
    must never differ.
    """
    path = raw.split("?", 1)[0]
    if not path.startswith("/clusters/"):
        raise PathError("guarita serves Kubernetes clusters under /clusters/NAME/: use the server URL that "
                        "`bastion kubeconfig --cluster NAME` writes")
    parts = path.split("/")[1:]
    if parts and parts[-1] == "" and len(parts) > 2:
        parts = parts[:-1]  # one trailing slash is harmless
    decoded = []
    for part in parts:
        lowered = part.lower()
        if "%2f" in lowered or "%5c" in lowered or "%00" in lowered:
            raise PathError("encoded '/', '\\' or NUL in the request path")
        text = unquote(part)
        if text in (".", "..") or "\\" in text:
            raise PathError("'.' or '..' segments are not allowed in the request path")
        decoded.append(text)
    if len(parts) < 2 or not parts[1]:
        raise PathError("no cluster in the path: expected /clusters/NAME/...")
    if any(not p for p in decoded[2:]) or (len(parts) > 2 and not decoded[2]):
        raise PathError("empty segment ('//') in the request path")
    cluster = decoded[1]
    rest = parts[2:]
    raw_rest = "/" + "/".join(rest)
    segs = tuple(decoded[2:])
    return _classify(cluster, raw_rest, segs)


def _classify(cluster: str, raw_rest: str, segs: tuple[str, ...]) -> KubeRequest:
    path = "/" + "/".join(segs)
    if not segs or _DISCOVERY.match(path) or path in _SELF_REVIEWS:
        return KubeRequest(cluster, raw_rest, segs, discovery=True)
    if segs[0] == "api" and len(segs) >= 2:
        tail = segs[2:]
    elif segs[0] == "apis" and len(segs) >= 3:
        tail = segs[3:]
    else:
        return KubeRequest(cluster, raw_rest, segs)  # a non-resource URL (/metrics, /logs...)
    namespace = None
    if len(tail) >= 2 and tail[0] == "namespaces":
        namespace = tail[1]
        if len(tail) == 2 or (len(tail) == 3 and tail[2] in ("status", "finalize")):
            return KubeRequest(cluster, raw_rest, segs, namespace=namespace, resource="namespaces", name=namespace,
                               subresource=tail[2] if len(tail) == 3 else None)
        tail = tail[2:]
    resource = tail[0] if tail else None
    name = tail[1] if len(tail) >= 2 else None
    sub = tail[2] if len(tail) >= 3 else None
    return KubeRequest(cluster, raw_rest, segs, namespace=namespace, resource=resource, name=name, subresource=sub)


@dataclass(frozen=True)
class KubeDecision:
    allowed: bool
    rule: AccessRule | None
    reason: str


def _glob(value: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


def may_reach(config: Config, identity: Identity, cluster: str) -> bool:
    return any(rule.clusters and matches_identity(rule, identity) and _glob(cluster, rule.clusters)
               for rule in config.access)


def reachable_clusters(config: Config, identity: Identity) -> list[str]:
    return [c.name for c in config.clusters if may_reach(config, identity, c.name)]


def authorize_kube(config: Config, identity: Identity, req: KubeRequest) -> KubeDecision:
    who = identity.display
    if req.node_proxy:
        return KubeDecision(False, None, "the nodes/proxy subresource reaches the kubelet directly (exec without "
                                         "recording): guarita never forwards it")
    reached = False
    port_forward_refused = False
    for rule in config.access:
        if not rule.clusters or not matches_identity(rule, identity) or not _glob(req.cluster, rule.clusters):
            continue
        reached = True
        if req.discovery:
            return KubeDecision(True, rule, f"allowed by {rule.name}")
        if req.namespace is None:
            if "*" not in rule.namespaces:
                continue
        elif not _glob(req.namespace, rule.namespaces):
            continue
        if req.needs_port_forward and not rule.port_forward:
            port_forward_refused = True
            continue
        return KubeDecision(True, rule, f"allowed by {rule.name}")
    if not reached:
        return KubeDecision(False, None, f"guarita: {who} may not use cluster {req.cluster!r}")
    if port_forward_refused:
        where = f" in namespace {req.namespace!r}" if req.namespace else ""
        return KubeDecision(False, None, f"guarita: port-forward (and the {req.resource} proxy) is not allowed for "
                                         f"{who} on cluster {req.cluster!r}{where}")
    if req.namespace is None:
        return KubeDecision(False, None, f"guarita: {who} may use cluster {req.cluster!r} only in some namespaces; "
                                         "cluster-wide requests are not allowed (use -n NAMESPACE)")
    return KubeDecision(False, None, f"guarita: {who} may not use namespace {req.namespace!r} on cluster "
                                     f"{req.cluster!r}")
