"""The approval engine: decides each command (allow, deny, or hold for approval), stores
requests and decisions, wakes waiting sessions, and answers approvers.

Shared by every front door through :class:`bastion.session.Session` (``gate_exec``,
``gate_shell`` and the interactive gate). A request is stored first, then announced
(recording marker, audit log, webhooks); the waiting session learns of a decision
through the state store's notification (any replica) and writes the decision into its
recording. Nothing here ever turns a pending request into an approval by itself: a
timeout, a cancel, a session that ends or a gateway that stops all end in ``expired`` or
``cancelled``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fnmatch
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from bastion.approvals.result import GateResult
from bastion.approvals.rules import ApprovalPolicy, Context, Verdict
from bastion.approvals.webhooks import Webhooks, public_request
from bastion.config import format_duration
from bastion.identity import Identity
from bastion.identity.delegation import chain_fields
from bastion.state import Conflict, NotFound, StateError

if TYPE_CHECKING:
    from bastion.services import Services
    from bastion.session import Session, SessionInfo

__all__ = ["ApprovalEngine", "DecisionError", "GateResult"]

log = logging.getLogger("guarita.approvals")

SWEEP_INTERVAL = 5.0
_STRICTNESS = {"allow": 0, "approve": 1, "deny": 2}


class DecisionError(Exception):
    """A refused decision: ``status`` is the HTTP status, ``code`` a short reason."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _who(identity: dict[str, Any]) -> str:
    return str(identity.get("email") or identity.get("subject") or "?")


class ApprovalEngine:
    def __init__(self, gateway: Services) -> None:
        self.gw = gateway
        self.policy: ApprovalPolicy = gateway.config.approvals
        from bastion.console.settings import request_link

        self.webhooks = Webhooks(self.policy.webhooks, lambda rid: request_link(gateway.config, rid))
        self.sessions: dict[str, Session] = {}
        self._recent: dict[str, collections.deque[float]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def state(self) -> Any:
        return self.gw.state

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self._sweep()
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="approvals-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for session in list(self.sessions.values()):
            session.cancel_approval("the gateway is shutting down")
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        await self.webhooks.close()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self._sweep()
                await self.gw.live.update_counts()
            except Exception as exc:
                log.warning("approvals: sweep failed: %s", exc)

    async def _sweep(self) -> None:
        for row in await self.state.expire_orphans():
            self.gw.audit.emit("approval.expired", request=row["id"], session=row["session_id"],
                               reason=row.get("status_reason"), command=row["command"], rule=row["rule"],
                               subject=row["requester_subject"])
            self.webhooks.announce("approval.resolved", row)

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception as exc:
                log.warning("%s failed: %s", what, exc)

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- live sessions (their rows in the state database: bastion/live.py) ----------------------

    def session_started(self, session: Session) -> None:
        self.sessions[session.id] = session
        info = session.info
        if info.kind == "exec" and info.command is not None and not self.gates_opening(info):
            # Exec commands no rule holds: into the index (gated ones are indexed by the gate).
            self._record(session, 0.0, info.command, "exec", "allowed", None)

    def session_ended(self, session: Session) -> None:
        session.cancel_approval("the session ended")
        self.sessions.pop(session.id, None)

    # -- verdicts ------------------------------------------------------------------------------

    def context(self, session: Session) -> Context:
        return self.context_of(session.info)

    @staticmethod
    def context_of(info: SessionInfo) -> Context:
        # A session in a cluster is scoped like kube (clusters, namespaces) whichever door opened
        # it (the MCP door's exec_in_pod).
        door = "kube" if info.cluster else info.front_door
        return Context(identity=info.identity, front_door=door, target=info.target,
                       namespace=info.extra.get("namespace"))

    def command_verdict(self, ctx: Context, command: str, argv: list[str] | None = None) -> Verdict:
        """The strictest verdict over the lines of ``command`` (a multi-line paste is several
        commands; the whole text is checked too, for patterns that span lines)."""
        texts = [command] + ([line for line in command.split("\n") if line.strip()] if "\n" in command else [])
        verdicts = [self.policy.command_verdict(ctx, text, argv if text == command else None) for text in texts]
        return max(verdicts, key=lambda v: _STRICTNESS[v.action])

    def watches(self, session: Session) -> bool:
        return self.policy.watches_commands(self.context(session))

    def gates_opening(self, info: SessionInfo, argv: list[str] | None = None) -> bool:
        """Does opening this session need a decision first (an exec command, or a shell)?"""
        ctx = self.context_of(info)
        if info.kind == "exec" and info.command is not None:
            return self.command_verdict(ctx, info.command, argv).action != "allow"
        if info.kind == "shell":
            return self.policy.shell_verdict(ctx).action != "allow"
        return False

    # -- the gate ---------------------------------------------------------------------------

    async def check(self, session: Session, command: str, kind: str, *, argv: list[str] | None = None,
                    also: tuple[str, ...] = (), record: bool = True) -> GateResult:
        """Decide one command of ``session``: allow, refuse, or request approval and wait.
        ``also``: other spellings of the same command line (checked, the strictest wins).
        ``record``: whether an allowed command goes to the commands index and recording."""
        ctx = self.context(session)
        t = session.recording.now()
        if kind == "shell":
            verdict = self.policy.shell_verdict(ctx)
        else:
            verdict = max([self.command_verdict(ctx, command, argv),
                           *(self.command_verdict(ctx, text) for text in also if text)],
                          key=lambda v: _STRICTNESS[v.action])
        # Rules saw the command as sent; every copy kept from here on is masked (docs/masking.md).
        command, also = _shown(session, command) or "", tuple(_shown(session, text) or "" for text in also)
        if verdict.action == "allow":
            if record and command:
                self._record(session, t, command, kind, "allowed", verdict.rule_name if verdict.rule else None)
            return GateResult(True, "allowed", rule=verdict.rule.name if verdict.rule else None)
        # Only another spelling (the typed text, when the screen showed nothing) matched: that is the command.
        command = command or next((text for text in also if text), "")
        if verdict.action == "deny":
            rule = verdict.rule
            reason = (rule.message if rule and rule.message else
                      f"{'opening a shell' if kind == 'shell' else 'this command'} is refused by guarita rule "
                      f"{verdict.rule_name!r}")
            self._record(session, t, command, kind, "denied", verdict.rule_name, reason=reason)
            self.gw.audit.emit("command.refused", session=session.id, subject=ctx.identity.subject,
                               target=ctx.target, command=command, kind=kind, rule=verdict.rule_name, reason=reason)
            return GateResult(False, "denied", reason, rule=verdict.rule_name)
        return await self._request(session, ctx, verdict, command, kind, t)

    def _rate_limited(self, session_id: str) -> float | None:
        """Seconds until this session may ask again, or None when it may ask now."""
        limit = self.policy.defaults.requests_per_minute
        now = time.monotonic()
        recent = self._recent.setdefault(session_id, collections.deque())
        while recent and recent[0] <= now - 60:
            recent.popleft()
        if len(recent) >= limit:
            return 60 - (now - recent[0])
        recent.append(now)
        return None

    async def _request(self, session: Session, ctx: Context, verdict: Verdict, command: str, kind: str,
                       t: float) -> GateResult:
        rule = verdict.rule
        approvers = self.policy.approvers_for(rule)
        timeout = rule.timeout if rule else self.policy.defaults.timeout
        min_approvals = rule.min_approvals if rule else self.policy.defaults.min_approvals
        wait = self._rate_limited(session.id)
        if wait is not None:
            limit = self.policy.defaults.requests_per_minute
            reason = (f"too many approval requests from this session ({limit} in the last minute); "
                      f"try again in {int(wait) + 1}s")
            self._record(session, t, command, kind, "rate-limited", verdict.rule_name, reason=reason)
            self.gw.audit.emit("approval.rate_limited", session=session.id, subject=ctx.identity.subject,
                               command=command, rule=verdict.rule_name)
            return GateResult(False, "rate-limited", reason, rule=verdict.rule_name)
        info = session.info
        try:
            request = await self.state.create_request({
                "session_id": session.id, "requester": ctx.identity.to_dict(),
                "requester_issuer": ctx.identity.issuer, "requester_subject": ctx.identity.subject,
                "front_door": info.front_door, "kind": kind, "target": info.target, "login": info.login,
                "namespace": info.extra.get("namespace"), "pod": info.extra.get("pod"), "command": command,
                "rule": verdict.rule_name, "message": rule.message if rule else None,
                "approver_groups": list(approvers), "min_approvals": min_approvals,
                "expires": time.time() + timeout,
            })
        except (StateError, OSError, Exception) as exc:  # fail closed: no record, no command
            log.error("approvals: cannot store a request: %s", exc)
            reason = "guarita could not record the approval request (state database unavailable); the command did not run"
            self._record(session, t, command, kind, "error", verdict.rule_name, reason=reason, index=False)
            return GateResult(False, "error", reason, rule=verdict.rule_name)
        rid = request["id"]
        session.marker("approval-request", request=rid, command=command, mode=kind, rule=verdict.rule_name,
                       approvers=list(approvers), min_approvals=min_approvals, timeout=timeout)
        self.gw.audit.emit("approval.requested", request=rid, session=session.id, subject=ctx.identity.subject,
                           issuer=ctx.identity.issuer, target=ctx.target, login=info.login, command=command,
                           kind=kind, rule=verdict.rule_name, approvers=list(approvers),
                           min_approvals=min_approvals, expires=request["expires"], **chain_fields(ctx.identity))
        self.webhooks.announce("approval.requested", request)
        what = "Opening a shell" if kind == "shell" else "This command"
        lines = [f"guarita: {what} needs approval" + (f": {rule.message}" if rule and rule.message else "."),
                 f"guarita: request {rid} (rule {verdict.rule_name!r}): "
                 f"{min_approvals} approval(s) from group(s) {', '.join(approvers)}; waiting up to "
                 f"{format_duration(timeout)}.",
                 f"guarita: an approver runs: bastion approvals approve {rid} --reason '...'"]
        if kind == "interactive" and session.info.size:
            lines.append("guarita: Ctrl-C cancels the request.")
        session.say("\n".join(lines))

        cancel = asyncio.Event()
        session.approval_cancel = cancel
        session.cancel_reason = None
        try:
            row = await self.state.wait_request(rid, timeout, cancel)
            if row is not None and row["status"] == "pending":
                if cancel.is_set():
                    row = await self.state.finish_request(rid, "cancelled", session.cancel_reason or "cancelled")
                else:
                    row = await self.state.finish_request(
                        rid, "expired", f"no decision within {format_duration(timeout)}")
        except (StateError, OSError, Exception) as exc:
            log.error("approvals: lost track of request %s: %s", rid, exc)
            with contextlib.suppress(Exception):
                await self.state.finish_request(rid, "expired", f"the gateway lost the state database: {exc}")
            row = None
        finally:
            session.approval_cancel = None
        if row is None:
            reason = "guarita lost the approval request (state database unavailable); the command did not run"
            self._record(session, t, command, kind, "error", verdict.rule_name, request_id=rid, reason=reason)
            return GateResult(False, "error", reason, rid, verdict.rule_name)
        status = row["status"]
        for d in row["decisions"]:
            session.marker("approval-decision", request=rid, approver=d["approver"].get("subject"),
                           approver_email=d["approver"].get("email"), approver_issuer=d["approver"].get("issuer"),
                           decision=d["decision"], reason=d["reason"])
        if status in ("expired", "cancelled"):
            session.marker("approval-decision", request=rid, decision=status, reason=row.get("status_reason"))
            self.webhooks.announce("approval.resolved", row)
        self.gw.audit.emit("approval.resolved", request=rid, session=session.id, status=status,
                           reason=row.get("status_reason"), command=command, rule=verdict.rule_name,
                           subject=ctx.identity.subject,
                           approvers=[d["approver"].get("subject") for d in row["decisions"] if d["decision"] == "approve"])
        last = row["decisions"][-1] if row["decisions"] else None
        if status == "approved":
            names = ", ".join(_who(d["approver"]) for d in row["decisions"] if d["decision"] == "approve")
            reason = f"request {rid} approved by {names}" + (f": {last['reason']}" if last else "")
        elif status == "denied" and last is not None:
            reason = f"request {rid} denied by {_who(last['approver'])}: {last['reason']}"
        elif status == "expired":
            reason = f"request {rid} expired: {row.get('status_reason') or 'no decision in time'}; the command did not run"
        else:
            reason = f"request {rid} {status}: {row.get('status_reason') or status}; the command did not run"
        self._record(session, t, command, kind, status, verdict.rule_name, request_id=rid, reason=reason)
        return GateResult(status == "approved", status, reason, rid, verdict.rule_name)

    def index_command(self, session: Session, command: str, kind: str) -> None:
        """A command no rule concerns, into the recording and the commands index."""
        self._record(session, session.recording.now(), command, kind, "allowed", None)

    def _record(self, session: Session, t: float, command: str, kind: str, outcome: str, rule: str | None,
                request_id: str | None = None, reason: str | None = None, index: bool = True) -> None:
        """The command, with its outcome, in the recording (a ``command`` marker) and the index."""
        command = _shown(session, command) or ""
        session.marker("command", command=command, mode=kind, outcome=outcome, rule=rule, request=request_id,
                       reason=reason if outcome != "allowed" else None)
        if index:
            info = session.info
            self.spawn(self.state.add_command(session.id, t, command, outcome, subject=info.identity.subject,
                                              target=info.target, rule=rule, request_id=request_id),
                       "indexing a command")

    # -- approvers ----------------------------------------------------------------------------

    def may_view(self, request: dict[str, Any], identity: Identity) -> bool:
        return self._is_requester(request, identity) or self._is_approver(request, identity)

    @staticmethod
    def _is_requester(request: dict[str, Any], identity: Identity) -> bool:
        if request["requester_issuer"] == identity.issuer and request["requester_subject"] == identity.subject:
            return True
        # An actor of the requester's delegation chain asked too: it may not decide either.
        chain = (request.get("requester") or {}).get("act") or []
        return any(isinstance(a, dict) and a.get("sub") == identity.subject
                   and (a.get("iss") or request["requester_issuer"]) == identity.issuer for a in chain)

    @staticmethod
    def _is_approver(request: dict[str, Any], identity: Identity) -> bool:
        groups = request.get("approver_groups") or []
        return any(fnmatch.fnmatchcase(g, pattern) for g in identity.groups for pattern in groups)

    async def decide(self, request_id: str, approver: Identity, decision: str, reason: str) -> dict[str, Any]:
        if not reason or not reason.strip():
            raise DecisionError(400, "reason_required", "give a reason: it is kept with the decision for auditors")
        request = await self.state.get_request(request_id)
        if request is None:
            raise DecisionError(404, "not_found", f"no approval request {request_id!r}")
        if request["status"] != "pending":
            raise DecisionError(409, "already_decided", f"request {request_id} is already {request['status']}"
                                + (f" ({request['status_reason']})" if request.get("status_reason") else ""))
        if approver.delegated:
            # A person approves, never an agent acting for one, whatever groups the token carries.
            self._refused(request, approver, decision, "delegated_approver")
            raise DecisionError(403, "delegated_approver",
                                f"a delegated token ({approver.chain}) can never decide on a request: an agent "
                                "in the chain would be approving; sign in as yourself (`bastion login`)")
        if self._is_requester(request, approver):
            self._refused(request, approver, decision, "self_approval")
            raise DecisionError(403, "self_approval", "nobody may decide on their own request")
        if not self._is_approver(request, approver):
            self._refused(request, approver, decision, "not_an_approver")
            raise DecisionError(403, "not_an_approver",
                                f"{approver.display} is not in an approver group of this request "
                                f"({', '.join(request['approver_groups'])})")
        who = approver.to_dict()
        try:
            updated = await self.state.decide(request_id, who, decision, reason.strip())
        except NotFound as exc:
            raise DecisionError(404, "not_found", str(exc)) from None
        except Conflict as exc:
            raise DecisionError(409, "already_decided", str(exc)) from None
        self.gw.audit.emit("approval.decision", request=request_id, session=request["session_id"],
                           decision=decision, reason=reason.strip(), approver=approver.subject,
                           approver_issuer=approver.issuer, status=updated["status"],
                           requester=request["requester_subject"], command=request["command"])
        self.webhooks.announce("approval.decided", updated, decision=decision,
                               approver={"subject": approver.subject, "email": approver.email})
        return updated

    def _refused(self, request: dict[str, Any], approver: Identity, decision: str, why: str) -> None:
        self.gw.audit.emit("approval.decision_refused", request=request["id"], reason=why, decision=decision,
                           approver=approver.subject, approver_issuer=approver.issuer)


__all__ = ["ApprovalEngine", "DecisionError", "GateResult", "public_request"]


def _shown(session: Session, command: str | None) -> str | None:
    """The command as the gateway keeps it: masked where the session's masking applies."""
    mask = getattr(session, "mask_command", None)
    return mask(command) if mask is not None else command
