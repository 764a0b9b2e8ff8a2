"""The approval gate fails closed (issue 16), end to end through OpenSSH and real bash:
a shell without a PTY (guarita is its line discipline), keys other than Enter that run the
line, the alternate screen, a forged screen, history expansion, nested quoting, and the
emulator's own bugs. The rule under test holds any command that says ``needs-approval``
(tests/test_approvals_e2e.py's gateway)."""

from __future__ import annotations

import uuid
from pathlib import Path

from tests.conftest import GatewayProcess, Targets
from tests.support.approvals import BackgroundSsh
from tests.support.oidc import OIDCProvider
from tests.test_approvals_e2e import PROMPT, REQUEST, agw, approve, dest, hooks, shell  # noqa: F401

__all__ = ["agw", "hooks"]


def _audit_requests(gw: GatewayProcess, mark: int) -> list[dict]:
    return [e for e in gw.audit_events(mark) if e.get("event") == "approval.requested"]


# -- class 1: no PTY -------------------------------------------------------------------------


def test_piped_script_without_pty_is_judged_line_by_line(agw: GatewayProcess, oidc: OIDCProvider,
                                                         targets: Targets) -> None:
    script = (b"echo before-$((1+1))\n"
              b"echo needs-\\\napproval-$((6*7))\n"  # a continuation: judged as one logical command
              b"cat <<EOF\nheredoc-body\nEOF\n"
              b"echo after-$((2+2))\n")
    mark = agw.audit_mark()
    job = BackgroundSsh(["-T", *dest(agw, f"{targets.login}@web-key")], oidc.token("agent-ci"), input=script)
    req = agw.wait_audit("approval.requested", mark, timeout=20)
    assert req["command"] == "echo needs-\\\napproval-$((6*7))", req
    approve(agw, str(req["request"]), oidc.token("agent-sre"))
    r = job.join()
    out = r.stdout.decode()
    assert "before-2\n" in out and "needs-approval-42\n" in out and "heredoc-body\n" in out and "after-4\n" in out
    assert out.index("before-2") < out.index("needs-approval-42") < out.index("after-4")


def test_denied_line_without_pty_ends_the_scripts_input(agw: GatewayProcess, oidc: OIDCProvider,
                                                        targets: Targets, tmp_path: Path) -> None:
    witness = Path("/tmp") / f"guarita-nopty-{uuid.uuid4().hex}"
    script = f"echo first\necho needs-approval; touch {witness}\necho never-runs\n".encode()
    mark = agw.audit_mark()
    # `ssh target bash`: an exec of a shell that reads its script from stdin.
    job = BackgroundSsh([*dest(agw, f"{targets.login}@web-key"), "bash"], oidc.token("agent-ci"), input=script)
    req = agw.wait_audit("approval.requested", mark, timeout=20)
    approve(agw, str(req["request"]), oidc.token("agent-sre"), decision="deny", reason="not today")
    r = job.join()
    out = r.stdout.decode()
    assert "first\n" in out and "never-runs" not in out, out
    assert "denied by agent-sre" in out and "input ends here" in out
    assert not witness.exists()


def test_echo_piped_into_ssh_is_held(agw: GatewayProcess, oidc: OIDCProvider, targets: Targets) -> None:
    """`echo CMD | ssh target`: the whole of stdin is one command, held like an exec."""
    mark = agw.audit_mark()
    job = BackgroundSsh([*dest(agw, f"{targets.login}@web-key")], oidc.token("agent-ci"),
                        input=b"sh -c \"echo need''s-approval-nested\"")  # no final newline; nested quoting
    req = agw.wait_audit("approval.requested", mark, timeout=20)
    approve(agw, str(req["request"]), oidc.token("agent-sre"), decision="deny", reason="no")
    r = job.join()
    assert b"needs-approval-nested" not in r.stdout


# -- classes 2-5 with a PTY ---------------------------------------------------------------------


def _held(pty, gw: GatewayProcess, oidc: OIDCProvider) -> str:  # type: ignore[no-untyped-def]
    pty.expect(REQUEST, timeout=20)
    assert pty.last_match is not None
    rid = pty.last_match.group(1).decode()
    approve(gw, rid, oidc.token("agent-sre"), decision="deny", reason="no")
    pty.expect(rb"denied by agent-sre", timeout=20)
    pty.expect(PROMPT, timeout=20)
    return rid


def test_keys_other_than_enter_are_judged(agw: GatewayProcess, oidc: OIDCProvider, targets: Targets) -> None:
    pty = shell(agw, targets, oidc.token("agent-ci"))
    try:
        witness = f"/tmp/guarita-keys-{uuid.uuid4().hex[:8]}"
        # Ctrl-O (operate-and-get-next) runs the line like Enter.
        pty.send(f"echo needs-approval > {witness}\x0f".encode())
        _held(pty, agw, oidc)
        # Ctrl-X Ctrl-E would edit the line in an editor whose result runs unseen: refused.
        pty.send(b"echo fine\x18\x05")
        pty.expect(rb"in an editor", timeout=20)
        pty.expect(PROMPT, timeout=20)
        # A key binding that could submit lines is refused.
        pty.send(b"bind '\"\\C-t\": accept-line'\r")
        pty.expect(rb"changing key bindings", timeout=20)
        pty.expect(PROMPT, timeout=20)
        assert not Path(witness).exists()
    finally:
        pty.close()


def test_alternate_screen_is_no_off_switch(agw: GatewayProcess, oidc: OIDCProvider, targets: Targets) -> None:
    pty = shell(agw, targets, oidc.token("agent-ci"))
    try:
        pty.send(b"printf '\\033[?1049h'; printf '\\033[?4m'\r")
        pty.expect(PROMPT, timeout=20)
        pty.send(b"echo needs-approval-alt\r")
        _held(pty, agw, oidc)
        pty.send(b"echo still-$((3*3))\r")
        pty.expect(rb"still-9", timeout=20)
    finally:
        pty.close()


def test_history_expansion_and_nested_quoting(agw: GatewayProcess, oidc: OIDCProvider, targets: Targets) -> None:
    pty = shell(agw, targets, oidc.token("agent-ci"))
    try:
        pty.send(b"echo need\r")
        pty.expect(PROMPT, timeout=20)
        pty.send(b"!!s-approval\r")  # bash runs `echo needs-approval`
        _held(pty, agw, oidc)
        pty.send(b"!4711\r")  # an event guarita never saw: refused
        pty.expect(rb"history expansion", timeout=20)
        pty.expect(PROMPT, timeout=20)
        pty.send(b"bash -c \"echo need''s-approval\"\r")
        _held(pty, agw, oidc)
    finally:
        pty.close()


# -- class 6: file transfer by exec ----------------------------------------------------------


def test_legacy_scp_is_refused_where_sftp_is_off(agw: GatewayProcess, oidc: OIDCProvider, targets: Targets,
                                                 tmp_path: Path) -> None:
    import subprocess

    from tests.test_ssh_e2e import sftp_command

    cmd, env = sftp_command(agw, f"{targets.login}@web-key", tmp_path, oidc.token("agent-ci"))
    options = cmd[1:cmd.index("-b")]  # the same OpenSSH options and askpass, for scp
    source = tmp_path / "payload.txt"
    source.write_text("payload\n")
    remote = f"/tmp/guarita-scp-{uuid.uuid4().hex[:8]}"
    mark = agw.audit_mark()
    for direction in ([str(source), f"{targets.login}@web-key@127.0.0.1:{remote}"],
                      [f"{targets.login}@web-key@127.0.0.1:/etc/hostname", str(tmp_path / "got")]):
        r = subprocess.run(["scp", "-O", *options, *direction], capture_output=True, env=env, timeout=30,
                           start_new_session=True)
        assert r.returncode != 0 and b"file transfer by exec (scp) is not allowed" in r.stderr, r.stderr
    assert not Path(remote).exists() and not (tmp_path / "got").exists()
    agw.wait_audit("session.refused", mark, reason="subsystem_denied")


# -- classes 4 and 8: a forged screen; approvers see the logical command ------------------------


def test_forged_screen_does_not_hide_the_typed_line(agw: GatewayProcess, oidc: OIDCProvider,
                                                   targets: Targets) -> None:
    pty = shell(agw, targets, oidc.token("agent-ci"))
    try:
        # A background job redraws the prompt line with harmless text after the user typed.
        pty.send(b"(sleep 1; printf '\\r\\033[K[gw]$ echo harmless-xyz') &\r")
        pty.expect(PROMPT, timeout=20)
        pty.send(b"echo needs-approval-forged")
        pty.expect(rb"harmless-xyz", timeout=20)
        pty.send(b"\r")
        _held(pty, agw, oidc)
    finally:
        pty.close()


def test_requests_carry_the_logical_command(agw: GatewayProcess, oidc: OIDCProvider, targets: Targets) -> None:
    pty = shell(agw, targets, oidc.token("agent-ci"))
    try:
        mark = agw.audit_mark()
        for line in (b"cat <<EOF", b"one"):
            pty.send(line + b"\r")
            pty.expect(rb"> ", timeout=20)
        pty.send(b"needs-approval two\r")  # held inside the here-document, shown whole
        req = agw.wait_audit("approval.requested", mark, timeout=20)
        assert req["command"] == "cat <<EOF\none\nneeds-approval two", req
        approve(agw, str(req["request"]), oidc.token("agent-sre"), decision="deny", reason="no")
        pty.expect(PROMPT, timeout=20)
        mark = agw.audit_mark()
        pty.send(b"echo needs-\\\r")
        pty.expect(rb"> ", timeout=20)
        pty.send(b"approval-cont\r")
        req = agw.wait_audit("approval.requested", mark, timeout=20)
        assert req["command"] == "echo needs-\\\napproval-cont", req
        approve(agw, str(req["request"]), oidc.token("agent-sre"), decision="deny", reason="no")
        pty.expect(PROMPT, timeout=20)
    finally:
        pty.close()


# -- issue 23 item 8: an exec command is in the commands index once ---------------------------


def test_exec_command_listed_once(agw: GatewayProcess, oidc: OIDCProvider, targets: Targets) -> None:
    import subprocess
    import sys

    from tests.support.openssh import run_ssh

    cmd = f"echo once-{uuid.uuid4().hex[:8]}"
    mark = agw.audit_mark()
    r = run_ssh([*dest(agw, f"{targets.login}@web-key"), cmd], token=oidc.token("agent-ci"), timeout=30)
    assert r.returncode == 0, r.stderr
    sid, _, _ = agw.session_recording(mark, command=cmd)
    base = [sys.executable, "-m", "replay.cli", "--recordings", agw.recordings_dir.as_uri()]
    shown = subprocess.run([*base, "cat", sid, "--commands"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout.count(cmd) == 1, shown.stdout + shown.stderr
    found = subprocess.run([*base, "search", "--commands-only", cmd.split()[1]], capture_output=True, text=True,
                           timeout=60)
    assert found.stdout.count(cmd) == 1, found.stdout + found.stderr


def test_typed_commands_are_indexed_without_rules(gateway: GatewayProcess, oidc: OIDCProvider,
                                                  targets: Targets) -> None:
    """The shared gateway has no approval rules: nothing is held, every line is indexed."""
    import subprocess
    import sys

    from tests.support.openssh import PtySsh

    tag = uuid.uuid4().hex[:8]
    mark = gateway.audit_mark()
    pty = PtySsh(["-tt", *dest(gateway, f"{targets.login}@web-key")], token=oidc.token("agent-sre"),
                 cols=80, rows=24).start()
    try:
        pty.expect(rb"[$#] ", timeout=15)
        pty.send(f"echo typed-{tag}-$((1+1))\r".encode())
        pty.expect(f"typed-{tag}-2".encode(), timeout=15)
        pty.send(f"echo up-{tag} \\\r".encode())
        pty.expect(rb"> ", timeout=15)
        pty.send(b"continued\r")
        pty.expect(f"up-{tag} continued".encode(), timeout=15)
        pty.send(b"exit\r")
        pty.wait(timeout=15)
    finally:
        pty.close()
    sid, _, events = gateway.session_recording(mark, kind="shell")
    base = [sys.executable, "-m", "replay.cli", "--recordings", gateway.recordings_dir.as_uri()]
    shown = subprocess.run([*base, "cat", sid, "--commands"], capture_output=True, text=True, timeout=60)
    assert f"echo typed-{tag}-$((1+1))" in shown.stdout, shown.stdout + shown.stderr
    assert f"echo up-{tag} \\\ncontinued" in shown.stdout, shown.stdout  # one logical command
    assert not [e for e in events if e.code == "m" and e.data.get("type") == "hidden-input"]
