"""The session pipeline every front door feeds: recording, hidden-input detection, audit.

A front door turns its protocol into calls on a ``Session``: bytes from the agent go
through ``from_client()`` before they reach the target, bytes from the target through
``from_target()`` before they reach the agent. Policy (who may open the session) is
decided before a Session exists; approvals and masking hook in here, shared by SSH and
Kubernetes alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bastion.identity import Identity
from recorder import SessionRecording

if TYPE_CHECKING:
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

    On a terminal, keystrokes come back as echo within milliseconds, except at a
    password prompt, where the remote side turns echo off. Typed characters are held
    here until either their echo appears in the output (recorded as input, with the
    time they were typed) or Enter arrives with no echo seen (recorded only as a
    ``hidden-input`` marker with the length). Control keys pass straight through.
    """

    def __init__(self, recording: SessionRecording, limit: int = 4096) -> None:
        self.rec = recording
        self.limit = limit
        self._held: list[tuple[float, bytes]] = []
        self._held_len = 0

    def typed(self, data: bytes) -> None:
        t = self.rec.now()
        if len(data) == 1 and (data >= b" " and data != b"\x7f") or (len(data) > 1 and _printable(data)):
            self._held.append((t, data))
            self._held_len += len(data)
            if self._held_len > self.limit:  # a paste, not a password
                self.release()
            return
        if data[:1] in (b"\r", b"\n") and self._held:
            self.rec.marker("hidden-input", length=self._held_len,
                            reason="typed while the terminal did not echo (e.g. a password prompt)")
            self._held.clear()
            self._held_len = 0
        elif data == b"\x7f" and self._held:  # backspace at a silent prompt edits the secret
            t0, last = self._held.pop()
            self._held_len -= len(last)
            if len(last) > 1:
                self._held.append((t0, last[:-1]))
                self._held_len += len(last) - 1
            return
        else:
            self.release()
        self.rec.input(data)

    def output(self, data: bytes) -> None:
        """Called before the output is recorded: an echo releases the held keystrokes."""
        if self._held and any(_echoed(chunk, data) for _, chunk in self._held[-4:]):
            self.release()

    def release(self) -> None:
        for t, chunk in self._held:
            self.rec.input_at(t, chunk)
        self._held.clear()
        self._held_len = 0


def _printable(data: bytes) -> bool:
    return all(b >= 0x20 and b != 0x7F for b in data)


def _echoed(typed: bytes, output: bytes) -> bool:
    return typed[:16] in output or typed[-1:] in output


class Session:
    def __init__(self, gateway: Gateway, info: SessionInfo) -> None:
        self.gateway = gateway
        self.info = info
        self.started = time.time()
        self.recording = gateway.recorder.open_session(info.metadata(), term=info.size)
        self.id = self.recording.id
        self._echo = EchoTracker(self.recording) if info.size else None
        self.ended = False
        gateway.audit.emit("session.start", session=self.id, **_audit_fields(info))

    def from_client(self, data: bytes) -> bytes:
        if self._echo is not None:
            self._echo.typed(data)
        else:
            self.recording.input(data)
        return data

    def from_target(self, data: bytes, stream: str = "o") -> bytes:
        if self._echo is not None and stream == "o":
            self._echo.output(data)
        self.recording.output(data, stream)
        return data

    def resize(self, cols: int, rows: int) -> None:
        self.recording.resize(cols, rows)

    def marker(self, kind: str, **fields: Any) -> None:
        self.recording.marker(kind, **fields)

    async def end(self, status: int | None, signal: str | None = None, reason: str | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        if self._echo is not None:
            self._echo.release()
        self.recording.exit(status, signal, reason)
        await self.recording.close({"exit": {"status": status, "signal": signal}, "reason": reason})
        self.gateway.audit.emit("session.end", session=self.id, exit_status=status, exit_signal=signal,
                                reason=reason, duration=round(time.time() - self.started, 3),
                                bytes=dict(self.recording.counts), **_audit_fields(self.info))


def _audit_fields(info: SessionInfo) -> dict[str, Any]:
    return {"front_door": info.front_door, "subject": info.identity.subject, "issuer": info.identity.issuer,
            "groups": list(info.identity.groups), "source": info.source, "target": info.target,
            "login": info.login, "kind": info.kind, "command": info.command, "subsystem": info.subsystem}
