"""The gateway's configuration: a TOML file parsed into typed, validated dataclasses.

Every error names the key that is wrong and what would fix it, and all errors are
reported at once (``bastion check-config``), so an operator fixes a file in one pass.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bastion.approvals.rules import ApprovalPolicy, parse_policy

DEFAULT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA")
# Symmetric and unsigned algorithms can never be allowed: with HMAC, anyone holding the
# issuer's *public* key could mint tokens.
FORBIDDEN_ALGORITHMS = {"none", "HS256", "HS384", "HS512"}
DEFAULT_ENV_ALLOWLIST = ("LANG", "LANGUAGE", "LC_*", "TZ", "COLORTERM")
# Never passed through, whatever the allowlist says: they change what the target executes.
FORBIDDEN_ENV = ("LD_*", "PATH", "IFS", "BASH_ENV", "ENV", "SHELLOPTS", "PS4", "PYTHON*", "PERL*", "NODE_OPTIONS")


class ConfigError(Exception):
    """One or more problems in a configuration; ``problems`` lists ``(key, message)``."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"{key}: {msg}" for key, msg in problems))


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w|y)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def parse_duration(value: Any) -> float:
    """``"90s"``, ``"5m"``, ``"1h"``, ``"5y"`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '30s', '5m' or '1h', got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"expected a duration like '30s', '5m' or '1h', got {value!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


@dataclass(frozen=True)
class IssuerConfig:
    issuer: str
    audience: str
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    subject_claim: str = "sub"
    groups_claim: str = "groups"
    email_claim: str = "email"
    extra_claims: tuple[str, ...] = ()
    leeway: float = 30.0
    # Only for issuers without discovery; normally taken from /.well-known/openid-configuration.
    jwks_uri: str | None = None


@dataclass(frozen=True)
class TargetConfig:
    name: str
    host: str
    port: int = 22
    logins: tuple[str, ...] = ()
    default_login: str | None = None
    # Pinned host keys ("ssh-ed25519 AAAA..."); empty only for the embedded demo target.
    host_keys: tuple[str, ...] = ()
    credential: str = "key"  # "key": a private key the gateway holds; "ca": a per-session certificate
    private_key: Path | None = None
    ca_key: Path | None = None
    cert_ttl: float = 300.0
    connect_timeout: float = 10.0


@dataclass(frozen=True)
class AccessRule:
    """Who (subjects, groups, claims: any may match) may reach which targets and logins."""

    name: str
    subjects: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    claims: tuple[tuple[str, str], ...] = ()
    targets: tuple[str, ...] = ("*",)
    logins: tuple[str, ...] = ("*",)
    sftp: bool = False
    # Kubernetes: clusters (globs) this rule grants, the namespaces in them, and whether
    # port-forward (and the pods/services proxy) is allowed there. No clusters: no cluster.
    clusters: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ("*",)
    port_forward: bool = False


IN_CLUSTER_SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class ClusterConfig:
    """A Kubernetes cluster served at ``/clusters/NAME`` on the kube front door.

    The gateway reaches it with its own credentials: a kubeconfig (``context`` or its
    current context), or the in-cluster service account (token and CA re-read as they
    rotate), and acts as the caller through ``Impersonate-User`` / ``Impersonate-Group``.
    """

    name: str
    kubeconfig: Path | None = None
    context: str | None = None
    in_cluster: bool = False
    service_account_dir: Path = IN_CLUSTER_SA_DIR
    # Time to connect to the API server, and to get its response headers, connecting included
    # (watches and `logs -f` stream for as long as they like once the headers have arrived).
    connect_timeout: float = 10.0
    response_timeout: float = 60.0
    # Prepended to the impersonated user and groups (e.g. "oidc:"), so that no identity
    # can ever be mistaken for a Kubernetes built-in name.
    user_prefix: str = ""
    group_prefix: str = ""


@dataclass(frozen=True)
class RecordingConfig:
    url: str
    spool_dir: Path
    key_file: Path
    failure_policy: str = "strict"  # or "best_effort"
    segment_seconds: float = 5.0
    segment_bytes: int = 512 * 1024
    flush_interval: float = 1.0
    # S3 only: Object Lock mode and how long each object is kept (LGPD deployments: 5y).
    lock_mode: str = "COMPLIANCE"
    retention: float = 5 * 31536000.0
    # How much the spool may hold while the store is unreachable before new sessions are refused.
    spool_budget: int = 1024 * 1024 * 1024


@dataclass(frozen=True)
class Config:
    data_dir: Path
    ssh_listen: tuple[str, int]
    http_listen: tuple[str, int]
    host_key: Path
    user_ca_key: Path
    target_ca_key: Path
    recording: RecordingConfig
    issuers: tuple[IssuerConfig, ...]
    targets: tuple[TargetConfig, ...]
    access: tuple[AccessRule, ...]
    audit_log: str = "-"
    env_allowlist: tuple[str, ...] = DEFAULT_ENV_ALLOWLIST
    cert_max_ttl: float = 3600.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    dev: bool = False
    # Set only by --dev: the demo target is started by the gateway itself.
    demo_target: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # Kubernetes front door (started when clusters are configured): always HTTPS, with
    # kube_tls_cert/kube_tls_key, or a server certificate from the gateway's own CA
    # (created in data_dir) valid for loopback, the host name and kube_server_names.
    clusters: tuple[ClusterConfig, ...] = ()
    kube_listen: tuple[str, int] = ("127.0.0.1", 8443)
    kube_tls_cert: Path | None = None
    kube_tls_key: Path | None = None
    kube_server_names: tuple[str, ...] = ()
    # State store URL (sqlite:///PATH or postgresql://...); empty: sqlite:///DATA_DIR/state.db.
    state_url: str = ""
    # This replica's stable name (default: host name + data_dir), to tell its earlier runs.
    state_replica: str | None = None
    # [[approvals]] rules, [approval_defaults] and [[webhooks]] (bastion/approvals/rules.py).
    approvals: ApprovalPolicy = field(default_factory=ApprovalPolicy)

    @property
    def state(self) -> str:
        return self.state_url or f"sqlite:///{self.data_dir / 'state.db'}"

    def target(self, name: str) -> TargetConfig | None:
        return next((t for t in self.targets if t.name == name), None)

    def cluster(self, name: str) -> ClusterConfig | None:
        return next((c for c in self.clusters if c.name == name), None)


def env_allowed(name: str, allowlist: tuple[str, ...]) -> bool:
    if any(fnmatch.fnmatchcase(name, pat) for pat in FORBIDDEN_ENV):
        return False
    return any(fnmatch.fnmatchcase(name, pat) for pat in allowlist)


class _Reader:
    """Walks a TOML table, collecting every problem instead of stopping at the first."""

    def __init__(self, problems: list[tuple[str, str]], base: Path) -> None:
        self.problems = problems
        self.base = base

    def get(self, table: dict[str, Any], key: str, path: str, kind: type | tuple[type, ...],
            default: Any = None, required: bool = False) -> Any:
        if key not in table:
            if required:
                self.problems.append((f"{path}{key}", "is required"))
            return default
        value = table[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            self.problems.append((f"{path}{key}", f"must be {names}, got {value!r}"))
            return default
        return value

    def strings(self, table: dict[str, Any], key: str, path: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.get(table, key, path, list, None)
        if value is None:
            return default
        if not all(isinstance(v, str) for v in value):
            self.problems.append((f"{path}{key}", "must be a list of strings"))
            return default
        return tuple(value)

    def duration(self, table: dict[str, Any], key: str, path: str, default: float) -> float:
        if key not in table:
            return default
        try:
            return parse_duration(table[key])
        except ValueError as exc:
            self.problems.append((f"{path}{key}", str(exc)))
            return default

    def path(self, table: dict[str, Any], key: str, path: str, default: Path | None = None) -> Path | None:
        value = self.get(table, key, path, str, None)
        if value is None:
            return default
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base / p)

    def unknown(self, table: dict[str, Any], known: set[str], path: str) -> None:
        for key in table:
            if key not in known:
                self.problems.append((f"{path}{key}", f"unknown key (known: {', '.join(sorted(known))})"))


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> Config:
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError([(str(path), "file not found")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([(str(path), f"not valid TOML: {exc}")]) from None
    return parse_config(raw, base=path.resolve().parent, overrides=overrides)


def parse_config(raw: dict[str, Any], base: Path, overrides: dict[str, Any] | None = None) -> Config:
    problems: list[tuple[str, str]] = []
    r = _Reader(problems, base)
    r.unknown(raw, {"gateway", "recording", "ssh", "oidc", "targets", "access", "clusters", "state", "approvals",
                   "approval_defaults", "webhooks"}, "")
    overrides = overrides or {}

    gw = r.get(raw, "gateway", "", dict, {})
    r.unknown(gw, {"data_dir", "ssh_listen", "http_listen", "host_key", "user_ca_key", "target_ca_key",
                   "audit_log", "tls_cert", "tls_key", "kube_listen", "kube_tls_cert", "kube_tls_key",
                   "kube_server_names"}, "gateway.")
    data_dir = overrides.get("data_dir") or r.path(gw, "data_dir", "gateway.", base / "guarita-data")
    assert data_dir is not None
    ssh_listen = _listen(r, gw, "ssh_listen", "127.0.0.1:2222")
    http_listen = _listen(r, gw, "http_listen", "127.0.0.1:8080")
    tls_cert = r.path(gw, "tls_cert", "gateway.")
    tls_key = r.path(gw, "tls_key", "gateway.")
    if bool(tls_cert) != bool(tls_key):
        problems.append(("gateway.tls_cert", "tls_cert and tls_key must be given together"))
    if not tls_cert and not is_loopback(http_listen[0]):
        problems.append(("gateway.http_listen",
                         "the HTTP API carries bearer tokens: outside loopback set gateway.tls_cert and gateway.tls_key"))

    recording = _recording(r, r.get(raw, "recording", "", dict, {}), data_dir, overrides)
    ssh = r.get(raw, "ssh", "", dict, {})
    r.unknown(ssh, {"env_allowlist", "cert_max_ttl"}, "ssh.")

    issuers = tuple(_issuer(r, t, f"oidc[{i}].") for i, t in enumerate(_tables(r, raw, "oidc")))
    if not issuers:
        problems.append(("oidc", "at least one [[oidc]] issuer is required"))
    targets = tuple(_target(r, t, f"targets[{i}].") for i, t in enumerate(_tables(r, raw, "targets")))
    seen: set[str] = set()
    for i, t in enumerate(targets):
        if t.name in seen:
            problems.append((f"targets[{i}].name", f"duplicate target name {t.name!r}"))
        seen.add(t.name)
    access = tuple(_access(r, t, f"access[{i}].", i) for i, t in enumerate(_tables(r, raw, "access")))
    clusters = tuple(_cluster(r, t, f"clusters[{i}].") for i, t in enumerate(_tables(r, raw, "clusters")))
    seen_clusters: set[str] = set()
    for i, c in enumerate(clusters):
        if c.name in seen_clusters:
            problems.append((f"clusters[{i}].name", f"duplicate cluster name {c.name!r}"))
        seen_clusters.add(c.name)
    kube_listen = _listen(r, gw, "kube_listen", "127.0.0.1:8443")
    kube_tls_cert = r.path(gw, "kube_tls_cert", "gateway.")
    kube_tls_key = r.path(gw, "kube_tls_key", "gateway.")
    if bool(kube_tls_cert) != bool(kube_tls_key):
        problems.append(("gateway.kube_tls_cert", "kube_tls_cert and kube_tls_key must be given together"))
    for key, value in (("kube_tls_cert", kube_tls_cert), ("kube_tls_key", kube_tls_key)):
        if value is not None and not value.exists():
            problems.append((f"gateway.{key}", f"file {value} does not exist"))

    state = r.get(raw, "state", "", dict, {})
    r.unknown(state, {"url", "replica"}, "state.")
    state_url = overrides.get("state") or r.get(state, "url", "state.", str, "")
    if state_url:
        from bastion.state import StateError, engine_url

        try:
            engine_url(state_url)
        except StateError as exc:
            problems.append(("state.url", str(exc)))
    approvals = parse_policy(r, raw)

    if problems:
        raise ConfigError(problems)
    return Config(
        data_dir=data_dir,
        ssh_listen=ssh_listen,
        http_listen=http_listen,
        host_key=r.path(gw, "host_key", "gateway.", data_dir / "ssh_host_ed25519_key"),  # type: ignore[arg-type]
        user_ca_key=r.path(gw, "user_ca_key", "gateway.", data_dir / "user_ca_key"),  # type: ignore[arg-type]
        target_ca_key=r.path(gw, "target_ca_key", "gateway.", data_dir / "target_ca_key"),  # type: ignore[arg-type]
        recording=recording,
        issuers=issuers,
        targets=targets,
        access=access,
        audit_log=r.get(gw, "audit_log", "gateway.", str, "-"),
        env_allowlist=r.strings(ssh, "env_allowlist", "ssh.", DEFAULT_ENV_ALLOWLIST),
        cert_max_ttl=r.duration(ssh, "cert_max_ttl", "ssh.", 3600.0),
        tls_cert=tls_cert,
        tls_key=tls_key,
        clusters=clusters,
        kube_listen=kube_listen,
        kube_tls_cert=kube_tls_cert,
        kube_tls_key=kube_tls_key,
        kube_server_names=r.strings(gw, "kube_server_names", "gateway."),
        state_url=state_url,
        state_replica=r.get(state, "replica", "state.", str, None),
        approvals=approvals,
    )


def _listen(r: _Reader, table: dict[str, Any], key: str, default: str) -> tuple[str, int]:
    try:
        return parse_listen(r.get(table, key, "gateway.", str, default))
    except ValueError as exc:
        r.problems.append((f"gateway.{key}", str(exc)))
        return parse_listen(default)


def _tables(r: _Reader, raw: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        r.problems.append((key, f"must be an array of tables: write [[{key}]]"))
        return []
    return value


def _recording(r: _Reader, t: dict[str, Any], data_dir: Path, overrides: dict[str, Any]) -> RecordingConfig:
    p = "recording."
    r.unknown(t, {"url", "spool_dir", "key_file", "failure_policy", "segment_seconds", "segment_bytes",
                  "flush_interval", "lock_mode", "retention", "spool_budget"}, p)
    url = overrides.get("recordings") or r.get(t, "url", p, str, (data_dir / "recordings").as_uri())
    scheme = urlparse(url).scheme
    if scheme not in ("file", "s3"):
        r.problems.append((f"{p}url", f"must be file:///PATH or s3://BUCKET/PREFIX, got {url!r}"))
    policy = r.get(t, "failure_policy", p, str, "strict")
    if policy not in ("strict", "best_effort"):
        r.problems.append((f"{p}failure_policy", f"must be 'strict' or 'best_effort', got {policy!r}"))
    segment_bytes = r.get(t, "segment_bytes", p, int, 512 * 1024)
    if not 4096 <= segment_bytes <= 64 * 1024 * 1024:
        r.problems.append((f"{p}segment_bytes", "must be between 4096 and 67108864"))
    flush = r.duration(t, "flush_interval", p, 1.0)
    if not 0 < flush <= 1.0:
        r.problems.append((f"{p}flush_interval", "must be more than 0 and at most 1s (the durability promise)"))
    lock_mode = r.get(t, "lock_mode", p, str, "COMPLIANCE")
    if lock_mode not in ("COMPLIANCE", "GOVERNANCE"):
        r.problems.append((f"{p}lock_mode", f"must be 'COMPLIANCE' or 'GOVERNANCE', got {lock_mode!r}"))
    retention = r.duration(t, "retention", p, 5 * 31536000.0)
    if retention < 86400:
        r.problems.append((f"{p}retention", "must be at least 1d (Object Lock retains whole days)"))
    return RecordingConfig(
        lock_mode=lock_mode,
        retention=retention,
        spool_budget=r.get(t, "spool_budget", p, int, 1024 * 1024 * 1024),
        url=url,
        spool_dir=r.path(t, "spool_dir", p, data_dir / "spool"),  # type: ignore[arg-type]
        key_file=r.path(t, "key_file", p, data_dir / "recording_key.pem"),  # type: ignore[arg-type]
        failure_policy=policy,
        segment_seconds=r.duration(t, "segment_seconds", p, 5.0),
        segment_bytes=segment_bytes,
        flush_interval=flush,
    )


def _issuer(r: _Reader, t: dict[str, Any], p: str) -> IssuerConfig:
    r.unknown(t, {"issuer", "audience", "algorithms", "subject_claim", "groups_claim", "email_claim",
                  "extra_claims", "leeway", "jwks_uri"}, p)
    issuer = r.get(t, "issuer", p, str, "", required=True)
    parsed = urlparse(issuer)
    if issuer and (parsed.scheme not in ("https", "http") or not parsed.hostname):
        r.problems.append((f"{p}issuer", f"must be an https:// URL, got {issuer!r}"))
    elif issuer and parsed.scheme == "http" and not is_loopback(parsed.hostname or ""):
        r.problems.append((f"{p}issuer", "must use https:// (plain http is accepted only on loopback)"))
    algorithms = r.strings(t, "algorithms", p, DEFAULT_ALGORITHMS)
    bad = [a for a in algorithms if a in FORBIDDEN_ALGORITHMS or a not in DEFAULT_ALGORITHMS]
    if bad:
        r.problems.append((f"{p}algorithms", f"{', '.join(bad)} not allowed; choose from {', '.join(DEFAULT_ALGORITHMS)}"))
    return IssuerConfig(
        issuer=issuer.rstrip("/") if issuer.endswith("/") and parsed.path == "/" else issuer,
        audience=r.get(t, "audience", p, str, "", required=True),
        algorithms=tuple(a for a in algorithms if a not in bad) or DEFAULT_ALGORITHMS,
        subject_claim=r.get(t, "subject_claim", p, str, "sub"),
        groups_claim=r.get(t, "groups_claim", p, str, "groups"),
        email_claim=r.get(t, "email_claim", p, str, "email"),
        extra_claims=r.strings(t, "extra_claims", p),
        leeway=r.duration(t, "leeway", p, 30.0),
        jwks_uri=r.get(t, "jwks_uri", p, str, None),
    )


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _target(r: _Reader, t: dict[str, Any], p: str) -> TargetConfig:
    r.unknown(t, {"name", "host", "port", "logins", "default_login", "host_keys", "credential",
                  "private_key", "ca_key", "cert_ttl", "connect_timeout"}, p)
    name = r.get(t, "name", p, str, "", required=True)
    if name and not _NAME.match(name):
        r.problems.append((f"{p}name", "letters, digits, '.', '_' and '-' only (it is typed after '@' in ssh)"))
    port = r.get(t, "port", p, int, 22)
    if not 0 < port < 65536:
        r.problems.append((f"{p}port", f"must be 1-65535, got {port}"))
    credential = r.get(t, "credential", p, str, "key")
    private_key = r.path(t, "private_key", p)
    ca_key = r.path(t, "ca_key", p)
    if credential not in ("key", "ca"):
        r.problems.append((f"{p}credential", f"must be 'key' or 'ca', got {credential!r}"))
    elif credential == "key" and private_key is None:
        r.problems.append((f"{p}private_key", "is required when credential = 'key'"))
    elif private_key is not None and not private_key.exists():
        r.problems.append((f"{p}private_key", f"file {private_key} does not exist"))
    host_keys = r.strings(t, "host_keys", p)
    if not host_keys:
        r.problems.append((f"{p}host_keys", "pin the target's host key(s), e.g. the output of ssh-keyscan"))
    for i, line in enumerate(host_keys):
        if len(line.split()) < 2:
            r.problems.append((f"{p}host_keys[{i}]", "expected 'TYPE BASE64' as in a known_hosts file"))
    logins = r.strings(t, "logins", p)
    if not logins:
        r.problems.append((f"{p}logins", "list the logins agents may use on this target"))
    default_login = r.get(t, "default_login", p, str, logins[0] if len(logins) == 1 else None)
    return TargetConfig(
        name=name, host=r.get(t, "host", p, str, "", required=True), port=port, logins=logins,
        default_login=default_login, host_keys=host_keys, credential=credential,
        private_key=private_key, ca_key=ca_key, cert_ttl=r.duration(t, "cert_ttl", p, 300.0),
        connect_timeout=r.duration(t, "connect_timeout", p, 10.0),
    )


def _cluster(r: _Reader, t: dict[str, Any], p: str) -> ClusterConfig:
    r.unknown(t, {"name", "kubeconfig", "context", "in_cluster", "service_account_dir", "connect_timeout",
                  "response_timeout", "user_prefix", "group_prefix"}, p)
    name = r.get(t, "name", p, str, "", required=True)
    if name and not _NAME.match(name):
        r.problems.append((f"{p}name", "letters, digits, '.', '_' and '-' only (it is part of the URL path "
                           "/clusters/NAME)"))
    kubeconfig = r.path(t, "kubeconfig", p)
    in_cluster = r.get(t, "in_cluster", p, bool, False)
    if in_cluster and kubeconfig is not None:
        r.problems.append((f"{p}in_cluster", "give either kubeconfig = PATH or in_cluster = true, not both"))
    elif not in_cluster and kubeconfig is None:
        r.problems.append((p.rstrip("."), "set kubeconfig = PATH (the gateway's own credentials for this cluster) "
                           "or in_cluster = true (its service account)"))
    elif kubeconfig is not None and not kubeconfig.exists():
        r.problems.append((f"{p}kubeconfig", f"file {kubeconfig} does not exist"))
    context = r.get(t, "context", p, str, None)
    if context is not None and in_cluster:
        r.problems.append((f"{p}context", "only applies with kubeconfig = PATH"))
    return ClusterConfig(
        name=name, kubeconfig=kubeconfig, context=context, in_cluster=in_cluster,
        service_account_dir=r.path(t, "service_account_dir", p, IN_CLUSTER_SA_DIR),  # type: ignore[arg-type]
        connect_timeout=r.duration(t, "connect_timeout", p, 10.0),
        response_timeout=r.duration(t, "response_timeout", p, 60.0),
        user_prefix=r.get(t, "user_prefix", p, str, ""),
        group_prefix=r.get(t, "group_prefix", p, str, ""),
    )


def _access(r: _Reader, t: dict[str, Any], p: str, index: int) -> AccessRule:
    r.unknown(t, {"name", "subjects", "groups", "claims", "targets", "logins", "sftp", "clusters", "namespaces",
                  "port_forward"}, p)
    claims = r.get(t, "claims", p, dict, {})
    if not all(isinstance(v, str) for v in claims.values()):
        r.problems.append((f"{p}claims", "values must be strings (glob patterns)"))
    rule = AccessRule(
        name=r.get(t, "name", p, str, f"access[{index}]"),
        subjects=r.strings(t, "subjects", p),
        groups=r.strings(t, "groups", p),
        claims=tuple(sorted((str(k), str(v)) for k, v in claims.items())),
        # A rule written for clusters grants no SSH target unless it names targets too.
        targets=r.strings(t, "targets", p, () if "clusters" in t else ("*",)),
        logins=r.strings(t, "logins", p, ("*",)),
        sftp=r.get(t, "sftp", p, bool, False),
        clusters=r.strings(t, "clusters", p),
        namespaces=r.strings(t, "namespaces", p, ("*",)),
        port_forward=r.get(t, "port_forward", p, bool, False),
    )
    if not (rule.subjects or rule.groups or rule.claims):
        # Fail closed: a rule that names nobody must not silently mean everybody.
        r.problems.append((p.rstrip("."), "name at least one of subjects, groups or claims (use subjects = [\"*\"] for everyone)"))
    return rule
