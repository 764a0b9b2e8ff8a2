"""Runs the bypass corpus (tests/approval_corpus) through the detector and the rules and
REPORTS how many attempts are caught, as an SSH exec command and typed interactively.

A miss is not a failure (the corpus documents what command matching cannot stop); the
counts must equal the ones written in docs/threat-model.md, so the documentation is
updated whenever the corpus or the matching changes.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from bastion.approvals.detector import CommandDetector
from bastion.approvals.rules import ApprovalPolicy, Context, parse_policy
from bastion.config import ConfigError, _Reader
from bastion.identity import Identity

CORPUS = Path(__file__).resolve().parent / "approval_corpus"
THREAT_MODEL = Path(__file__).resolve().parent.parent / "docs" / "threat-model.md"
AGENT = Identity(issuer="https://idp", subject="agent", groups=("ci",))
CTX = Context(identity=AGENT, front_door="ssh", target="db-1")


def load_policy() -> ApprovalPolicy:
    problems: list[tuple[str, str]] = []
    policy = parse_policy(_Reader(problems, CORPUS), tomllib.loads((CORPUS / "rules.toml").read_text()))
    if problems:
        raise ConfigError(problems)
    return policy


def attempts() -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    for path in sorted(CORPUS.glob("*.txt")):
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
                 and not line.startswith("#")]
        out[path.name] = [[part.strip() for part in line.split(" ⏎ ")] for line in lines]
    return out


def caught(policy: ApprovalPolicy, command: str) -> bool:
    return policy.command_verdict(CTX, command).action != "allow"


def typed(policy: ApprovalPolicy, lines: list[str]) -> bool:
    """Type the lines into a simulated bash (echo on, PS1 / PS2) and check what the
    detector reads on each Enter."""
    d = CommandDetector(80, 24)
    d.output(b"[gw]$ ")
    continued = False
    heredoc: str | None = None
    for line in lines:
        data = line.encode()
        d.keys(data)
        d.output(data)
        command = d.command()
        joined = d.joined(command)  # as the gate does: a backslash-newline continues the line
        d.enter()
        if (command and caught(policy, command)) or (joined and caught(policy, joined)):
            return True
        d.continue_after(command)
        if heredoc is not None and line == heredoc:
            heredoc = None
        elif heredoc is None and (m := re.search(r"<<-?\s*['\"]?(\w+)", line)):
            heredoc = m.group(1)
        continued = line.endswith("\\") or heredoc is not None or line.rstrip().endswith(("do", "then", "{"))
        d.output(b"\r\n" + (b"> " if continued else b"[gw]$ "))
    return False


def test_corpus_report() -> None:
    policy = load_policy()
    rows = []
    total = exec_caught = typed_caught = 0
    for name, items in attempts().items():
        e = sum(caught(policy, "\n".join(lines)) for lines in items)
        t = sum(typed(policy, lines) for lines in items)
        rows.append(f"{name:<22} {len(items):>3} attempts  exec caught {e:>3}  interactive caught {t:>3}")
        total += len(items)
        exec_caught += e
        typed_caught += t
        missed = [" ⏎ ".join(lines) for lines in items if not caught(policy, "\n".join(lines))]
        rows += [f"    missed (exec): {m}" for m in missed]
    summary = f"caught as exec: {exec_caught} of {total}; caught interactively: {typed_caught} of {total}"
    print("\n".join(["", *rows, summary]))
    documented = THREAT_MODEL.read_text(encoding="utf-8")
    assert summary in documented, f"update docs/threat-model.md with: {summary}"
