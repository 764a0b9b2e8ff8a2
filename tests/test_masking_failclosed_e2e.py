"""Masking fails closed, end to end: real ssh through the gateway to a real sshd.

One test per class of output that used to slip through (issue 22): back-pressure (a client
that reads slowly, a target link that stalls), escape sequences after a value, screen
modes, encodings, and what the agent sends (typed input, exec command lines). Each checks
what the agent saw and what the recording holds, and that near misses are left alone.
``leaks()`` counts values in clear; the counts are printed (``-s``) for the issue's report.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from bastion.masking.stream import marker_values
from tests.conftest import GatewayProcess, Targets, gateway_config, target_block
from tests.support.approvals import BackgroundSsh, cli
from tests.support.oidc import OIDCProvider
from tests.support.openssh import PtySsh, _kill_group, _prepare_ssh, run_ssh
from tests.support.relay import ThrottledRelay

# Runs on the target (python3 there) and here: the same seeded values on both sides.
GEN = r"""
import random, sys
def digits(r, n):
    while True:
        d = [r.randrange(10) for _ in range(n)]
        if len(set(d)) > 1:
            return d
def cpf(r):
    d = digits(r, 9)
    for w in (10, 11):
        d.append(sum(x * (w - i) for i, x in enumerate(d)) * 10 % 11 % 10)
    return "%d%d%d.%d%d%d.%d%d%d-%d%d" % tuple(d)
def near(value):  # the same shape, a wrong check digit: not a CPF
    return value[:-1] + str((int(value[-1]) + 1) % 10)
def lines(seed, n):
    r = random.Random(seed)
    out = []
    for i in range(n):
        v = cpf(r)
        out.append((v, near(v), "%05d INFO pedido=%d cliente=%s ref=%s ok\n" % (i, i * 7919 % 100000, v, near(v))))
    return out
"""
ns: dict[str, Any] = {}
exec(GEN, ns)


def _remote_log(seed: int, n: int) -> str:
    # written in pieces of 1000 bytes, as a program that logs as it goes: many packets
    return "python3 -c " + _sq(GEN + f"\nt = ''.join(l for _, _, l in lines({seed}, {n})).encode()\n"
                               "for i in range(0, len(t), 1000):\n    sys.stdout.buffer.write(t[i:i + 1000]); "
                               "sys.stdout.flush()\n")


def _sq(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def leaks(seen: bytes, values: list[str]) -> int:
    """How many of ``values`` appear in clear in ``seen``."""
    if len(values) > 100:  # CPFs of a log: one pass over the text
        return len(set(_CPF_SHAPE.findall(seen)) & {v.encode() for v in values})
    return sum(v.encode() in seen for v in values)


_CPF_SHAPE = re.compile(rb"[0-9]{3}\.[0-9]{3}\.[0-9]{3}-[0-9]{2}")


def _near_kept(seen: bytes, near: list[str]) -> bool:
    return {n.encode() for n in near} <= set(re.findall(rb"ref=([0-9.-]+) ok", seen))


@pytest.fixture(scope="module")
def relay(targets: Targets) -> Any:
    with ThrottledRelay(targets.web_key.port, every=16384, stall=0.02) as r:
        yield r


@pytest.fixture(scope="module")
def gw(oidc: OIDCProvider, targets: Targets, relay: ThrottledRelay,
       tmp_path_factory: pytest.TempPathFactory) -> Any:
    data_dir = tmp_path_factory.mktemp("failclosed-gw")
    t = targets
    text = gateway_config(
        data_dir, [(oidc.issuer, "5s")],  # type: ignore[list-item]
        target_block("masked", t.web_key.port, [t.login], [t.web_key.host_key_line], "key", t.gateway_key)
        + target_block("stalled", relay.port, [t.login], [t.web_key.host_key_line], "key", t.gateway_key),
        '[[access]]\nname = "everyone"\nsubjects = ["*"]\ntargets = ["*"]\n'
        '\n[[approvals]]\nname = "needs a second person"\npattern = "needs-approval"\napprovers = ["sre"]\n',
    )
    text += '\n[masking]\ndefault_apply = "both"\n'
    (data_dir / "guarita.toml").write_text(text)
    g = GatewayProcess(data_dir / "guarita.toml", data_dir)
    g.start()
    yield g
    g.stop()


def _recorded(g: GatewayProcess, mark: int, **fields: Any) -> tuple[str, dict[str, Any], list[Any]]:
    return g.session_recording(mark, **fields)


def _output(events: list[Any]) -> bytes:
    return b"".join(e.stream_bytes() or b"" for e in events if e.stream in ("o", "e"))


def _slow_ssh(args: list[str], token: str, piece: int, pause: float, timeout: float = 60) -> bytes:
    """ssh whose output is read ``piece`` bytes at a time with ``pause`` between reads (an
    agent that processes output as it goes): the gateway's writes back up."""
    with tempfile.TemporaryDirectory(prefix="guarita-ssh-") as tmp:
        cmd, env = _prepare_ssh(args, token=token, identity=None, env=None, tmpdir=Path(tmp))
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, start_new_session=True)
        assert proc.stdout is not None
        out = bytearray()
        deadline = time.monotonic() + timeout
        try:
            while chunk := proc.stdout.read1(piece):  # type: ignore[attr-defined]
                out += chunk
                time.sleep(pause)  # the slow reader itself, not a wait for anything
                assert time.monotonic() < deadline, "the slow reader timed out"
            assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else b""
        finally:
            _kill_group(proc)
            proc.wait()
        return bytes(out)


# -- 1. back-pressure: a slow reader, a stalled link ---------------------------------------------


def test_a_slow_reader_gets_no_value_unmasked(gw: GatewayProcess, oidc: OIDCProvider) -> None:
    data = ns["lines"](1, 30000)  # ~2.1 MB: more than ssh's channel window, so the gateway waits
    values, near = [v for v, _, _ in data], [n for _, n, _ in data]
    mark = gw.audit_mark()
    seen = _slow_ssh(["-p", str(gw.ssh_port), "masked@127.0.0.1", _remote_log(1, 30000)],
                     oidc.token("agent-sre"), piece=4096, pause=0.002)
    _, _, events = _recorded(gw, mark, kind="exec", target="masked")
    recorded = _output(events)
    print(f"\nslow reader: {leaks(seen, values)} of {len(values)} CPFs unmasked live, "
          f"{leaks(recorded, values)} in the recording")
    assert seen.count(b"\n") == 30000 and seen.count(b"cliente=***.***.***-** ") == 30000
    assert leaks(seen, values) == 0 and leaks(recorded, values) == 0
    assert _near_kept(seen, near)  # near misses unaltered


def test_a_stalled_target_link_cuts_no_value(gw: GatewayProcess, oidc: OIDCProvider, relay: ThrottledRelay) -> None:
    data = ns["lines"](2, 4000)
    values = [v for v, _, _ in data]
    mark = gw.audit_mark()
    before = relay.stalls
    r = run_ssh(["-p", str(gw.ssh_port), "stalled@127.0.0.1", _remote_log(2, 4000)], token=oidc.token("agent-sre"),
                timeout=60)
    assert r.returncode == 0, r.stderr
    assert relay.stalls - before >= 10  # the link did stall, many times, mid-stream
    _, _, events = _recorded(gw, mark, kind="exec", target="stalled")
    recorded = _output(events)
    print(f"\nstalled link: {leaks(r.stdout, values)} of {len(values)} CPFs unmasked live, "
          f"{leaks(recorded, values)} in the recording ({relay.stalls - before} stalls)")
    assert r.stdout.count(b"cliente=***.***.***-** ") == 4000
    assert leaks(r.stdout, values) == 0 and leaks(recorded, values) == 0
    assert _near_kept(r.stdout, [n for _, n, _ in data])


# -- 2-4. escapes after a value, screen modes, encodings -------------------------------------------

CPF, CNPJ, PHONE, CARD, EMAIL = "529.982.247-25", "11.222.333/0001-81", "(11) 91234-5678", "4111 1111 1111 1111", \
    "ana.souza@example.com"
ESCAPES = [b"\x1b7", b"\x1b8", b"\x1b\\", b"\x1b(B", b"\x1b=", b"\x1b>", b"\x1bM", b"\x1bE", b"\x1b[0m", b"\x1b[K"]


def _emit(g: GatewayProcess, token: str, payload: bytes, tty: bool = False) -> tuple[bytes, bytes]:
    """The target prints ``payload`` (exact bytes); what the agent saw, what was recorded."""
    mark = g.audit_mark()
    command = "python3 -c " + _sq(f"import sys; sys.stdout.buffer.write(bytes.fromhex('{payload.hex()}'))")
    r = run_ssh([*(["-tt"] if tty else []), "-p", str(g.ssh_port), "masked@127.0.0.1", command], token=token)
    assert r.returncode == 0, r.stderr
    _, _, events = _recorded(g, mark, kind="exec", target="masked")
    return r.stdout, _output(events)


def test_escape_sequences_after_a_value_do_not_hide_it(gw: GatewayProcess, oidc: OIDCProvider) -> None:
    values = [CPF, CNPJ, PHONE, CARD, EMAIL]
    payload = b"".join(v.encode() + esc + b"x9 " for v in values for esc in ESCAPES)
    payload += b"".join(b"\x1b]8;;https://crm.example/c?id=1\x1b\\" + v.encode() + b"\x1b]8;;\x1b\\\n" for v in values)
    payload += b"".join(b"\x1b]8;;https://crm.example/\x07" + v.encode() + b"\x1b]8;;\x07\n" for v in values)
    near = b"v1.2.3\x1b7x 529.982.247-26\x1b8 2024-01-31\x1b\\ 10.0.0.1\x1b(B\n"
    seen, recorded = _emit(gw, oidc.token("agent-sre"), payload + near)
    print(f"\nescapes: {leaks(seen, values)} of {len(values)} kinds unmasked live, {leaks(recorded, values)} recorded")
    assert leaks(seen, values) == 0 and leaks(recorded, values) == 0
    assert seen.count(b"***.***.***-**") == len(ESCAPES) + 2
    assert seen.endswith(near)


def test_no_screen_mode_switches_masking_off(gw: GatewayProcess, oidc: OIDCProvider) -> None:
    token = oidc.token("agent-sre")
    tricks = [b"\x1b[?1049h", b"\x1b[?1049h\x1b[?25;1049l", b"\x1b[?1049h\x1b[?01049l", b"\x1b[?47h", b"\x1b[?1047h"]
    payload = b"".join(t + f" cliente {CPF} {EMAIL}\n".encode() for t in tricks)
    for tty in (False, True):  # with no PTY there is no screen; with one, the alternate screen is scanned
        seen, recorded = _emit(gw, token, payload, tty=tty)
        print(f"\nscreen modes (tty={tty}): {leaks(seen, [CPF, EMAIL])} kinds unmasked live, "
              f"{leaks(recorded, [CPF, EMAIL])} recorded")
        assert leaks(seen, [CPF, EMAIL]) == 0 and leaks(recorded, [CPF, EMAIL]) == 0
        assert seen.count(b"***.***.***-**") == len(tricks)


def test_encoded_values_are_masked(gw: GatewayProcess, oidc: OIDCProvider) -> None:
    encoded = ["ana.souza%40example.com", "%2B5511912345678", "+55%2011%2091234-5678", "11.222.333%2F0001-81",
               "11.222.333\\/0001-81", "529%2E982%2E247-25", "ana.souza\\u0040example.com", "4111+1111+1111+1111",
               "4111%201111%201111%201111", "ana.souza&#64;example.com", "4111\\u00201111\\u00201111\\u00201111"]
    near = "GET /a?q=1%2B1&v=2.0%2F3 100% {\"p\":\"a\\/b\"} 1+1=2 529%2E982%2E247-26\n"
    payload = ("\n".join(f"url=https://x.example/?q={e}&ok=1 {{\"v\":\"{e}\"}}" for e in encoded) + "\n" + near).encode()
    seen, recorded = _emit(gw, oidc.token("agent-sre"), payload)
    print(f"\nencodings: {leaks(seen, encoded)} of {len(encoded)} unmasked live, {leaks(recorded, encoded)} recorded")
    assert leaks(seen, encoded) == 0 and leaks(recorded, encoded) == 0
    assert seen.endswith(near.encode())


# -- 5. what the agent sends: typed input, exec command lines ---------------------------------------


def test_typed_values_are_masked_in_the_recording(gw: GatewayProcess, oidc: OIDCProvider, tmp_path: Path) -> None:
    mark = gw.audit_mark()
    with PtySsh(["-tt", "-p", str(gw.ssh_port), "masked@127.0.0.1"], token=oidc.token("agent-sre")) as pty:
        pty.expect(rb"[$#] ")
        for ch in f": {CPF} {EMAIL}".encode():  # one keystroke at a time, as a person types
            pty.send(bytes([ch]))
            pty.expect(re.escape(bytes([ch])))  # its echo, shown at once
        pty.send(b"\r")
        pty.expect(rb"[$#] ")
        pty.send(b"exit\r")
        assert pty.wait() == 0
        seen = pty.output()
    assert CPF.encode() in seen  # the agent's live view of its own typing is untouched
    sid, _, events = _recorded(gw, mark, kind="shell", target="masked")
    typed = b"".join(e.stream_bytes() or b"" for e in events if e.stream == "i")
    recorded = _output(events)
    print(f"\ntyped: {leaks(typed, [CPF, EMAIL])} of 2 unmasked in input events, "
          f"{leaks(recorded, [CPF, EMAIL])} in output (echo)")
    assert leaks(typed, [CPF, EMAIL]) == 0 and leaks(recorded, [CPF, EMAIL]) == 0
    assert b"***.***.***-**" in typed
    values = [v for e in events if e.code == "m" and e.data.get("type") == "masking" and e.data.get("stream") == "i"
              for v in marker_values(e.data)]
    assert sorted(v["detector"] for v in values) == ["cpf", "email"]  # with their keyed hash
    cast = tmp_path / "s.cast"
    exported = subprocess.run([sys.executable, "-m", "replay.cli", "--recordings", gw.recordings_dir.as_uri(),
                               "export", sid, "-o", str(cast)], capture_output=True, timeout=60)
    assert exported.returncode == 0, exported.stderr
    assert leaks(cast.read_bytes(), [CPF, EMAIL]) == 0


def test_exec_command_lines_are_kept_masked(gw: GatewayProcess, oidc: OIDCProvider) -> None:
    mark = gw.audit_mark()
    command = f"echo grep {CPF} clientes.csv; true {EMAIL}"
    r = run_ssh(["-p", str(gw.ssh_port), "masked@127.0.0.1", command], token=oidc.token("agent-sre"))
    assert r.returncode == 0, r.stderr
    shown = "echo grep ***.***.***-** clientes.csv; true ***.*****@*******.***"
    sid, manifest, _ = _recorded(gw, mark, kind="exec", target="masked")
    audit = gw.audit_log.read_text()
    replay = [sys.executable, "-m", "replay.cli", "--recordings", gw.recordings_dir.as_uri()]
    listed = subprocess.run([*replay, "ls", "--json"], capture_output=True, timeout=60).stdout
    searched = subprocess.run([*replay, "search", "grep"], capture_output=True, timeout=60).stdout
    kept = {"metadata": json.dumps(manifest).encode(), "audit": audit.encode(), "replay ls": listed,
            "replay search": searched}
    print("\ncommand line: " + ", ".join(f"{k} {leaks(v, [CPF, EMAIL])}" for k, v in kept.items()))
    assert manifest["session"]["command"] == shown
    for where, text in kept.items():
        assert leaks(text, [CPF, EMAIL]) == 0, where


def test_approval_requests_and_what_approvers_see_are_masked(gw: GatewayProcess, oidc: OIDCProvider) -> None:
    mark = gw.audit_mark()
    command = f"echo needs-approval {CPF} {EMAIL}"
    job = BackgroundSsh(["-p", str(gw.ssh_port), "masked@127.0.0.1", command], oidc.token("agent-ci"))
    event = gw.wait_audit("approval.requested", mark, timeout=20)
    approver = oidc.token("agent-sre")
    listed = cli(["approvals", "list"], approver, gw.http_url)
    shown = cli(["approvals", "show", str(event["request"])], approver, gw.http_url)
    assert listed.returncode == 0 and shown.returncode == 0, listed.stderr + shown.stderr
    assert "needs-approval ***.***.***-**" in shown.stdout  # the approver still sees what it is
    denied = cli(["approvals", "deny", str(event["request"]), "--reason", "no"], approver, gw.http_url)
    assert denied.returncode == 0, denied.stderr
    r = job.join()
    assert r.returncode != 0
    audit = gw.audit_log.read_text()
    seen = {"audit": audit.encode(), "approvals list": listed.stdout.encode(), "approvals show": shown.stdout.encode()}
    print("\napproval: " + ", ".join(f"{k} {leaks(v, [CPF, EMAIL])}" for k, v in seen.items()))
    for where, text in seen.items():
        assert leaks(text, [CPF, EMAIL]) == 0, where


def test_the_approval_gate_reads_typed_commands_with_masking_on(gw: GatewayProcess, oidc: OIDCProvider) -> None:
    """The echo the live view gets early (typed one key at a time) reaches the interactive
    gate's screen too: the command line it reconstructs is whole."""
    mark = gw.audit_mark()
    with PtySsh(["-tt", "-p", str(gw.ssh_port), "masked@127.0.0.1"], token=oidc.token("agent-ci")) as pty:
        pty.expect(rb"[$#] ")
        for ch in b"echo needs-approval 12":
            pty.send(bytes([ch]))
            pty.expect(re.escape(bytes([ch])))
        pty.send(b"\r")
        event = gw.wait_audit("approval.requested", mark, timeout=20)
        assert event["command"] == "echo needs-approval 12"
        denied = cli(["approvals", "deny", str(event["request"]), "--reason", "no"], oidc.token("agent-sre"),
                     gw.http_url)
        assert denied.returncode == 0, denied.stderr
        pty.expect(rb"denied")
        pty.send(b"exit\r")
        pty.wait()
