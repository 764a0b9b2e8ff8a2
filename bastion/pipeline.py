"""Admission to the session pipeline: the one path every front door opens sessions by.

A front door (SSH, Kubernetes, an MCP door, a database protocol...) translates its protocol;
everything between "this identity wants this session" and "bytes flow" happens here, once:

1. **draining**: a gateway shutting down opens nothing (``draining``, 503);
2. **recording**: the spool over its budget (``recording_spool_full``), or, under the
   ``strict`` failure policy, a spool that cannot be written at all (disk full, read-only:
   ``recording_unavailable``) refuses the session *before any byte reaches the client*;
3. **locks and per-identity limits** (bastion/control): a slot is taken for the session
   id, given back if the session never opens (``locked``, ``limit``);
4. **the approval gate's opening**: an exec command or a shell that rules hold or refuse
   is decided before the target runs anything (the session and its recording start
   here, so the request and the decision are in it); Ctrl-C cancels the wait;
5. **the session**: :class:`bastion.session.Session`, registered in the one live-session
   registry (bastion/live.py) with the door's :class:`ClientSide`, and ended by the
   strict failure policy through it if the spool fails later.

Every refusal is a :class:`bastion.refusal.Refused` (reason, message, status) and one
audit event, ``session.refused`` with ``front_door``, which ``guarita_sessions_refused_total``
counts.

What a new front door writes (the callback contract, in the manner of asyncssh's
``SSHServerSession``: the pipeline calls these, from the event loop, never concurrently):

``ClientSide`` (one object per session, given to :func:`admit`)
    ``write_client(data)``: guarita's own words for the agent (approval waits, refusals);
    before the target is open on the door's message stream (SSH: stderr), after it on the
    terminal. Must not block; may drop bytes once the client is gone.
    ``deliver_output(data, stream)``: target output the pipeline released late (a
    masker's held-back tail, ``stream`` ``"o"`` or ``"e"``), in order with the rest.
    ``notify_user(text)``: a one-line notice while the session goes on (limits, expiry).
    ``terminate(message)``: end the session now from the gateway's side (lock, kill,
    limit, shutdown, recording failure): tell the user ``message``, close both sides.
    Idempotent; may be called before the target is open.

``FrontDoor`` (one per listener, bastion/doors/__init__.py; started and stopped by the gateway)
    ``async start()``, ``async stop_accepting()`` (SIGTERM: no new connections, live
    sessions go on), ``async stop()`` (after the live sessions were ended). The gateway
    (bastion/gateway.py) keeps its doors in one list and bastion/lifecycle.py drains them
    through it; a new door is one more entry there.

A refusal after admission (the target cannot be reached) goes through
``Admission.refuse(exc)``: audited once, its slot given back. The SSH door
(bastion/doors/ssh/frontdoor.py), the Kubernetes door (bastion/doors/kube/exec.py) and the MCP door
(bastion/doors/mcp/calls.py) all open sessions this way.

The door's life of a session::

    early = EarlyInput(limit, pause=...)            # input before the target is open
    admission = await admit(services, info, client, early=early)  # Refused: say it, close
    ...start connecting the target (optional: overlaps with an approval wait)...
    await admission.decide_opening(argv)           # GateRefused: the command may not run
    session = admission.open()                     # or admission.release() if it never will
    ...target open: session.attach_target(write_target); replay early.take()...
    bytes: session.from_client(data) -> target; session.from_target(data, "o"|"e") -> client
    await session.end(status, signal, reason)

``services`` is anything with the attributes of :class:`PipelineServices` (the gateway is
one; a test passes a small object). Door-specific policy (which target, login, cluster or
namespace) is decided by the door, which gives the access rule that allowed the session
in ``SessionInfo.rule``: session limits come from that rule and no other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from bastion.doors import FrontDoor as FrontDoor  # declared with the doors; re-exported here
from bastion.masking.recorded import shown_command
from bastion.refusal import Refused
from bastion.session import Session, SessionInfo, audit_fields

log = logging.getLogger("guarita.pipeline")

T = TypeVar("T")

REFUSED_EVENT = "session.refused"
SPOOL_PROBE_BYTES = 4096


class ClientSide(Protocol):
    """The front door's side of one session (see the module docstring for the contract)."""

    def write_client(self, data: bytes) -> None: ...

    def deliver_output(self, data: bytes, stream: str) -> None: ...

    def notify_user(self, text: str) -> None: ...

    def terminate(self, message: str) -> None: ...


class Admitter(Protocol):
    """Locks and per-identity limits (bastion.control.Control)."""

    def admit(self, identity: Any, target: str | None, key: str) -> Refused | None: ...

    def release(self, key: str) -> None: ...


class AuditSink(Protocol):
    def emit(self, event: str, **fields: Any) -> None: ...


class PipelineServices(Protocol):
    """What admission uses of the gateway (the composition root, bastion/gateway.py)."""

    @property
    def draining(self) -> bool: ...

    @property
    def audit(self) -> AuditSink: ...

    @property
    def recorder(self) -> Any: ...  # recorder.Recorder: spool_full(), spool_full_reason(), spool_dir

    @property
    def control(self) -> Admitter: ...

    @property
    def approvals(self) -> Any: ...  # bastion.approvals.engine.ApprovalEngine: gates_opening()

    @property
    def config(self) -> Any: ...  # bastion.config.Config

    @property
    def masking_secret(self) -> bytes | None: ...


class GateRefused(Refused):
    """The approval gate refused the opening (denied, timed out, cancelled): the session
    exists and is recorded, and the door ends it with its exit status."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(f"approval_{outcome}", message, 403)
        self.outcome = outcome


def refused(services: PipelineServices, exc: Refused, front_door: str, **fields: Any) -> Refused:
    """Audit a refusal once (``session.refused``), whichever layer raised it; returns it."""
    if not getattr(exc, "audited", False):
        exc.audited = True  # type: ignore[attr-defined]
        if fields.get("command"):  # kept masked like every other copy of a command line
            fields["command"] = shown_command(services.config.masking, services.masking_secret, front_door,
                                              fields.get("target") or "", fields.get("groups") or (),
                                              fields["command"])
        services.audit.emit(REFUSED_EVENT, reason=exc.reason, detail=exc.message, front_door=front_door,
                            **{k: v for k, v in fields.items() if k not in ("reason", "detail", "front_door")})
    return exc


class EarlyInput(Generic[T]):
    """Input that arrives before the target is open, or while the opening waits for
    approval: kept in order (then replayed to the target), up to ``limit`` bytes before
    ``pause`` stops reading the client. Ctrl-C while an approval waits cancels it."""

    def __init__(self, limit: int, pause: Callable[[], None] | None = None, ctrl_c_cancels: bool = True) -> None:
        self.limit = limit
        self._pause = pause
        self.ctrl_c_cancels = ctrl_c_cancels
        self.items: list[T] = []
        self.size = 0
        self.eof = False
        self.session: Session | None = None

    def add(self, item: T, stdin: bytes | None) -> None:
        """``stdin``: the bytes the agent typed in ``item`` (None for other frames)."""
        session = self.session
        if (self.ctrl_c_cancels and stdin and b"\x03" in stdin and session is not None
                and session.approval_cancel is not None):
            session.cancel_approval("cancelled with Ctrl-C")
            return
        self.items.append(item)
        self.size += len(stdin or b"")
        if self.size > self.limit and self._pause is not None:
            self._pause()

    def take(self) -> list[T]:
        items, self.items, self.size = self.items, [], 0
        return items


class Admission:
    """A session admitted (its slot taken) and not yet open."""

    def __init__(self, services: PipelineServices, info: SessionInfo, client: ClientSide,
                 early: EarlyInput[Any] | None) -> None:
        self.services = services
        self.info = info
        self.client = client
        self.early = early
        self.session: Session | None = None
        self._released = False

    def open(self) -> Session:
        """The session: recorded, registered, and ended through ``client`` if the spool fails."""
        if self.session is None:
            self.session = Session(self.services, self.info, self.client)  # type: ignore[arg-type]
            if self.early is not None:
                self.early.session = self.session
        return self.session

    def gates_opening(self, argv: list[str] | None = None) -> bool:
        approvals = self.services.approvals
        return approvals is not None and bool(approvals.gates_opening(self.info, argv=argv))

    async def decide_opening(self, argv: list[str] | None = None) -> None:
        """The approval gate before anything runs on the target. Raises GateRefused (the
        session is open, recorded and told why; the door ends it) when the answer is no."""
        if not self.gates_opening(argv):
            return
        session = self.open()
        if self.info.kind == "exec":
            result = await session.gate_exec(self.info.command or "", argv=argv)
        else:
            result = await session.gate_shell()
        if not result.allowed:
            raise GateRefused(result.outcome, str(result.reason or f"guarita: the command was {result.outcome}"))

    def release(self) -> None:
        """The session will never open: its slot goes back (nothing if it did open)."""
        if self.session is None and not self._released:
            self._released = True
            self.services.control.release(self.info.session_id or "")

    def refuse(self, exc: Refused) -> Refused:
        """A refusal after admission (the target cannot be reached...): audited, slot back."""
        self.release()
        return refused(self.services, exc, self.info.front_door, **_refusal_fields(self.info))


async def admit(services: PipelineServices, info: SessionInfo, client: ClientSide,
                early: EarlyInput[Any] | None = None) -> Admission:
    """Admission for a session the door's policy allowed: draining, the recording spool,
    locks and limits. Raises Refused (audited once as ``session.refused``)."""
    if info.session_id is None:
        from recorder.recorder import new_session_id

        info.session_id = new_session_id()
    try:
        if services.draining:
            raise Refused("draining", "this gateway is shutting down; connect again to reach another replica", 503)
        await check_spool(services)
        refusal = services.control.admit(info.identity, info.target, info.session_id)
        if refusal is not None:
            raise refusal
    except Refused as exc:
        raise refused(services, exc, info.front_door, **_refusal_fields(info)) from None
    return Admission(services, info, client, early)


async def open_session(services: PipelineServices, info: SessionInfo, client: ClientSide,
                       argv: list[str] | None = None, early: EarlyInput[Any] | None = None) -> Session:
    """Admission, the approval gate's opening and the session, in one call (for a door
    that has nothing to do in between). Raises Refused; GateRefused ends the session."""
    admission = await admit(services, info, client, early)
    try:
        await admission.decide_opening(argv)
    except GateRefused as exc:
        if admission.session is not None:
            await admission.session.end(None, reason=exc.message)
        raise
    except BaseException:
        if admission.session is not None:
            await admission.session.end(None, reason="the session ended before it opened")
        admission.release()
        raise
    return admission.open()


async def check_spool(services: PipelineServices) -> None:
    """Refuse a new session the spool cannot record: over its budget (both policies), or,
    under ``strict``, not writable at all (a probe file: disk full, read-only, gone)."""
    recorder = services.recorder
    if recorder.spool_full():
        raise Refused("recording_spool_full", recorder.spool_full_reason(), 503)
    problem = await _probe(Path(recorder.spool_dir))
    if problem is None:
        return
    if getattr(recorder, "failure_policy", "strict") == "strict":
        raise Refused("recording_unavailable", f"the recording spool {recorder.spool_dir} cannot be written "
                      f"({problem}); guarita never lets traffic through unrecorded, so new sessions are refused "
                      "until it can (recording.failure_policy = strict)", 503)
    log.error("ALERT the recording spool %s cannot be written (%s); the session opens anyway "
              "(recording.failure_policy = best_effort)", recorder.spool_dir, problem)


async def _probe(spool: Path) -> str | None:
    import asyncio

    return await asyncio.to_thread(_probe_sync, spool)


def _probe_sync(spool: Path) -> str | None:
    path = spool / f".probe-{uuid.uuid4().hex}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        os.write(fd, b"\0" * SPOOL_PROBE_BYTES)
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
    return None


def _refusal_fields(info: SessionInfo) -> dict[str, Any]:
    fields = audit_fields(info, info.command)
    fields.pop("front_door", None)
    for key in ("namespace", "pod"):
        if info.extra.get(key) is not None:
            fields[key] = info.extra[key]
    return fields
