"""Credential guessing is throttled and every refusal is audited, on the SSH front door
(the real OpenSSH client, a real sshd target, the Node OIDC provider).

* at most 6 authentication attempts per connection, then a clear refusal;
* failed logins limited per source address and per (claimed) subject, refused before any
  verification with one clear line; a burst of 200 bad tokens is counted in the metrics;
* agent forwarding, X11 forwarding, environment variables the allowlist drops, and a client
  that sends garbage instead of SSH are each in the audit log.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import asyncssh
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from bastion.doors.ssh.authlimit import MAX_AUTH_TRIES, PER_ADDRESS, PER_SUBJECT
from tests.conftest import GatewayProcess, Targets, gateway_config, target_block, wait_for
from tests.support.oidc import OIDCProvider
from tests.support.openssh import run_ssh
from tests.test_operations import access_block, scrape, value


def _forged(oidc: OIDCProvider, client: str) -> str:
    """A token for ``client`` signed by a key nobody trusts (its claims are real)."""
    token = oidc.token(client)
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(claims, key, algorithm="RS256", headers=header)


@pytest.fixture
def guarded(tmp_path: Path, oidc: OIDCProvider, targets: Targets,
            start_gateway: Callable[..., GatewayProcess]) -> GatewayProcess:
    data = tmp_path / "gw"
    t = targets
    text = gateway_config(data, [(oidc.issuer, "5s")],  # type: ignore[list-item]
                          target_block("web-key", t.web_key.port, [t.login], [t.web_key.host_key_line], "key",
                                       t.gateway_key),
                          access_block("everyone", ["sre", "ci"], ["*"]), env_allowlist=["LANG"])
    return start_gateway(text, data_dir=data)


def dest(gw: GatewayProcess, user: str) -> list[str]:
    return ["-p", str(gw.ssh_port), f"{user}@127.0.0.1"]


def test_six_attempts_per_connection_with_real_ssh(guarded: GatewayProcess, oidc: OIDCProvider,
                                                   targets: Targets) -> None:
    mark = guarded.audit_mark()
    # The client would go on answering 30 prompts; the gateway stops it at 6.
    r = run_ssh(["-o", "NumberOfPasswordPrompts=30", *dest(guarded, f"{targets.login}@web-key"), "true"],
                token=_forged(oidc, "agent-sre"))
    assert r.returncode == 255
    assert b"too many authentication attempts" in r.stderr, r.stderr
    events = guarded.audit_events(mark)
    failures = [e for e in events if e["event"] == "auth.failure"]
    assert len(failures) == MAX_AUTH_TRIES, [e["event"] for e in events]
    throttled = [e for e in events if e["event"] == "auth.throttled"]
    assert [e["scope"] for e in throttled] == ["connection"]


async def _bad_logins(gw: GatewayProcess, tokens: list[str], parallel: int = 20) -> int:
    """One connection per token (password method); returns how many were refused."""
    refused = 0
    sem = asyncio.Semaphore(parallel)

    async def one(token: str) -> None:
        nonlocal refused
        async with sem:
            try:
                conn = await asyncssh.connect("127.0.0.1", gw.ssh_port, username="x@web-key", password=token,
                                              known_hosts=None, preferred_auth="password", client_keys=None,
                                              agent_path=None)
                conn.close()
            except (asyncssh.Error, OSError):
                refused += 1

    await asyncio.gather(*(one(t) for t in tokens))
    return refused


def test_failed_logins_limited_per_subject_and_address(guarded: GatewayProcess, oidc: OIDCProvider,
                                                       targets: Targets) -> None:
    ci = dest(guarded, f"{targets.login}@web-key")
    # Per subject: forged tokens naming agent-ci, past the limit: then even agent-ci's real token
    # is refused for the window, with the reason; agent-sre (same address) still gets in.
    before = scrape(guarded)
    asyncio.run(_bad_logins(guarded, [_forged(oidc, "agent-ci")] * PER_SUBJECT))
    r = run_ssh([*ci, "true"], token=oidc.token("agent-ci"))
    assert r.returncode == 255 and b"too many failed logins for agent-ci" in r.stderr, r.stderr
    ok = run_ssh([*ci, "echo sre-still-in"], token=oidc.token("agent-sre"))
    assert ok.returncode == 0 and ok.stdout == b"sre-still-in\n", ok.stderr

    # Per address: a burst of 200 bad tokens from 127.0.0.1. Past the limit they are refused
    # before any verification (no JWT parsed, no key looked up), and the metrics show it.
    burst = [_forged(oidc, "agent-sre")] * 200
    assert asyncio.run(_bad_logins(guarded, burst)) == 200
    after = scrape(guarded)
    verified = value(after, "guarita_auth_failures_total", front_door="ssh", reason="bad_signature") - \
        value(before, "guarita_auth_failures_total", front_door="ssh", reason="bad_signature")
    throttled = value(after, "guarita_auth_throttled_total", scope="address")
    assert verified <= PER_ADDRESS + 1, verified  # everything past the limit cost no verification
    assert throttled >= 200 - PER_ADDRESS, throttled
    # The real client sees one clear line, even with a valid token, until the window moves on.
    r = run_ssh([*ci, "true"], token=oidc.token("agent-sre"))
    assert r.returncode == 255 and b"too many failed logins from 127.0.0.1" in r.stderr, r.stderr
    assert "Traceback" not in guarded.log_text()


def test_refusals_are_audited(guarded: GatewayProcess, oidc: OIDCProvider, targets: Targets,
                              tmp_path: Path) -> None:
    mark = guarded.audit_mark()
    sock = Path(tempfile.mkdtemp(prefix="agent-", dir="/tmp")) / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, 10, "ssh-agent")
        r = run_ssh(["-A", "-X", "-o", "SendEnv=GUARITA_SECRET_X LANG", *dest(guarded, f"{targets.login}@web-key"),
                     "echo refusals-$((1+1))"], token=oidc.token("agent-sre"),
                    env={"SSH_AUTH_SOCK": str(sock), "DISPLAY": "127.0.0.1:77", "GUARITA_SECRET_X": "hunter2",
                         "LANG": "C.UTF-8"})
    finally:
        agent.terminate()
        agent.wait(10)
    assert r.returncode == 0 and r.stdout == b"refusals-2\n", r.stderr
    refused = guarded.wait_audit("forward.refused", mark, kind="agent-forwarding")
    assert refused["subject"] == "agent-sre"
    guarded.wait_audit("forward.refused", mark, kind="x11-forwarding")
    env = guarded.wait_audit("env.refused", mark)
    assert env["names"] == ["GUARITA_SECRET_X"] and "hunter2" not in str(guarded.audit_events(mark))

    # Garbage instead of SSH, and a client that gives up during authentication.
    with socket.create_connection(("127.0.0.1", guarded.ssh_port), timeout=10) as s:
        s.recv(256)  # the banner
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)))
        s.settimeout(10)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
    abandoned = guarded.wait_audit("auth.abandoned", mark)
    assert abandoned["source"].startswith("127.0.0.1:") and abandoned["reason"]
    # A client that fails once and goes away in the middle of authentication.
    mark = guarded.audit_mark()
    assert asyncio.run(_bad_logins(guarded, [_forged(oidc, "agent-sre")])) == 1
    gone = guarded.wait_audit("auth.abandoned", mark)
    assert gone["failures"] == 1, gone
    assert "Traceback" not in guarded.log_text()
