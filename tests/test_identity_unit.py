"""Unit tests for issue 8's parts that need no servers: lock matching, the per-identity
limiter, roles, config validation, the device-flow poll loop (interval, slow_down,
refusals, timeout), the login cache's refresh errors, ``--until`` parsing and the session
limits watchdog (expiry with end / warn / allow, max_duration, idle during an approval)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bastion import login as lg
from bastion.cli_identity import parse_until
from bastion.config import ConfigError, RoleMembers, Roles, parse_config
from bastion.control import (
    Lock,
    LockError,
    SessionLimiter,
    SessionLimits,
    has_role,
    parse_lock_target,
    roles_of,
)
from bastion.identity import Identity
from bastion.session import Session

ALICE = Identity(issuer="https://idp", subject="alice", groups=("dev", "contractors"), email="alice@example.com",
                 claims={"repository": "org/app"}, expires_at=time.time() + 3600)


def lock(kind: str, value: str, **kw: Any) -> Lock:
    return Lock(id="l1", kind=kind, value=value, reason="r", created_by={"subject": "op"}, created=0.0, **kw)


# -- locks -------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "value", "matches"), [
    ("subject", "alice", True), ("subject", "alice@example.com", True), ("subject", "ali*", False),
    ("group", "contractors", True), ("group", "sre", False),
    ("target", "web-1", True), ("target", "web-2", False),
    ("claim", "repository=org/app", True), ("claim", "repository=org/other", False),
])
def test_lock_matches_exactly(kind: str, value: str, matches: bool) -> None:
    assert lock(kind, value).matches(ALICE, "web-1") is matches


def test_lock_activity_and_session_kills() -> None:
    now = time.time()
    assert lock("subject", "alice", until=now + 10).active(now)
    assert not lock("subject", "alice", until=now - 1).active(now)
    assert not lock("subject", "alice", removed=now).active(now)
    kill = lock("session", "s-1")
    assert kill.matches(ALICE, "web-1", "s-1") and not kill.matches(ALICE, "web-1", "s-2")
    row = {"id": "s-1", "target": "web-1", "identity": ALICE.to_dict()}
    assert lock("group", "dev").matches_row(row) and not lock("group", "ops").matches_row(row)
    assert lock("target", "web-1").refusal() == "target web-1 is locked by an operator: r (lock l1)"


@pytest.mark.parametrize(("kind", "value", "error"), [
    ("user", "alice", "a lock is on one of subject, group, target, claim"),
    ("subject", "  ", "the subject to lock is empty"),
    ("claim", "repository", "NAME=VALUE"),
    ("claim", "=x", "NAME=VALUE"),
])
def test_lock_targets_that_make_no_sense(kind: str, value: str, error: str) -> None:
    with pytest.raises(LockError, match=error):
        parse_lock_target(kind, value)
    assert parse_lock_target("claim", " repository = org/app ") == ("claim", "repository=org/app")


# -- limits ------------------------------------------------------------------------------


def test_concurrent_sessions_per_subject() -> None:
    limiter = SessionLimiter()
    assert limiter.admit("a", "alice", 2, 0, now=0) is None
    assert limiter.admit("b", "alice", 2, 0, now=0) is None
    refused = limiter.admit("c", "alice", 2, 0, now=0)
    assert refused is not None and "2 open at once" in refused
    assert limiter.admit("d", "bob", 2, 0, now=0) is None  # per subject
    limiter.release_pending("a")  # never started
    assert limiter.admit("c", "alice", 2, 0, now=0) is None
    limiter.started("b", "alice")
    limiter.release_pending("b")  # started: only its end frees the slot
    assert limiter.count("alice") == 2
    limiter.ended("b")
    assert limiter.count("alice") == 1
    assert limiter.admit("x", "alice", 2, 0, now=10_000) is None  # a pending slot nobody released expires
    assert limiter.count("alice") == 1


def test_new_sessions_per_minute() -> None:
    limiter = SessionLimiter()
    for i in range(3):
        assert limiter.admit(f"s{i}", "ci", 0, 3, now=100 + i) is None
    refused = limiter.admit("s3", "ci", 0, 3, now=110)
    assert refused is not None and "3 in the last minute" in refused and "try again in 51s" in refused
    assert limiter.admit("s4", "ci", 0, 3, now=161) is None  # the first one left the window


# -- roles and config ----------------------------------------------------------------------


def test_roles_by_group_subject_or_email_glob() -> None:
    roles = Roles(operators=RoleMembers(subjects=("*@example.com",)), auditors=RoleMembers(groups=("dev",)))
    assert roles_of(roles, ALICE) == ["operator", "auditor"]
    bob = Identity(issuer="i", subject="bob", groups=("ops",))
    assert roles_of(roles, bob) == [] and not has_role(Roles(), ALICE, "operator")


BASE = {"oidc": [{"issuer": "https://idp.example.com", "audience": "guarita"}]}


def test_config_session_limits_roles_and_limits(tmp_path: Path) -> None:
    raw = {**BASE, "access": [{"subjects": ["*"], "on_expiry": "allow", "max_session": "2h", "idle_timeout": "30m",
                               "max_duration": "8h"}],
           "roles": {"operators": {"groups": ["sre"]}, "auditors": {"subjects": ["audit@example.com"]}},
           "limits": {"max_sessions_per_subject": 5, "sessions_per_minute": 0, "lock_poll_interval": "250ms"}}
    config = parse_config(raw, base=tmp_path)
    rule = config.access[0]
    assert (rule.on_expiry, rule.max_session, rule.idle_timeout, rule.max_duration) == ("allow", 7200, 1800, 28800)
    assert config.roles.operators.groups == ("sre",) and config.roles.auditors.subjects == ("audit@example.com",)
    assert (config.limits.max_sessions_per_subject, config.limits.sessions_per_minute) == (5, 0)
    assert config.limits.lock_poll_interval == 0.25


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    raw = {**BASE, "access": [{"subjects": ["*"], "on_expiry": "never", "idle_timeout": "0s"}],
           "roles": {"operator": {"groups": ["sre"]}, "auditors": {"group": ["x"]}},
           "limits": {"max_sessions_per_subject": -1, "lock_poll_interval": "5s"}}
    with pytest.raises(ConfigError) as info:
        parse_config(raw, base=tmp_path)
    keys = dict(info.value.problems)
    assert "must be 'end', 'warn' or 'allow'" in keys["access[0].on_expiry"]
    assert "positive duration" in keys["access[0].idle_timeout"]
    assert "unknown key" in keys["roles.operator"] and "unknown key" in keys["roles.auditors.group"]
    assert "0 (no limit) or more" in keys["limits.max_sessions_per_subject"]
    assert "at most 1s" in keys["limits.lock_poll_interval"]


def test_until_is_a_duration_or_a_date() -> None:
    assert parse_until("30m", now=1000.0) == 2800.0
    assert parse_until("2030-01-01T00:00:00Z") == 1893456000.0
    with pytest.raises(Exception, match="duration from now"):
        parse_until("next tuesday")


# -- the device flow ---------------------------------------------------------------------------

SETTINGS = lg.LoginSettings(issuer="https://idp", client_id="cli")


class FakeIdP:
    """Answers the token endpoint from a script, on a fake clock."""

    def __init__(self, answers: list[tuple[int, dict[str, Any]]]) -> None:
        self.answers = answers
        self.now = 0.0
        self.polls: list[float] = []

    def post(self, url: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        assert form["grant_type"] == lg.DEVICE_GRANT and form["device_code"] == "dc" and form["client_id"] == "cli"
        self.polls.append(self.now)
        return self.answers.pop(0) if self.answers else (400, {"error": "authorization_pending"})

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def poll(self, timeout: float | None = None, interval: int = 2) -> dict[str, Any]:
        start = {"device_code": "dc", "interval": interval, "expires_in": 600}
        return lg.poll_for_tokens(SETTINGS, "https://idp/token", start, timeout, post=self.post, sleep=self.sleep,
                                  clock=lambda: self.now)


def test_device_flow_polls_at_the_interval_and_slows_down() -> None:
    pending, slow = (400, {"error": "authorization_pending"}), (400, {"error": "slow_down"})
    idp = FakeIdP([pending, slow, pending, (200, {"access_token": "at", "refresh_token": "rt"})])
    assert idp.poll()["access_token"] == "at"
    assert idp.polls == [2, 4, 11, 18]  # every 2 s; after slow_down, 5 s slower (RFC 8628 §3.5)


@pytest.mark.parametrize(("error", "message"), [
    ("access_denied", "the sign-in was refused"),
    ("expired_token", "the code expired"),
    ("invalid_client", "refused the login: invalid_client: bad"),
])
def test_device_flow_refusals(error: str, message: str) -> None:
    idp = FakeIdP([(400, {"error": error, "error_description": "bad"})])
    with pytest.raises(lg.LoginError, match=message):
        idp.poll()


def test_device_flow_gives_up_at_the_timeout() -> None:
    idp = FakeIdP([])
    with pytest.raises(lg.LoginTimeout, match="not completed within 5s"):
        idp.poll(timeout=5)
    assert idp.now == 5 and idp.polls[-1] == 5  # a last poll right at the deadline


# -- the login cache -----------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "token.json"
    monkeypatch.setenv("GUARITA_TOKEN_CACHE", str(path))
    return path


def _jwt(exp: float) -> str:
    import base64

    body = base64.urlsafe_b64encode(json.dumps({"sub": "alice", "exp": exp}).encode()).decode().rstrip("=")
    return f"e30.{body}.sig"


def test_login_cache_refreshes_and_keeps_the_refresh_token(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = _jwt(time.time() - 5), _jwt(time.time() + 600)
    cache.write_text(json.dumps({"tokens": {}, "login": {
        "issuer": "https://idp", "client_id": "cli", "token_endpoint": "https://idp/token", "access_token": old,
        "refresh_token": "rt-1", "expires_at": time.time() - 5, "issued_at": time.time() - 600}}))
    forms: list[dict[str, str]] = []

    def post(url: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        forms.append(form)
        return 200, {"access_token": new, "expires_in": 600}  # no new refresh token: the old one stays

    monkeypatch.setattr(lg, "post_form", post)
    assert lg.cached_token() == new
    assert forms == [{"grant_type": "refresh_token", "refresh_token": "rt-1", "client_id": "cli"}]
    assert json.loads(cache.read_text())["login"]["refresh_token"] == "rt-1"
    assert lg.cached_token() == new and len(forms) == 1  # fresh now: no second refresh
    assert cache.stat().st_mode & 0o777 == 0o600


def test_login_cache_refresh_errors(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = {"issuer": "https://idp", "client_id": "cli", "token_endpoint": "https://idp/token",
             "access_token": _jwt(time.time() - 5), "expires_at": time.time() - 5, "issued_at": time.time() - 600}
    cache.write_text(json.dumps({"tokens": {}, "login": entry}))
    with pytest.raises(lg.LoginError, match="gave no refresh token; run `bastion login`"):
        lg.cached_token()
    cache.write_text(json.dumps({"tokens": {}, "login": {**entry, "refresh_token": "rt"}}))
    monkeypatch.setattr(lg, "post_form", lambda url, form: (400, {"error": "invalid_grant"}))
    with pytest.raises(lg.LoginError, match="no longer accepts your login .* run `bastion login`"):
        lg.cached_token()
    assert lg.login_entry() is not None  # kept: the message stays the same until the next login


def test_login_settings_from_env_file_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "login.toml"
    path.write_text('issuer = "https://file.example"\nclient_id = "from-file"\n')
    monkeypatch.setenv("GUARITA_LOGIN_CONFIG", str(path))
    monkeypatch.setenv("GUARITA_LOGIN_CLIENT_ID", "from-env")
    s = lg.load_settings()
    assert (s.issuer, s.client_id, s.scope) == ("https://file.example", "from-env", "openid offline_access")
    assert lg.load_settings(issuer="https://flag.example").issuer == "https://flag.example"
    with pytest.raises(lg.LoginError, match="plain http"):
        lg.load_settings(issuer="http://idp.example.com")
    path.write_text('issuer = "https://x"\nclinet_id = "typo"\n')
    with pytest.raises(lg.LoginError, match="unknown key"):
        lg.load_settings()


# -- the session limits watchdog -----------------------------------------------------------------


def _session(expires_in: float | None, started_ago: float = 0.0) -> Any:
    """A Session with only what the watchdog reads; stop/notify/marker recorded."""
    s: Any = object.__new__(Session)
    now = time.time()
    identity = Identity(issuer="i", subject="alice", expires_at=now + expires_in if expires_in is not None else 0.0)
    s.info = SimpleNamespace(identity=identity)
    s.started, s.ended, s.approval_cancel = now - started_ago, False, None
    s.last_activity = time.monotonic()
    s.calls = []

    def stop(kind: str, message: str, **fields: Any) -> bool:
        s.calls.append(("stop", kind, message))
        s.ended = True
        return True

    s.stop = stop
    s.notify = lambda text: s.calls.append(("notify", text))
    s.marker = lambda kind, **fields: s.calls.append(("marker", kind, fields.get("policy")))
    return s


def _watch(s: Any, limits: SessionLimits, timeout: float = 5) -> list[tuple[Any, ...]]:
    asyncio.run(asyncio.wait_for(Session._watch_limits(s, limits), timeout))
    return list(s.calls)


def test_expiry_ends_the_session_after_a_warning() -> None:
    calls = _watch(_session(0.3, started_ago=100), SessionLimits())
    assert calls[0][0] == "notify" and "your credential expires in 1s" in calls[0][1]
    assert calls[1][:2] == ("stop", "expired") and "on_expiry = end" in calls[1][2]


def test_expiry_with_warn_goes_on_until_max_session() -> None:
    calls = _watch(_session(0.2), SessionLimits(on_expiry="warn", max_session=0.6))
    assert calls[0] == ("marker", "credential-expired", "warn")
    assert calls[1][0] == "notify" and "policy lets this session go on" in calls[1][1]
    assert calls[2][:2] == ("stop", "max-session")


def test_expiry_with_allow_is_only_recorded() -> None:
    calls = _watch(_session(0.1), SessionLimits(on_expiry="allow", max_session=0.4))
    assert [c[0] for c in calls] == ["marker", "stop"] and calls[1][1] == "max-session"


def test_max_duration_and_idle() -> None:
    calls = _watch(_session(3600), SessionLimits(max_duration=0.3))
    assert calls[-1][:2] == ("stop", "max-duration") and "maximum duration of 1s" in calls[-1][2]
    s = _session(3600)
    s.approval_cancel = asyncio.Event()  # waiting for an approver is not idleness

    async def run() -> None:
        task = asyncio.create_task(Session._watch_limits(s, SessionLimits(idle_timeout=0.2)))
        await asyncio.sleep(0.5)
        assert s.calls == []
        s.approval_cancel = None
        await asyncio.wait_for(task, 2)

    asyncio.run(run())
    assert s.calls[-1][:2] == ("stop", "idle")
