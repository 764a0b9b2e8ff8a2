"""One store for the gateway's state: SQLite by default, PostgreSQL for several replicas.

Everything goes through SQLAlchemy Core on an async engine (aiosqlite / asyncpg). What a
replica changes that another replica waits for (an approval decision, later a lock or a
session kill) is published on a *topic*: PostgreSQL ``NOTIFY guarita_events`` sent in the
same transaction, received by every replica's ``LISTEN`` connection; with SQLite, the
topic is published in-process. Waiters also poll, every second (a quarter second while
the PostgreSQL listener is down), so a lost notification costs latency, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, text, update
from sqlalchemy import event as sa_event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from bastion.state import schema as s
from recorder.objects import NotFound

log = logging.getLogger("guarita.state")

CHANNEL = "guarita_events"
LOCKS_TOPIC = "locks"  # published when a lock is created or lifted, or a session is to be killed
HEARTBEAT_INTERVAL = 5.0
# A replica whose heartbeat is older than this is dead: its sessions are gone.
REPLICA_DEAD_AFTER = 20.0
_ID_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i: ids are typed by people


class StateError(RuntimeError):
    """The state database cannot be used; the message says which and why."""


class StateNotFound(StateError, NotFound):
    """No such approval request, lock or session (guarita's one ``NotFound``, recorder/objects.py)."""


class Conflict(StateError):
    pass


def new_id(length: int = 10) -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def engine_url(url: str) -> tuple[str, str]:
    """``sqlite:///path`` / ``postgresql://...`` -> (kind, SQLAlchemy async URL)."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError with a long message
        raise StateError(f"state URL {url!r} is not a database URL: use sqlite:///PATH or "
                         "postgresql://USER@HOST:PORT/DB") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise StateError("state URL: sqlite needs a file (sqlite:///PATH); an in-memory database "
                             "would lose pending approvals on restart")
        return "sqlite", parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    if backend in ("postgresql", "postgres"):
        return "postgresql", parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    raise StateError(f"state URL {url!r}: unsupported database {backend!r} (use sqlite:/// or postgresql://)")


def _asyncpg_dsn(sqlalchemy_url: str) -> str:
    return make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)


class StateStore:
    def __init__(self, url: str, replica_name: str | None = None, poll_interval: float = 1.0) -> None:
        self.url = url
        self.kind, self._engine_url = engine_url(url)
        self.replica_id = uuid.uuid4().hex
        self.replica_name = replica_name or socket.gethostname()
        self.poll_interval = poll_interval
        self.engine: AsyncEngine | None = None
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._listener: Any = None  # asyncpg connection with LISTEN
        self._listening = False
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def display_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    async def start(self) -> None:
        if self.kind == "sqlite":
            path = Path(str(make_url(self._engine_url).database))
            path.parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_async_engine(self._engine_url)
            _sqlite_setup(self.engine)
        else:
            self.engine = create_async_engine(self._engine_url, pool_size=5, max_overflow=10, pool_pre_ping=True)
        try:
            await self._migrate()
            async with self.engine.begin() as conn:
                now = time.time()
                await conn.execute(insert(s.replicas).values(
                    id=self.replica_id, name=self.replica_name, started=now, heartbeat=now,
                    info={"pid": os.getpid(), "host": socket.gethostname()}))
        except StateError:
            raise
        except (OSError, Exception) as exc:
            await self.engine.dispose()
            raise StateError(f"state database {self.display_url} is not usable: {exc}") from exc
        if self.kind == "postgresql":
            await self._connect_listener()
            self._tasks.append(asyncio.create_task(self._keep_listening(), name="state-listener"))
        self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="state-heartbeat"))

    async def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
        if self.engine is not None:
            with contextlib.suppress(Exception):
                async with self.engine.begin() as conn:
                    await conn.execute(delete(s.live_sessions).where(s.live_sessions.c.replica_id == self.replica_id))
                    await conn.execute(delete(s.replicas).where(s.replicas.c.id == self.replica_id))
            await self.engine.dispose()

    async def _migrate(self) -> None:
        assert self.engine is not None
        async with self.engine.begin() as conn:
            if self.kind == "postgresql":
                # Two replicas starting at once must not both create the tables.
                await conn.execute(text("SELECT pg_advisory_xact_lock(4711080)"))
            await conn.run_sync(s.metadata.create_all)
            current = (await conn.execute(select(func.max(s.schema_version.c.version)))).scalar()
            if current is None:
                await conn.execute(insert(s.schema_version).values(version=s.SCHEMA_VERSION, applied=time.time()))
                return
            if current > s.SCHEMA_VERSION:
                raise StateError(f"state database {self.display_url} has schema version {current}, newer than "
                                 f"this gateway's {s.SCHEMA_VERSION}: upgrade the gateway")
            for version in range(current + 1, s.SCHEMA_VERSION + 1):
                for statement in s.MIGRATIONS.get(version, []):
                    await conn.execute(text(statement))
                await conn.execute(insert(s.schema_version).values(version=version, applied=time.time()))

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncConnection]:
        assert self.engine is not None, "state store not started"
        async with self.engine.begin() as conn:
            yield conn

    # -- topics: cross-replica wake-ups ------------------------------------------------------

    @contextlib.contextmanager
    def subscribe(self, topic: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._waiters.setdefault(topic, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(topic)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    self._waiters.pop(topic, None)

    def publish_local(self, topic: str) -> None:
        for event in self._waiters.get(topic, ()):
            event.set()

    async def _notify(self, conn: AsyncConnection, topic: str) -> None:
        """Within a transaction: other replicas hear ``topic`` when it commits."""
        if self.kind == "postgresql":
            await conn.execute(text("SELECT pg_notify(:channel, :topic)"), {"channel": CHANNEL, "topic": topic})

    @property
    def wake_interval(self) -> float:
        """How often a waiter re-reads the database even without a notification."""
        if self.kind == "postgresql" and not self._listening:
            return min(self.poll_interval, 0.25)
        return self.poll_interval

    async def _connect_listener(self) -> None:
        import asyncpg

        try:
            conn = await asyncpg.connect(_asyncpg_dsn(self._engine_url), timeout=10)
            await conn.add_listener(CHANNEL, self._on_notify)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            log.warning("state: cannot LISTEN on %s (%s); decisions from other replicas arrive by polling",
                        self.display_url, exc)
            self._listening = False
            return
        conn.add_termination_listener(self._on_listener_lost)
        self._listener = conn
        self._listening = True

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self.publish_local(payload)

    def _on_listener_lost(self, conn: Any) -> None:
        if not self._closed:
            log.warning("state: the LISTEN connection to %s was lost; polling until it is back", self.display_url)
        self._listening = False
        self._listener = None

    async def _keep_listening(self) -> None:
        delay = 0.5
        while True:
            await asyncio.sleep(delay)
            if self._listener is None or self._listener.is_closed():
                self._listening = False
                await self._connect_listener()
                if self._listening:
                    log.info("state: listening on %s again", self.display_url)
                    # Whatever was decided while deaf: wake every waiter to re-read.
                    for topic in list(self._waiters):
                        self.publish_local(topic)
                delay = 0.5 if self._listening else min(delay * 2, 5.0)
            else:
                delay = 1.0

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            try:
                async with self._tx() as conn:
                    await conn.execute(update(s.replicas).where(s.replicas.c.id == self.replica_id)
                                       .values(heartbeat=time.time()))
            except Exception as exc:  # the database may be briefly away; keep trying
                log.warning("state: heartbeat failed: %s", exc)

    # -- approval requests -----------------------------------------------------------------

    async def create_request(self, values: dict[str, Any]) -> dict[str, Any]:
        values = {"status": "pending", "replica_id": self.replica_id, "created": time.time(), **values}
        for _ in range(5):
            values["id"] = values.get("id") or new_id()
            try:
                async with self._tx() as conn:
                    await conn.execute(insert(s.approval_requests).values(**values))
                break
            except IntegrityError:
                values["id"] = None  # an id collision: draw another
        else:
            raise StateError("could not allocate an approval request id")
        row = await self.get_request(values["id"])
        assert row is not None
        return row

    async def get_request(self, request_id: str) -> dict[str, Any] | None:
        async with self._tx() as conn:
            return await self._read_request(conn, request_id)

    async def _read_request(self, conn: AsyncConnection, request_id: str, lock: bool = False) -> dict[str, Any] | None:
        query = select(s.approval_requests).where(s.approval_requests.c.id == request_id)
        if lock and self.kind == "postgresql":
            query = query.with_for_update()
        row = (await conn.execute(query)).mappings().first()
        if row is None:
            return None
        decisions = (await conn.execute(
            select(s.approval_decisions).where(s.approval_decisions.c.request_id == request_id)
            .order_by(s.approval_decisions.c.id))).mappings().all()
        return {**dict(row), "decisions": [_decision(d) for d in decisions]}

    async def list_requests(self, status: str | None = None, limit: int = 200,
                            session_id: str | None = None) -> list[dict[str, Any]]:
        query = select(s.approval_requests).order_by(s.approval_requests.c.created.desc()).limit(limit)
        if status:
            query = query.where(s.approval_requests.c.status == status)
        if session_id:
            query = query.where(s.approval_requests.c.session_id == session_id)
        async with self._tx() as conn:
            rows = [dict(r) for r in (await conn.execute(query)).mappings().all()]
            if rows:
                ids = [r["id"] for r in rows]
                decisions = (await conn.execute(
                    select(s.approval_decisions).where(s.approval_decisions.c.request_id.in_(ids))
                    .order_by(s.approval_decisions.c.id))).mappings().all()
                by_id: dict[str, list[dict[str, Any]]] = {}
                for d in decisions:
                    by_id.setdefault(d["request_id"], []).append(_decision(d))
                for r in rows:
                    r["decisions"] = by_id.get(r["id"], [])
        return rows

    async def decide(self, request_id: str, approver: dict[str, Any], decision: str, reason: str) -> dict[str, Any]:
        """Record one approver's decision; the request is approved once ``min_approvals``
        distinct approvers approved, denied by the first denial. Raises NotFound, or
        Conflict when the request is no longer pending or this approver already decided."""
        assert decision in ("approve", "deny")
        topic = f"approval:{request_id}"
        try:
            async with self._tx() as conn:
                row = await self._read_request(conn, request_id, lock=True)
                if row is None:
                    raise StateNotFound(f"no approval request {request_id!r}")
                if row["status"] != "pending":
                    raise Conflict(f"request {request_id} is already {row['status']}")
                now = time.time()
                await conn.execute(insert(s.approval_decisions).values(
                    request_id=request_id, approver_issuer=approver["issuer"], approver_subject=approver["subject"],
                    approver=approver, decision=decision, reason=reason, created=now))
                status = None
                if decision == "deny":
                    status = "denied"
                else:
                    approvals = (await conn.execute(select(func.count()).select_from(s.approval_decisions).where(
                        and_(s.approval_decisions.c.request_id == request_id,
                             s.approval_decisions.c.decision == "approve")))).scalar() or 0
                    if approvals >= row["min_approvals"]:
                        status = "approved"
                if status is not None:
                    result = await conn.execute(update(s.approval_requests).where(and_(
                        s.approval_requests.c.id == request_id, s.approval_requests.c.status == "pending"))
                        .values(status=status, decided=now, status_reason=reason))
                    if result.rowcount != 1:
                        raise Conflict(f"request {request_id} was decided meanwhile")
                await self._notify(conn, topic)
                updated = await self._read_request(conn, request_id)
        except IntegrityError:
            raise Conflict(f"you already decided on request {request_id}") from None
        self.publish_local(topic)
        assert updated is not None
        return updated

    async def finish_request(self, request_id: str, status: str, reason: str) -> dict[str, Any]:
        """Move a still-pending request to ``status`` (expired / cancelled). Returns the row as
        it then is: if a decision won the race, that decision."""
        assert status in ("expired", "cancelled")
        topic = f"approval:{request_id}"
        async with self._tx() as conn:
            await conn.execute(update(s.approval_requests).where(and_(
                s.approval_requests.c.id == request_id, s.approval_requests.c.status == "pending"))
                .values(status=status, decided=time.time(), status_reason=reason))
            await self._notify(conn, topic)
            row = await self._read_request(conn, request_id)
        self.publish_local(topic)
        if row is None:
            raise StateNotFound(f"no approval request {request_id!r}")
        return row

    async def wait_request(self, request_id: str, timeout: float,
                           cancelled: asyncio.Event | None = None) -> dict[str, Any] | None:
        """Until the request is no longer pending (or ``timeout`` s, or ``cancelled`` is set):
        returns the request as last read."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with self.subscribe(f"approval:{request_id}") as woken:
            while True:
                woken.clear()
                row = await self.get_request(request_id)
                if row is None or row["status"] != "pending" or (cancelled is not None and cancelled.is_set()):
                    return row
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return row
                waits = [asyncio.ensure_future(woken.wait())]
                if cancelled is not None:
                    waits.append(asyncio.ensure_future(cancelled.wait()))
                try:
                    await asyncio.wait(waits, timeout=min(remaining, self.wake_interval),
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()

    async def expire_orphans(self, grace: float = 5.0) -> list[dict[str, Any]]:
        """Pending requests nobody can wait for any more become ``expired`` (never approved):
        those of a replica that stopped (no heartbeat, or an earlier run of this replica) and
        those past their deadline. Returns the requests it expired."""
        now = time.time()
        async with self._tx() as conn:
            alive = select(s.replicas.c.id).where(and_(
                s.replicas.c.heartbeat >= now - REPLICA_DEAD_AFTER,
                or_(s.replicas.c.name != self.replica_name, s.replicas.c.id == self.replica_id)))
            orphaned = (await conn.execute(select(s.approval_requests.c.id, s.approval_requests.c.expires).where(and_(
                s.approval_requests.c.status == "pending",
                or_(s.approval_requests.c.replica_id.not_in(alive),
                    s.approval_requests.c.expires < now - grace))))).all()
            expired = []
            for rid, expires in orphaned:
                reason = ("no decision before the request timed out" if expires < now - grace else
                          "the gateway holding the session stopped before a decision; the command did not run")
                result = await conn.execute(update(s.approval_requests).where(and_(
                    s.approval_requests.c.id == rid, s.approval_requests.c.status == "pending"))
                    .values(status="expired", decided=now, status_reason=reason))
                if result.rowcount:
                    expired.append(rid)
                    await self._notify(conn, f"approval:{rid}")
            dead = select(s.replicas.c.id).where(or_(
                s.replicas.c.heartbeat < now - REPLICA_DEAD_AFTER,
                and_(s.replicas.c.name == self.replica_name, s.replicas.c.id != self.replica_id)))
            await conn.execute(delete(s.live_sessions).where(s.live_sessions.c.replica_id.in_(dead)))
            await conn.execute(delete(s.replicas).where(s.replicas.c.id.in_(dead)))
            rows = [await self._read_request(conn, rid) for rid in expired]
        for rid in expired:
            self.publish_local(f"approval:{rid}")
        return [r for r in rows if r is not None]

    # -- commands index --------------------------------------------------------------------

    async def add_command(self, session_id: str, t: float, command: str, outcome: str, *,
                          subject: str | None = None, target: str | None = None, rule: str | None = None,
                          request_id: str | None = None) -> None:
        async with self._tx() as conn:
            await conn.execute(insert(s.commands).values(
                session_id=session_id, t=t, at=time.time(), subject=subject, target=target, command=command,
                outcome=outcome, rule=rule, request_id=request_id))

    async def search_commands(self, contains: str | None = None, session_id: str | None = None,
                              since: float | None = None, until: float | None = None,
                              limit: int = 1000) -> list[dict[str, Any]]:
        query = select(s.commands).order_by(s.commands.c.at).limit(limit)
        if contains:
            query = query.where(s.commands.c.command.contains(contains, autoescape=True))
        if session_id:
            query = query.where(s.commands.c.session_id == session_id)
        if since is not None:
            query = query.where(s.commands.c.at >= since)
        if until is not None:
            query = query.where(s.commands.c.at <= until)
        async with self._tx() as conn:
            return [dict(r) for r in (await conn.execute(query)).mappings().all()]

    # -- live sessions -----------------------------------------------------------------------

    async def add_live_session(self, values: dict[str, Any]) -> None:
        now = time.time()
        async with self._tx() as conn:
            await conn.execute(insert(s.live_sessions).values(
                replica_id=self.replica_id, started=now, updated=now, bytes_in=0, bytes_out=0, **values))

    async def update_live_sessions(self, counts: Sequence[tuple[str, int, int]]) -> None:
        if not counts:
            return
        now = time.time()
        async with self._tx() as conn:
            for sid, bytes_in, bytes_out in counts:
                await conn.execute(update(s.live_sessions).where(s.live_sessions.c.id == sid)
                                   .values(bytes_in=bytes_in, bytes_out=bytes_out, updated=now))

    async def remove_live_session(self, session_id: str) -> None:
        async with self._tx() as conn:
            await conn.execute(delete(s.live_sessions).where(s.live_sessions.c.id == session_id))

    async def remove_stale_live_sessions(self, keep: Collection[str], before: float) -> int:
        """This replica's rows added before ``before`` for sessions not in ``keep``: a removal
        that failed (the database was away for a moment) is made good here. Rows added after
        ``before`` are left, so a session opened meanwhile is never taken off."""
        async with self._tx() as conn:
            result = await conn.execute(delete(s.live_sessions).where(
                s.live_sessions.c.replica_id == self.replica_id, s.live_sessions.c.started < before,
                s.live_sessions.c.id.not_in(list(keep))))
        return int(result.rowcount or 0)

    async def list_live_sessions(self) -> list[dict[str, Any]]:
        now = time.time()
        alive = select(s.replicas.c.id).where(s.replicas.c.heartbeat >= now - REPLICA_DEAD_AFTER)
        async with self._tx() as conn:
            rows = (await conn.execute(select(s.live_sessions).where(s.live_sessions.c.replica_id.in_(alive))
                                       .order_by(s.live_sessions.c.started))).mappings().all()
        return [dict(r) for r in rows]


    async def live_sessions_overview(self) -> list[dict[str, Any]]:
        """Live sessions of live replicas, with the replica's name and the number of approval
        requests each session has pending (for `bastion sessions ls`)."""
        now = time.time()
        async with self._tx() as conn:
            rows = (await conn.execute(
                select(s.live_sessions, s.replicas.c.name.label("replica_name"))
                .join(s.replicas, s.replicas.c.id == s.live_sessions.c.replica_id)
                .where(s.replicas.c.heartbeat >= now - REPLICA_DEAD_AFTER)
                .order_by(s.live_sessions.c.started))).mappings().all()
            out = [dict(r) for r in rows]
            if out:
                counted = (await conn.execute(
                    select(s.approval_requests.c.session_id, func.count())
                    .where(and_(s.approval_requests.c.status == "pending",
                                s.approval_requests.c.session_id.in_([r["id"] for r in out])))
                    .group_by(s.approval_requests.c.session_id))).all()
                pending: dict[str, int] = {str(sid): int(n) for sid, n in counted}
                for r in out:
                    r["pending_approvals"] = int(pending.get(r["id"], 0))
        return out

    async def get_live_session(self, session_id: str) -> dict[str, Any] | None:
        now = time.time()
        alive = select(s.replicas.c.id).where(s.replicas.c.heartbeat >= now - REPLICA_DEAD_AFTER)
        async with self._tx() as conn:
            row = (await conn.execute(select(s.live_sessions).where(and_(
                s.live_sessions.c.id == session_id, s.live_sessions.c.replica_id.in_(alive))))).mappings().first()
        return dict(row) if row is not None else None

    # -- locks and session kills (issue 8) ----------------------------------------------------
    # A kill is a lock of kind "session" on one session id, short-lived: it travels to the
    # replica holding the session by the same topic (and poll) as every lock.

    async def create_lock(self, kind: str, value: str, reason: str, created_by: dict[str, Any],
                          until: float | None = None) -> dict[str, Any]:
        values: dict[str, Any] = {"kind": kind, "value": value, "reason": reason, "created_by": created_by,
                                  "created": time.time(), "until": until, "removed": None}
        for _ in range(5):
            values["id"] = new_id()
            try:
                async with self._tx() as conn:
                    await conn.execute(insert(s.locks).values(**values))
                    await self._notify(conn, LOCKS_TOPIC)
                break
            except IntegrityError:
                continue
        else:
            raise StateError("could not allocate a lock id")
        self.publish_local(LOCKS_TOPIC)
        return dict(values)

    async def get_lock(self, lock_id: str) -> dict[str, Any] | None:
        async with self._tx() as conn:
            row = (await conn.execute(select(s.locks).where(s.locks.c.id == lock_id))).mappings().first()
        return dict(row) if row is not None else None

    async def active_locks(self) -> list[dict[str, Any]]:
        """Locks in force now (kills included): not removed, and not past their ``until``."""
        now = time.time()
        async with self._tx() as conn:
            rows = (await conn.execute(select(s.locks).where(and_(
                s.locks.c.removed.is_(None), or_(s.locks.c.until.is_(None), s.locks.c.until > now)))
                .order_by(s.locks.c.created))).mappings().all()
        return [dict(r) for r in rows]

    async def list_locks(self, include_inactive: bool = False, limit: int = 500) -> list[dict[str, Any]]:
        """Locks (never kills), newest first; by default only those in force."""
        query = select(s.locks).where(s.locks.c.kind != "session").order_by(s.locks.c.created.desc()).limit(limit)
        if not include_inactive:
            now = time.time()
            query = query.where(and_(s.locks.c.removed.is_(None),
                                     or_(s.locks.c.until.is_(None), s.locks.c.until > now)))
        async with self._tx() as conn:
            return [dict(r) for r in (await conn.execute(query)).mappings().all()]

    async def remove_lock(self, lock_id: str) -> dict[str, Any]:
        """Lift a lock. Raises NotFound, or Conflict when it was already lifted."""
        async with self._tx() as conn:
            row = (await conn.execute(select(s.locks).where(and_(s.locks.c.id == lock_id,
                                                                 s.locks.c.kind != "session")))).mappings().first()
            if row is None:
                raise StateNotFound(f"no lock {lock_id!r}")
            if row["removed"] is not None:
                raise Conflict(f"lock {lock_id} was already lifted")
            now = time.time()
            await conn.execute(update(s.locks).where(s.locks.c.id == lock_id).values(removed=now))
            await self._notify(conn, LOCKS_TOPIC)
        self.publish_local(LOCKS_TOPIC)
        return {**dict(row), "removed": now}

    async def subject_seen(self, subject: str) -> bool:
        """Has this subject ever had a session or a request here (as far as the state knows)?"""
        async with self._tx() as conn:
            for column in (s.live_sessions.c.subject, s.commands.c.subject, s.approval_requests.c.requester_subject):
                found = (await conn.execute(select(column).where(column == subject).limit(1))).first()
                if found is not None:
                    return True
        return False


def _decision(row: Any) -> dict[str, Any]:
    return {"approver": dict(row["approver"]), "decision": row["decision"], "reason": row["reason"],
            "created": row["created"]}


def _sqlite_setup(engine: AsyncEngine) -> None:
    """WAL, a busy timeout, and ``BEGIN IMMEDIATE`` so that a read-then-write transaction
    (a decision) holds the write lock from its first statement: no lost updates."""

    @sa_event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @sa_event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
