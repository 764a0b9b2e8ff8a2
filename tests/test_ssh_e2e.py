"""End to end through real parts: OpenSSH ssh/sftp, asyncssh and paramiko clients ->
guarita (``bastion serve --config``) -> real OpenSSH sshd targets, with tokens from a
real OIDC provider. Each session's recording is read back and compared with what the
client saw. Fixtures: tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import select
import signal
import stat
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import asyncssh
import jwt
import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from recorder.events import Event
from recorder.signing import RecordingKey, verify_signature
from tests.conftest import (
    BASTION,
    GatewayProcess,
    Targets,
    check_config,
    gateway_config,
    stream_bytes,
    target_block,
    wait_for,
)
from tests.support.oidc import OIDCProvider
from tests.support.openssh import TOKEN_ENV, PtySsh, _prepare_ssh, run_ssh

PROMPT = rb"\[gw\]\$ "


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def dest(gw: GatewayProcess, user: str) -> list[str]:
    return ["-p", str(gw.ssh_port), f"{user}@127.0.0.1"]


def exits(events: list[Event]) -> list[Event]:
    return [e for e in events if e.code == "x"]


def markers(events: list[Event], kind: str) -> list[dict[str, Any]]:
    return [e.data for e in events if e.code == "m" and e.data.get("type") == kind]


def assert_times_ordered(events: list[Event]) -> None:
    times = [e.t for e in events]
    assert times == sorted(times), "event times go backwards"


def set_prompt(pty: PtySsh) -> None:
    """Wait for the login shell, then set a prompt the echo of the command cannot match."""
    pty.expect(rb"[$#] ", timeout=15)
    pty.send(b"PS1='[gw]''$ '\r")
    pty.expect(PROMPT)


def run_in_shell(pty: PtySsh, line: bytes, pattern: bytes) -> re.Match[bytes]:
    pty.send(line + b"\r")
    pty.expect(pattern)
    match = pty.last_match
    assert match is not None
    pty.expect(PROMPT)
    return match


def bytes_read(pid: int) -> int:
    """How many bytes process ``pid`` has read so far (``rchar`` of /proc/PID/io)."""
    with open(f"/proc/{pid}/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


def sftp_command(gw: GatewayProcess, user: str, tmp: Path, token: str) -> tuple[list[str], dict[str, str]]:
    helper = tmp / "askpass"
    helper.write_text(f'#!/bin/sh\nprintf \'%s\\n\' "${TOKEN_ENV}"\n')
    helper.chmod(stat.S_IRWXU)
    env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK",)}
    env.update(SSH_ASKPASS=str(helper), SSH_ASKPASS_REQUIRE="force", **{TOKEN_ENV: token})
    cmd = ["sftp", "-F", "/dev/null", "-P", str(gw.ssh_port),
           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
           "-o", "LogLevel=ERROR",
           # sftp -b turns BatchMode on, which forbids askpass: the first value given wins.
           "-o", "BatchMode=no",
           "-o", "PreferredAuthentications=keyboard-interactive,password",
           "-b", "-", f"{user}@127.0.0.1"]
    return cmd, env


async def _asyncssh_run(gw: GatewayProcess, username: str, token: str, command: str) -> asyncssh.SSHCompletedProcess:
    async with asyncssh.connect(
        "127.0.0.1", gw.ssh_port, username=username, password=token, known_hosts=None,
        client_keys=None, agent_path=None, preferred_auth=("keyboard-interactive", "password"),
    ) as conn:
        return await conn.run(command, check=False)


def run_ssh_late_stdin(args: list[str], token: str, data: bytes, ready: bytes = b"ready\n",
                       timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """Like run_ssh(input=data), but stdin (and its EOF) is sent only once the remote command
    has printed ``ready``: works around the gateway dropping stdin that arrives before the
    target session is open (see test_stdin_sent_at_once_is_not_lost)."""
    with tempfile.TemporaryDirectory(prefix="guarita-ssh-") as tmp:
        cmd, env = _prepare_ssh(args, token=token, identity=None, env=None, tmpdir=Path(tmp))
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, start_new_session=True)
        try:
            assert proc.stdout is not None
            head = b""
            deadline = time.monotonic() + timeout
            while not head.startswith(ready):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([proc.stdout], [], [], remaining)[0]:
                    raise TimeoutError(f"no {ready!r} from the remote command; got {head!r}")
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                head += chunk
            out, err = proc.communicate(input=data, timeout=max(1.0, deadline - time.monotonic()))
            return subprocess.CompletedProcess(cmd, proc.returncode, head + out, err)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def asyncssh_run(gw: GatewayProcess, username: str, token: str, command: str,
                 timeout: float = 20) -> asyncssh.SSHCompletedProcess:
    return asyncio.run(asyncio.wait_for(_asyncssh_run(gw, username, token, command), timeout))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}.{b64url(signature)}"


def assert_no_traceback(gw: GatewayProcess) -> None:
    log = gw.log_text()
    assert "Traceback" not in log, log[-4000:]


# ---------------------------------------------------------------------------
# exec through OpenSSH, and the recording read back
# ---------------------------------------------------------------------------


def test_exec_streams_exit_code_and_recording(gateway: GatewayProcess, oidc: OIDCProvider,
                                              targets: Targets) -> None:
    mark = gateway.audit_mark()
    cmd = "echo ready; printf 'out-%s\\n' \"$(cat)\"; echo err-line >&2; exit 3"
    r = run_ssh_late_stdin([*dest(gateway, f"{targets.login}@web-key"), cmd], oidc.token("agent-sre"),
                           b"hello-stdin")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"ready\nout-hello-stdin\n", b"err-line\n")

    auth = gateway.wait_audit("auth.success", mark, user=f"{targets.login}@web-key")
    assert auth["subject"] == "agent-sre" and auth["method"] in ("keyboard-interactive", "password")
    sid, manifest, events = gateway.session_recording(mark, command=cmd)
    # Event by event, the recording is what the client saw and sent.
    assert stream_bytes(events, "o") == r.stdout
    assert stream_bytes(events, "e") == r.stderr
    assert stream_bytes(events, "i") == b"hello-stdin"
    assert events[-1].code == "x" and len(exits(events)) == 1
    assert events[-1].data["status"] == 3 and events[-1].data["signal"] is None
    assert_times_ordered(events)

    meta = manifest["session"]
    assert meta["id"] == sid
    assert meta["identity"]["subject"] == "agent-sre"
    assert meta["identity"]["groups"] == ["sre"]
    assert meta["identity"]["email"] == "agent-sre@example.com"
    assert meta["identity"]["issuer"] == oidc.issuer
    assert (meta["target"], meta["login"], meta["command"], meta["kind"], meta["tty"]) == (
        "web-key", targets.login, cmd, "exec", False)
    assert manifest["end"]["exit"] == {"status": 3, "signal": None}
    # The manifest is signed by the gateway's recording key.
    key = RecordingKey.load_or_create(gateway.data_dir / "recording_key.pem")
    assert base64.b64decode(manifest["public_key"]) == key.public_raw
    body = {k: v for k, v in manifest.items() if k != "signature"}
    assert verify_signature(key.public_raw, body, manifest["signature"])
    assert sid in gateway.recordings()

    end = gateway.wait_audit("session.end", mark, session=sid)
    assert end["exit_status"] == 3 and end["subject"] == "agent-sre" and end["target"] == "web-key"
    assert end["bytes"] == {"o": len(r.stdout), "e": len(r.stderr), "i": len(b"hello-stdin")}


def test_exec_on_ca_target_with_default_login(gateway: GatewayProcess, oidc: OIDCProvider,
                                              targets: Targets) -> None:
    mark = gateway.audit_mark()
    r = run_ssh([*dest(gateway, "web-ca"), "id -un; echo via-ca"], token=oidc.token("agent-sre"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{targets.login}\nvia-ca\n".encode()
    start = gateway.wait_audit("session.start", mark, command="id -un; echo via-ca")
    assert (start["target"], start["login"]) == ("web-ca", targets.login)
    # The per-session certificate's key id names the agent and the recording in the target's own log.
    key_id = f"ID guarita:agent-sre:{start['session']}"
    log = wait_for(lambda: [line for line in targets.web_ca.log_text().splitlines()
                            if "Accepted publickey" in line and key_id in line],
                   10, "certificate key id in the sshd log")
    assert "CERT" in log[-1]


def test_claim_rule_lets_ci_reach_only_web_ca(gateway: GatewayProcess, oidc: OIDCProvider,
                                              targets: Targets) -> None:
    token = oidc.token("agent-ci")
    ok = run_ssh([*dest(gateway, "web-ca"), "echo ci-ok"], token=token)
    assert (ok.returncode, ok.stdout) == (0, b"ci-ok\n"), ok.stderr
    mark = gateway.audit_mark()
    refused = run_ssh([*dest(gateway, f"{targets.login}@web-key"), "echo no"], token=token)
    assert refused.returncode == 255 and refused.stdout == b""
    assert b"no access rule" in refused.stderr
    event = gateway.wait_audit("session.refused", mark, subject="agent-ci")
    assert event["reason"] == "access_denied"


def test_large_binary_output_is_exact(gateway: GatewayProcess, oidc: OIDCProvider,
                                      targets: Targets) -> None:
    mark = gateway.audit_mark()
    cmd = "head -c 5000000 /dev/urandom"
    r = run_ssh([*dest(gateway, f"{targets.login}@web-key"), cmd], token=oidc.token("agent-sre"),
                timeout=60)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == 5_000_000
    _, manifest, events = gateway.session_recording(mark, command=cmd, timeout=30)
    recorded = stream_bytes(events, "o")
    assert len(recorded) == 5_000_000
    assert hashlib.sha256(recorded).hexdigest() == hashlib.sha256(r.stdout).hexdigest()
    assert len(manifest["segments"]) > 1  # cut by size: several segments, chained
    assert manifest["end"]["bytes"]["o"] == 5_000_000


def test_stdin_eof_reaches_the_target(gateway: GatewayProcess, oidc: OIDCProvider,
                                      targets: Targets) -> None:
    mark = gateway.audit_mark()
    data = os.urandom(1_000_000)
    cmd = "echo ready; wc -c"
    r = run_ssh_late_stdin([*dest(gateway, f"{targets.login}@web-key"), cmd], oidc.token("agent-sre"), data)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"ready\n1000000\n"
    _, _, events = gateway.session_recording(mark, command=cmd)
    assert stream_bytes(events, "i") == data
    assert stream_bytes(events, "o") == r.stdout


def test_stdin_sent_at_once_is_not_lost(gateway: GatewayProcess, oidc: OIDCProvider,
                                        targets: Targets) -> None:
    r = run_ssh([*dest(gateway, f"{targets.login}@web-key"), "wc -c"], token=oidc.token("agent-sre"),
                input=b"x" * 1000, timeout=5)
    assert (r.returncode, r.stdout) == (0, b"1000\n")


# ---------------------------------------------------------------------------
# interactive: PTY, window change, typed secrets, signals
# ---------------------------------------------------------------------------


def test_interactive_shell_pty_resize_and_recording(gateway: GatewayProcess, oidc: OIDCProvider,
                                                    targets: Targets) -> None:
    mark = gateway.audit_mark()
    with PtySsh(["-tt", *dest(gateway, f"{targets.login}@web-key")], token=oidc.token("agent-sre"),
                env={"TERM": "xterm-256color"}) as pty:
        set_prompt(pty)
        assert run_in_shell(pty, b"stty size", rb"(\d+) (\d+)\r\n").groups() == (b"24", b"80")
        run_in_shell(pty, b"echo $TERM", rb"\rxterm-256color\r\n")  # TERM reached the target
        pty.resize(100, 30)

        # The window change travels ssh -> gateway -> target on its own: ask until it shows.
        def resized() -> bool:
            return run_in_shell(pty, b"stty size", rb"(\d+) (\d+)\r\n").groups() == (b"30", b"100")

        wait_for(resized, 10, "stty size 30 100")
        run_in_shell(pty, b"echo hello-$((6*7))", rb"\rhello-42\r\n")
        pty.send(b"exit\r")
        assert pty.wait(timeout=15) == 0
        seen = pty.output()

    sid, manifest, events = gateway.session_recording(mark, kind="shell", target="web-key")
    meta = manifest["session"]
    assert meta["tty"] is True and meta["kind"] == "shell"
    assert meta["term"] == {"type": "xterm-256color", "cols": 80, "rows": 24}
    assert [e.data for e in events if e.code == "r"][-1] == "100x30"
    typed = stream_bytes(events, "i")
    assert b"echo hello-$((6*7))\r" in typed and b"stty size\r" in typed and b"exit\r" in typed
    output = stream_bytes(events, "o")
    assert b"hello-42" in output
    # ssh keeps the local terminal raw: the client's terminal shows exactly what was recorded.
    assert output == seen
    assert exits(events)[-1].data["status"] == 0
    assert len(manifest["segments"]) >= 1
    assert_times_ordered(events)
    gateway.wait_audit("session.end", mark, session=sid, exit_status=0)


def test_password_typed_without_echo_is_recorded_hidden(gateway: GatewayProcess, oidc: OIDCProvider,
                                                        targets: Targets) -> None:
    secret = b"s3cr3t-value"
    mark = gateway.audit_mark()
    with PtySsh(["-tt", *dest(gateway, f"{targets.login}@web-key")], token=oidc.token("agent-sre")) as pty:
        set_prompt(pty)
        shell_pid = int(run_in_shell(pty, b"echo pid-$$", rb"pid-(\d+)\r\n").group(1))
        # -n 64: read byte by byte (still ends at Enter), so the shell's read count shows
        # when the secret has arrived; -s: the terminal does not echo, as at a password prompt.
        pty.send(b"read -s -n 64 -p 'Password: ' pw; echo; echo got-${#pw}\r")
        pty.expect(rb"(?<!')Password: ")  # the prompt, not the echo of the command line
        before = bytes_read(shell_pid)
        pty.send(secret)
        # The Enter is a keystroke of its own, as when a person types: send it only once the
        # target's shell has read the whole secret (so the gateway has passed it on).
        wait_for(lambda: bytes_read(shell_pid) >= before + len(secret), 10, "secret at the target")
        pty.send(b"\r")
        pty.expect(rb"\r\ngot-12\r\n")
        pty.expect(PROMPT)
        pty.send(b"exit\r")
        assert pty.wait(timeout=15) == 0
        assert secret not in pty.output()  # the terminal never echoed it

    sid, manifest, events = gateway.session_recording(mark, kind="shell", target="web-key")
    hidden = markers(events, "hidden-input")
    assert len(hidden) == 1, [e for e in events if e.code in ("i", "m")]
    # The length counts the secret's characters, not the Enter.
    assert {k: hidden[0][k] for k in ("type", "length")} == {"type": "hidden-input", "length": 12}
    assert secret not in stream_bytes(events, "i")
    # Nowhere in the recording: no event, no segment header/snapshot, not the manifest.
    everything = json.dumps([list(e) for e in events]) + json.dumps(manifest)
    assert secret.decode() not in everything
    assert b"read -s -n 64" in stream_bytes(events, "i")  # normal typing is still recorded
    assert manifest["end"]["markers"].get("hidden-input") == 1


def test_password_and_enter_in_one_write_is_recorded_hidden(gateway: GatewayProcess, oidc: OIDCProvider,
                                                            targets: Targets) -> None:
    secret = b"an0ther-s3cret"
    mark = gateway.audit_mark()
    with PtySsh(["-tt", *dest(gateway, f"{targets.login}@web-key")], token=oidc.token("agent-sre")) as pty:
        set_prompt(pty)
        pty.send(b"read -s -p 'Secret: ' pw; echo; echo len-${#pw}\r")
        pty.expect(rb"(?<!')Secret: ")
        pty.send(secret + b"\r")
        pty.expect(rb"\r\nlen-14\r\n")
        pty.expect(PROMPT)
        pty.send(b"exit\r")
        assert pty.wait(timeout=15) == 0
    _, manifest, events = gateway.session_recording(mark, kind="shell", target="web-key")
    assert secret not in stream_bytes(events, "i")
    assert [m["length"] for m in markers(events, "hidden-input")] == [14]


def test_ctrl_c_interrupts_remote_command(gateway: GatewayProcess, oidc: OIDCProvider,
                                          targets: Targets) -> None:
    mark = gateway.audit_mark()
    cmd = "echo started; sleep 30"
    with PtySsh(["-tt", *dest(gateway, f"{targets.login}@web-key"), cmd],
                token=oidc.token("agent-sre")) as pty:
        pty.expect(rb"started")
        t0 = time.monotonic()
        pty.send(b"\x03")
        rc = pty.wait(timeout=10)
        assert time.monotonic() - t0 < 5
    # The remote pty turned ^C into SIGINT: exit-signal INT, so OpenSSH has no status (255).
    assert rc == 255
    _, manifest, events = gateway.session_recording(mark, command=cmd)
    assert b"\x03" in stream_bytes(events, "i")
    assert exits(events)[-1].data["signal"] == "INT"
    assert manifest["end"]["exit"] == {"status": None, "signal": "INT"}


def test_exit_signal_is_passed_back(gateway: GatewayProcess, oidc: OIDCProvider,
                                    targets: Targets) -> None:
    cmd = "echo before; kill -TERM $$"
    # What OpenSSH does talking to the target directly (with the gateway's own key) ...
    direct = run_ssh(["-i", str(targets.gateway_key), "-p", str(targets.web_key.port),
                      f"{targets.login}@127.0.0.1", cmd])
    mark = gateway.audit_mark()
    r = run_ssh([*dest(gateway, f"{targets.login}@web-key"), cmd], token=oidc.token("agent-sre"))
    # ... is what it does through guarita: no exit status, so ssh exits 255.
    assert (r.returncode, r.stdout, r.stderr) == (direct.returncode, direct.stdout, direct.stderr)
    assert r.returncode == 255 and r.stdout == b"before\n"
    sid, manifest, events = gateway.session_recording(mark, command=cmd)
    assert exits(events)[-1].data["signal"] == "TERM"
    assert manifest["end"]["exit"]["signal"] == "TERM"
    assert gateway.wait_audit("session.end", mark, session=sid)["exit_signal"] == "TERM"


# ---------------------------------------------------------------------------
# refused by default: port forwarding, sftp; env allowlist
# ---------------------------------------------------------------------------


def test_port_forward_is_refused(gateway: GatewayProcess, oidc: OIDCProvider, targets: Targets) -> None:
    token = oidc.token("agent-sre")
    # Local forwarding (stdio forward = a direct-tcpip channel). -v: OpenSSH logs the
    # server's refusal text only above LogLevel=ERROR.
    mark = gateway.audit_mark()
    r = run_ssh(["-v", "-W", f"127.0.0.1:{targets.web_key.port}", *dest(gateway, f"{targets.login}@web-key")],
                token=token, input=b"")
    assert r.returncode == 255
    assert (b"open failed: administratively prohibited: port forwarding is not allowed through guarita"
            in r.stderr), r.stderr[-2000:]
    event = gateway.wait_audit("forward.refused", mark, kind="direct-tcpip")
    assert event["destination"] == f"127.0.0.1:{targets.web_key.port}"
    assert event["subject"] == "agent-sre"

    # Remote forwarding (tcpip-forward global request).
    mark = gateway.audit_mark()
    r = run_ssh(["-N", "-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:22",
                 *dest(gateway, f"{targets.login}@web-key")], token=token, input=b"")
    assert r.returncode == 255
    assert b"remote port forwarding failed" in r.stderr
    event = gateway.wait_audit("forward.refused", mark, kind="tcpip-forward")
    assert event["subject"] == "agent-sre"


def test_sftp_is_refused(gateway: GatewayProcess, oidc: OIDCProvider, targets: Targets,
                         tmp_path: Path) -> None:
    mark = gateway.audit_mark()
    cmd, env = sftp_command(gateway, f"{targets.login}@web-key", tmp_path, oidc.token("agent-sre"))
    r = subprocess.run(cmd, input=b"ls\n", capture_output=True, env=env, timeout=30,
                       start_new_session=True)
    assert r.returncode != 0
    assert b"not allowed" in r.stderr, r.stderr
    event = gateway.wait_audit("session.refused", mark, reason="subsystem_denied")
    assert event["subject"] == "agent-sre" and event["target"] == "web-key"


def test_env_passthrough_is_an_allowlist(gateway: GatewayProcess, oidc: OIDCProvider,
                                         targets: Targets) -> None:
    # web-key's sshd accepts LD_PRELOAD and PATH too: only guarita stands in the way.
    env = {"LANG": "pt_BR.UTF-8", "LD_PRELOAD": "/tmp/x", "GUARITA_TEST_ALLOWED": "yes",
           "GUARITA_TEST_OTHER": "leak"}
    sends = []
    for name in ("LANG", "LD_PRELOAD", "GUARITA_TEST_ALLOWED", "GUARITA_TEST_OTHER"):
        sends += ["-o", f"SendEnv={name}"]
    cmd = ('echo "$LANG-${LD_PRELOAD:-none}"; echo "${GUARITA_TEST_ALLOWED:-none}-'
           '${GUARITA_TEST_OTHER:-none}"; echo "$PATH"')
    r = run_ssh([*sends, "-o", "SetEnv=PATH=/tmp/evil", *dest(gateway, f"{targets.login}@web-key"), cmd],
                token=oidc.token("agent-sre"), env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "pt_BR.UTF-8-none"  # LD_* never, even though the allowlist names LD_*
    assert lines[1] == "yes-none"  # only what the allowlist names
    assert "/tmp/evil" not in lines[2]  # never PATH


# ---------------------------------------------------------------------------
# certificates for long tokens; other clients
# ---------------------------------------------------------------------------


def test_long_token_via_certificate_and_askpass_truncation(gateway: GatewayProcess, oidc: OIDCProvider,
                                                           targets: Targets, tmp_path: Path) -> None:
    token = oidc.token("agent-long")
    assert len(token) >= 1500

    # OpenSSH cuts an askpass answer at 1,023 bytes: the long token cannot pass that way.
    mark = gateway.audit_mark()
    r = run_ssh([*dest(gateway, f"{targets.login}@web-key"), "echo no"], token=token)
    assert r.returncode == 255 and r.stdout == b""
    assert b"Permission denied" in r.stderr
    failure = gateway.wait_audit("auth.failure", mark, user=f"{targets.login}@web-key")
    assert failure["reason"] == "malformed"  # what arrived was the first 1,023 bytes
    assert not [e for e in gateway.audit_events(mark) if e["event"] == "auth.success"]

    # The certificate path: one exchange, then plain ssh -i.
    key = tmp_path / "agent_key"
    env = {k: v for k, v in os.environ.items() if k not in ("GUARITA_TOKEN_FILE",)}
    env["GUARITA_TOKEN"] = token
    got = subprocess.run([*BASTION, "ssh-cert", "--key", str(key), "--gateway", gateway.http_url],
                         capture_output=True, text=True, env=env, timeout=60)
    assert got.returncode == 0, got.stderr
    cert_path = Path(str(key) + "-cert.pub")
    assert cert_path.read_text().startswith("ssh-ed25519-cert-v01@openssh.com ")
    assert "agent-long" in got.stdout

    mark = gateway.audit_mark()
    cmd = "echo cert-ok"
    r = run_ssh([*dest(gateway, f"{targets.login}@web-key"), cmd], identity=key)
    assert (r.returncode, r.stdout) == (0, b"cert-ok\n"), r.stderr
    auth = gateway.wait_audit("auth.success", mark, method="certificate")
    assert auth["subject"] == "agent-long" and auth["issuer"] == oidc.issuer
    _, manifest, _ = gateway.session_recording(mark, command=cmd)
    assert manifest["session"]["identity"]["subject"] == "agent-long"
    assert manifest["session"]["identity"]["method"] == "certificate"


def test_asyncssh_client(gateway: GatewayProcess, oidc: OIDCProvider, targets: Targets) -> None:
    mark = gateway.audit_mark()
    cmd = "echo from-asyncssh; echo e >&2; exit 7"
    result = asyncssh_run(gateway, f"{targets.login}@web-key", oidc.token("agent-sre"), cmd)
    assert (result.stdout, result.stderr, result.exit_status) == ("from-asyncssh\n", "e\n", 7)
    _, _, events = gateway.session_recording(mark, command=cmd)
    assert stream_bytes(events, "o") == b"from-asyncssh\n"
    assert exits(events)[-1].data["status"] == 7


def test_paramiko_client(gateway: GatewayProcess, oidc: OIDCProvider, targets: Targets) -> None:
    mark = gateway.audit_mark()
    cmd = "echo from-paramiko; exit 4"
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    try:
        client.connect("127.0.0.1", port=gateway.ssh_port, username=f"{targets.login}@web-key",
                       password=oidc.token("agent-sre"), look_for_keys=False, allow_agent=False,
                       timeout=15, auth_timeout=15, banner_timeout=15)
        _, stdout, _ = client.exec_command(cmd, timeout=15)
        out = stdout.read()
        status = stdout.channel.recv_exit_status()
    finally:
        client.close()
    assert (out, status) == (b"from-paramiko\n", 4)
    auth = gateway.wait_audit("auth.success", mark, subject="agent-sre")
    assert auth["method"] == "password"
    gateway.session_recording(mark, command=cmd)


# ---------------------------------------------------------------------------
# bad tokens against the real provider's keys
# ---------------------------------------------------------------------------


def _real_parts(oidc: OIDCProvider) -> tuple[dict[str, Any], dict[str, Any]]:
    token = oidc.token("agent-sre")
    return jwt.get_unverified_header(token), jwt.decode(token, options={"verify_signature": False})


def _forged(oidc: OIDCProvider, **changes: Any) -> str:
    header, claims = _real_parts(oidc)
    header_changes = changes.pop("header", {})
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode({**claims, **changes}, key, algorithm="RS256", headers={**header, **header_changes})


def _expired(oidc_short: OIDCProvider) -> str:
    token = oidc_short.token("agent-short")
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    # Not synchronisation: the token must actually be past exp + the issuer's 1 s leeway.
    time.sleep(max(0.0, exp + 1.2 - time.time()))
    return token


def _alg_none(oidc: OIDCProvider) -> str:
    header, claims = _real_parts(oidc)
    return compact({**header, "alg": "none"}, claims)


def _hs256_with_public_key(oidc: OIDCProvider) -> str:
    """The classic confusion attack: HMAC keyed with the issuer's *public* key (PEM)."""
    header, claims = _real_parts(oidc)
    with urllib.request.urlopen(oidc.jwks_uri, timeout=10) as resp:
        jwk = next(k for k in json.loads(resp.read())["keys"] if k["kid"] == header["kid"])
    pem = RSAAlgorithm.from_jwk(jwk).public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = compact({**header, "alg": "HS256"}, claims).rsplit(".", 1)[0]
    return signing_input + "." + b64url(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())


BAD_TOKENS = {
    "expired": (lambda oidc, short: _expired(short), "expired"),
    "wrong-audience": (lambda oidc, short: oidc.token("agent-sre", resource="https://other.example"),
                       "wrong_audience"),
    "forged-signature": (lambda oidc, short: _forged(oidc), "bad_signature"),
    "unknown-kid": (lambda oidc, short: _forged(oidc, header={"kid": "no-such-kid"}), "unknown_kid"),
    "wrong-issuer": (lambda oidc, short: _forged(oidc, iss="https://evil.example"), "unknown_issuer"),
    "alg-none": (lambda oidc, short: _alg_none(oidc), "alg_not_allowed"),
    "hs256-public-key": (lambda oidc, short: _hs256_with_public_key(oidc), "alg_not_allowed"),
    "garbage": (lambda oidc, short: "this is not a token", "malformed"),
    "100kb": (lambda oidc, short: "A" * 100_000, "too_large"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_bad_token_is_refused(case: str, gateway: GatewayProcess, oidc: OIDCProvider,
                              oidc_short: OIDCProvider, targets: Targets) -> None:
    make, reason = BAD_TOKENS[case]
    token = make(oidc, oidc_short)
    mark = gateway.audit_mark()
    user = f"bad-{case}@web-key"  # names this attempt's audit events
    t0 = time.monotonic()
    with pytest.raises(asyncssh.PermissionDenied):
        asyncssh_run(gateway, user, token, "echo should-not-run")
    assert time.monotonic() - t0 < 10  # refused, not hung
    failures = [e for e in gateway.audit_events(mark) if e["event"] == "auth.failure" and e["user"] == user]
    assert failures, gateway.audit_events(mark)
    assert {e["reason"] for e in failures} == {reason}, failures
    assert all("\n" not in e["detail"] and len(e["detail"]) < 400 for e in failures)
    assert not [e for e in gateway.audit_events(mark) if e["event"] in ("auth.success", "session.start")]
    assert_no_traceback(gateway)
    # ... and the gateway still serves the next valid connection.
    ok = asyncssh_run(gateway, f"{targets.login}@web-key", oidc.token("agent-sre"), "echo still-ok")
    assert (ok.stdout, ok.exit_status) == ("still-ok\n", 0)


# ---------------------------------------------------------------------------
# clear one-line errors for unusable destinations
# ---------------------------------------------------------------------------


ERRORS = {
    "unknown-target": ("{login}@nope", "agent-sre", "unknown target 'nope'", "unknown_target"),
    "login-not-allowed": ("root@web-key", "agent-sre", "login 'root' is not allowed on target 'web-key'",
                          "access_denied"),
    "no-access-rule": ("{login}@web-key", "agent-nobody", "no access rule lets agent-nobody use", "access_denied"),
    "target-down": ("{login}@web-down", "agent-sre", "cannot reach target web-down", "target_unreachable"),
    "host-key-changed": ("{login}@web-badkey", "agent-sre", "host key of target web-badkey", "host_key_mismatch"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_unusable_destination_gets_a_clear_error(case: str, gateway: GatewayProcess, oidc: OIDCProvider,
                                                 targets: Targets) -> None:
    user, client, message, reason = ERRORS[case]
    user = user.format(login=targets.login)
    mark = gateway.audit_mark()
    r = run_ssh([*dest(gateway, user), "echo never"], token=oidc.token(client))
    assert r.returncode == 255
    assert r.stdout == b""
    assert message.encode() in r.stderr, r.stderr
    lines = [line for line in r.stderr.decode().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("guarita: "), lines
    event = gateway.wait_audit("session.refused", mark, subject=client)
    assert event["reason"] == reason
    assert_no_traceback(gateway)


# ---------------------------------------------------------------------------
# malformed configuration
# ---------------------------------------------------------------------------


def _base_config(tmp_path: Path) -> str:
    key = tmp_path / "target_key"
    key.write_text("not checked by check-config beyond existing\n")
    target = target_block("web", 22, ["deploy"], ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ"],
                          "key", key)
    access = '[[access]]\ngroups = ["sre"]\n'
    return gateway_config(tmp_path / "data", [("http://127.0.0.1:9", "30s")], target, access)


BAD_CONFIGS = {
    "toml-syntax": (lambda text: text + "\nthis is = = not toml\n", "not valid TOML"),
    "unknown-key": (lambda text: text.replace("[gateway]\n", '[gateway]\ncolour = "blue"\n'),
                    "gateway.colour: unknown key"),
    "port-not-int": (lambda text: text.replace("port = 22", 'port = "x"'), "targets[0].port: must be int"),
    "forbidden-alg": (lambda text: text.replace('audience = "guarita"', 'audience = "guarita"\nalgorithms = ["HS256"]'),
                      "oidc[0].algorithms: HS256 not allowed"),
}


def test_valid_config_checks_ok(tmp_path: Path) -> None:
    path = tmp_path / "guarita.toml"
    path.write_text(_base_config(tmp_path))
    r = check_config(path)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_malformed_config_names_the_key(case: str, tmp_path: Path, start_gateway: Any) -> None:
    mutate, message = BAD_CONFIGS[case]
    base = _base_config(tmp_path)
    text = mutate(base)
    assert text != base
    path = tmp_path / "bad.toml"
    path.write_text(text)
    r = check_config(path)
    assert r.returncode == 2
    output = r.stdout + r.stderr
    assert message in output, output
    assert "Traceback" not in output
    if case == "toml-syntax":
        assert str(path) in output and "line" in output

    # The server refuses to start with the same explanation.
    gw = start_gateway(text, data_dir=tmp_path / "serve", wait=False)
    assert gw.proc is not None
    assert gw.proc.wait(timeout=30) == 2
    log = gw.log_text()
    assert message in log and "Traceback" not in log


def test_banner_is_shown_before_authentication(start_gateway: Any, oidc: OIDCProvider, targets: Targets,
                                               tmp_path: Path) -> None:
    """`ssh.banner`: the operator's notice (that sessions are recorded, say) reaches the
    OpenSSH client before it authenticates, as written, line by line."""
    t = targets
    data_dir = tmp_path / "banner-gw"
    text = gateway_config(data_dir, [(oidc.issuer, "5s")],  # type: ignore[list-item]
                          target_block("web-key", t.web_key.port, [t.login], [t.web_key.host_key_line], "key",
                                       t.gateway_key),
                          '[[access]]\nname = "everyone"\nsubjects = ["*"]\n')
    text += ('\n[ssh]\nbanner = """Sessions through this gateway are recorded (LGPD, Art. 37).\n'
             'Questions: dpo@example.com"""\n')
    gw = start_gateway(text, data_dir=data_dir)
    with tempfile.TemporaryDirectory(prefix="guarita-ssh-") as tmp:
        cmd, env = _prepare_ssh(["-p", str(gw.ssh_port), f"{t.login}@web-key@127.0.0.1", "echo ok"],
                                token=oidc.token("agent-sre"), identity=None, env=None, tmpdir=Path(tmp))
        cmd = [("LogLevel=INFO" if arg == "LogLevel=ERROR" else arg) for arg in cmd]  # ssh hides banners below INFO
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=30,
                           start_new_session=True)
    assert r.returncode == 0 and r.stdout == b"ok\n", r.stderr
    assert b"Sessions through this gateway are recorded (LGPD, Art. 37).\r\nQuestions: dpo@example.com" in r.stderr


def test_banner_with_escape_sequences_is_refused(tmp_path: Path) -> None:
    from bastion.config import ConfigError, parse_config

    raw = {"oidc": [{"issuer": "https://idp.example.com", "audience": "guarita"}],
           "ssh": {"banner": "recorded \x1b[2J"}}
    with pytest.raises(ConfigError) as info:
        parse_config(raw, base=tmp_path)
    assert "printable" in dict(info.value.problems)["ssh.banner"]
