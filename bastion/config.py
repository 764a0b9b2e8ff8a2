"""The gateway's configuration: a TOML file parsed into typed, validated dataclasses.

Every error names the key that is wrong and what would fix it, and all errors are
reported at once (``bastion check-config``), so an operator fixes a file in one pass.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from bastion.masking.config import MaskingConfig

from bastion.approvals.rules import ApprovalPolicy, parse_policy
from bastion.doors.mcp.settings import McpSettings, parse_mcp
from bastion.identity.delegation import DELEGATION_KEYS, DelegationScope, parse_scope

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


def format_duration(seconds: float) -> str:
    """Seconds -> ``"45s"``, ``"2m30s"``, ``"1h5m"`` (whole seconds, rounded), for messages."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        m, s = divmod(seconds, 60)
        return f"{m}m" + (f"{s}s" if s else "")
    h, rest = divmod(seconds, 3600)
    return f"{h}h" + (f"{rest // 60}m" if rest // 60 else "")


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
    # The longest delegation chain (RFC 8693 `act`, bastion/identity/delegation.py) accepted from
    # this issuer; 0 refuses every delegated token.
    max_delegation_depth: int = 4


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
    # Session limits (bastion/session.py): what happens when the credential a session started
    # with expires ("end", "warn": tell the user and go on, "allow": go on), the cap for
    # warn/allow (max_session, from the session's start), and idle / total duration limits.
    on_expiry: str = "end"
    max_session: float = 8 * 3600.0
    idle_timeout: float | None = None
    max_duration: float | None = None
    # Delegated tokens (RFC 8693 `act`): `delegated`, `actors`, `max_delegation_depth`.
    delegation: DelegationScope = field(default_factory=DelegationScope)


@dataclass(frozen=True)
class RoleMembers:
    """Who holds a role: any matching subject (or e-mail) or group glob."""

    subjects: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class Roles:
    """Roles on the HTTP API: operators lock, unlock and kill sessions; auditors read locks and
    live sessions. Approvers come from the approval rules."""

    operators: RoleMembers = field(default_factory=RoleMembers)
    auditors: RoleMembers = field(default_factory=RoleMembers)


@dataclass(frozen=True)
class Limits:
    """Per identity (subject), per replica: so a runaway agent cannot exhaust the gateway.
    0 turns a limit off."""

    max_sessions_per_subject: int = 64
    sessions_per_minute: int = 600
    # How often each replica re-reads locks and kill requests when no notification came.
    lock_poll_interval: float = 1.0


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
    # Terminal bytes per segment (about 0.1-0.4 MiB stored for text): few segments at high
    # throughput, where each costs a few fsyncs and an upload.
    segment_bytes: int = 4 * 1024 * 1024
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
    ssh_banner: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    dev: bool = False
    # Set only by --dev: the demo target is started by the gateway itself.
    demo_target: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # Personal-data masking ([masking]); None: not configured, nothing is masked.
    masking: MaskingConfig | None = None
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
    # Operations (bastion/lifecycle.py, bastion/http/api.py): how long live sessions may go on
    # after SIGTERM, and whether /metrics needs a token (None: only when roles are configured
    # and the HTTP API is not on loopback).
    drain_grace: float = 30.0
    metrics_public: bool | None = None
    # [roles] (operators, auditors) and [limits] (per-identity session limits), issue 8.
    roles: Roles = field(default_factory=Roles)
    limits: Limits = field(default_factory=Limits)
    # [mcp]: the MCP front door (bastion/doors/mcp).
    mcp: McpSettings = field(default_factory=McpSettings)
    # [console] (bastion/console/settings.py ConsoleConfig); None: no console outside --dev.
    console: Any = None

    @property
    def state(self) -> str:
        return self.state_url or f"sqlite:///{self.data_dir / 'state.db'}"

    def target(self, name: str) -> TargetConfig | None:
        return next((t for t in self.targets if t.name == name), None)

    def cluster(self, name: str) -> ClusterConfig | None:
        return next((c for c in self.clusters if c.name == name), None)


def _banner(r: _Reader, value: Any) -> str | None:
    """``ssh.banner``: printable text and newlines, at most 2,000 characters, shown by ssh
    clients before authentication (the notice that sessions are recorded, for instance)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        r.problems.append(("ssh.banner", "must be a non-empty string"))
        return None
    if len(value) > 2000 or any(not c.isprintable() and c not in "\n\t" for c in value):
        r.problems.append(("ssh.banner", "must be at most 2,000 printable characters (newlines allowed): a banner "
                                         "reaches every client's terminal, so no escape sequences"))
        return None
    return value.rstrip("\n").replace("\r", "").replace("\n", "\r\n") + "\r\n"


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


@dataclass(frozen=True)
class ConfigSource:
    """What SIGHUP reads again (bastion/lifecycle.py): the file, and how the running config
    was built from it. ``load`` returns the raw table (to tell which keys changed) and the
    parsed config, raising ConfigError for a file with problems. A plain ``--config FILE``
    (:func:`file_source`) or ``--dev --config FILE``, the file over the embedded default
    (bastion/devmode.py): one reload path for both."""

    path: Path
    load: Callable[[], tuple[dict[str, Any], Config]]


def file_source(path: Path, overrides: dict[str, Any] | None = None) -> ConfigSource:
    def load() -> tuple[dict[str, Any], Config]:
        config = load_config(path, overrides=overrides)  # names the problem (missing, bad TOML, a key)
        return tomllib.loads(path.read_text()), config

    return ConfigSource(path, load)


def parse_config(raw: dict[str, Any], base: Path, overrides: dict[str, Any] | None = None) -> Config:
    problems: list[tuple[str, str]] = []
    r = _Reader(problems, base)
    r.unknown(raw, {"gateway", "recording", "ssh", "oidc", "targets", "access", "clusters", "state", "approvals",
                   "approval_defaults", "webhooks", "roles", "limits", "masking", "mcp", "console"}, "")
    overrides = overrides or {}

    gw = r.get(raw, "gateway", "", dict, {})
    r.unknown(gw, {"data_dir", "ssh_listen", "http_listen", "host_key", "user_ca_key", "target_ca_key",
                   "audit_log", "tls_cert", "tls_key", "kube_listen", "kube_tls_cert", "kube_tls_key",
                   "kube_server_names", "drain_grace", "metrics_public"}, "gateway.")
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
    r.unknown(ssh, {"env_allowlist", "cert_max_ttl", "banner"}, "ssh.")
    ssh_banner = _banner(r, ssh.get("banner"))

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
    roles = _roles(r, r.get(raw, "roles", "", dict, {}))
    limits = _limits(r, r.get(raw, "limits", "", dict, {}))
    mcp = parse_mcp(r, r.get(raw, "mcp", "", dict, {}))
    drain_grace = r.duration(gw, "drain_grace", "gateway.", 30.0)
    if not 0 <= drain_grace <= 3600:
        problems.append(("gateway.drain_grace", "must be between 0s and 1h (keep the platform's stop timeout "
                         "above it: terminationGracePeriodSeconds, TimeoutStopSec)"))
    metrics_public = r.get(gw, "metrics_public", "gateway.", bool, None)
    masking = None
    if "masking" in raw:  # masking applies only where an operator configured it
        from bastion.masking.config import parse_masking

        masking, masking_problems = parse_masking(raw["masking"], base, data_dir)
        problems.extend(masking_problems)

    # [console]: the web console's OIDC client (issue 19)
    from bastion.console.settings import parse_console

    console, console_problems = parse_console(raw.get("console"), tuple(i.issuer for i in issuers))
    problems.extend(console_problems)
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
        ssh_banner=ssh_banner,
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
        drain_grace=drain_grace,
        metrics_public=metrics_public,
        roles=roles,
        limits=limits,
        mcp=mcp,
        masking=masking,
        console=console,
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
    segment_bytes = r.get(t, "segment_bytes", p, int, 4 * 1024 * 1024)
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
                  "extra_claims", "leeway", "jwks_uri", "max_delegation_depth"}, p)
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
        max_delegation_depth=_delegation_depth(r, t, p),
    )


def _delegation_depth(r: _Reader, t: dict[str, Any], p: str) -> int:
    from bastion.identity.delegation import DEFAULT_MAX_DEPTH, MAX_DEPTH

    depth = r.get(t, "max_delegation_depth", p, int, DEFAULT_MAX_DEPTH)
    if not 0 <= depth <= MAX_DEPTH:
        r.problems.append((f"{p}max_delegation_depth", f"must be between 0 and {MAX_DEPTH}, got {depth}"))
        return DEFAULT_MAX_DEPTH
    return int(depth)


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
                  "port_forward", "on_expiry", "max_session", "idle_timeout", "max_duration", *DELEGATION_KEYS}, p)
    on_expiry = r.get(t, "on_expiry", p, str, "end")
    if on_expiry not in ("end", "warn", "allow"):
        r.problems.append((f"{p}on_expiry", f"must be 'end', 'warn' or 'allow', got {on_expiry!r}"))
        on_expiry = "end"
    limits = {key: _positive_duration(r, t, key, p) for key in ("max_session", "idle_timeout", "max_duration")}
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
        on_expiry=on_expiry,
        max_session=limits["max_session"] or 8 * 3600.0,
        idle_timeout=limits["idle_timeout"],
        max_duration=limits["max_duration"],
        delegation=parse_scope(r, t, p),
    )
    if not (rule.subjects or rule.groups or rule.claims):
        # Fail closed: a rule that names nobody must not silently mean everybody.
        r.problems.append((p.rstrip("."), "name at least one of subjects, groups or claims (use subjects = [\"*\"] for everyone)"))
    return rule


def _positive_duration(r: _Reader, t: dict[str, Any], key: str, p: str) -> float | None:
    if key not in t:
        return None
    value = r.duration(t, key, p, 0.0)
    if value <= 0:
        r.problems.append((f"{p}{key}", "must be a positive duration like '30m' or '8h'"))
        return None
    return value


def _role_members(r: _Reader, t: dict[str, Any], key: str) -> RoleMembers:
    p = f"roles.{key}."
    table = r.get(t, key, "roles.", dict, {})
    r.unknown(table, {"subjects", "groups"}, p)
    return RoleMembers(subjects=r.strings(table, "subjects", p), groups=r.strings(table, "groups", p))


def _roles(r: _Reader, t: dict[str, Any]) -> Roles:
    r.unknown(t, {"operators", "auditors"}, "roles.")
    return Roles(operators=_role_members(r, t, "operators"), auditors=_role_members(r, t, "auditors"))


def _limits(r: _Reader, t: dict[str, Any]) -> Limits:
    p = "limits."
    r.unknown(t, {"max_sessions_per_subject", "sessions_per_minute", "lock_poll_interval"}, p)
    values = {}
    for key, default in (("max_sessions_per_subject", 64), ("sessions_per_minute", 600)):
        value = r.get(t, key, p, int, default)
        if value < 0:
            r.problems.append((f"{p}{key}", "must be 0 (no limit) or more"))
            value = default
        values[key] = value
    poll = r.duration(t, "lock_poll_interval", p, 1.0)
    if not 0 < poll <= 1.0:
        r.problems.append((f"{p}lock_poll_interval", "must be more than 0 and at most 1s (locks end sessions "
                           "within a second)"))
        poll = 1.0
    return Limits(max_sessions_per_subject=values["max_sessions_per_subject"],
                  sessions_per_minute=values["sessions_per_minute"], lock_poll_interval=poll)


# -- the configuration reference ---------------------------------------------------------------
#
# Every key of the file, for `bastion config-reference` (docs/configuration.md) and for SIGHUP
# (``reload``: the key takes effect without a restart). tests/test_config_reference.py keeps
# this table equal to what the parser accepts (it asks the parser for its known keys) and its
# defaults equal to the parser's; when you add a key to the parser, add it here and run
# `bastion config-reference -o docs/configuration.md`.

REQUIRED = "required"


@dataclass(frozen=True)
class ConfigSection:
    name: str  # "gateway", "targets[]" (an array of tables), "roles.operators"
    doc: str


@dataclass(frozen=True)
class ConfigKey:
    key: str  # "gateway.ssh_listen", "targets[].name"
    type: str
    default: Any  # the value as written in TOML, REQUIRED, or None (unset)
    doc: str
    reload: bool = False  # SIGHUP applies it to what happens next (else: restart)
    # The default in words, when it is not a literal (e.g. derived from data_dir): the
    # defaults test leaves such keys out.
    default_text: str | None = None

    @property
    def section(self) -> str:
        return self.key.rsplit(".", 1)[0] if "." in self.key else ""

    @property
    def name(self) -> str:
        return self.key.rsplit(".", 1)[-1]


CONFIG_SECTIONS = (
    ConfigSection("gateway", "Where the gateway listens, its keys and certificates, and operations."),
    ConfigSection("recording", "Where recordings go and how they are cut, kept and uploaded."),
    ConfigSection("ssh", "The SSH front door."),
    ConfigSection("oidc[]", "OIDC issuers whose tokens are accepted (at least one). Keys come from discovery and "
                            "JWKS, cached, refreshed on an unknown `kid`."),
    ConfigSection("targets[]", "SSH targets agents reach as `ssh -p 2222 [LOGIN@]TARGET@bastion`."),
    ConfigSection("access[]", "Who may reach which targets, logins and clusters. Ordered: the first rule whose "
                              "*who* and *where* both match decides; no match refuses."),
    ConfigSection("clusters[]", "Kubernetes clusters served at `https://bastion:8443/clusters/NAME`."),
    ConfigSection("state", "The state database (sessions and commands index, approvals, locks)."),
    ConfigSection("approvals[]", "Approval rules, ordered: the first matching rule decides a command (or the "
                                 "opening of a shell); see docs/approvals.md."),
    ConfigSection("approval_defaults", "What happens when no approval rule matches."),
    ConfigSection("webhooks[]", "Where approval requests and decisions are announced."),
    ConfigSection("roles", "Roles on the HTTP API. Approvers come from the approval rules."),
    ConfigSection("roles.operators", "Operators lock, unlock and kill sessions (and read metrics when "
                                     "`gateway.metrics_public` requires a token)."),
    ConfigSection("roles.auditors", "Auditors read locks and live sessions (and metrics)."),
    ConfigSection("limits", "Per identity, per replica, so a runaway agent cannot exhaust the gateway."),
    ConfigSection("mcp", "The MCP front door (`/mcp` on the HTTP API, `bastion mcp` over stdio; docs/mcp.md)."),
    ConfigSection("console", "The web console (docs/console.md): the OIDC client it signs people in with "
                             "(authorization code with PKCE). Without this table the console is off outside `--dev`."),
    ConfigSection("masking", "Personal-data masking of output (docs/masking.md). Without this table nothing is "
                             "masked."),
    ConfigSection("masking.detectors.<name>", "A built-in detector: `<name>` is one of `cpf`, `cnpj`, `card`, "
                                              "`phone_br`, `phone_e164`, `email`. All are on by default."),
    ConfigSection("masking.custom[]", "Custom detectors: a regex (bounded repetition only)."),
    ConfigSection("masking.rules[]", "Where masking applies, ordered: the first rule that matches decides."),
)

CONFIG_KEYS = (
    # [gateway]
    ConfigKey("gateway.data_dir", "path", None, "Keys created on first start, the spool, and SQLite state by default. "
              "Relative paths in the file are relative to the file's folder.",
              default_text="`guarita-data` beside the config file"),
    ConfigKey("gateway.ssh_listen", "HOST:PORT", "127.0.0.1:2222", "The SSH front door (`--ssh-listen`)."),
    ConfigKey("gateway.http_listen", "HOST:PORT", "127.0.0.1:8080", "The HTTP API: health, metrics, approvals, "
              "certificates (`--http-listen`). Outside loopback it needs `tls_cert` and `tls_key`."),
    ConfigKey("gateway.host_key", "path", None, "The gateway's SSH host key (created if missing).",
              default_text="`DATA_DIR/ssh_host_ed25519_key`"),
    ConfigKey("gateway.user_ca_key", "path", None, "The user CA that signs agents' certificates "
              "(`bastion ssh-cert`).", default_text="`DATA_DIR/user_ca_key`"),
    ConfigKey("gateway.target_ca_key", "path", None, "The CA that signs per-session certificates for targets with "
              "`credential = \"ca\"`.", default_text="`DATA_DIR/target_ca_key`"),
    ConfigKey("gateway.audit_log", "string", "-", "The audit stream (JSON lines): a file, or `-` for stdout "
              "(`--audit-log`)."),
    ConfigKey("gateway.tls_cert", "path", None, "TLS certificate (PEM) of the HTTP API."),
    ConfigKey("gateway.tls_key", "path", None, "Its private key."),
    ConfigKey("gateway.kube_listen", "HOST:PORT", "127.0.0.1:8443", "The Kubernetes front door (started when "
              "`[[clusters]]` are configured; always HTTPS; `--kube-listen`)."),
    ConfigKey("gateway.kube_tls_cert", "path", None, "TLS certificate of the Kubernetes front door.",
              default_text="one from a CA the gateway creates in `DATA_DIR`"),
    ConfigKey("gateway.kube_tls_key", "path", None, "Its private key."),
    ConfigKey("gateway.kube_server_names", "list of strings", [], "Extra names for the front door's own "
              "certificate (loopback and the host name are always in it)."),
    ConfigKey("gateway.drain_grace", "duration", "30s", "After SIGTERM, how long live sessions may go on (their "
              "users get a notice) before the gateway ends them; `0s` ends them at once. Keep the platform's stop "
              "timeout above it.", reload=True),
    ConfigKey("gateway.metrics_public", "bool", None, "Whether `/metrics` answers without a token. `false`: only "
              "to a bearer token of an operator or auditor. Unset: public, unless roles are configured and the HTTP "
              "API listens outside loopback.", reload=True, default_text="unset"),
    # [recording]
    ConfigKey("recording.url", "URL", None, "Where recordings go: `file:///PATH` (not write-once) or "
              "`s3://BUCKET/PREFIX` (Object Lock; endpoint from `AWS_ENDPOINT_URL_S3`; `--recordings`).",
              default_text="`file://DATA_DIR/recordings`"),
    ConfigKey("recording.spool_dir", "path", None, "The local spool (fsynced; uploaded from; sealed after a "
              "crash at the next start).", default_text="`DATA_DIR/spool`"),
    ConfigKey("recording.key_file", "path", None, "Ed25519 key that signs manifests (created if missing; or "
              "`$GUARITA_RECORDING_KEY`).", default_text="`DATA_DIR/recording_key.pem`"),
    ConfigKey("recording.failure_policy", "string", "strict", "`strict`: a session whose recording fails ends; "
              "`best_effort`: it goes on and an alert is logged."),
    ConfigKey("recording.segment_seconds", "duration", "5s", "A segment is sealed and uploaded after this long..."),
    ConfigKey("recording.segment_bytes", "integer", 4194304,
              "...or once its events hold this many bytes, uncompressed (4096 to 67108864; what a replay "
              "reader holds in memory per segment)."),
    ConfigKey("recording.flush_interval", "duration", "1s", "Events are fsynced to the spool at least this often "
              "(at most 1s: the durability promise)."),
    ConfigKey("recording.lock_mode", "string", "COMPLIANCE", "S3 Object Lock mode of every object: `COMPLIANCE` "
              "or `GOVERNANCE`."),
    ConfigKey("recording.retention", "duration", "5y", "How long each object is locked (at least `1d`; LGPD "
              "deployments keep five years)."),
    ConfigKey("recording.spool_budget", "integer", 1073741824, "Bytes the spool may hold (the store being "
              "unreachable) before new sessions are refused."),
    # [ssh]
    ConfigKey("ssh.env_allowlist", "list of strings", list(DEFAULT_ENV_ALLOWLIST), "Environment variables "
              "(globs) passed to targets; `LD_*`, `PATH` and other dangerous ones never are.", reload=True),
    ConfigKey("ssh.cert_max_ttl", "duration", "1h", "Longest lifetime of a certificate from `bastion ssh-cert` "
              "(never past the token's)."),
    ConfigKey("ssh.banner", "string", None, "Text ssh clients show before authentication, e.g. that sessions "
              "are recorded and why (LGPD transparency); printable, at most 2,000 characters.", reload=True),
    # [[oidc]]
    ConfigKey("oidc[].issuer", "URL", REQUIRED, "Issuer URL (`https://`; `http://` only on loopback)."),
    ConfigKey("oidc[].audience", "string", REQUIRED, "The `aud` tokens must carry."),
    ConfigKey("oidc[].algorithms", "list of strings", list(DEFAULT_ALGORITHMS), "Accepted signature algorithms "
              "(asymmetric only; `none` and HMAC never)."),
    ConfigKey("oidc[].subject_claim", "string", "sub", "Claim that names the identity."),
    ConfigKey("oidc[].groups_claim", "string", "groups", "Claim with the identity's groups."),
    ConfigKey("oidc[].email_claim", "string", "email", "Claim with the e-mail address."),
    ConfigKey("oidc[].extra_claims", "list of strings", [], "Other claims kept on the identity, for rules to match "
              "(e.g. GitHub Actions' `repository`, `ref`)."),
    ConfigKey("oidc[].leeway", "duration", "30s", "Clock skew allowed on `exp` and `nbf`."),
    ConfigKey("oidc[].jwks_uri", "URL", None, "Only for issuers without discovery."),
    ConfigKey("oidc[].max_delegation_depth", "integer", 4, "The longest delegation chain (RFC 8693 `act` claim, "
              "possibly nested) accepted in this issuer's tokens; `0` refuses delegated tokens. Every actor "
              "that names an `iss` must name a configured issuer."),
    # [[targets]]
    ConfigKey("targets[].name", "string", REQUIRED, "What agents type after `@` (letters, digits, `.`, `_`, `-`).",
              reload=True),
    ConfigKey("targets[].host", "string", REQUIRED, "Host name or address of the target's sshd.", reload=True),
    ConfigKey("targets[].port", "integer", 22, "Its port.", reload=True),
    ConfigKey("targets[].logins", "list of strings", REQUIRED, "Logins agents may use there.", reload=True),
    ConfigKey("targets[].default_login", "string", None, "Login when the agent names none.", reload=True,
              default_text="the only login, when there is one"),
    ConfigKey("targets[].host_keys", "list of strings", REQUIRED, "Pinned host keys (`TYPE BASE64`, as from "
              "`ssh-keyscan`).", reload=True),
    ConfigKey("targets[].credential", "string", "key", "`key`: a private key the gateway holds; `ca`: a "
              "per-session certificate from the target CA.", reload=True),
    ConfigKey("targets[].private_key", "path", None, "The key, for `credential = \"key\"`.", reload=True),
    ConfigKey("targets[].ca_key", "path", None, "A CA of this target's own, instead of `gateway.target_ca_key`.",
              reload=True),
    ConfigKey("targets[].cert_ttl", "duration", "5m", "Lifetime of per-session certificates.", reload=True),
    ConfigKey("targets[].connect_timeout", "duration", "10s", "Time to connect to the target.", reload=True),
    # [[access]]
    ConfigKey("access[].name", "string", None, "Named in the audit log and in refusals.", reload=True,
              default_text="`access[N]`"),
    ConfigKey("access[].subjects", "list of strings", [], "Subjects or e-mail addresses (globs). At least one of "
              "subjects, groups, claims is required (`[\"*\"]`: everyone).", reload=True),
    ConfigKey("access[].groups", "list of strings", [], "Groups (globs).", reload=True),
    ConfigKey("access[].claims", "table of strings", {}, "Claims that must all match (globs), e.g. "
              "`{ repository = \"org/*\" }`.", reload=True),
    ConfigKey("access[].targets", "list of strings", None, "Targets (globs).", reload=True,
              default_text="`[\"*\"]`; `[]` when the rule has a `clusters` key"),
    ConfigKey("access[].logins", "list of strings", ["*"], "Logins (globs).", reload=True),
    ConfigKey("access[].sftp", "bool", False, "Allow the sftp subsystem (file transfer).", reload=True),
    ConfigKey("access[].clusters", "list of strings", [], "Kubernetes clusters (globs).", reload=True),
    ConfigKey("access[].namespaces", "list of strings", ["*"], "Namespaces in them (globs).", reload=True),
    ConfigKey("access[].port_forward", "bool", False, "Allow `kubectl port-forward` (and the pods/services proxy).",
              reload=True),
    ConfigKey("access[].on_expiry", "string", "end", "When the session's credential expires: `end`, `warn` (tell "
              "the user and go on) or `allow`.", reload=True),
    ConfigKey("access[].max_session", "duration", "8h", "With `warn`/`allow`: the longest a session may go on.",
              reload=True),
    ConfigKey("access[].idle_timeout", "duration", None, "End a session without input or output for this long.",
              reload=True),
    ConfigKey("access[].max_duration", "duration", None, "End a session after this long.", reload=True),
    ConfigKey("access[].delegated", "bool", None, "Only delegated tokens (`true`: an `act` chain, an agent "
              "acting for the subject) or only direct ones (`false`).", default_text="either", reload=True),
    ConfigKey("access[].actors", "list of strings", [], "Only when an actor of the delegation chain (its subject or "
              "client id) matches one of these globs.", reload=True),
    ConfigKey("access[].max_delegation_depth", "integer", None, "Only for chains of at most this many actors.",
              default_text="any", reload=True),
    # [[clusters]]
    ConfigKey("clusters[].name", "string", REQUIRED, "Served at `/clusters/NAME`."),
    ConfigKey("clusters[].kubeconfig", "path", None, "The gateway's own credentials for the cluster (this or "
              "`in_cluster`)."),
    ConfigKey("clusters[].context", "string", None, "Context of the kubeconfig.", default_text="its current context"),
    ConfigKey("clusters[].in_cluster", "bool", False, "Use the pod's service account (re-read as it rotates)."),
    ConfigKey("clusters[].service_account_dir", "path", str(IN_CLUSTER_SA_DIR), "Where the service account is "
              "mounted."),
    ConfigKey("clusters[].connect_timeout", "duration", "10s", "Time to connect to the API server."),
    ConfigKey("clusters[].response_timeout", "duration", "60s", "Time to its response headers (watches and "
              "`logs -f` then stream as long as they like)."),
    ConfigKey("clusters[].user_prefix", "string", "", "Prepended to `Impersonate-User` (e.g. `oidc:`)."),
    ConfigKey("clusters[].group_prefix", "string", "", "Prepended to each `Impersonate-Group`."),
    # [state]
    ConfigKey("state.url", "URL", None, "`sqlite:///PATH` or `postgresql://USER@HOST:PORT/DB` (several replicas; "
              "password in `PGPASSWORD`; `--state`).", default_text="`sqlite:///DATA_DIR/state.db`"),
    ConfigKey("state.replica", "string", None, "This replica's stable name.", default_text="host name and data_dir"),
    # [[approvals]]
    ConfigKey("approvals[].name", "string", None, "Named to approvers, in markers and refusals.", reload=True,
              default_text="`approvals[N]`"),
    ConfigKey("approvals[].pattern", "string", None, "A regex searched in the command (one of pattern, argv_prefix, "
              "shell).", reload=True),
    ConfigKey("approvals[].argv_prefix", "list of strings", None, "Compared with the start of each simple "
              "command.", reload=True),
    ConfigKey("approvals[].shell", "string", None, "A rule about opening an interactive shell: `allow`, `approve` "
              "or `deny`.", reload=True),
    ConfigKey("approvals[].action", "string", "approve", "`allow`, `deny` or `approve`.", reload=True),
    ConfigKey("approvals[].subjects", "list of strings", [], "Whose commands (globs; with groups and claims: any "
              "matches; none: everyone).", reload=True),
    ConfigKey("approvals[].groups", "list of strings", [], "Groups (globs).", reload=True),
    ConfigKey("approvals[].claims", "table of strings", {}, "Claims (globs).", reload=True),
    ConfigKey("approvals[].targets", "list of strings", [], "SSH targets (globs; none: every target).", reload=True),
    ConfigKey("approvals[].clusters", "list of strings", [], "Kubernetes clusters (globs).", reload=True),
    ConfigKey("approvals[].namespaces", "list of strings", [], "Namespaces (globs).", reload=True),
    ConfigKey("approvals[].approvers", "list of strings", None, "Approver groups.", reload=True,
              default_text="`approval_defaults.approvers`"),
    ConfigKey("approvals[].min_approvals", "integer", None, "Approvals needed.", reload=True,
              default_text="`approval_defaults.min_approvals`"),
    ConfigKey("approvals[].timeout", "duration", None, "How long a request waits (1s to 7d).", reload=True,
              default_text="`approval_defaults.timeout`"),
    ConfigKey("approvals[].message", "string", None, "Shown to the agent and the approvers.", reload=True),
    ConfigKey("approvals[].delegated", "bool", None, "Only delegated tokens (`true`: an `act` chain, an agent "
              "acting for the subject) or only direct ones (`false`).", default_text="either", reload=True),
    ConfigKey("approvals[].actors", "list of strings", [], "Only when an actor of the delegation chain (its subject or "
              "client id) matches one of these globs.", reload=True),
    ConfigKey("approvals[].max_delegation_depth", "integer", None, "Only for chains of at most this many actors.",
              default_text="any", reload=True),
    # [approval_defaults]
    ConfigKey("approval_defaults.action", "string", "allow", "For commands no rule matches.", reload=True),
    ConfigKey("approval_defaults.shell", "string", "allow", "For opening a shell when no shell rule matches.",
              reload=True),
    ConfigKey("approval_defaults.approvers", "list of strings", [], "Approver groups of rules that name none.",
              reload=True),
    ConfigKey("approval_defaults.min_approvals", "integer", 1, "Approvals needed.", reload=True),
    ConfigKey("approval_defaults.timeout", "duration", "10m", "How long a request waits.", reload=True),
    ConfigKey("approval_defaults.requests_per_minute", "integer", 5, "Approval requests one session may make per "
              "minute.", reload=True),
    # [[webhooks]]
    ConfigKey("webhooks[].url", "URL", REQUIRED, "`http(s)://` endpoint that receives a POST per event.",
              reload=True),
    ConfigKey("webhooks[].format", "string", "json", "`json` (generic) or `slack` (Slack-compatible).",
              reload=True),
    ConfigKey("webhooks[].timeout", "duration", "5s", "Time for one delivery.", reload=True),
    # [roles]
    ConfigKey("roles.operators.subjects", "list of strings", [], "Subjects or e-mail addresses (globs)."),
    ConfigKey("roles.operators.groups", "list of strings", [], "Groups (globs)."),
    ConfigKey("roles.auditors.subjects", "list of strings", [], "Subjects or e-mail addresses (globs)."),
    ConfigKey("roles.auditors.groups", "list of strings", [], "Groups (globs)."),
    # [mcp]
    ConfigKey("mcp.enabled", "bool", True, "Serve `/mcp` (streamable HTTP) and its protected-resource metadata "
              "on the HTTP API."),
    ConfigKey("mcp.approval_wait", "duration", "1m", "How long one tool call waits for an approval (sending "
              "progress notifications) before it answers with the pending request; the request lives on until "
              "its rule's timeout."),
    ConfigKey("mcp.page_bytes", "integer", 32768, "The most output per stream in one tool result; the rest is "
              "paged with the `session_output` tool."),
    ConfigKey("mcp.progress_interval", "duration", "2s", "How often a waiting tool call sends progress."),
    # [limits]
    ConfigKey("limits.max_sessions_per_subject", "integer", 64, "Concurrent sessions of one subject (0: no limit)."),
    ConfigKey("limits.sessions_per_minute", "integer", 600, "New sessions of one subject per minute (0: no limit)."),
    ConfigKey("limits.lock_poll_interval", "duration", "1s", "How often each replica re-reads locks when no "
              "notification came (at most 1s)."),
    # [console]
    ConfigKey("console.client_id", "string", REQUIRED, "A public client at the issuer (no secret) allowed the "
              "authorization code grant with PKCE and the redirect URI `URL/console/callback`."),
    ConfigKey("console.issuer", "URL", None, "Which `[[oidc]]` issuer people sign in with.",
              default_text="the first `[[oidc]]` issuer"),
    ConfigKey("console.url", "URL", None, "The base URL people open (the redirect URI and the links in webhooks "
              "derive from it).", default_text="the URL of the request"),
    ConfigKey("console.scopes", "list of strings", None, "Scopes asked for (must include `openid`).",
              default_text='`["openid", "email", "profile"]`'),
    # [masking]
    ConfigKey("masking.secret_file", "path", None, "HMAC key of the masking log (created, mode 0600, if missing).",
              default_text="`DATA_DIR/masking.key`"),
    ConfigKey("masking.default_apply", "string", "both", "Where masking applies when no rule matches: `live` (what "
              "the agent sees, hence also the recording), `recording` (only the recorded copy), `both` or `none`."),
    ConfigKey("masking.flush_after", "duration", "5ms", "Show the agent the held-back echo of what it typed after "
              "this much silence (at most 100ms); other held output waits for the bytes that decide it."),
    ConfigKey("masking.alt_screen", "string", "mask", "Full-screen programs are scanned too: `mask` is the only "
              "value (kept for old configurations)."),
    ConfigKey("masking.detectors.<name>.enabled", "bool", True, "Turn the detector off with `false`."),
    ConfigKey("masking.detectors.<name>.style", "string", None, "`redact`, `keep_last`, `tag` or `fixed`.",
              default_text="the detector's own"),
    ConfigKey("masking.detectors.<name>.keep_last", "integer", None, "Characters kept with `keep_last` (1 to 16).",
              default_text="the detector's own"),
    ConfigKey("masking.detectors.<name>.tag", "string", None, "Replacement with `tag` (printable ASCII).",
              default_text="the detector's own"),
    ConfigKey("masking.detectors.<name>.fixed", "string", None, "Replacement with `fixed`.",
              default_text="the detector's own"),
    ConfigKey("masking.custom[].name", "string", REQUIRED, "Detector name in markers and metrics (lower case, "
              "digits, `_`)."),
    ConfigKey("masking.custom[].pattern", "string", REQUIRED, "The regex."),
    ConfigKey("masking.custom[].style", "string", "redact", "`redact`, `keep_last`, `tag` or `fixed`."),
    ConfigKey("masking.custom[].keep_last", "integer", 4, "Characters kept with `keep_last`."),
    ConfigKey("masking.custom[].tag", "string", None, "Replacement with `tag`."),
    ConfigKey("masking.custom[].fixed", "string", "****", "Replacement with `fixed`."),
    ConfigKey("masking.rules[].targets", "list of strings", [], "SSH targets (globs)."),
    ConfigKey("masking.rules[].clusters", "list of strings", [], "Kubernetes clusters (globs)."),
    ConfigKey("masking.rules[].groups", "list of strings", [], "The identity has one of these groups (globs)."),
    ConfigKey("masking.rules[].apply", "string", REQUIRED, "`live`, `recording`, `both` or `none`."),
)
