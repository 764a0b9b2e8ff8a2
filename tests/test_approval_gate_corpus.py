"""The gate's corpus by class (tests/approval_corpus/gate/*.txt), end to end: real ``ssh``,
the gateway, real bash on the target (under a PTY, and for class 1 without one). Every
attempt tries to print ``needs-approval-42``, which the gateway's rule holds; it is *held*
when guarita asks for approval or refuses it, *missed* when the target printed it. One
session per attempt (the gateway limits approval requests per session). The counts per
class are printed and every attempt must be held."""

from __future__ import annotations

import re
import time
from pathlib import Path

from tests.conftest import GatewayProcess, Targets
from tests.support.approvals import BackgroundSsh
from tests.support.oidc import OIDCProvider
from tests.test_approvals_e2e import PROMPT, agw, approve, dest, hooks, shell  # noqa: F401

__all__ = ["agw", "hooks"]

CORPUS = Path(__file__).resolve().parent / "approval_corpus" / "gate"
RAN = b"needs-approval-42"
HELD = re.compile(rb"request [a-z0-9]{10} \(rule|guarita: [^\r\n]*(?:refused|cannot follow)")
_STEP = re.compile(r"\{(PROMPT|WAIT:[^}]*)\}")


def _attempts(name: str) -> list[str]:
    text = (CORPUS / name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _keys(text: str) -> bytes:
    return text.encode().decode("unicode_escape").encode("latin-1")


def _typed(gw: GatewayProcess, targets: Targets, oidc: OIDCProvider, attempt: str) -> bool:
    pty = shell(gw, targets, oidc.token("agent-ci"))
    try:
        start = len(pty.output())
        parts = _STEP.split(attempt)
        for i, part in enumerate(parts):
            if i % 2 == 0:
                pty.send(_keys(part))
            elif part == "PROMPT":
                pty.expect(PROMPT, timeout=20)
            else:
                pty.expect(re.escape(_keys(part[5:])), timeout=20)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            out = pty.output()[start:]
            if HELD.search(out):
                return True
            if RAN in out:
                return False
            pty._read_some(0.1)
        return False
    finally:
        pty.close()


def _piped(gw: GatewayProcess, targets: Targets, oidc: OIDCProvider, attempt: str) -> bool:
    door, script = attempt.split("|", 1)
    command = [] if door == "shell" else door.split(" ", 1)[1:]
    args = ["-T", *dest(gw, f"{targets.login}@web-key"), *command]
    mark = gw.audit_mark()
    job = BackgroundSsh(args, oidc.token("agent-ci"), input=_keys(script))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        asked = [e for e in gw.audit_events(mark) if e.get("event") == "approval.requested"]
        if asked:
            approve(gw, str(asked[0]["request"]), oidc.token("agent-sre"), decision="deny", reason="corpus")
            return RAN not in job.join().stdout
        if not job._thread.is_alive():
            break
        time.sleep(0.05)
    job.join()
    return False  # it ran without a request (or never finished)


def test_gate_corpus_by_class(agw: GatewayProcess, oidc: OIDCProvider, targets: Targets) -> None:
    rows, missed = [], []
    for path in sorted(CORPUS.glob("*.txt")):
        attempts = _attempts(path.name)
        run = _piped if path.name.startswith("1-") else _typed
        held = 0
        for attempt in attempts:
            if run(agw, targets, oidc, attempt):
                held += 1
            else:
                missed.append(f"{path.name}: {attempt}")
        rows.append(f"{path.stem:<18} held {held} of {len(attempts)}")
    print("\n".join(["", *rows, *(f"    missed: {m}" for m in missed)]))
    assert not missed, missed
