"""Just-in-time approvals end to end with real parts: OpenSSH ``ssh`` (exec, and under a
real PTY), real ``sshd`` targets, Node ``oidc-provider`` tokens, the real ``bastion
approvals`` CLI as the approver, webhooks received over HTTP, and two gateway replicas on
a throwaway PostgreSQL cluster.

Identities (tests/conftest.py): ``agent-ci`` asks (group ci), ``agent-sre`` and
``agent-long`` approve (group sre), ``agent-nobody`` is in no group.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import (
    GatewayProcess,
    Targets,
    check_config,
    gateway_config,
    target_block,
    wait_for,
)
from tests.support import postgres
from tests.support.approvals import BackgroundSsh, WebhookReceiver, cli
from tests.support.oidc import OIDCProvider
from tests.support.openssh import PtySsh, run_ssh

PROMPT = rb"\[gw\]\$ "
REQUEST = re.compile(rb"request ([a-z0-9]{10}) \(rule")

APPROVALS = """
[approval_defaults]
action = "allow"
requests_per_minute = 3

[[approvals]]
name = "nobody opens shells"
subjects = ["agent-nobody"]
shell = "deny"

[[approvals]]
name = "CI shells on web-ca"
claims = { repository = "org/*" }
targets = ["web-ca"]
shell = "approve"
approvers = ["sre"]

[[approvals]]
name = "destructive"
pattern = "needs-approval"
approvers = ["sre"]
timeout = "60s"
message = "commands that say needs-approval need a second person"

[[approvals]]
name = "quick"
pattern = "times-out-fast"
approvers = ["sre"]
timeout = "2s"

[[approvals]]
name = "four eyes"
pattern = "needs-two"
approvers = ["sre"]
min_approvals = 2

[[approvals]]
name = "no shutdowns"
argv_prefix = ["shutdown"]
action = "deny"
message = "nobody shuts targets down through guarita"
"""


def _config(data_dir: Path, oidc: OIDCProvider, targets: Targets, hooks: str = "", state: str = "") -> str:
    t = targets
    # web-ca trusts the target CA the shared gateway fixture made: this gateway uses it too.
    data_dir.mkdir(parents=True, exist_ok=True)
    for suffix in ("", ".pub"):
        shutil.copyfile(str(t.target_ca_key) + suffix, data_dir / f"target_ca_key{suffix}")
    target_text = "\n".join([
        target_block("web-key", t.web_key.port, [t.login], [t.web_key.host_key_line], "key", t.gateway_key),
        target_block("web-ca", t.web_ca.port, [t.login], [t.web_ca.host_key_line], "ca"),
    ])
    access = '[[access]]\nname = "everyone"\nsubjects = ["*"]\ntargets = ["*"]\n'
    state_text = f'[state]\nurl = "{state}"\n' if state else ""
    return gateway_config(data_dir, [(oidc.issuer, "5s")], target_text,  # type: ignore[list-item]
                          access + APPROVALS + hooks + state_text)


@pytest.fixture(scope="module")
def hooks() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def agw(oidc: OIDCProvider, targets: Targets, hooks: WebhookReceiver,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    data_dir = tmp_path_factory.mktemp("approvals-gw")
    hook_text = (f'[[webhooks]]\nurl = "{hooks.url}/json"\nformat = "json"\n\n'
                 f'[[webhooks]]\nurl = "{hooks.url}/slack"\nformat = "slack"\n\n'
                 # Nothing listens there: a failing webhook must never hold anything up.
                 '[[webhooks]]\nurl = "http://127.0.0.1:9/down"\nformat = "json"\ntimeout = "2s"\n')
    path = data_dir / "guarita.toml"
    path.write_text(_config(data_dir, oidc, targets, hook_text))
    checked = check_config(path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with GatewayProcess(path, data_dir) as gw:
        yield gw


def dest(gw: GatewayProcess, user: str) -> list[str]:
    return ["-p", str(gw.ssh_port), f"{user}@127.0.0.1"]


def markers(events: list[Any], kind: str) -> list[dict[str, Any]]:
    return [e.data for e in events if e.code == "m" and e.data.get("type") == kind]


def requested(gw: GatewayProcess, mark: int, command: str) -> str:
    return str(gw.wait_audit("approval.requested", mark, timeout=20, command=command)["request"])


def approve(gw: GatewayProcess, rid: str, token: str, reason: str = "looks fine", decision: str = "approve") -> None:
    r = cli(["approvals", decision, rid, "--reason", reason], token, gw.http_url)
    assert r.returncode == 0, r.stdout + r.stderr


def api(gw: GatewayProcess, path: str, token: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(gw.http_url + path, data=json.dumps(body).encode() if body is not None else None,
                                 method="POST" if body is not None else "GET",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def shell(gw: GatewayProcess, targets: Targets, token: str, target: str = "web-key") -> PtySsh:
    pty = PtySsh(["-tt", *dest(gw, f"{targets.login}@{target}")], token=token, cols=80, rows=24).start()
    pty.expect(rb"[$#] ", timeout=15)
    # A prompt the echo of this very line cannot match; history kept per test.
    pty.send(b"PS1='[gw]''$ '; HISTFILE=/dev/null\r")
    pty.expect(PROMPT)
    return pty


# ---------------------------------------------------------------------------
# exec
# ---------------------------------------------------------------------------


def test_exec_approved_through_the_cli(agw: GatewayProcess, oidc: OIDCProvider, targets: Targets,
                                       hooks: WebhookReceiver, tmp_path_factory: pytest.TempPathFactory) -> None:
    cmd = "echo needs-approval-$((6*7)); echo to-stderr >&2"
    mark = agw.audit_mark()
    job = BackgroundSsh([*dest(agw, f"{targets.login}@web-key"), cmd], oidc.token("agent-ci"))
    rid = requested(agw, mark, cmd)
    # Announced by webhook, generic JSON and Slack-compatible, while it waits.
    _, body = hooks.wait(lambda path, b: path == "/json" and b["request"]["id"] == rid)
    assert body["event"] == "approval.requested" and body["request"]["command"] == cmd
    assert body["request"]["requester"]["subject"] == "agent-ci" and body["request"]["approvers"] == ["sre"]
    _, slack = hooks.wait(lambda path, b: path == "/slack" and rid in b.get("text", ""))
    assert "needs-approval" in slack["text"] and slack["blocks"]
    listed = cli(["approvals", "list"], oidc.token("agent-sre"), agw.http_url)
    assert rid in listed.stdout and "agent-ci" in listed.stdout, listed.stderr
    assert listed.stdout.splitlines()[0].split() == ["ID", "STATUS", "REQUESTER", "TARGET", "APPROVERS", "COMMAND"]

    approve(agw, rid, oidc.token("agent-sre"), "ticket OPS-1")
    r = job.join()
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"needs-approval-42\n"
    err = r.stderr.decode()
    assert f"request {rid}" in err and "group(s) sre" in err and "waiting up to 1m" in err
    assert "approved by agent-sre" in err and err.endswith("to-stderr\n")
    hooks.wait(lambda path, b: path == "/json" and b["event"] == "approval.decided" and b["request"]["id"] == rid)

    sid, manifest, events = agw.session_recording(mark, command=cmd)
    req = markers(events, "approval-request")
    assert [(m["request"], m["rule"], m["approvers"]) for m in req] == [(rid, "destructive", ["sre"])]
    dec = markers(events, "approval-decision")
    assert [(m["approver"], m["decision"], m["reason"]) for m in dec] == [("agent-sre", "approve", "ticket OPS-1")]
    assert [(m["command"], m["outcome"]) for m in markers(events, "command")] == [(cmd, "approved")]
    assert b"needs-approval-42" in b"".join(e.stream_bytes() or b"" for e in events if e.stream == "o")
    resolved = agw.wait_audit("approval.resolved", mark, request=rid)
    assert resolved["status"] == "approved" and resolved["approvers"] == ["agent-sre"]
    decision = agw.wait_audit("approval.decision", mark, request=rid)
    assert decision["approver"] == "agent-sre" and decision["reason"] == "ticket OPS-1"
    # `replay cat --commands` shows the command with its approval.
    shown = subprocess.run([sys.executable, "-m", "replay.cli", "--recordings", agw.recordings_dir.as_uri(),
                            "cat", sid, "--commands"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "approval-request" in shown.stdout and "approval-decision" in shown.stdout
    assert "outcome=approved" in shown.stdout
    _check_evidence_package(agw, sid, cmd, tmp_path_factory.mktemp("evidence"))


def _check_evidence_package(gw: GatewayProcess, sid: str, cmd: str, folder: Path) -> None:
    """`replay evidence`: the package names who, what and whose approval, and what it holds
    verifies again from the package alone, against the key it names."""
    package = folder / "agent-ci.tar.gz"
    made = subprocess.run([sys.executable, "-m", "replay.cli", "--config", str(gw.config_path), "evidence",
                           "--subject", "agent-ci", "--command", cmd, "-o", str(package)],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert "1 sessions, 1 verified OK" in made.stdout
    with tarfile.open(package) as tar:
        names = tar.getnames()
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        tar.extractall(folder / "x", filter="data")
    assert [row["id"] for row in index] == [sid]
    row = index[0]
    assert (row["subject"], row["command"], row["exit_status"], row["verified"]) == ("agent-ci", cmd, 0, True)
    assert [(a["approver"], a["decision"], a["reason"]) for a in row["approvals"]] == [
        ("agent-sre", "approve", "ticket OPS-1")]
    assert f"sessions/{sid}/session.cast" in names and any(n.endswith(f"{sid}/manifest.json") for n in names)
    again = subprocess.run([sys.executable, "-m", "replay.cli", "--recordings", (folder / "x" / "store").as_uri(),
                            "verify", "--all", "--public-key", str(folder / "x" / "recording-keys")],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and f"{sid}: OK" in again.stdout, again.stdout + again.stderr
    none = subprocess.run([sys.executable, "-m", "replay.cli", "--config", str(gw.config_path), "evidence",
                           "-o", str(folder / "all.tar.gz")], capture_output=True, text=True, timeout=60)
    assert none.returncode == 2 and "at least one filter" in none.stderr and not (folder / "all.tar.gz").exists()
    nowhere = subprocess.run([sys.executable, "-m", "replay.cli", "--config", str(gw.config_path), "evidence",
                              "--subject", "agent-ci", "-o", str(folder / "missing" / "x.tar.gz")],
                             capture_output=True, text=True, timeout=60)
    assert nowhere.returncode == 2 and "is not a folder" in nowhere.stderr and "Traceback" not in nowhere.stderr
    nobody = subprocess.run([sys.executable, "-m", "replay.cli", "--config", str(gw.config_path), "evidence",
                             "--subject", "nobody-at-all", "-o", str(folder / "n.tar.gz")],
                            capture_output=True, text=True, timeout=60)
    assert nobody.returncode == 1 and "no sessions match --subject nobody-at-all" in nobody.stderr


def test_exec_denied_ends_with_status_1_and_the_reason(agw: GatewayProcess, oidc: OIDCProvider,
                                                       targets: Targets, tmp_path: Path) -> None:
    witness = Path("/tmp") / f"guarita-denied-{uuid.uuid4().hex}"
    cmd = f"touch {witness}; echo needs-approval"
    mark = agw.audit_mark()
    job = BackgroundSsh([*dest(agw, f"{targets.login}@web-key"), cmd], oidc.token("agent-ci"))
    rid = requested(agw, mark, cmd)
    approve(agw, rid, oidc.token("agent-sre"), "not during the freeze", decision="deny")
    r = job.join()
    assert r.returncode == 1 and r.stdout == b""
    assert f"request {rid} denied by agent-sre@example.com: not during the freeze" in r.stderr.decode()
    assert not witness.exists()
    _, manifest, events = agw.session_recording(mark, command=cmd)
    assert [m["outcome"] for m in markers(events, "command")] == ["denied"]
    assert events[-1].code == "x" and events[-1].data["status"] == 1


def test_exec_timed_out_and_deny_rule(agw: GatewayProcess, oidc: OIDCProvider, targets: Targets) -> None:
    cmd = "echo times-out-fast"
    mark = agw.audit_mark()
    t0 = time.monotonic()
    job = BackgroundSsh([*dest(agw, f"{targets.login}@web-key"), cmd], oidc.token("agent-ci"))
    rid = requested(agw, mark, cmd)
    r = job.join()
    assert 2 <= time.monotonic() - t0 < 15
    assert r.returncode == 1 and r.stdout == b""
    assert f"request {rid} expired: no decision within 2s" in r.stderr.decode()
    status, body = api(agw, f"/v1/approvals/{rid}", oidc.token("agent-sre"))
    assert (status, body["status"]) == (200, "expired")

    # A deny rule refuses at once, without a request.
    mark = agw.audit_mark()
    r = BackgroundSsh([*dest(agw, f"{targets.login}@web-key"), "sudo shutdown -h now"], oidc.token("agent-ci")).join()
    assert r.returncode == 1
    assert "nobody shuts targets down through guarita" in r.stderr.decode()
    assert not [e for e in agw.audit_events(mark) if e["event"] == "approval.requested"]
    assert agw.wait_audit("command.refused", mark)["rule"] == "no shutdowns"


def test_bad_decisions_are_refused(agw: GatewayProcess, oidc: OIDCProvider, targets: Targets) -> None:
    cmd = "echo needs-approval self-check"
    mark = agw.audit_mark()
    job = BackgroundSsh([*dest(agw, f"{targets.login}@web-key"), cmd], oidc.token("agent-sre"))
    rid = requested(agw, mark, cmd)
    # Nobody approves their own request (agent-sre is in the approver group).
    r = cli(["approvals", "approve", rid, "--reason", "me"], oidc.token("agent-sre"), agw.http_url)
    assert r.returncode != 0 and "HTTP 403" in r.stderr and "self_approval" in r.stderr
    # Approvers must be in an approver group of the rule.
    r = cli(["approvals", "approve", rid, "--reason", "x"], oidc.token("agent-ci"), agw.http_url)
    assert r.returncode != 0 and "not_an_approver" in r.stderr and "sre" in r.stderr
    # A forged approver token (right claims, wrong key) is refused before anything else.
    real = jwt.decode(oidc.token("agent-long"), options={"verify_signature": False})
    header = jwt.get_unverified_header(oidc.token("agent-long"))
    forged = jwt.encode(real, rsa.generate_private_key(public_exponent=65537, key_size=2048),
                        algorithm="RS256", headers={"kid": header["kid"]})
    r = cli(["approvals", "approve", rid, "--reason", "x"], forged, agw.http_url)
    assert r.returncode != 0 and "HTTP 401" in r.stderr
    status, body = api(agw, "/v1/approvals/nosuchid42/approve", oidc.token("agent-long"), {"reason": "x"})
    assert (status, body["error"]) == (404, "not_found")
    status, body = api(agw, f"/v1/approvals/{rid}/approve", oidc.token("agent-long"), {})
    assert (status, body["error"]) == (400, "reason_required")
    # The one valid decision, then any other is too late.
    approve(agw, rid, oidc.token("agent-long"), "fine by me", decision="deny")
    status, body = api(agw, f"/v1/approvals/{rid}/approve", oidc.token("agent-long"), {"reason": "changed my mind"})
    assert (status, body["error"]) == (409, "already_decided") and "already denied" in body["message"]
    assert job.join().returncode == 1
    refused = [e["reason"] for e in agw.audit_events(mark) if e["event"] == "approval.decision_refused"]
    assert refused == ["self_approval", "not_an_approver"]
    # The requester sees the request; someone in no approver group does not.
    assert api(agw, f"/v1/approvals/{rid}", oidc.token("agent-sre"))[0] == 200
    assert api(agw, f"/v1/approvals/{rid}", oidc.token("agent-nobody"))[0] == 403


def test_min_approvals_waits_for_the_second_approver(agw: GatewayProcess, oidc: OIDCProvider,
                                                     targets: Targets) -> None:
    cmd = "echo needs-two-$((2*2))"
    mark = agw.audit_mark()
    job = BackgroundSsh([*dest(agw, f"{targets.login}@web-key"), cmd], oidc.token("agent-ci"))
    rid = requested(agw, mark, cmd)
    r = cli(["approvals", "approve", rid, "--reason", "one"], oidc.token("agent-sre"), agw.http_url)
    assert r.returncode == 0 and "status pending (1 of 2 approvals)" in r.stdout
    r = cli(["approvals", "approve", rid, "--reason", "again"], oidc.token("agent-sre"), agw.http_url)
    assert r.returncode != 0 and "HTTP 409" in r.stderr  # the same approver twice counts once
    approve(agw, rid, oidc.token("agent-long"), "two")
    r2 = job.join()
    assert (r2.returncode, r2.stdout) == (0, b"needs-two-4\n")
    assert "approved by agent-sre@example.com, agent-long@example.com" in r2.stderr.decode()


# ---------------------------------------------------------------------------
# interactive
# ---------------------------------------------------------------------------


def test_piped_lines_then_eof(agw: GatewayProcess, oidc: OIDCProvider, targets: Targets) -> None:
    """`printf 'LINE\\n' | ssh -tt`: the client's EOF comes right behind the line, while the
    gate still holds its Enter; the EOF must not overtake it (the shell would wait for ever)."""
    r = run_ssh(["-tt", *dest(agw, f"{targets.login}@web-key")], token=oidc.token("agent-ci"),
                input=b"echo piped-$((6*7)); exit\n", timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert b"piped-42\r\n" in r.stdout


def _wait_request(pty: PtySsh) -> str:
    pty.expect(REQUEST, timeout=20)
    assert pty.last_match is not None
    return pty.last_match.group(1).decode()


def test_interactive_typed_history_and_tab_completion(agw: GatewayProcess, oidc: OIDCProvider,
                                                      targets: Targets) -> None:
    scratch = f"/tmp/guarita-tab-{uuid.uuid4().hex[:8]}"
    approver = oidc.token("agent-sre")
    mark = agw.audit_mark()
    with shell(agw, targets, oidc.token("agent-ci")) as pty:
        # Typed: held until approved, then it runs.
        pty.send(b"echo needs-approval-$((6*7))\r")
        rid = _wait_request(pty)
        pty.expect(rb"Ctrl-C cancels")
        approve(agw, rid, approver)
        pty.expect(rb"approved by agent-sre")
        pty.expect(rb"[\r\n]needs-approval-42\r\n")
        pty.expect(PROMPT)

        # History recall: only an up-arrow is typed; the shell redraws the line.
        pty.send(b"echo up-arrow-$((1+1))\r")
        pty.expect(rb"[\r\n]up-arrow-2\r\n")
        pty.expect(PROMPT)
        pty.send(b"P=needs; history -s \"echo $P-approval-recalled\"\r")
        pty.expect(PROMPT)
        pty.send(b"\x1b[A")
        pty.expect(rb"echo needs-approval-recalled")
        pty.send(b"\r")
        rid = _wait_request(pty)
        approve(agw, rid, approver, "recalled", decision="deny")
        pty.expect(rb"denied by agent-sre@example.com: recalled")
        pty.expect(PROMPT)
        # The line was cleared on the remote side: the next command runs alone.
        pty.send(b"echo after-$((3+4))\r")
        pty.expect(rb"[\r\n]after-7\r\n")
        pty.expect(PROMPT)

        # Tab completion: what is typed does not match; what the shell completes does.
        pty.send(f"mkdir -p {scratch} && touch {scratch}/needs-$(echo approval)-file\r".encode())
        pty.expect(PROMPT)
        pty.send(f"rm {scratch}/nee".encode())
        pty.expect(rb"/nee")
        pty.send(b"\t")
        pty.expect(rb"ds-approval-file")
        pty.send(b"\r")
        rid = _wait_request(pty)
        approve(agw, rid, approver, "keep the file", decision="deny")
        pty.expect(rb"denied by agent-sre")
        pty.expect(PROMPT)
        pty.send(f"ls {scratch}; rm -r {scratch}\r".encode())
        pty.expect(rb"needs-approval-file\r\n")
        pty.expect(PROMPT)
        pty.send(b"exit\r")
        assert pty.wait(timeout=15) == 0

    _, _, events = agw.session_recording(mark, kind="shell", target="web-key")
    commands = [(m["command"], m["outcome"]) for m in markers(events, "command")]
    assert ("echo needs-approval-$((6*7))", "approved") in commands
    assert ("echo needs-approval-recalled", "denied") in commands
    assert (f"rm {scratch}/needs-approval-file", "denied") in commands
    assert ("echo after-$((3+4))", "allowed") in commands
    status, listed = api(agw, "/v1/approvals?status=all", approver)
    mine = {r["id"]: r for r in listed["approvals"]}
    assert mine[rid]["kind"] == "interactive" and mine[rid]["status"] == "denied"


def test_interactive_paste_and_ctrl_c(agw: GatewayProcess, oidc: OIDCProvider, targets: Targets) -> None:
    approver = oidc.token("agent-sre")
    mark = agw.audit_mark()
    with shell(agw, targets, oidc.token("agent-ci")) as pty:
        # A pasted block: each line checked in turn, held lines released as approved.
        pty.send(b"echo one-$((1+1))\recho needs-approval-pasted-$((2+3))\recho three-$((1+2))\r")
        pty.expect(rb"[\r\n]one-2\r\n")
        rid = _wait_request(pty)
        out = pty.output()
        assert b"three-3" not in out and b"needs-approval-pasted-5\r\n" not in out
        approve(agw, rid, approver)
        # No line-start anchor: the rest of the paste reaches the target with the approved
        # line, and the tty echoes it (typeahead) while bash runs that line, so its output
        # may follow "echo three-$((1+2))" on the same line. The echoed commands hold
        # "$((2+3))" and "$((1+2))", never the results.
        pty.expect(rb"needs-approval-pasted-5\r\n")
        pty.expect(rb"three-3\r\n")
        pty.expect(PROMPT)

        # Ctrl-C while waiting cancels the request; other keys are dropped.
        pty.send(b"echo needs-approval-cancel-me\r")
        rid2 = _wait_request(pty)
        pty.send(b"ignored keys")
        pty.send(b"\x03")
        pty.expect(rb"cancelled with Ctrl-C")
        pty.expect(PROMPT)
        pty.send(b"echo still-$((5+5))\r")
        pty.expect(rb"[\r\n]still-10\r\n")
        pty.expect(PROMPT)
        assert b"ignored keys" not in pty.output()[-300:]
        pty.send(b"exit\r")
        assert pty.wait(timeout=15) == 0

    status, body = api(agw, f"/v1/approvals/{rid2}", approver)
    assert body["status"] == "cancelled" and body["status_reason"] == "cancelled with Ctrl-C"
    _, _, events = agw.session_recording(mark, kind="shell", target="web-key")
    commands = [(m["command"], m["outcome"]) for m in markers(events, "command")]
    assert commands[1:4] == [("echo one-$((1+1))", "allowed"), ("echo needs-approval-pasted-$((2+3))", "approved"),
                            ("echo three-$((1+2))", "allowed")]
    assert ("echo needs-approval-cancel-me", "cancelled") in commands
    assert markers(events, "input-dropped")
    assert commands[0] == ("PS1='[gw]''$ '; HISTFILE=/dev/null", "allowed"), commands


def test_request_flood_is_rate_limited(agw: GatewayProcess, oidc: OIDCProvider, targets: Targets) -> None:
    mark = agw.audit_mark()
    with shell(agw, targets, oidc.token("agent-ci")) as pty:
        for i in range(3):  # requests_per_minute = 3 in this gateway's config
            pty.send(f"echo needs-approval-flood-{i}\r".encode())
            _wait_request(pty)
            pty.send(b"\x03")
            pty.expect(rb"cancelled with Ctrl-C")
            pty.expect(PROMPT)
        pty.send(b"echo needs-approval-flood-3\r")
        pty.expect(rb"too many approval requests from this session \(3 in the last minute\); try again in \d+s")
        pty.expect(PROMPT)
        pty.send(b"exit\r")
        assert pty.wait(timeout=15) == 0
    flood = [e for e in agw.audit_events(mark) if e["event"] == "approval.requested"]
    assert len(flood) == 3
    assert agw.wait_audit("approval.rate_limited", mark)["command"] == "echo needs-approval-flood-3"


def test_shell_policy(agw: GatewayProcess, oidc: OIDCProvider, targets: Targets) -> None:
    # Denied outright for one identity ...
    with PtySsh(["-tt", *dest(agw, f"{targets.login}@web-key")], token=oidc.token("agent-nobody")) as pty:
        pty.expect(rb"refused by guarita rule 'nobody opens shells'|opening a shell is refused")
        assert pty.wait(timeout=15) == 1
    # ... held for approval for CI jobs on web-ca.
    mark = agw.audit_mark()
    with PtySsh(["-tt", *dest(agw, f"{targets.login}@web-ca")], token=oidc.token("agent-ci")) as pty:
        pty.expect(rb"Opening a shell needs approval")
        rid = _wait_request(pty)
        approve(agw, rid, oidc.token("agent-sre"), "incident 12")
        pty.expect(rb"[$#] ", timeout=15)
        pty.send(b"echo in-$((2*3))\r")
        pty.expect(rb"in-6")
        pty.send(b"exit\r")
        assert pty.wait(timeout=15) == 0
    assert agw.wait_audit("approval.resolved", mark, request=rid)["status"] == "approved"


def test_invalid_regex_refused_at_check_config(oidc: OIDCProvider, targets: Targets, tmp_path: Path) -> None:
    text = _config(tmp_path, oidc, targets).replace('pattern = "needs-approval"', 'pattern = "rm (-rf"')
    path = tmp_path / "bad.toml"
    path.write_text(text)
    r = check_config(path)
    assert r.returncode == 2
    assert "approvals[2].pattern: invalid regular expression 'rm (-rf'" in r.stderr


# ---------------------------------------------------------------------------
# two replicas on one PostgreSQL
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg() -> Iterator[postgres.PostgresCluster]:
    if not postgres.available():
        pytest.skip("PostgreSQL 15 binaries are not installed")
    with postgres.PostgresCluster() as cluster:
        yield cluster


def test_two_replicas_on_postgresql(pg: postgres.PostgresCluster, oidc: OIDCProvider, targets: Targets,
                                    tmp_path: Path) -> None:
    replicas = []
    try:
        for name in ("a", "b"):
            data_dir = tmp_path / name
            data_dir.mkdir()
            path = data_dir / "guarita.toml"
            path.write_text(_config(data_dir, oidc, targets, state=pg.url))
            replicas.append(GatewayProcess(path, data_dir).start())
        a, b = replicas
        # The request waits on replica a and is approved through replica b.
        cmd = "echo needs-approval-across-$((10+1))"
        mark = a.audit_mark()
        job = BackgroundSsh([*dest(a, f"{targets.login}@web-key"), cmd], oidc.token("agent-ci"))
        rid = requested(a, mark, cmd)
        listed = cli(["approvals", "list"], oidc.token("agent-sre"), b.http_url)
        assert rid in listed.stdout
        approve(b, rid, oidc.token("agent-sre"), "via b")
        t_approved = time.monotonic()
        r = job.join()
        assert (r.returncode, r.stdout) == (0, b"needs-approval-across-11\n"), r.stderr
        assert time.monotonic() - t_approved < 3  # LISTEN/NOTIFY, not the 1 s poll (plus ssh teardown)
        assert b.wait_audit("approval.decision", 0, request=rid)["status"] == "approved"

        # A replica that dies with a request pending: on restart it is expired, never approved.
        cmd = "echo needs-approval-orphan"
        mark = a.audit_mark()
        job = BackgroundSsh([*dest(a, f"{targets.login}@web-key"), cmd], oidc.token("agent-ci"))
        rid = requested(a, mark, cmd)
        assert a.proc is not None
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(timeout=10)
        a.proc = None
        assert job.join().returncode != 0
        assert api(b, f"/v1/approvals/{rid}", oidc.token("agent-sre"))[1]["status"] == "pending"
        a.start()

        def expired() -> bool:
            return api(b, f"/v1/approvals/{rid}", oidc.token("agent-sre"))[1]["status"] == "expired"

        wait_for(expired, 15, "the orphaned request expired")
        status, body = api(b, f"/v1/approvals/{rid}/approve", oidc.token("agent-sre"), {"reason": "late"})
        assert status == 409
        assert "stopped before a decision" in (body["message"])
    finally:
        for gw in replicas:
            gw.stop()


def test_line_longer_than_the_screen_is_not_judged_by_its_tail(agw: GatewayProcess, oidc: OIDCProvider,
                                                               targets: Targets) -> None:
    """Padding pushes the start of a line (where the rule matches) off the top of the
    screen: typed, it is checked on the typed text and held; recalled from history (nothing
    typed), it cannot be read whole and is refused."""
    pad = " " * 2500  # 80 x 24 is 1,920 cells
    with shell(agw, targets, oidc.token("agent-ci")) as pty:
        pty.send(f"echo needs-approval-padded #{pad}tail\r".encode())
        _wait_request(pty)
        pty.send(b"\x03")
        pty.expect(rb"cancelled with Ctrl-C")
        pty.expect(PROMPT)
        pty.send(b"P=needs; history -s \"echo $P-approval-padded #$(printf '%2500s')tail\"\r")
        pty.expect(PROMPT)
        pty.send(b"\x1b[A")
        pty.expect(rb"tail")
        pty.send(b"\r")
        pty.expect(rb"does not fit on the screen")
        pty.expect(PROMPT)
        pty.send(b"echo short-$((2+2))\r")
        pty.expect(rb"[\r\n]short-4\r\n")
        pty.send(b"exit\r")
        assert pty.wait(timeout=15) == 0
