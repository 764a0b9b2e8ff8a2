"""Shared fixtures: a real OIDC provider, real OpenSSH targets and a real guarita gateway.

Everything is session-scoped, and under pytest-xdist every worker gets its own copy
(own ports, own temp dirs, own processes): tests on one worker run one after the other
against that worker's gateway, so "the audit events since my mark" belong to the test.

Fixtures
--------
``oidc``         OIDCProvider (Node oidc-provider), clients ``agent-sre`` (groups [sre],
                 email), ``agent-ci`` (groups [ci], claim repository="org/app"),
                 ``agent-nobody`` (no groups) and ``agent-long`` (groups [sre] and a padding
                 claim: its access token is >= 1,500 bytes).
``oidc_short``   A second provider whose tokens live 1 s (issuer leeway 1 s in the config):
                 for expired-token tests.
``targets``      Targets: ``web_key`` / ``web_ca`` (SshdTarget), ``login``, ``gateway_key``
                 (private key the gateway holds for web-key), ``target_ca_key``.
``gateway``      GatewayProcess running ``bastion serve --config`` on free ports.
``start_gateway``  function-scoped factory: ``start_gateway(config_text)`` runs another
                 gateway with a custom config, stopped at the end of the test.

Helpers: :func:`read_recording`, :func:`find_session`, :func:`wait_for`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from recorder.events import Event
from recorder.segment import parse_segment, segment_name
from recorder.store import session_prefix
from tests.support.moto import MotoServer, set_aws_env
from tests.support.oidc import OIDCProvider
from tests.support.openssh import (
    SshdTarget,
    ensure_login_user,
    free_port,
    keygen,
    public_key_line,
)

BASTION = [sys.executable, "-m", "bastion.cli"]
AUDIENCE = "guarita"

CLIENTS = [
    {
        "client_id": "agent-sre",
        "client_secret": "sre-secret",
        "groups": ["sre"],
        "email": "agent-sre@example.com",
    },
    {
        "client_id": "agent-ci",
        "client_secret": "ci-secret",
        "groups": ["ci"],
        "extra": {"repository": "org/app"},
    },
    {"client_id": "agent-nobody", "client_secret": "nobody-secret", "groups": []},
    {
        "client_id": "agent-long",
        "client_secret": "long-secret",
        "groups": ["sre"],
        "email": "agent-long@example.com",
        "extra": {"padding": "p" * 1300},
    },
    # Tokens that live 5 s, for sessions that must end when the credential expires.
    {"client_id": "agent-brief-sre", "client_secret": "brief-sre-secret", "groups": ["sre"], "ttl": 5},
    {"client_id": "agent-brief-ci", "client_secret": "brief-ci-secret", "groups": ["ci"],
     "extra": {"repository": "org/app"}, "ttl": 5},
]
SHORT_CLIENTS = [{"client_id": "agent-short", "client_secret": "short-secret", "groups": ["sre"]}]


# ---------------------------------------------------------------------------
# polling
# ---------------------------------------------------------------------------


def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition"
) -> Any:
    """Poll ``predicate`` (tiny backoff) until it returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.1)


# ---------------------------------------------------------------------------
# recordings and audit log
# ---------------------------------------------------------------------------


def read_recording(
    store_dir: Path, session_id: str, timeout: float = 15.0
) -> tuple[dict[str, Any], list[Event]]:
    """Wait (deadline) for the session's manifest in a ``file://`` store, then return
    ``(manifest, events)`` with the events of every segment in order.

    Also checks what any reader relies on: every segment the manifest lists exists, its
    SHA-256 and size match the manifest, and each header carries the previous segment's
    hash (the chain) and the right index and session id.
    """
    session_dir = Path(store_dir) / session_prefix(session_id)
    manifest_path = session_dir / "manifest.json"
    wait_for(manifest_path.exists, timeout, f"manifest of {session_id} in {session_dir}")
    manifest = json.loads(manifest_path.read_text())
    events: list[Event] = []
    prev: str | None = None
    for record in manifest["segments"]:
        data = (session_dir / segment_name(record["index"])).read_bytes()
        assert hashlib.sha256(data).hexdigest() == record["sha256"], f"segment {record['index']} hash"
        assert len(data) == record["size"]
        header, seg_events = parse_segment(data, segment_name(record["index"]))
        assert header["session"] == session_id
        assert header["index"] == record["index"]
        assert header["prev_sha256"] == prev, f"hash chain broken at segment {record['index']}"
        assert len(seg_events) == record["events"]
        prev = record["sha256"]
        events.extend(seg_events)
    return manifest, events


def stream_bytes(events: list[Event], stream: str) -> bytes:
    """Concatenated bytes of one stream (``o``, ``e`` or ``i``), text and binary forms."""
    return b"".join(e.stream_bytes() or b"" for e in events if e.stream == stream)


_ANY = object()


def find_session(events: list[dict[str, Any]], command: Any = _ANY, **fields: Any) -> str:
    """The id of the last ``session.start`` audit event matching ``command`` and ``fields``."""
    for event in reversed(events):
        if event.get("event") != "session.start":
            continue
        if command is not _ANY and event.get("command") != command:
            continue
        if all(event.get(k) == v for k, v in fields.items()):
            return str(event["session"])
    raise LookupError(f"no session.start with command={command!r} {fields} in the audit log")


# ---------------------------------------------------------------------------
# the gateway process
# ---------------------------------------------------------------------------


class GatewayStartError(RuntimeError):
    pass


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _ssh_banner(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.settimeout(2)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


@dataclass
class GatewayProcess:
    """``bastion serve --config FILE`` as a subprocess, with helpers to read what it wrote."""

    config_path: Path
    data_dir: Path
    ssh_port: int = 0
    http_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def recordings_dir(self) -> Path:
        return self.data_dir / "recordings"

    @property
    def audit_log(self) -> Path:
        return self.data_dir / "audit.jsonl"

    @property
    def stderr_log(self) -> Path:
        return self.data_dir / "gateway-stderr.log"

    # -- lifecycle --------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        """Start on free ports (retrying if another process grabs one) and wait until
        /healthz answers and the SSH port speaks SSH."""
        last: Exception | None = None
        for _ in range(4):
            self._pick_ports()
            try:
                self._spawn_and_wait(timeout)
                return self
            except GatewayStartError as exc:
                last = exc
                self.stop()
                if "address already in use" not in str(exc).lower():
                    raise
        raise last  # type: ignore[misc]

    # What a subclass with more front doors changes: ports, command line, environment, readiness.

    def _pick_ports(self) -> None:
        self.ssh_port, self.http_port = free_port(), free_port()

    def _command(self) -> list[str]:
        return [*BASTION, "serve", "--config", str(self.config_path),
                "--ssh-listen", f"127.0.0.1:{self.ssh_port}", "--http-listen", f"127.0.0.1:{self.http_port}"]

    def _environment(self) -> dict[str, str] | None:
        return None  # inherit ours

    def _ready(self) -> bool:
        return _http_ok(self.http_url + "/healthz") and _ssh_banner(self.ssh_port)

    def _spawn_and_wait(self, timeout: float) -> None:
        with open(self.stderr_log, "ab") as log:
            self.proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True, env=self._environment())
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            if self.proc.poll() is not None:
                raise GatewayStartError(f"gateway exited with {self.proc.returncode}:\n{self.log_text()}")
            if self._ready():
                return
            if time.monotonic() > deadline:
                raise GatewayStartError(f"gateway not ready after {timeout}s:\n{self.log_text()}")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def __enter__(self) -> GatewayProcess:
        """``with GatewayProcess(config, data_dir) as gw:`` starts it and always stops it,
        a start that fails half way included."""
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 15.0) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=10)
        return proc.returncode

    # -- what it wrote ------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.stderr_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def audit_events(self, since: int = 0) -> list[dict[str, Any]]:
        """Parsed audit log lines (from line ``since`` on; see :meth:`audit_mark`)."""
        try:
            lines = self.audit_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        # A line being written right now may be incomplete: ignore a partial last line.
        out = []
        for line in lines[since:]:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def audit_mark(self) -> int:
        """Number of audit lines so far: pass it as ``since`` to see only newer events."""
        try:
            return len(self.audit_log.read_text().splitlines())
        except FileNotFoundError:
            return 0

    def wait_audit(
        self, event: str, since: int = 0, timeout: float = 10.0, **fields: Any
    ) -> dict[str, Any]:
        """Poll until an audit event named ``event`` with ``fields`` appears; return it."""

        def find() -> dict[str, Any] | None:
            for e in self.audit_events(since):
                if e.get("event") == event and all(e.get(k) == v for k, v in fields.items()):
                    return e
            return None

        try:
            return wait_for(find, timeout, f"audit event {event} {fields}")
        except TimeoutError:
            raise AssertionError(
                f"no audit event {event} {fields}; got {self.audit_events(since)}"
            ) from None

    def recordings(self) -> list[str]:
        """Ids of sessions whose manifest has reached the store."""
        return sorted(p.parent.name for p in self.recordings_dir.glob("*/*/*/*/manifest.json"))

    def read_recording(self, session_id: str, timeout: float = 15.0) -> tuple[dict[str, Any], list[Event]]:
        return read_recording(self.recordings_dir, session_id, timeout)

    def session_recording(
        self, since: int = 0, command: Any = _ANY, timeout: float = 15.0, **fields: Any
    ) -> tuple[str, dict[str, Any], list[Event]]:
        """Find a session in the audit log (after ``since``) and read its recording."""
        sid = wait_for(
            lambda: _try_find(self.audit_events(since), command, fields), timeout, "session.start"
        )
        manifest, events = self.read_recording(sid, timeout)
        return sid, manifest, events


def _try_find(events: list[dict[str, Any]], command: Any, fields: dict[str, Any]) -> str | None:
    try:
        return find_session(events, command, **fields)
    except LookupError:
        return None


# ---------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------


def toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def toml_list(values: list[str]) -> str:
    return "[" + ", ".join(toml_str(v) for v in values) + "]"


def target_block(
    name: str,
    port: int,
    logins: list[str],
    host_keys: list[str],
    credential: str = "key",
    private_key: Path | None = None,
    extra: str = "",
) -> str:
    lines = [
        "[[targets]]",
        f"name = {toml_str(name)}",
        'host = "127.0.0.1"',
        f"port = {port}",
        f"logins = {toml_list(logins)}",
        f"host_keys = {toml_list(host_keys)}",
        f"credential = {toml_str(credential)}",
    ]
    if private_key is not None:
        lines.append(f"private_key = {toml_str(str(private_key))}")
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


def gateway_config(
    data_dir: Path,
    issuers: list[tuple[str, str]],
    targets: str,
    access: str,
    segment_seconds: str = "1s",
    extra_gateway: str = "",
    env_allowlist: list[str] | None = None,
) -> str:
    """A whole guarita.toml. ``issuers`` is a list of (issuer URL, leeway)."""
    parts = [
        "[gateway]",
        f"data_dir = {toml_str(str(data_dir))}",
        f"target_ca_key = {toml_str(str(data_dir / 'target_ca_key'))}",
        f"audit_log = {toml_str(str(data_dir / 'audit.jsonl'))}",
        extra_gateway,
        "",
        "[recording]",
        f"url = {toml_str((data_dir / 'recordings').as_uri())}",
        f"segment_seconds = {toml_str(segment_seconds)}",
        "segment_bytes = 262144",
        "",
    ]
    if env_allowlist is not None:
        parts += ["[ssh]", f"env_allowlist = {toml_list(env_allowlist)}", ""]
    for url, leeway in issuers:
        parts += [
            "[[oidc]]",
            f"issuer = {toml_str(url)}",
            f"audience = {toml_str(AUDIENCE)}",
            'extra_claims = ["repository"]',
            f"leeway = {toml_str(leeway)}",
            "",
        ]
    parts += [targets, access]
    return "\n".join(parts)


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BASTION, "check-config", str(path)], capture_output=True, text=True, timeout=60
    )


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


# moto_server with Object Lock, one per test module (S3 recording tests).
@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory):
    server = MotoServer(tmp_path_factory.mktemp("moto"), record=False).start()
    yield server
    server.stop()


@pytest.fixture
def s3env(moto: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MotoServer:
    set_aws_env(monkeypatch, moto.url, tmp_path)
    return moto


@pytest.fixture(scope="session")
def oidc() -> Iterator[OIDCProvider]:
    with OIDCProvider(clients=CLIENTS, audience=AUDIENCE, token_ttl=600) as provider:
        yield provider


@pytest.fixture(scope="session")
def oidc_short() -> Iterator[OIDCProvider]:
    """Tokens that live one second (the gateway gives this issuer a 1 s leeway)."""
    with OIDCProvider(clients=SHORT_CLIENTS, audience=AUDIENCE, token_ttl=1) as provider:
        yield provider


@pytest.fixture(scope="session")
def gateway_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway")


@dataclass
class Targets:
    login: str
    web_key: SshdTarget
    web_ca: SshdTarget
    gateway_key: Path  # private key the gateway holds for web-key (authorized there)
    target_ca_key: Path  # the gateway's target CA (web-ca trusts its public half)
    other_host_key: str  # a host key line that belongs to no target


@pytest.fixture(scope="session")
def targets(gateway_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Targets]:
    login = ensure_login_user()
    gateway_key = keygen(gateway_dir / "web_key_id", comment="guarita-gateway")
    ca_key = keygen(gateway_dir / "target_ca_key", comment="guarita-target-ca")
    other = keygen(tmp_path_factory.mktemp("otherkey") / "host_key", comment="not-the-target")
    work = tmp_path_factory.mktemp("targets")
    # AcceptEnv on web-key deliberately admits variables guarita must never pass on,
    # so the tests see the gateway's filter and not sshd's.
    web_key = SshdTarget(
        work,
        authorized_keys=[public_key_line(gateway_key)],
        extra_config="AcceptEnv LD_PRELOAD PATH",
    )
    web_ca = SshdTarget(work, trusted_user_ca_keys=[public_key_line(ca_key)])
    try:
        web_key.start()
        web_ca.start()
        yield Targets(login, web_key, web_ca, gateway_key, ca_key, public_key_line(other))
    finally:
        web_key.stop()
        web_ca.stop()


def _closed_port() -> int:
    return free_port()  # nothing listens there (a race with another bind is harmless)


@pytest.fixture(scope="session")
def gateway(
    oidc: OIDCProvider, oidc_short: OIDCProvider, targets: Targets, gateway_dir: Path
) -> Iterator[GatewayProcess]:
    t = targets
    target_text = "\n".join([
        target_block("web-key", t.web_key.port, [t.login], [t.web_key.host_key_line],
                     "key", t.gateway_key),
        target_block("web-ca", t.web_ca.port, [t.login], [t.web_ca.host_key_line], "ca"),
        # Broken on purpose: nothing listens on its port.
        target_block("web-down", _closed_port(), [t.login], [t.web_key.host_key_line],
                     "key", t.gateway_key, extra='connect_timeout = "5s"'),
        # Broken on purpose: the pinned host key is not web-key's.
        target_block("web-badkey", t.web_key.port, [t.login], [t.other_host_key],
                     "key", t.gateway_key),
    ])
    access = "\n".join([
        "[[access]]",
        'name = "sre everywhere"',
        'groups = ["sre"]',
        'targets = ["*"]',
        "",
        "[[access]]",
        'name = "org CI jobs on web-ca"',
        'claims = { repository = "org/*" }',
        'targets = ["web-ca"]',
        "",
    ])
    text = gateway_config(
        gateway_dir,
        [(oidc.issuer, "5s"), (oidc_short.issuer, "1s")],  # type: ignore[list-item]
        target_text,
        access,
        env_allowlist=["LANG", "LC_*", "TZ", "GUARITA_TEST_ALLOWED", "LD_*"],
    )
    config_path = gateway_dir / "guarita.toml"
    config_path.write_text(text)
    checked = check_config(config_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with GatewayProcess(config_path, gateway_dir) as gw:
        yield gw


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """``start_gateway(config_text, data_dir=None, wait=True)``: another gateway for one test.

    The config is written to ``tmp_path/guarita.toml``; ``{data_dir}`` in the text is
    replaced by the data dir. With ``wait=False`` the process is only spawned (for
    configs that must make it exit), and ``.proc`` can be waited on.
    """
    started: list[GatewayProcess] = []

    def start(config_text: str, data_dir: Path | None = None, wait: bool = True) -> GatewayProcess:
        ddir = data_dir or (tmp_path / f"gw{len(started)}")
        ddir.mkdir(parents=True, exist_ok=True)
        path = ddir / "guarita.toml"
        path.write_text(config_text.replace("{data_dir}", str(ddir)))
        gw = GatewayProcess(path, ddir)
        started.append(gw)
        if wait:
            gw.start()
        else:
            gw.ssh_port, gw.http_port = free_port(), free_port()
            with open(gw.stderr_log, "ab") as log:
                gw.proc = subprocess.Popen(
                    [*BASTION, "serve", "--config", str(path),
                     "--ssh-listen", f"127.0.0.1:{gw.ssh_port}",
                     "--http-listen", f"127.0.0.1:{gw.http_port}"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                )
        return gw

    yield start
    for gw in started:
        gw.stop()


def bastion_bin() -> list[str]:
    """How tests run the ``bastion`` CLI (the console script when installed)."""
    found = shutil.which("bastion")
    return [found] if found else list(BASTION)
