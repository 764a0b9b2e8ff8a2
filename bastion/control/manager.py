"""The gateway's lifecycle controller: admission (locks, limits), lock and kill enforcement
across replicas, and the session limits each access rule sets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from bastion.control.limits import SessionLimiter, SessionLimits
from bastion.control.locks import Lock, LockError, parse_lock_target
from bastion.identity import Identity
from bastion.refusal import Refused
from bastion.state import NotFound
from bastion.state.store import LOCKS_TOPIC

if TYPE_CHECKING:
    from bastion.services import Services
    from bastion.session import Session, SessionInfo

log = logging.getLogger("guarita.control")

KILL_TTL = 120.0  # a kill request stays in force this long (the session ends within a second)


class Control:
    def __init__(self, gateway: Services) -> None:
        self.gw = gateway
        self.limiter = SessionLimiter()
        # Live sessions, and the Kubernetes connections that are not sessions but that locks and
        # kills end too (port-forward tunnels, watches, followed logs: bastion/doors/kube/held.py), are
        # in the gateway's one registry (bastion/live.py).
        self.locks: list[Lock] = []  # in force (kills included), as last read
        self.loaded_at = 0.0
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._watch(), name="control-locks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _watch(self) -> None:
        """Re-read the locks when any replica publishes the topic, and at least every
        ``limits.lock_poll_interval`` (a lost notification costs under a second)."""
        state = self.gw.state
        with state.subscribe(LOCKS_TOPIC) as woken:
            while True:
                interval = min(self.gw.config.limits.lock_poll_interval, state.wake_interval)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), interval)
                woken.clear()
                try:
                    await self.refresh()
                except Exception as exc:  # the database may be briefly away: keep the last view
                    log.warning("control: cannot read locks: %s", exc)
                    self.enforce()

    async def refresh(self) -> None:
        rows = await self.gw.state.active_locks()
        self.locks = [Lock.from_row(r) for r in rows]
        self.loaded_at = time.time()
        self.enforce()

    # -- admission -----------------------------------------------------------------------------

    def locked(self, identity: Identity, target: str | None) -> Lock | None:
        now = time.time()
        return next((lock for lock in self.locks
                     if lock.kind != "session" and lock.active(now) and lock.matches(identity, target)), None)

    def admit(self, identity: Identity, target: str | None, key: str) -> Refused | None:
        """May this identity open a session on ``target`` now? Takes a slot for session ``key``
        (released by the session's end, or by :meth:`release` if it never starts)."""
        lock = self.locked(identity, target)
        if lock is not None:
            return Refused("locked", lock.refusal(), 403)
        limits = self.gw.config.limits
        refused = self.limiter.admit(key, identity.subject, limits.max_sessions_per_subject,
                                     limits.sessions_per_minute)
        if refused is not None:
            self.gw.audit.emit("limit.refused", subject=identity.subject, issuer=identity.issuer, target=target,
                               detail=refused)
            return Refused("limit", refused, 429)
        return None

    def release(self, key: str) -> None:
        self.limiter.release_pending(key)

    # -- live sessions (called by Session) --------------------------------------------------------

    def session_started(self, session: Session) -> None:
        self.limiter.started(session.id, session.info.identity.subject)

    def session_ended(self, session: Session) -> None:
        self.limiter.ended(session.id)

    def enforce(self) -> int:
        """End every local live session that a lock (or kill) in force matches; returns how many
        were told to end now."""
        now = time.time()
        active = [lock for lock in self.locks if lock.active(now)]
        if not active:
            return 0
        ended = 0
        for session in self.gw.live.all():
            if session.ended or session.stopping:
                continue
            info = session.info
            lock = next((lk for lk in active if lk.matches(info.identity, info.target, session.id)), None)
            if lock is None:
                continue
            kind = "kill" if lock.kind == "session" else "lock"
            if session.stop(kind, lock.ending(), lock=lock.id, lock_kind=lock.kind, lock_value=lock.value,
                            lock_reason=lock.reason, by=lock.created_by.get("subject")):
                ended += 1
        return ended

    def limits_for(self, info: SessionInfo) -> SessionLimits:
        """The limits of the access rule that allowed the session (``info.rule``, decided by
        the front door's policy): never a rule matched again here, which could differ."""
        rule = info.rule
        if rule is None:
            return SessionLimits()
        return SessionLimits(on_expiry=rule.on_expiry, max_session=rule.max_session,
                             idle_timeout=rule.idle_timeout, max_duration=rule.max_duration, rule=rule.name)

    # -- operators (HTTP API) -------------------------------------------------------------------

    async def create_lock(self, kind: str, value: str, reason: str, by: Identity,
                          until: float | None = None) -> tuple[Lock, dict[str, Any]]:
        kind, value = parse_lock_target(kind, value)
        if kind == "session":
            raise LockError("end one session with `bastion sessions kill ID`, not a lock")
        reason = (reason or "").strip()
        if not reason:
            raise LockError("give a reason: it is shown to the users whose sessions end, and kept for auditors")
        if until is not None and until <= time.time():
            raise LockError("the lock's end (until) is in the past")
        before = await self.gw.state.live_sessions_overview()  # before: the matching ones end right away
        row = await self.gw.state.create_lock(kind, value, reason, by.to_dict(), until)
        lock = Lock.from_row(row)
        self.locks = [*self.locks, lock]
        ended_here = self.enforce()
        live = [r for r in before if lock.matches_row(r)]
        known = True
        if kind == "subject":
            known = bool(live) or await self.gw.state.subject_seen(value)
        self.gw.audit.emit("lock.created", lock=lock.id, kind=kind, value=value, reason=reason, until=until,
                           by=by.subject, by_issuer=by.issuer, live_sessions=len(live), ended_here=ended_here)
        return lock, {"live_sessions": len(live), "known": known}

    async def remove_lock(self, lock_id: str, by: Identity) -> Lock:
        row = await self.gw.state.remove_lock(lock_id)
        self.locks = [lock for lock in self.locks if lock.id != lock_id]
        self.gw.audit.emit("lock.removed", lock=lock_id, kind=row["kind"], value=row["value"], by=by.subject,
                           by_issuer=by.issuer)
        return Lock.from_row(row)

    async def kill(self, session_id: str, by: Identity, reason: str) -> dict[str, Any]:
        reason = (reason or "").strip()
        if not reason:
            raise LockError("give a reason: it is shown to the user and kept in the recording")
        row = await self.gw.state.get_live_session(session_id)
        if row is None and session_id not in self.gw.live.sessions:
            raise NotFound(f"no live session {session_id!r} (see `bastion sessions ls`)")
        created = await self.gw.state.create_lock("session", session_id, reason, by.to_dict(),
                                                  time.time() + KILL_TTL)
        self.locks = [*self.locks, Lock.from_row(created)]
        self.enforce()
        self.gw.audit.emit("session.kill", session=session_id, reason=reason, by=by.subject, by_issuer=by.issuer,
                           replica=(row or {}).get("replica_id"))
        return row or {"id": session_id}
