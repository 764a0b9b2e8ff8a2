"""The session pipeline every front door feeds: recording, hidden-input detection, audit.

A front door turns its protocol into calls on a ``Session``: bytes from the agent go
through ``from_client()`` before they reach the target, bytes from the target through
``from_target()`` before they reach the agent. Policy (who may open the session) is
decided before a Session exists; approvals and masking hook in here, shared by SSH and
Kubernetes alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bastion.identity import Identity
from recorder import SessionRecording

if TYPE_CHECKING:
    from bastion.approvals.engine import GateResult
    from bastion.approvals.interactive import InteractiveGate
    from bastion.gateway import Gateway


@dataclass
class SessionInfo:
    """What a front door knows about a session when it opens."""

    front_door: str  # "ssh" or "kube"
    identity: Identity
    source: str  # client address
    target: str  # SSH target, or kube cluster
    login: str | None = None
    kind: str = "shell"  # "shell", "exec", "subsystem"
    command: str | None = None
    subsystem: str | None = None
    term: str | None = None
    size: tuple[int, int] | None = None  # (cols, rows) when a PTY was requested
    extra: dict[str, Any] = field(default_factory=dict)
    # Chosen before the target is contacted, so the target's own log can name it.
    session_id: str | None = None

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "front_door": self.front_door,
            "identity": self.identity.to_dict() | {"method": self.identity.method},
            "source": self.source,
            "target": self.target,
            "login": self.login,
            "kind": self.kind,
            "command": self.command,
            "subsystem": self.subsystem,
            "tty": self.size is not None,
        }
        if self.size:
            meta["term"] = {"type": self.term, "cols": self.size[0], "rows": self.size[1]}
        return meta | self.extra


class EchoTracker:
    """Keeps typed secrets out of recordings.

    On a terminal, typed text comes back as echo within milliseconds, except at a
    password prompt, where the remote side turns echo off. Typed text is held here until
    its echo appears in the output (then it is recorded as input, at the time it was
    typed). When Enter comes while text is still held, the verdict waits for the next
    output: if it echoes the text (an agent that wrote a whole line at once), the text is
    input; if not (a password prompt), only a ``hidden-input`` marker with the length is
    recorded. Other control keys release held text as input.
    """

    def __init__(self, recording: SessionRecording, limit: int = 4096) -> None:
        self.rec = recording
        self.limit = limit
        self._held: list[tuple[float, bytes]] = []
        self._held_len = 0
        # Text followed by Enter, waiting for the output that tells whether it was echoed.
        self._verdict: list[tuple[float, bytes]] = []

    def typed(self, data: bytes) -> None:
        for piece in _KEYS.findall(data):
            self._key(piece)

    def _key(self, piece: bytes) -> None:
        if _printable(piece):
            self._held.append((self.rec.now(), piece))
            self._held_len += len(piece)
            if self._held_len > self.limit:  # a paste, not a password
                self.release()
            return
        if piece == b"\x7f" and self._held:  # backspace while held edits the held text
            t0, last = self._held.pop()
            self._held_len -= len(last)
            if len(last) > 1:
                self._held.append((t0, last[:-1]))
                self._held_len += len(last) - 1
            return
        if piece[:1] in (b"\r", b"\n") and self._held:
            self._decide(b"")  # an older line still undecided: no echo came, keep it hidden
            # The Enter waits with its line, so the recording keeps the order it was typed in.
            self._verdict, self._held, self._held_len = [*self._held, (self.rec.now(), piece)], [], 0
            return
        self._decide(b"")
        self.release()
        self.rec.input(piece)

    def output(self, data: bytes) -> None:
        """Called before the output is recorded: an echo releases held keystrokes."""
        if self._verdict:
            self._decide(data)
        if self._held and any(_echoed(chunk, data) for _, chunk in self._held[-4:]):
            self.release()

    def _decide(self, output: bytes) -> None:
        if not self._verdict:
            return
        *line, (t_enter, enter) = self._verdict
        text = b"".join(chunk for _, chunk in line)
        if output and _echoed(text, output):
            for t, chunk in line:
                self.rec.input_at(t, chunk)
        else:
            self.rec.marker("hidden-input", length=len(text),
                            reason="typed while the terminal did not echo (e.g. a password prompt)")
        self.rec.input_at(t_enter, enter)
        self._verdict = []

    def holding(self) -> bool:
        """Typed text is waiting for its echo (or its verdict): it may be a secret."""
        return bool(self._held or self._verdict)

    def release(self) -> None:
        for t, chunk in self._held:
            self.rec.input_at(t, chunk)
        self._held.clear()
        self._held_len = 0

    def close(self) -> None:
        """End of session: undecided text never echoed, so it stays hidden."""
        self._decide(b"")
        self.release()


# Runs of printable bytes (UTF-8 included), or one control key / escape sequence.
_KEYS = re.compile(rb"[^\x00-\x1f\x7f]+|\x1b\[[0-9;?]*[ -/]*[@-~]|\x1bO.|\x1b.?|[\x00-\x1f\x7f]", re.DOTALL)


def _printable(data: bytes) -> bool:
    return all(b >= 0x20 and b != 0x7F for b in data)


def _echoed(typed: bytes, output: bytes) -> bool:
    # The first few characters, contiguous: with echo on, the terminal sends typed text
    # back as it was written; a lone character matching unrelated output must not count.
    return typed[:6] in output


class Session:
    def __init__(self, gateway: Gateway, info: SessionInfo) -> None:
        self.gateway = gateway
        self.info = info
        self.started = time.time()
        self.recording = gateway.recorder.open_session(info.metadata(), term=info.size, session_id=info.session_id)
        self.id = self.recording.id
        self._echo = EchoTracker(self.recording) if info.size else None
        self.ended = False
        # Approvals. A front door gives the session a way to write to the agent (its terminal,
        # or stderr before the target is open) and, for interactive sessions, to the target
        # (held input is released later): then commands typed in a terminal are gated too.
        self.write_client: Callable[[bytes], None] | None = None
        self.write_target: Callable[[bytes], None] | None = None
        self.approval_cancel: asyncio.Event | None = None
        self.cancel_reason: str | None = None
        self._gate: InteractiveGate | None = None
        self._gate_checked = False
        self._approvals = getattr(gateway, "approvals", None)
        gateway.audit.emit("session.start", session=self.id, **_audit_fields(info))
        if self._approvals is not None:
            self._approvals.session_started(self)

    def from_client(self, data: bytes) -> bytes:
        gate = self._gate if self._gate_checked else self._start_gate()
        if gate is not None and gate.waiting:  # a command waits for approval: only Ctrl-C counts
            gate.drop(data)
            return b""
        hidden = self._echo is not None and self._echo.holding()
        if self._echo is not None:
            self._echo.typed(data)
        else:
            self.recording.input(data)
        return gate.input(data, hidden) if gate is not None else data

    def from_target(self, data: bytes, stream: str = "o") -> bytes:
        if self._echo is not None and stream == "o":
            self._echo.output(data)
        gate = self._gate if self._gate_checked else self._start_gate()
        if gate is not None and stream == "o":
            gate.output(data)
        self.recording.output(data, stream)
        return data

    def resize(self, cols: int, rows: int) -> None:
        self.recording.resize(cols, rows)
        if self._gate is not None:
            self._gate.resize(cols, rows)

    # -- approvals (bastion/approvals) --------------------------------------------------------

    async def gate_exec(self, command: str, argv: list[str] | None = None) -> GateResult:
        """Decide an exec command before the target session is opened: allowed at once, or
        refused, or held until approved (the agent is told on ``write_client`` who must
        approve, the request id and how long it may wait). Kubernetes passes the ``argv``."""
        from bastion.approvals.engine import GateResult

        if self._approvals is None:
            return GateResult(True, "allowed")
        result = await self._approvals.check(self, command, "exec", argv=argv)
        if result.outcome != "allowed":
            self.say(f"guarita: {result.reason}")
        return result

    async def gate_shell(self) -> GateResult:
        """Decide whether this identity may open an interactive shell here at all."""
        from bastion.approvals.engine import GateResult

        if self._approvals is None:
            return GateResult(True, "allowed")
        result = await self._approvals.check(self, "interactive shell", "shell")
        if result.outcome != "allowed":
            self.say(f"guarita: {result.reason}")
        return result

    def cancel_approval(self, reason: str) -> None:
        """End a wait for approval (Ctrl-C, disconnect, shutdown): the request is cancelled."""
        if self.approval_cancel is not None and not self.approval_cancel.is_set():
            self.cancel_reason = reason
            self.approval_cancel.set()

    def say(self, text: str) -> None:
        """A message from guarita to the agent (recorded as what they saw)."""
        if self.write_client is None:
            return
        if self._gate is not None:  # on the terminal, below the line being held
            data = ("\r\n" + text.replace("\n", "\r\n") + "\r\n").encode()
            self.to_client(data)
            return
        data = (text.replace("\n", "\r\n" if self.info.size else "\n") + ("\r\n" if self.info.size else "\n")).encode()
        with contextlib.suppress(Exception):
            self.write_client(data)
        self.recording.output(data, "e")

    def to_client(self, data: bytes) -> None:
        if self.write_client is not None:
            with contextlib.suppress(Exception):
                self.write_client(data)
            self.recording.output(data, "o")

    def send_upstream(self, data: bytes) -> None:
        """Input the gate held, released to the target (already recorded when typed)."""
        if self.write_target is not None and data:
            with contextlib.suppress(Exception):
                self.write_target(data)

    def _start_gate(self) -> InteractiveGate | None:
        """The interactive gate, for a terminal session whose commands rules may concern,
        once the front door has given both write callbacks."""
        if self.write_client is None or self.write_target is None:
            return None
        self._gate_checked = True
        if self._approvals is None or not self.info.size or self.info.kind not in ("shell", "exec"):
            return None
        if not self._approvals.watches(self):
            return None
        from bastion.approvals.interactive import InteractiveGate

        self._gate = InteractiveGate(self, self._approvals, *self.info.size)
        return self._gate

    def marker(self, kind: str, **fields: Any) -> None:
        self.recording.marker(kind, **fields)

    async def end(self, status: int | None, signal: str | None = None, reason: str | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        if self._approvals is not None:
            self._approvals.session_ended(self)
        if self._gate is not None:
            await self._gate.close()
        if self._echo is not None:
            self._echo.close()
        self.recording.exit(status, signal, reason)
        await self.recording.close({"exit": {"status": status, "signal": signal}, "reason": reason})
        self.gateway.audit.emit("session.end", session=self.id, exit_status=status, exit_signal=signal,
                                reason=reason, duration=round(time.time() - self.started, 3),
                                bytes=dict(self.recording.counts), **_audit_fields(self.info))


def _audit_fields(info: SessionInfo) -> dict[str, Any]:
    return {"front_door": info.front_door, "subject": info.identity.subject, "issuer": info.identity.issuer,
            "groups": list(info.identity.groups), "source": info.source, "target": info.target,
            "login": info.login, "kind": info.kind, "command": info.command, "subsystem": info.subsystem}
