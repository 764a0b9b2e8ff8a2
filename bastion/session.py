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
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

from bastion.approvals.result import GateResult
from bastion.config import AccessRule, format_duration
from bastion.identity import Identity
from bastion.logs import current_session
from bastion.masking.engine import marker_values
from bastion.masking.recorded import MaskedInput, mask_text, masking_apply
from recorder import SessionRecording

if TYPE_CHECKING:
    from bastion.control.limits import SessionLimits
    from bastion.services import Services

# A session about to reach a hard limit (credential expiry, maximum duration) is warned
# this long before (at most; a fifth of the session's whole allowance when shorter).
LIMIT_WARNING = 300.0
# Session._paced: the most masked output kept back for the next chunk, and the smallest
# chunk it paces (bulk output; interactive output, in small chunks, is never kept back).
_CARRY_MAX = 4096
_PACE_MIN = 8192
# Session._typed: how much of the agent's recent input its echo is compared with.
_TYPED_MAX = 4096
_ESC_SEQ = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|O.|.)?", re.DOTALL)
_CONTROL_BYTES = bytes(range(0x20)) + b"\x7f"
_UNMASKED_REGION = "a cursor move or mode change between digits: a value drawn out of order there is not masked"


# The front doors, as sessions, audit events and metrics name them.
DoorName = Literal["ssh", "kube", "mcp"]
# A target's output streams: stdout and stderr (asciicast codes "o" and "e").
Stream = Literal["o", "e"]


class TerminalGate(Protocol):
    """The approvals' interactive gate (bastion.approvals.interactive.InteractiveGate), as a
    session drives it: typed input and the terminal's output go through it."""

    waiting: bool

    def output(self, data: bytes) -> None: ...

    def resize(self, cols: int, rows: int) -> None: ...

    def drop(self, data: bytes) -> None: ...

    def input(self, data: bytes, hidden: bool = False) -> bytes: ...

    def after_held_input(self, action: Callable[[], None]) -> None: ...

    async def close(self) -> None: ...


@dataclass
class SessionInfo:
    """What a front door knows about a session when it opens."""

    front_door: DoorName
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
    # The access rule that allowed the session (the front door's policy decision): its
    # session limits (max_duration, idle_timeout, on_expiry) are the session's.
    rule: AccessRule | None = field(default=None, compare=False, repr=False)

    @property
    def cluster(self) -> str | None:
        """The session's scope: the Kubernetes cluster it reaches (its namespace is
        ``extra["namespace"]``), or None for an SSH target. Rules about clusters and rules
        about targets ask this, never the door's name."""
        cluster = self.extra.get("cluster")
        return str(cluster) if cluster else None

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
        # Lines followed by Enter, oldest first, each waiting for output that echoes it
        # (a line typed ahead of a slow prompt is echoed only when the prompt comes).
        self._verdicts: list[_Verdict] = []

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
        if piece[:1] in (b"\r", b"\n") and (self._held or self._verdicts):
            # The Enter waits with its line, so the recording keeps the order it was typed in.
            self._verdicts.append(_Verdict(self._held, (self.rec.now(), piece), time.monotonic()))
            self._held, self._held_len = [], 0
            return
        self._settle(final=True)
        self.release()
        self.rec.input(piece)

    def output(self, data: bytes) -> None:
        """Called before the output is recorded: an echo releases held keystrokes."""
        if self._verdicts:
            for verdict in self._verdicts:
                verdict.seen(data)
            self._settle(final=False)
        if self._held and any(_echoed(chunk, data) for _, chunk in self._held[-4:]):
            self.release()

    def _settle(self, final: bool) -> None:
        """Record the waiting lines, in order, as input once echoed, or as hidden input once
        their wait is over (``final``: now) without an echo."""
        while self._verdicts:
            verdict = self._verdicts[0]
            echoed = verdict.echoed()
            if not (echoed or final or verdict.expired()):
                return
            self._verdicts.pop(0)
            if echoed or not verdict.text:
                for t, chunk in verdict.line:
                    self.rec.input_at(t, chunk)
            else:
                self.rec.marker("hidden-input", length=len(verdict.text),
                                reason="typed while the terminal did not echo (e.g. a password prompt)")
            self.rec.input_at(*verdict.enter)

    def holding(self) -> bool:
        """Typed text is waiting for its echo (or its verdict): it may be a secret."""
        return bool(self._held or self._verdicts)

    def release(self) -> None:
        for t, chunk in self._held:
            self.rec.input_at(t, chunk)
        self._held.clear()
        self._held_len = 0

    def close(self) -> None:
        """End of session: undecided text never echoed, so it stays hidden."""
        self._settle(final=True)
        self.release()


class _Verdict:
    """A typed line and its Enter, and the output since: echoed or not?"""

    # An echo must come within this much output or time (a slow prompt, a typed-ahead line).
    MAX_OUTPUT = 64 * 1024
    MAX_WAIT = 5.0

    def __init__(self, line: list[tuple[float, bytes]], enter: tuple[float, bytes], since: float) -> None:
        self.line = line
        self.enter = enter
        self.text = b"".join(chunk for _, chunk in line)
        self.since = since
        self._out = bytearray()
        self._echoed = False

    def seen(self, data: bytes) -> None:
        if self._echoed or len(self._out) >= self.MAX_OUTPUT:
            return
        # Keep what the echo could span across chunks (the echo may come in pieces).
        self._out += data[: self.MAX_OUTPUT]
        self._echoed = bool(self.text) and _echoed(self.text, bytes(_strip_controls(self._out)))

    def echoed(self) -> bool:
        return self._echoed

    def expired(self) -> bool:
        return len(self._out) >= self.MAX_OUTPUT or time.monotonic() - self.since > self.MAX_WAIT


def _strip_controls(data: bytearray) -> bytes:
    """Output without escape sequences and carriage returns (a redrawn echo)."""
    return _ESCAPES.sub(b"", bytes(data))


_ESCAPES = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][0-9A-Za-z]|\x1b.|\r|\x08")


# Runs of printable bytes (UTF-8 included), or one control key / escape sequence.
_KEYS = re.compile(rb"[^\x00-\x1f\x7f]+|\x1b\[[0-9;?]*[ -/]*[@-~]|\x1bO.|\x1b.?|[\x00-\x1f\x7f]", re.DOTALL)


def _printable(data: bytes) -> bool:
    return all(b >= 0x20 and b != 0x7F for b in data)


def _echoed(typed: bytes, output: bytes) -> bool:
    # The first few characters, contiguous: with echo on, the terminal sends typed text
    # back as it was written; a lone character matching unrelated output must not count.
    return typed[:6] in output


class Session:
    """One live session. Opened by bastion.pipeline (admission); ``client`` is the front
    door's side of it (bastion.pipeline.ClientSide): how guarita writes to the agent,
    releases late output, notifies and ends the session."""

    def __init__(self, gateway: Services, info: SessionInfo, client: Any = None) -> None:
        self.gateway = gateway
        self.info = info
        self.started = time.time()
        # Masking applies to what the gateway keeps of the agent's input and command lines too
        # (bastion/masking/recorded.py): the command is masked before it is stored anywhere.
        self._mask_apply = masking_apply(gateway.config.masking, gateway.masking_secret,
                                         info.front_door, info.target, info.identity.groups, info.kind)
        self._commands_masked: dict[str, tuple[str, list[Any]]] = {}
        self.shown_command = self.mask_command(info.command)
        meta = info.metadata() | {"command": self.shown_command}
        if isinstance(meta.get("argv"), list):  # kubectl exec's argv, kept as sent: masked too
            meta["argv"] = [self.mask_command(a) if isinstance(a, str) else a for a in meta["argv"]]
        self.recording = gateway.recorder.open_session(meta, term=info.size, session_id=info.session_id)
        self.id = self.recording.id
        # Operations (bastion/metrics.py, bastion/logs.py): bytes relayed agent -> target and
        # target -> agent, and the session id on the log lines of this session's task.
        self.bytes_in = 0
        self.bytes_out = 0
        current_session.set(self.id)
        if client is not None:  # before any event can fail: the strict policy ends it through client
            self.end_if_unrecorded(client.terminate)
        self._metrics = gateway.metrics
        if self._metrics is not None:
            self._metrics.session_started(self)
        self._echo = EchoTracker(self.recording) if info.size else None
        self.ended = False
        # Masking: the front door gives ``deliver_output`` so held-back output can be sent
        # after a few ms of silence.
        self.deliver_output: Callable[[bytes, str], None] | None = (client.deliver_output if client is not None
                                                                      else None)
        self.masked_counts: dict[str, int] = {}
        self._maskers: dict[str, Any] = {}
        self._mask_live = True
        self._mask_flush_after = 0.005
        self._mask_timer: asyncio.TimerHandle | None = None
        self._mask_fed = 0.0  # monotonic time of the last output fed to the maskers
        self._target_held = False  # the front door has stopped reading the target (hold_target)
        self._carry: dict[str, bytes] = {}  # masked output waiting for the next chunk (_paced)
        self._typed = bytearray()  # the agent's last printable input (its echo may be shown early)
        self._input: Any = self.recording  # where input is recorded (MaskedInput when masking)
        self._start_masking()
        # Approvals. A front door gives the session a way to write to the agent (its terminal,
        # or stderr before the target is open) and, for interactive sessions, to the target
        # (held input is released later): then commands typed in a terminal are gated too.
        self.write_client: Callable[[bytes], None] | None = client.write_client if client is not None else None
        self.write_target: Callable[[bytes], None] | None = None
        self.approval_cancel: asyncio.Event | None = None
        self.cancel_reason: str | None = None
        self._gate: TerminalGate | None = None
        self._gate_checked = False
        self._approvals = gateway.approvals
        # Session limits and locks (bastion/control): the last input or output (idle timeout),
        # why the gateway ended the session (the recording's and audit log's end reason).
        self.last_activity = time.monotonic()
        self.stopping = False
        self.stop_reason: str | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._control = gateway.control
        self.limits: SessionLimits | None = None
        gateway.audit.emit("session.start", session=self.id, **audit_fields(info, self.shown_command))
        self._live = gateway.live
        self._live.opened(self, client, live_row(self))
        if self._approvals is not None:
            self._approvals.session_started(self)
        if self._control is not None:
            self._control.session_started(self)
            self.limits = self._control.limits_for(info)
            self._watchdog = asyncio.get_running_loop().create_task(self._watch_limits(self.limits))

    def attach_target(self, write_target: Callable[[bytes], None]) -> None:
        """The target is open: input the interactive approval gate held is released there."""
        self.write_target = write_target

    def from_client(self, data: bytes) -> bytes:
        self.bytes_in += len(data)
        self.last_activity = time.monotonic()
        gate = self._gate if self._gate_checked else self._start_gate()
        if gate is not None and gate.waiting:  # a command waits for approval: only Ctrl-C counts
            gate.drop(data)
            return b""
        hidden = self._echo is not None and self._echo.holding()
        if self._maskers:
            self._note_typed(data)
        if self._echo is not None:
            self._echo.typed(data)
        else:
            self._input.input(data)
        return gate.input(data, hidden) if gate is not None else data

    def end_if_unrecorded(self, terminate: Callable[[str], None]) -> None:
        """The strict failure policy, for every front door: if the spool cannot take this
        session's events, ``terminate`` (the front door's) ends it with the reason."""

        def failed(exc: Exception) -> None:
            if self.gateway.config.recording.failure_policy == "strict":
                terminate(f"the recording of this session failed ({exc}); the session is ended because "
                          "guarita never lets traffic through unrecorded")

        self.recording.on_failure = failed

    def from_target(self, data: bytes, stream: Stream = "o") -> bytes:
        """Output from the target; returns what the agent gets (masked where policy says)."""
        self.bytes_out += len(data)
        self.last_activity = time.monotonic()
        if not self._maskers:
            return self._emit(data, data, stream)
        self._mask_fed = self.last_activity
        shown, recorded = self._mask(data, stream)
        shown = self._paced(self._emit(shown, recorded, stream), len(data), stream)
        if self._maskers[stream].holding or self._carry.get(stream):
            self._arm_mask_flush()
        return shown

    def _paced(self, shown: bytes, size: int, stream: str) -> bytes:
        """Masked output goes to the agent in pieces no larger than the chunk that came in;
        what the masker released from its held tail waits for the next chunk, or for the
        silence flush. Otherwise, on a plain log, every other chunk comes out a few bytes
        over the channel's packet size and costs a second, tiny packet (a third of the
        gateway's CPU for masking, bench/masking). Only bulk output is paced: a small chunk
        (a prompt, an echo) goes out whole at once, and tags longer than their values are
        never kept waiting beyond _CARRY_MAX."""
        carry = self._carry.get(stream)
        if carry:
            shown = carry + shown
        if size < _PACE_MIN or len(shown) <= size or len(shown) - size > _CARRY_MAX:
            self._carry[stream] = b""
            return shown
        self._carry[stream] = shown[size:]
        return shown[:size]

    def _emit(self, shown: bytes, recorded: bytes, stream: str) -> bytes:
        if self._echo is not None and stream == "o":
            self._echo.output(shown)
        gate = self._gate if self._gate_checked else self._start_gate()
        if gate is not None and stream == "o":
            gate.output(shown)
        self.recording.output(recorded, stream)
        return shown

    # -- masking (bastion/masking): one streaming masker per output stream -----------------

    def _start_masking(self) -> None:
        masking = self.gateway.config.masking
        secret = self.gateway.masking_secret
        # Binary channels (sftp, port forwards) are never rewritten.
        if masking is None or secret is None or self.info.kind == "subsystem":
            return
        cluster = self.info.cluster  # whichever door opened it (kube exec, the MCP door's exec_in_pod)
        apply = masking.where(None if cluster else self.info.target, cluster, self.info.identity.groups)
        if apply == "none":
            return
        self._maskers = {stream: masking.masker(secret) for stream in ("o", "e")}
        # "live" and "both": the agent sees masked output, and so does everything after it
        # (spool, store, logs); "recording": only the recorded copy is masked.
        self._mask_live = apply != "recording"
        self._mask_flush_after = masking.flush_after
        self.recording.meta["masking"] = apply
        # What the agent types is recorded masked like output (its live view is its own).
        self._input = MaskedInput(self.recording, masking.masker(secret), self._note_masked)
        if self._echo is not None:
            self._echo.rec = self._input
        if self._commands_masked.get(self.info.command or ""):
            self._note_masked(self._commands_masked[self.info.command or ""][1], "command")

    def mask_command(self, command: str | None) -> str | None:
        """A command line as the gateway keeps it (metadata, commands index, audit events,
        approval requests and what approvers see): masked wherever masking applies. Rules are
        matched on the command as sent; only the copies kept are masked."""
        if command is None or self._mask_apply == "none":
            return command
        done = self._commands_masked.get(command)
        if done is None:
            masking, secret = self.gateway.config.masking, self.gateway.masking_secret
            assert masking is not None and secret is not None  # else _mask_apply is "none"
            done = self._commands_masked[command] = mask_text(masking.masker(secret), command)
        return done[0]

    def _note_typed(self, data: bytes) -> None:
        typed = _ESC_SEQ.sub(b"", data).translate(None, _CONTROL_BYTES)
        if typed:
            self._typed += typed
            del self._typed[:-_TYPED_MAX]

    def _mask(self, data: bytes, stream: str) -> tuple[bytes, bytes]:
        masker = self._maskers[stream]
        masked, found = masker.feed(data)
        self._note_masked(found, stream)
        split = masker.take_unmasked()
        if split:  # a true limit, shown to auditors (docs/masking.md)
            self.recording.marker("masking", stream=stream, unmasked_region=_UNMASKED_REGION, count=split)
        if self._mask_live:  # less what the agent had early (its own echo, _mask_silence)
            return (masked if masker.live_out is None else masker.live_out), masked
        # The agent gets the original bytes now; the recording the masked ones, in order.
        return data, masked

    def _note_masked(self, found: Any, stream: str) -> None:
        """One ``masking`` marker per output chunk, listing its values as [detector, offset,
        length, hmac] (docs/recording-format.md): a marker per value cost more than finding it,
        and the list is encoded in C where the engine is built (bastion/masking/engine.py)."""
        if not found:
            return
        values, counts = marker_values(found)
        for detector, n in counts.items():
            self.masked_counts[detector] = self.masked_counts.get(detector, 0) + n
            if self._metrics is not None:
                self._metrics.masked(detector, n)
        self.recording.marker_json("masking", "values", values, stream=stream)

    def _arm_mask_flush(self) -> None:
        if self._mask_timer is None:
            loop = asyncio.get_running_loop()
            self._mask_timer = loop.call_later(self._mask_flush_after, self._mask_silence)

    def hold_target(self, held: bool) -> None:
        """The front door stopped (True) or resumed (False) reading the target's output, because
        the agent or the recorder is slower. A pause of the gateway's own making is not the
        target's silence: the maskers keep their held tails through it (a flush would cut a
        value in two, and its halves would go out unmasked)."""
        self._target_held = held
        if not held:
            self._mask_fed = time.monotonic()  # silence counts from when reading resumes

    def _mask_silence(self) -> None:
        """The silence timer. Masking decides on content, never on time: a held tail goes out
        once the bytes after it show it complete or not a value (or at the end of the
        stream), however long the target, the link or the agent pauses. Silence only lets
        the agent see early (never the recording) a held tail that is the echo of what it
        typed itself, and the masked output _paced kept back."""
        self._mask_timer = None
        wait = self._mask_fed + self._mask_flush_after - time.monotonic()
        if self._target_held:
            wait = self._mask_flush_after
        if wait > 0:
            self._mask_timer = asyncio.get_running_loop().call_later(wait, self._mask_silence)
            return
        for stream, masker in self._maskers.items():
            shown = self._carry.pop(stream, b"")
            if self._mask_live and masker.unshown():
                held = masker.held_text()
                if held and held in self._typed:  # the agent's own typing: it knows these bytes
                    early = masker.release_held()
                    shown += early
                    if stream == "o":  # what reads the live view (the echo, the command line) sees it now
                        if self._echo is not None:
                            self._echo.output(early)
                        gate = self._gate if self._gate_checked else self._start_gate()
                        if gate is not None:
                            gate.output(early)
            if shown and self.deliver_output is not None:
                self.deliver_output(shown, stream)

    def flush_output(self) -> None:
        """Release output a masker held back (after a few ms of silence, and before the end):
        delivered to the agent through ``deliver_output`` and recorded."""
        self._mask_timer = None
        for stream, masker in self._maskers.items():
            out, found = masker.flush()
            live = out if masker.live_out is None else masker.live_out
            self._note_masked(found, stream)
            shown = self._carry.pop(stream, b"")
            if out:
                shown += self._emit(live if self._mask_live else b"", out, stream)
            if shown and self.deliver_output is not None:
                self.deliver_output(shown, stream)

    def resize(self, cols: int, rows: int) -> None:
        self.recording.resize(cols, rows)
        if self._gate is not None:
            self._gate.resize(cols, rows)

    # -- approvals (bastion/approvals) --------------------------------------------------------

    async def gate_exec(self, command: str, argv: list[str] | None = None) -> GateResult:
        """Decide an exec command before the target session is opened: allowed at once, or
        refused, or held until approved (the agent is told on ``write_client`` who must
        approve, the request id and how long it may wait). Kubernetes passes the ``argv``."""
        if self._approvals is None:
            return GateResult(True, "allowed")
        result: GateResult = await self._approvals.check(self, command, "exec", argv=argv)
        if result.outcome != "allowed":
            self.say(f"guarita: {result.reason}")
        return result

    async def gate_shell(self) -> GateResult:
        """Decide whether this identity may open an interactive shell here at all."""
        if self._approvals is None:
            return GateResult(True, "allowed")
        result: GateResult = await self._approvals.check(self, "interactive shell", "shell")
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
        if self._gate is not None and self.info.size:  # on the terminal, below the line being held
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

    def after_held_input(self, action: Callable[[], None]) -> None:
        """Run ``action`` (the end of the agent's input: EOF, stdin closed) once the input the
        interactive gate holds has gone upstream: an EOF passed on first would leave the
        target without the held Enter (`printf 'cmd\\n' | ssh -tt` would hang for ever)."""
        if self._gate is not None:
            self._gate.after_held_input(action)
        else:
            action()

    def _start_gate(self) -> TerminalGate | None:
        """The interactive gate, for a terminal session whose commands rules may concern,
        once the front door has given both write callbacks."""
        if self.write_client is None or self.write_target is None:
            return None
        self._gate_checked = True
        if self._approvals is None or self.info.kind not in ("shell", "exec"):
            return None
        if not self._approvals.watches(self):
            # No rule concerns it: a terminal's lines are still indexed, never held.
            if self.info.size and self.info.kind == "shell":
                self._gate = self.gateway.interactive_gate(self, self._approvals, *self.info.size, record_only=True)
            return self._gate
        # Built by the composition root (bastion/gateway.py): the gates' modules depend on this one.
        if not self.info.size:  # no terminal: guarita is the shell's line discipline
            self._gate = self.gateway.line_gate(self, self._approvals)  # None: its input is no commands
            return self._gate
        self._gate = self.gateway.interactive_gate(self, self._approvals, *self.info.size)
        return self._gate

    def marker(self, kind: str, **fields: Any) -> None:
        self.recording.marker(kind, **fields)

    # -- ended by the gateway: locks, kills, session limits (bastion/control) ----------------------

    def stop(self, kind: str, message: str, **fields: Any) -> bool:
        """End the session from the gateway's side: a ``kind`` marker (lock, kill, expired,
        idle, max-duration, max-session) with the reason, which also becomes the session's end
        reason; the front door tells the user ``message`` and closes. False when the front door
        has not registered the session yet (the caller tries again shortly)."""
        if self.ended:
            return True
        channel = self._live.client(self.id)
        if channel is None:
            return False
        if not self.stopping:
            self.stopping = True
            self.stop_reason = message
            self.marker(kind, reason=message, **fields)
            self.gateway.audit.emit("session.stopped", session=self.id, kind=kind, reason=message,
                                    subject=self.info.identity.subject, target=self.info.target,
                                    **{k: v for k, v in fields.items() if k not in ("reason", "session", "kind")})
        self.cancel_approval(message)
        channel.terminate(message)
        return True

    def notify(self, text: str) -> None:
        """A line from guarita to the user while the session goes on (recorded as a notice)."""
        self.marker("notice", text=text)
        channel = self._live.client(self.id)
        if channel is not None:
            with contextlib.suppress(Exception):
                channel.notify_user(text)

    async def _watch_limits(self, limits: SessionLimits) -> None:
        """Credential expiry (per ``on_expiry``), maximum duration and idle timeout."""
        exp = self.info.identity.expires_at or None
        hard = hard_limits(exp, limits, self.started)
        expiry_noted = exp is None or limits.on_expiry == "end"
        warned: set[str] = set()
        if not hard and expiry_noted and not limits.idle_timeout:
            return
        while not self.ended:
            now = time.time()
            wake = math.inf
            for deadline, kind, message, warning in hard:
                if now >= deadline:
                    if self.stop(kind, message, limit=kind, rule=limits.rule):
                        return
                    wake = min(wake, now + 0.2)  # not registered by its front door yet
                    continue
                lead = min(LIMIT_WARNING, (deadline - self.started) * 0.2)
                if kind not in warned and lead >= 2:
                    if now >= deadline - lead:
                        warned.add(kind)
                        self.notify(warning.format(left=_span(deadline - now)))
                    else:
                        wake = min(wake, deadline - lead)
                wake = min(wake, deadline)
            if not expiry_noted and exp is not None:
                if now >= exp:
                    expiry_noted = True
                    self.marker("credential-expired", policy=limits.on_expiry, expired_at=exp, rule=limits.rule)
                    if limits.on_expiry == "warn":
                        self.notify(f"your credential expired at {utc_clock(exp)}; policy lets this session go on for "
                                    f"up to {_span(limits.max_session)} from its start (on_expiry = warn)")
                else:
                    wake = min(wake, exp)
            if limits.idle_timeout:
                if self.approval_cancel is not None:  # waiting for a person is not idleness
                    self.last_activity = time.monotonic()
                idle = time.monotonic() - self.last_activity
                if idle >= limits.idle_timeout:
                    if self.stop("idle", f"the session was idle (no input or output) for "
                                 f"{_span(limits.idle_timeout)} (idle_timeout)", limit="idle", rule=limits.rule):
                        return
                    wake = min(wake, now + 0.2)
                else:
                    wake = min(wake, now + limits.idle_timeout - idle)
            if wake == math.inf:
                return
            await asyncio.sleep(max(0.02, wake - time.time()))

    async def end(self, status: int | None, signal: str | None = None, reason: str | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        reason = self.stop_reason or reason
        if self._watchdog is not None and self._watchdog is not asyncio.current_task():
            self._watchdog.cancel()
        if self._control is not None:
            self._control.session_ended(self)
        if self._approvals is not None:
            self._approvals.session_ended(self)
        if self._gate is not None:
            await self._gate.close()
        if self._mask_timer is not None:
            self._mask_timer.cancel()
        self.flush_output()  # normally done by the front door before the exit status
        if self._echo is not None:
            self._echo.close()
        if isinstance(self._input, MaskedInput):
            self._input.close()
        self.recording.exit(status, signal, reason)
        if self._metrics is not None:
            self._metrics.session_ended(self, status, signal)
        try:
            await self.recording.close({"exit": {"status": status, "signal": signal}, "reason": reason,
                                        **({"masking": dict(self.masked_counts)} if self._maskers else {})})
        finally:
            # Out of the registry once sealed: the shutdown waits for this before the recorder closes.
            self._live.ended(self.id)
        self.gateway.audit.emit("session.end", session=self.id, exit_status=status, exit_signal=signal,
                                reason=reason, duration=round(time.time() - self.started, 3),
                                bytes=dict(self.recording.counts), **audit_fields(self.info, self.shown_command))


def hard_limits(exp: float | None, limits: SessionLimits, started: float,
                what: str = "session") -> list[tuple[float, str, str, str]]:
    """When a session (or another held connection: ``what``) must end, by its credential's
    expiry (``exp``, per ``on_expiry``), ``max_session`` and ``max_duration``:
    (deadline, marker kind, end message, warning with ``{left}``)."""
    hard: list[tuple[float, str, str, str]] = []
    if exp is not None and limits.on_expiry == "end":
        hard.append((exp, "expired", f"your credential expired at {utc_clock(exp)}; the {what} ends (policy: "
                     "on_expiry = end). Get a fresh token (e.g. `bastion login`) and reconnect",
                     f"your credential expires in {{left}}; this {what} will end then (get a fresh token, "
                     "e.g. `bastion login`, and reconnect)"))
    elif exp is not None:
        hard.append((started + limits.max_session, "max-session", f"the {what} reached {_span(limits.max_session)}, "
                     f"the longest a {what} may outlive its credential here (max_session)",
                     f"this {what} outlives its credential and reaches max_session in {{left}}; it will end then"))
    if limits.max_duration:
        hard.append((started + limits.max_duration, "max-duration",
                     f"the {what} reached its maximum duration of {_span(limits.max_duration)} (max_duration)",
                     f"this {what} reaches its maximum duration in {{left}}; it will end then"))
    return hard


def utc_clock(ts: float) -> str:
    """``14:21:17 UTC``: when a credential expired, in messages to the user."""
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S UTC")


def _span(seconds: float) -> str:
    """A time left or a limit, rounded up: "1s" left, never "0s"."""
    return format_duration(math.ceil(max(0.0, seconds)))


def live_row(session: Session) -> dict[str, Any]:
    """The session's row in the state database's live sessions (``bastion sessions ls``)."""
    info = session.info
    return {"id": session.id, "identity": info.identity.to_dict(), "subject": info.identity.subject,
            "front_door": info.front_door, "target": info.target, "login": info.login, "kind": info.kind,
            "command": session.shown_command, "source": info.source}


def audit_fields(info: SessionInfo, command: str | None) -> dict[str, Any]:
    """A session's fields in audit events; ``command`` as the gateway shows it (masked where
    the session's masking applies)."""
    from bastion.identity.delegation import chain_fields

    return {"front_door": info.front_door, "subject": info.identity.subject, "issuer": info.identity.issuer,
            "groups": list(info.identity.groups), "source": info.source, "target": info.target,
            "login": info.login, "kind": info.kind, "command": command, "subsystem": info.subsystem,
            **chain_fields(info.identity)}
