"""One MCP tool call that runs something: a Session of the shared pipeline, front door ``mcp``.

A call goes through what an ``ssh TARGET CMD`` goes through: access rules, locks and
per-identity limits (admission), the approval gate for the exec command, the target
connection with the gateway's credential, masking of the output, the recording, the commands
index and the audit log. It runs as its own task, so that the tool call that started it can
stop waiting (after ``mcp.approval_wait``: the agent gets the pending request and may wait
again with ``approval_status``) while the request and the command live on; a client that goes
away while the call waits for approval cancels the request, as Ctrl-C does over SSH.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import asyncssh

from bastion.identity import Identity
from bastion.masking.recorded import shown_command
from bastion.pipeline import admit, refused
from bastion.policy import authorize, reachable_targets
from bastion.refusal import Refused
from bastion.session import Session, SessionInfo, Stream
from bastion.upstreams.ssh.upstream import TargetError, connect_target
from recorder.recorder import new_session_id

if TYPE_CHECKING:
    from bastion.services import Services

Phase = Literal["starting", "approval", "running", "done"]
# What one call keeps of each stream in memory for paging (session_output); pages beyond it are
# read back from the recording, which has it all. With Calls' 64 recent calls: at most 128 MiB.
KEEP_BYTES = 1024 * 1024
EXIT_REFUSED = 1


class CallRefused(Refused):
    """The call may not run: ``reason`` for the audit log, ``message`` for the agent."""


@dataclass
class Output:
    data: bytearray = field(default_factory=bytearray)
    total: int = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = KEEP_BYTES - len(self.data)
        if room > 0:
            self.data += chunk[:room]


class Call:
    """One ``run_command`` call, and its session's ClientSide (bastion/pipeline.py): the live
    registry holds it while it is live (locks, kills, session limits and shutdown end it
    through :meth:`terminate`)."""

    def __init__(self, gw: Services, identity: Identity, source: str, target: str, login: str | None,
                 command: str, tool: str) -> None:
        self.gw = gw
        self.identity = identity
        self.source = source
        self.target_name = target
        self.login = login
        self.command = command
        self.tool = tool
        self.id = new_session_id()
        self.phase: Phase = "starting"
        self.session: Session | None = None
        self.stdout = Output()
        self.stderr = Output()
        self.notes: list[str] = []  # what guarita told the agent (approval lines, notices)
        self.exit_status: int | None = None
        self.exit_signal: str | None = None
        self.outcome: str = "running"  # completed | refused | denied | ended | error
        self.reason: str | None = None
        self.request_id: str | None = None
        self.approvers: list[str] = []
        self.started = time.time()
        self.done = asyncio.Event()
        self.sealed = asyncio.Event()  # the session has ended and its recording was closed
        self._conn: asyncssh.SSHClientConnection | None = None
        self._chan: asyncssh.SSHClientChannel[bytes] | None = None
        self._closed = asyncio.Event()
        self._ended_by: str | None = None

    # -- the session ----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except Refused as exc:
            self._refused(exc)
        except Exception as exc:  # never a traceback to the agent: a reason, and the session ends
            self.outcome, self.reason = "error", f"guarita could not run the call: {exc}"
        finally:
            self.phase = "done"
            if self._connecting is not None and self._conn is None:
                self._connecting.cancel()  # refused: a connection still being made is not wanted
                if self._connecting.done() and not self._connecting.cancelled() \
                        and self._connecting.exception() is None:
                    self._connecting.result().close()
            self.hang_up()
            # The agent has its answer now; sealing the recording (last segment, signed manifest)
            # goes on after, as when an SSH door sends the exit status first.
            self.done.set()
            try:
                if self.session is not None and not self.session.ended:
                    await self.session.end(self.exit_status, self.exit_signal, self.reason)
            finally:
                self.sealed.set()

    async def _run(self) -> None:
        _, info = self.prepare()
        # Admission (bastion/pipeline.py): draining, the recording spool, locks and limits.
        admission = await admit(self.gw, info, self)
        self.session = session = admission.open()
        if admission.gates_opening(self.argv):
            self.preconnect()  # as the SSH door does: an approved command starts at once
            self.phase = "approval"
            result = await session.gate_exec(self.command, argv=self.argv)
            self.request_id = result.request_id or self.request_id
            if not result.allowed:
                self.outcome = "denied" if result.outcome == "denied" else result.outcome
                self.reason, self.exit_status = result.reason, EXIT_REFUSED
                return
        if self._ended_by is not None:
            return
        self.phase = "running"
        await self.execute(session)
        session.flush_output()
        if self._ended_by is None and self.outcome == "running":
            self.outcome = "completed"

    # What a kind of call provides: where it goes (checked by the rules), and how it runs there.

    argv: list[str] | None = None

    def prepare(self) -> tuple[str, SessionInfo]:
        """Resolve and authorize: (the name admission checks locks on, the session's info)."""
        target, login, rule = self._resolve()
        self.login = login
        return target.name, SessionInfo(front_door="mcp", identity=self.identity, source=self.source,
                                        target=target.name, login=login, kind="exec", command=self.command,
                                        session_id=self.id, extra={"mcp_tool": self.tool}, rule=rule)

    _connecting: asyncio.Future[asyncssh.SSHClientConnection] | None = None

    def preconnect(self) -> None:
        """Open the target connection while the approval waits (no session is opened on it
        before the decision; closed unused if the answer is no)."""
        target = self.gw.config.target(self.target_name)
        assert target is not None and self.login is not None
        self._connecting = asyncio.ensure_future(
            connect_target(target, self.login, self.identity, self.id, self.gw.target_ca))
        self._connecting.add_done_callback(self._close_if_unused)

    def _close_if_unused(self, future: asyncio.Future[asyncssh.SSHClientConnection]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        if self.phase == "done" and self._conn is None:
            future.result().close()

    async def execute(self, session: Session) -> None:
        target = self.gw.config.target(self.target_name)
        assert target is not None and self.login is not None
        try:
            if self._connecting is not None:
                self._conn = await self._connecting
            else:
                self._conn = await connect_target(target, self.login, self.identity, self.id, self.gw.target_ca)
        except TargetError as exc:
            self.gw.audit.emit("session.refused", reason=exc.reason, detail=str(exc), source=self.source,
                               subject=self.identity.subject, target=target.name, login=self.login, kind="exec",
                               command=self.kept_command(), front_door="mcp", session=self.id)
            self.outcome, self.reason = "error", str(exc)
            return
        if self._ended_by is not None:
            return
        self._chan, _ = await self._conn.create_session(lambda: _TargetReader(self), self.command, encoding=None)
        self._chan.write_eof()  # a tool call has no stdin
        await self._closed.wait()

    def kept_command(self) -> str | None:
        """The command as the gateway keeps it (audit log): masked like the session's copies."""
        if self.session is not None:
            return self.session.shown_command
        return shown_command(self.gw.config.masking, self.gw.masking_secret, "mcp",
                             self.target_name, self.identity.groups, self.command)

    def _resolve(self) -> tuple[Any, str, Any]:
        target = self.gw.config.target(self.target_name)
        if target is None:
            known = reachable_targets(self.gw.config, self.identity)
            hint = f" (targets you may use: {', '.join(known)})" if known else " (you may use no target)"
            raise CallRefused("unknown_target", f"unknown target {self.target_name!r}{hint}")
        login = self.login or target.default_login
        if login is None:
            raise CallRefused("login_required", f"target {target.name!r} has several logins: give `login`, one of "
                              f"{', '.join(target.logins)}")
        decision = authorize(self.gw.config, self.identity, target, login)
        if not decision.allowed:
            raise CallRefused("access_denied", decision.reason)
        return target, login, decision.rule

    def _refused(self, exc: Refused) -> None:
        self.outcome, self.reason, self.exit_status = "refused", exc.message, None
        refused(self.gw, exc, "mcp", source=self.source, subject=self.identity.subject, target=self.target_name,
                login=self.login, kind="exec", command=self.kept_command())
        if self.session is None:
            self.gw.control.release(self.id)

    # -- output ----------------------------------------------------------------------------------

    def target_output(self, data: bytes, stderr: bool) -> None:
        assert self.session is not None
        stream: Stream = "e" if stderr else "o"
        self._deliver(self.session.from_target(data, stream), stream)

    def deliver_output(self, data: bytes, stream: str) -> None:
        self._deliver(data, stream)

    def _deliver(self, data: bytes, stream: str) -> None:
        if data:
            (self.stderr if stream == "e" else self.stdout).add(data)

    def write_client(self, data: bytes) -> None:
        self._told(data)

    def _told(self, data: bytes) -> None:
        text = data.decode("utf-8", "replace").strip()
        if text:
            self.notes.extend(line.removeprefix("guarita: ") for line in text.splitlines())

    def target_closed(self, status: int | None, signal: str | None) -> None:
        self.exit_status, self.exit_signal = status, signal
        if status is None and signal is None and self._ended_by is None:
            self.outcome, self.reason = "error", "the connection to the target was lost"
        self._closed.set()

    # -- ended by the gateway (locks, kills, limits, shutdown) --------------------------------------

    def terminate(self, message: str) -> None:
        if self._ended_by is not None:
            return
        self._ended_by = message
        self.outcome, self.reason = "ended", message
        if self.session is not None:
            self.session.marker("terminated", reason=message)
            self.session.cancel_approval(message)
        self.hang_up()
        self._closed.set()

    def hang_up(self) -> None:
        """Close the connection to where the command runs (it ends there)."""
        if self._chan is not None:
            self._chan.close()
        if self._conn is not None:
            self._conn.close()

    def notify_user(self, text: str) -> None:
        self.notes.append(text)

    def cancel(self, reason: str) -> None:
        """The MCP client went away: a pending request is cancelled, a running command ended."""
        if self.phase == "approval" and self.session is not None:
            self.session.cancel_approval(reason)
        elif self.phase != "done":
            self.terminate(reason)


class _TargetReader(asyncssh.SSHClientSession):  # type: ignore[type-arg]
    def __init__(self, call: Call) -> None:
        self.call = call
        self.status: int | None = None
        self.signal: str | None = None

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self.call.target_output(data, datatype == asyncssh.EXTENDED_DATA_STDERR)

    def exit_status_received(self, status: int) -> None:
        self.status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.signal = signal

    def connection_lost(self, exc: Exception | None) -> None:
        self.call.target_closed(self.status, self.signal)


class Calls:
    """Recent calls of this replica, for paging and waiting (bounded: the oldest finished go)."""

    def __init__(self, keep: int = 64) -> None:
        self._calls: collections.OrderedDict[str, Call] = collections.OrderedDict()
        self._keep = keep

    def add(self, call: Call) -> None:
        self._calls[call.id] = call
        while len(self._calls) > self._keep:
            oldest = next((k for k, c in self._calls.items() if c.phase == "done"), None)
            if oldest is None:
                break
            del self._calls[oldest]

    def get(self, session_id: str) -> Call | None:
        return self._calls.get(session_id)

    def by_request(self, request_id: str) -> Call | None:
        return next((c for c in self._calls.values() if c.request_id == request_id), None)


def same_caller(a: Identity, b: Identity) -> bool:
    """The same principal through the same chain: an agent reads only what it (for that subject) ran."""
    return a.issuer == b.issuer and a.subject == b.subject and a.actors == b.actors


async def wait_done(call: Call, limit: float) -> bool:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(call.done.wait(), limit)
    return call.done.is_set()
